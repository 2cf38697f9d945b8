#!/usr/bin/env bash
# Why: run one command with a Docker engine and always put the host back afterwards. `docker.sh up` provides the
# engine (the one that answers, or a private dockerd); `docker.sh down` runs on every exit, Ctrl-C included, and
# stops the private engine once no other with-docker.sh still uses it. Exits with the command's status.
#
#   bash hack/kind/with-docker.sh CMD [ARGS...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(($#)) || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }

# this shell's pid names its hold on the engine; a holder that dies without `down` stops counting
trap 'BEACON_DOCKER_LEASE=$$ bash "$here/docker.sh" down || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

engine_env=$(BEACON_DOCKER_LEASE=$$ bash "$here/docker.sh" up)
eval "$engine_env"

rc=0
"$@" || rc=$?
exit "$rc"
