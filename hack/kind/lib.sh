#!/usr/bin/env bash
# Shared by the scripts under hack/kind/ (sourced, never run): names, versions, the cache directory and the
# address plan, so every script agrees on where things live and which addresses they may use.
#
# Address plan. Everything beacon's tests, demo, benchmarks and kind runs use lies in 198.18.0.0/15 (RFC 2544),
# never in 10/8, 172.16/12 or 192.168/16:
#   198.18.0.0/16     test hosts (beacon_dev.testhosts), nothing else
#   198.19.0.0/24     the private Docker engine's default bridge (bip)
#   198.19.1.0/24     the docker network `kind` (created before `kind create cluster`, which reuses it)
#   198.19.16.0/20    the private Docker engine's default-address-pools (/24 each)
#   198.19.64.0/20    the local control plane's Service range
#   198.19.224.0/20   kind pod subnet
#   198.19.240.0/22   kind Service subnet

# shellcheck disable=SC2034  # the variables below are used by the scripts that source this file
here_kind=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$here_kind/../.." && pwd)
# shellcheck source=/dev/null
. "$repo_root/tools/k8s/versions.env"

KIND_VERSION=${KIND_VERSION:-v0.33.0}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
BEACON_CACHE=${BEACON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/beacon}
BEACON_IMAGE_PREFIX=${BEACON_IMAGE_PREFIX:-beacon-kind}

KIND_NETWORK_SUBNET=198.19.1.0/24
KIND_NETWORK_GATEWAY=198.19.1.1
DOCKER_BIP=198.19.0.1/24
DOCKER_POOL_BASE=198.19.16.0/20
KIND_POD_SUBNET=198.19.224.0/20
KIND_SERVICE_SUBNET=198.19.240.0/22

# kind_say COMPONENT MESSAGE...: progress on stderr, so stdout stays for values a caller captures
kind_say() {
  local who=$1
  shift
  printf '[%s] %s\n' "$who" "$*" >&2
}
kind_die() {
  local who=$1
  shift
  printf '[%s] error: %s\n' "$who" "$*" >&2
  exit 1
}
# GOPROXY without the `direct` fallback: builds reach the module proxy only
kind_goproxy() { go env GOPROXY | cut -d, -f1; }
