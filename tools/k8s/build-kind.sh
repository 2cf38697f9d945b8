#!/usr/bin/env bash
# Builds the binaries an offline kind node image needs beyond the local control plane's (build.sh):
# kubelet, kubeadm, kube-scheduler and kube-proxy from the kube/ wrapper module, CoreDNS with the plugins
# kubeadm's Corefile uses (coredns-kind/), and a static pause (hack/kind/node/pause.c). Cached outside the repo,
# keyed by the pinned versions, the Go and C compilers and the sources, so every clone on this machine reuses one
# build. Prints the bin directory on its last line.
#
# Why: no image registry is reachable here, so kind's node image and kubeadm's component images are assembled
# from binaries built locally. The kube binaries use build.sh's version stamping (lib.sh), and go's build cache
# shares the compile of every package they have in common with the control plane.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
who=kind-bin
pause_src="$here/../../hack/kind/node/pause.c"
# shellcheck source=tools/k8s/lib.sh
. "$here/lib.sh"
command -v gcc >/dev/null 2>&1 || die "gcc is not on PATH (apt-get install gcc libc6-dev); it builds the static pause"

key_src=$( { cat "$here/versions.env" "$here/lib.sh" "$here/build-kind.sh" "$here/kube/go.mod" "$here/kube/go.sum" \
  "$here/coredns-kind/go.mod" "$here/coredns-kind/go.sum" "$here/coredns-kind/main.go" "$pause_src"; \
  gcc --version | head -n1; } | sha256sum | cut -c1-12)
bin="$cache_root/kind-bin/k8s-${KUBERNETES_VERSION}_coredns-${COREDNS_VERSION}_${goversion}_${key_src}"
open_cache "$bin"

build "kubelet, kubeadm, kube-scheduler, kube-proxy ${KUBERNETES_VERSION}" kube "$(kube_ldflags)" "$bin/" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy

read -r coredns_commit _ < <(origin coredns-kind "github.com/coredns/coredns@${COREDNS_VERSION}")
build "coredns ${COREDNS_VERSION} with kubeadm's plugins" coredns-kind \
  "-X github.com/coredns/coredns/coremain.GitCommit=${coredns_commit:0:10}" "$bin/coredns" .

say "building the static pause"
gcc -static -O2 -s -Wall -o "$bin/pause" "$pause_src" || die "gcc -static failed (is libc6-dev installed?)"

close_cache "$bin" kubelet kubeadm kube-scheduler kube-proxy coredns pause
