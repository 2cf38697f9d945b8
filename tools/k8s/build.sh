#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, kube-controller-manager, kubectl, etcd, CoreDNS) from Go modules
# and caches the binaries outside the repo, keyed by the pinned versions, the Go version and the wrapper modules'
# contents, so every clone on this machine reuses one build. Prints the bin directory on its last line.
#
# Why a script and not `go install pkg@version`: k8s.io/kubernetes has replace directives, which `go install`
# refuses; the wrapper modules in this folder pin everything instead (see sync-gomod.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
. "$here/versions.env"

say() { printf '[control-plane] %s\n' "$*" >&2; }
die() { printf '[control-plane] error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "the Go toolchain is not on PATH; install Go >= 1.26 (kube ${KUBERNETES_VERSION} needs it)"
goversion=$(go env GOVERSION)
case "$goversion" in
  go1.2[6-9]*|go1.[3-9]*) ;;
  *) die "Go ${goversion} is too old: kube ${KUBERNETES_VERSION} and CoreDNS ${COREDNS_VERSION} need go1.26 or newer" ;;
esac

key_src=$(cat "$here/versions.env" "$here/build.sh" "$here"/*/go.mod "$here"/*/go.sum "$here"/*/main.go | sha256sum | cut -c1-12)
cache_root=${BEACON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/beacon}
bin="$cache_root/control-plane/k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_coredns-${COREDNS_VERSION}_${goversion}_${key_src}"
wanted="kube-apiserver kube-controller-manager kubectl etcd coredns"

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

export GOFLAGS="-trimpath -mod=readonly -buildvcs=false"
export CGO_ENABLED=0

build() {  # build NAME MODULE_DIR LDFLAGS PACKAGES...
  local name=$1 dir=$2 ldflags=$3; shift 3
  local t0; t0=$(date +%s)
  say "building ${name} (cold builds take minutes; go's own cache makes rebuilds fast)"
  (cd "$here/$dir" && go build -ldflags "-s -w ${ldflags}" -o "$bin/" "$@") \
    || die "go build of ${name} failed (module proxy unreachable, or the pinned version does not build with ${goversion}); see the output above"
  say "built ${name} in $(( $(date +%s) - t0 ))s"
}

read -r kube_commit kube_time < <(origin "k8s.io/kubernetes@${KUBERNETES_VERSION}")
kube_minor=${KUBERNETES_VERSION#v1.}; kube_minor=${kube_minor%%.*}
kube_ld=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ld+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${kube_minor}"
  kube_ld+=" -X ${pkg}.gitCommit=${kube_commit} -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${kube_time}"
done
build "kube-apiserver, kube-controller-manager, kubectl ${KUBERNETES_VERSION}" kube "$kube_ld" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl

read -r etcd_commit _ < <(origin "go.etcd.io/etcd/server/v3@${ETCD_VERSION}")
build "etcd ${ETCD_VERSION}" etcd "-X go.etcd.io/etcd/api/v3/version.GitSHA=${etcd_commit:0:10}" .

read -r coredns_commit _ < <(origin "github.com/coredns/coredns@${COREDNS_VERSION}")
build "coredns ${COREDNS_VERSION}" coredns "-X github.com/coredns/coredns/coremain.GitCommit=${coredns_commit:0:10}" .

for b in $wanted; do [ -x "$bin/$b" ] || die "expected binary $b is missing from $bin"; done
touch "$bin/.complete"
say "ready: $bin"
echo "$bin"
