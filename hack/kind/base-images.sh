#!/usr/bin/env bash
# Why: no image registry is reachable here, so even the base images that kind, kube-proxy and the operator build on
# are made locally, from Debian's packages: a Debian base from debootstrap (`docker import`), and on top of it, with
# recipes under hack/kind/base/, the kind node base, a stand-in for python:3.11-slim-bookworm and kube-proxy's
# base. Each tag carries a short key of its recipe (and of its parent's tag), so a changed recipe rebuilds and an
# unchanged one is reused from the Docker store. Needs a Docker engine (see docker.sh / with-docker.sh).
#
# Prints, on stdout, KEY=VALUE lines for `eval`: BEACON_DEBIAN_IMAGE, BEACON_NODE_BASE_IMAGE, BEACON_PYTHON_IMAGE,
# BEACON_PROXY_BASE_IMAGE. Progress and timings go to stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
. "$here/lib.sh"

BASE_DIR=$here/base
IMAGE_PREFIX=${BEACON_IMAGE_PREFIX:-beacon-kind}
DEBOOTSTRAP_VARIANT=minbase
export DOCKER_BUILDKIT=0
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

say() { kind_say bases "$@"; }

docker info >/dev/null 2>&1 || kind_die bases "no Docker engine answers (run under hack/kind/with-docker.sh)"

# one builder at a time: a second caller waits, then finds the tags
mkdir -p "$BEACON_CACHE"
exec 9>"$BEACON_CACHE/base-images.lock"
flock -w 3600 9 || kind_die bases "timed out waiting for $BEACON_CACHE/base-images.lock"

# key ITEM...: a short hash over strings and over the files of directories (names and contents)
key() {
  local item
  for item in "$@"; do
    if [[ -d $item ]]; then
      (cd "$item" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
      (cd "$item" && find . -type f -perm -u+x -print | LC_ALL=C sort)
    else
      printf '%s\n' "$item"
    fi
  done | sha256sum | cut -c1-12
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirrors apt on this machine already uses, as apt itself resolves its sources:
# "<main mirror> <security mirror or ->". BEACON_DEBIAN_MIRROR overrides the main one.
debian_mirrors() {
  local targets main security
  # shellcheck disable=SC2016 # $(...) is apt's format syntax, not the shell's
  targets=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null | sort -u)
  main=${BEACON_DEBIAN_MIRROR:-$(awk -v s="$DEBIAN_SUITE" '$2 == s {print $1; exit}' <<<"$targets")}
  security=$(awk -v s="$DEBIAN_SUITE-security" '$2 == s {print $1; exit}' <<<"$targets")
  [[ -n $main ]] || kind_die bases "apt has no source for $DEBIAN_SUITE; set BEACON_DEBIAN_MIRROR to a Debian mirror"
  echo "${main%/} ${security:--}"
}

# unmount whatever a failed debootstrap left mounted inside DIR, then remove DIR
remove_rootfs() {
  local dir=$1 mnt
  [[ -d $dir ]] || return 0
  while read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done < <(awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
  rm -rf --one-file-system "$dir"
}

build_debian() {
  local tag=$1 mirrors mirror security work rootfs include=()
  mirrors=$(debian_mirrors)
  read -r mirror security <<<"$mirrors"
  command -v debootstrap >/dev/null || {
    say "installing debootstrap with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y --no-install-recommends \
      debootstrap >&2
  }
  work=$(mktemp -d "${TMPDIR:-/tmp}/beacon-debootstrap.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap must remove this directory even after work is reassigned
  trap "remove_rootfs '$work'" EXIT
  rootfs=$work/rootfs
  [[ $mirror == https:* ]] && include=(--include=ca-certificates)
  mkdir -p "$BEACON_CACHE/debootstrap-debs"
  say "debootstrap --variant=$DEBOOTSTRAP_VARIANT $DEBIAN_SUITE from $mirror"
  debootstrap --variant="$DEBOOTSTRAP_VARIANT" "${include[@]}" --cache-dir="$BEACON_CACHE/debootstrap-debs" \
    "$DEBIAN_SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    kind_die bases "debootstrap failed"
  }
  {
    echo "deb $mirror $DEBIAN_SUITE main"
    echo "deb $mirror $DEBIAN_SUITE-updates main"
    [[ $security == - ]] || echo "deb ${security%/} $DEBIAN_SUITE-security main"
  } >"$rootfs/etc/apt/sources.list"
  cp -a "$BASE_DIR/debian/rootfs/." "$rootfs/"
  # what the image settings above keep out of later installs, out of the base too; no host identity or caches
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,lintian}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log "$rootfs"/tmp/* "$rootfs"/etc/hostname
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  : >"$rootfs/etc/resolv.conf"
  rm -f "$rootfs/etc/machine-id" && : >"$rootfs/etc/machine-id"
  say "docker import $tag"
  tar -C "$rootfs" --numeric-owner --xattrs --xattrs-include='security.capability' -c . |
    docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
      --message "debootstrap --variant=$DEBOOTSTRAP_VARIANT $DEBIAN_SUITE" - "$tag" >/dev/null
  remove_rootfs "$work"
  trap - EXIT
}

# build_from NAME TAG PARENT: docker build of hack/kind/base/NAME on PARENT; apt inside reaches Debian's mirror
# over the host's network (and no proxy)
build_from() {
  local name=$1 tag=$2 parent=$3 log
  log=$(mktemp "${TMPDIR:-/tmp}/beacon-build-$name.XXXXXX")
  if ! docker build --network host --force-rm --build-arg "BASE_IMAGE=$parent" \
    --label "dev.beacon.recipe=$name" -t "$tag" "$BASE_DIR/$name" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    kind_die bases "docker build of $name failed"
  fi
  rm -f "$log"
}

# ensure VAR NAME TAG BUILD...: reuse TAG when the store has it, else build it (timed); remember VAR=TAG
outputs=()
ensure() {
  local var=$1 name=$2 tag=$3 start
  shift 3
  if have_image "$tag"; then
    say "$name: $tag (cached)"
  else
    say "$name: building $tag"
    start=$SECONDS
    "$@"
    say "$name: built $tag in $((SECONDS - start))s"
  fi
  outputs+=("$var=$tag")
}

total=$SECONDS
# the Debian base's recipe: the debootstrap call and the rootfs tweaks (this script's build_debian) and base/debian/
debian_tag=$IMAGE_PREFIX/debian:$DEBIAN_SUITE-$(key "$DEBOOTSTRAP_VARIANT $DEBIAN_SUITE" "$(declare -f build_debian)" \
  "$BASE_DIR/debian")
ensure BEACON_DEBIAN_IMAGE debian "$debian_tag" build_debian "$debian_tag"

for spec in node:BEACON_NODE_BASE_IMAGE:node-base python:BEACON_PYTHON_IMAGE:python \
  kube-proxy:BEACON_PROXY_BASE_IMAGE:kube-proxy-base; do
  IFS=: read -r dir var repo <<<"$spec"
  tag=$IMAGE_PREFIX/$repo:$DEBIAN_SUITE-$(key "$debian_tag" "$BASE_DIR/$dir")
  ensure "$var" "$repo" "$tag" build_from "$dir" "$tag" "$debian_tag"
done
say "base images ready in $((SECONDS - total))s"
printf '%s\n' "${outputs[@]}"
