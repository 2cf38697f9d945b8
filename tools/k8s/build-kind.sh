#!/usr/bin/env bash
# Builds the binaries an offline kind node image needs beyond the local control plane's (build.sh):
# kubelet, kubeadm, kube-scheduler and kube-proxy from the kube/ wrapper module, CoreDNS with the plugins
# kubeadm's Corefile uses (coredns-kind/), and a static pause (hack/kind/node/pause.c). Cached outside the repo,
# keyed by the pinned versions, the Go and C compilers and the sources, so every clone on this machine reuses one
# build. Prints the bin directory on its last line.
#
# Why: no image registry is reachable here, so kind's node image and kubeadm's component images are assembled
# from binaries built locally. The kube binaries use build.sh's version stamping, and go's build cache shares
# the compile of every package they have in common with the control plane.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pause_src="$here/../../hack/kind/node/pause.c"
# shellcheck source=/dev/null
. "$here/versions.env"

say() { printf '[kind-bin] %s\n' "$*" >&2; }
die() { printf '[kind-bin] error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "the Go toolchain is not on PATH; install Go >= 1.26 (kube ${KUBERNETES_VERSION} needs it)"
command -v gcc >/dev/null 2>&1 || die "gcc is not on PATH (apt-get install gcc libc6-dev); it builds the static pause"
goversion=$(go env GOVERSION)
case "$goversion" in
  go1.2[6-9]*|go1.[3-9]*) ;;
  *) die "Go ${goversion} is too old: kube ${KUBERNETES_VERSION} and CoreDNS ${COREDNS_VERSION} need go1.26 or newer" ;;
esac

key_src=$( { cat "$here/versions.env" "$here/build-kind.sh" "$here/kube/go.mod" "$here/kube/go.sum" \
  "$here/coredns-kind/go.mod" "$here/coredns-kind/go.sum" "$here/coredns-kind/main.go" "$pause_src"; \
  gcc --version | head -n1; } | sha256sum | cut -c1-12)
cache_root=${BEACON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/beacon}
bin="$cache_root/kind-bin/k8s-${KUBERNETES_VERSION}_coredns-${COREDNS_VERSION}_${goversion}_${key_src}"
wanted="kubelet kubeadm kube-scheduler kube-proxy coredns pause"

if [ -f "$bin/.complete" ]; then
  say "cached: $bin"
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
exec 9>"$bin/.lock"
flock 9   # a second clone building at the same time waits for this one instead of racing it
if [ -f "$bin/.complete" ]; then say "cached: $bin"; echo "$bin"; exit 0; fi

# origin MODULE@VERSION -> "<commit-hash or none> <commit-time RFC3339>" as the module proxy records them
origin() {
  (cd "$here/kube" && go list -m -json "$1") | python3 -c '
import json, sys
info = json.load(sys.stdin)
origin = info.get("Origin") or {}
print(origin.get("Hash") or "none", info.get("Time", "1970-01-01T00:00:00Z"))'
}

GOPROXY=$(go env GOPROXY | cut -d, -f1)   # the module proxy only, never `direct`
export GOPROXY
export GOFLAGS="-trimpath -mod=readonly -buildvcs=false"
export CGO_ENABLED=0

build() {  # build NAME MODULE_DIR LDFLAGS OUTPUT PACKAGES...  (OUTPUT: a file, or a directory ending in /)
  local name=$1 dir=$2 ldflags=$3 out=$4; shift 4
  local t0; t0=$(date +%s)
  say "building ${name} (cold builds take minutes; go's own cache makes rebuilds fast)"
  (cd "$here/$dir" && go build -ldflags "-s -w ${ldflags}" -o "$out" "$@") \
    || die "go build of ${name} failed (module proxy unreachable, or the pinned version does not build with ${goversion}); see the output above"
  say "built ${name} in $(( $(date +%s) - t0 ))s"
}

# the same version stamping as build.sh, so `kubeadm version`, `kubelet --version` and the Node's kubeletVersion
# report the pinned release
read -r kube_commit kube_time < <(origin "k8s.io/kubernetes@${KUBERNETES_VERSION}")
kube_minor=${KUBERNETES_VERSION#v1.}; kube_minor=${kube_minor%%.*}
kube_ld=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ld+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${kube_minor}"
  kube_ld+=" -X ${pkg}.gitCommit=${kube_commit} -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${kube_time}"
done
build "kubelet, kubeadm, kube-scheduler, kube-proxy ${KUBERNETES_VERSION}" kube "$kube_ld" "$bin/" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy

read -r coredns_commit _ < <(cd "$here/coredns-kind" && go list -m -json "github.com/coredns/coredns@${COREDNS_VERSION}" \
  | python3 -c 'import json, sys; print((json.load(sys.stdin).get("Origin") or {}).get("Hash") or "none")')
build "coredns ${COREDNS_VERSION} with kubeadm's plugins" coredns-kind \
  "-X github.com/coredns/coredns/coremain.GitCommit=${coredns_commit:0:10}" "$bin/coredns" .

say "building the static pause"
gcc -static -O2 -s -Wall -o "$bin/pause" "$pause_src" || die "gcc -static failed (is libc6-dev installed?)"

for b in $wanted; do [ -x "$bin/$b" ] || die "expected binary $b is missing from $bin"; done
touch "$bin/.complete"
say "ready: $bin"
echo "$bin"
