#!/usr/bin/env bash
# Builds the operator image IMG (default beacon:dev) from the repo's Dockerfile without any network inside the
# build, so it works where no image registry (and no package index) is reachable from a container:
#   - the legacy builder (DOCKER_BUILDKIT=0): BuildKit would fetch its Dockerfile frontend from a registry;
#   - `--network none`: every RUN step is offline, which proves nothing is downloaded in the build;
#   - beacon's dependencies (and setuptools/wheel to build beacon itself) come from a wheelhouse downloaded on the
#     host for CPython 3.11 on manylinux x86_64, cached under $BEACON_CACHE/wheelhouse/<key> (key = the dependency
#     list of pyproject.toml), and staged into the build context as wheels/ (the Dockerfile then installs with
#     pip --no-index);
#   - offline (KIND_OFFLINE=1 or a private engine, BEACON_DOCKER_PRIVATE=1), the base is the locally built
#     stand-in for the stock Python image: BEACON_PYTHON_IMAGE, from hack/kind/base-images.sh unless given.
# Otherwise the Dockerfile's default base is used (pulled by the engine if missing, as `docker build .` would).
# Progress goes to stderr; nothing is printed on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=/dev/null
. "$here/lib.sh"

IMG=${IMG:-beacon:dev}
PYTHON=${PYTHON:-python3}
say() { kind_say operator-image "$@"; }
die() { kind_die operator-image "$@"; }

offline=0
if [[ ${KIND_OFFLINE:-0} == 1 || ${BEACON_DOCKER_PRIVATE:-0} == 1 ]]; then offline=1; fi

command -v docker >/dev/null || die "docker is not on PATH"
"$PYTHON" -c 'import sys, tomllib; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null ||
  die "$PYTHON must be Python >= 3.11 (it reads pyproject.toml with tomllib)"

# --- the base image -------------------------------------------------------------------------------------------
build_args=()
if [[ -z ${BEACON_PYTHON_IMAGE:-} && $offline == 1 ]]; then
  say "offline: building (or reusing) the local base images"
  bases=$(bash "$here/base-images.sh")
  while IFS='=' read -r key value; do
    if [[ $key == BEACON_PYTHON_IMAGE ]]; then BEACON_PYTHON_IMAGE=$value; fi
  done <<<"$bases"
  [[ -n ${BEACON_PYTHON_IMAGE:-} ]] || die "hack/kind/base-images.sh printed no BEACON_PYTHON_IMAGE"
fi
if [[ -n ${BEACON_PYTHON_IMAGE:-} ]]; then
  docker image inspect "$BEACON_PYTHON_IMAGE" >/dev/null 2>&1 || die "base image $BEACON_PYTHON_IMAGE is not in the engine"
  build_args+=(--build-arg "PYTHON_IMAGE=$BEACON_PYTHON_IMAGE")
  say "base image: $BEACON_PYTHON_IMAGE"
else
  say "base image: the Dockerfile's default"
fi

# --- the wheelhouse -------------------------------------------------------------------------------------------
# The requirements (runtime dependencies + the build backend) and the target, one per line; their hash is the key.
wheel_target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
requirements=$("$PYTHON" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    meta = tomllib.load(f)
for req in [*meta["project"]["dependencies"], *meta["build-system"]["requires"]]:
    print(req)
EOF
)
key=$(printf '%s\n' "$requirements" "${wheel_target[@]}" | cat - "$repo/constraints.txt" | sha256sum | cut -c1-16)
wheelhouse=$BEACON_CACHE/wheelhouse/$key
if [[ -f $wheelhouse/.complete ]]; then
  say "wheelhouse: reusing $wheelhouse ($(find "$wheelhouse" -name '*.whl' | wc -l) wheels)"
else
  say "wheelhouse: downloading wheels for CPython 3.11 / manylinux x86_64 into $wheelhouse"
  mkdir -p "$BEACON_CACHE/wheelhouse"
  partial=$(mktemp -d "$BEACON_CACHE/wheelhouse/.partial.XXXXXX")
  mapfile -t reqs <<<"$requirements"
  if ! "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-cache-dir --dest "$partial" \
    -c "$repo/constraints.txt" "${wheel_target[@]}" "${reqs[@]}" >&2; then
    rm -rf "$partial"
    die "pip download failed (the wheelhouse needs the package index once; later builds reuse the cache)"
  fi
  printf '%s\n' "$requirements" >"$partial/requirements.txt"
  touch "$partial/.complete"
  rm -rf "$wheelhouse"
  mv "$partial" "$wheelhouse"
  say "wheelhouse: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels"
fi

# --- the build context: what the Dockerfile copies, plus wheels/ --------------------------------------------
context=$(mktemp -d "${TMPDIR:-/tmp}/beacon-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
cp "$repo/Dockerfile" "$repo/.dockerignore" "$repo/pyproject.toml" "$repo/README.md" "$repo/constraints.txt" "$context/"
cp -r "$repo/operator" "$context/operator"
mkdir "$context/wheels"
cp "$wheelhouse"/*.whl "$context/wheels/"

say "building $IMG (legacy builder, --network none)"
started=$SECONDS
DOCKER_BUILDKIT=0 docker build --network none --force-rm "${build_args[@]}" -t "$IMG" "$context" >&2
say "built $IMG in $((SECONDS - started))s"
