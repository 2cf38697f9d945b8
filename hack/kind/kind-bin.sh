#!/usr/bin/env bash
# Prints the path of a kind binary at $KIND_VERSION (lib.sh), built once with `go install` through the Go module
# proxy and cached outside the repo. Why: kind's release binaries live on a host this machine may not reach, and
# the Go toolchain is already needed for the control plane, so a Go build is the one way that works everywhere.
set -euo pipefail
# shellcheck source=/dev/null
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"

command -v go >/dev/null 2>&1 || kind_die kind "the Go toolchain is not on PATH"
goversion=$(go env GOVERSION)
dir="$BEACON_CACHE/kind/${KIND_VERSION}_${goversion}"
if [ -x "$dir/kind" ]; then
  echo "$dir/kind"
  exit 0
fi

mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9   # a second caller waits for this build instead of racing it
if [ ! -x "$dir/kind" ]; then
  t0=$(date +%s)
  kind_say kind "building kind ${KIND_VERSION} with go install (once per machine)"
  GOBIN="$dir/.tmp" GOPROXY=$(kind_goproxy) GOFLAGS="-trimpath" CGO_ENABLED=0 \
    go install "sigs.k8s.io/kind@${KIND_VERSION}" \
    || kind_die kind "go install sigs.k8s.io/kind@${KIND_VERSION} failed (Go module proxy unreachable?)"
  mv "$dir/.tmp/kind" "$dir/kind"
  rmdir "$dir/.tmp"
  kind_say kind "built kind in $(( $(date +%s) - t0 ))s"
fi
echo "$dir/kind"
