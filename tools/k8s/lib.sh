#!/usr/bin/env bash
# Shared by build.sh (the local control plane) and build-kind.sh (kind's node binaries), sourced, never run: one
# Go check, one cache-directory protocol (version-keyed directory, flock, .complete marker), one module-proxy-only
# Go environment, one `go build` wrapper and one Kubernetes version stamping, so the two builds cannot drift apart.
# The caller sets `here` (this folder) and `who` (the log prefix) before sourcing it; `cache_root` and `goversion`
# are set here for the caller.
# shellcheck disable=SC2154,SC2034  # here/who come from the caller, cache_root is the caller's to use

# shellcheck source=/dev/null
. "$here/versions.env"

say() { printf '[%s] %s\n' "$who" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$who" "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "the Go toolchain is not on PATH; install Go >= 1.26 (kube ${KUBERNETES_VERSION} needs it)"
goversion=$(go env GOVERSION)
case "$goversion" in
  go1.2[6-9]*|go1.[3-9]*) ;;
  *) die "Go ${goversion} is too old: kube ${KUBERNETES_VERSION} and CoreDNS ${COREDNS_VERSION} need go1.26 or newer" ;;
esac
cache_root=${BEACON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/beacon}

# open_cache DIR: print DIR and exit if a build there completed; otherwise create it and hold its lock (a second
# clone building at the same time waits for this one instead of racing it), then check again
open_cache() {
  local dir=$1
  if [ -f "$dir/.complete" ]; then say "cached: $dir"; echo "$dir"; exit 0; fi
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  flock 9
  if [ -f "$dir/.complete" ]; then say "cached: $dir"; echo "$dir"; exit 0; fi
}

# close_cache DIR BINARY...: check every binary is there, mark the build complete and print DIR
close_cache() {
  local dir=$1 b; shift
  for b in "$@"; do [ -x "$dir/$b" ] || die "expected binary $b is missing from $dir"; done
  touch "$dir/.complete"
  say "ready: $dir"
  echo "$dir"
}

# origin MODULE_DIR MODULE@VERSION -> "<commit-hash or none> <commit-time RFC3339>" as the module proxy records them
origin() {
  (cd "$here/$1" && go list -m -json "$2") | python3 -c '
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

# kube_ldflags: the version stamping of a Kubernetes release build, so `--version`, `kubeadm version` and a Node's
# kubeletVersion report the pinned release
kube_ldflags() {
  local commit time minor pkg ld=""
  read -r commit time < <(origin kube "k8s.io/kubernetes@${KUBERNETES_VERSION}")
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
    ld+=" -X ${pkg}.gitCommit=${commit} -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${time}"
  done
  echo "$ld"
}
