#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, kube-controller-manager, kubectl, etcd, CoreDNS) from Go modules
# and caches the binaries outside the repo, keyed by the pinned versions, the Go version and the wrapper modules'
# contents, so every clone on this machine reuses one build. Prints the bin directory on its last line.
#
# Why a script and not `go install pkg@version`: k8s.io/kubernetes has replace directives, which `go install`
# refuses; the wrapper modules in this folder pin everything instead (see sync-gomod.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
who=control-plane
# shellcheck source=tools/k8s/lib.sh
. "$here/lib.sh"

key_src=$(cat "$here/versions.env" "$here/lib.sh" "$here/build.sh" "$here"/{kube,etcd,coredns}/go.{mod,sum} \
  "$here"/{etcd,coredns}/main.go | sha256sum | cut -c1-12)
bin="$cache_root/control-plane/k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_coredns-${COREDNS_VERSION}_${goversion}_${key_src}"
open_cache "$bin"

build "kube-apiserver, kube-controller-manager, kubectl ${KUBERNETES_VERSION}" kube "$(kube_ldflags)" "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl

read -r etcd_commit _ < <(origin kube "go.etcd.io/etcd/server/v3@${ETCD_VERSION}")
build "etcd ${ETCD_VERSION}" etcd "-X go.etcd.io/etcd/api/v3/version.GitSHA=${etcd_commit:0:10}" "$bin/" .

read -r coredns_commit _ < <(origin kube "github.com/coredns/coredns@${COREDNS_VERSION}")
build "coredns ${COREDNS_VERSION}" coredns "-X github.com/coredns/coredns/coremain.GitCommit=${coredns_commit:0:10}" \
  "$bin/" .

close_cache "$bin" kube-apiserver kube-controller-manager kubectl etcd coredns
