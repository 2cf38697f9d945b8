#!/usr/bin/env bash
# Builds (or reuses) beacon's offline kind node image and prints `KIND_NODE_IMAGE=<tag>` on its last stdout line.
#
# Why: no image registry is reachable here, and `kind build node-image` fetches images even when they are
# present. So the node image is assembled by hand (see hack/kind/node/Dockerfile): kind's node base from
# base-images.sh, kind's own node files from its Go module, kubelet/kubeadm/kubectl, and kubeadm's component
# images under exactly the tags `kubeadm config images list` prints, built from locally compiled binaries and
# imported into containerd when the node boots. The tag carries a content key, so an unchanged recipe is reused.
#
# Needs a Docker engine (DOCKER_HOST as `hack/kind/docker.sh up` prints it): `make kind-image`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=/dev/null
. "$here/lib.sh"
export DOCKER_BUILDKIT=0   # BuildKit would fetch its frontend image from a registry

say() { kind_say node-image "$@"; }
die() { kind_die node-image "$@"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

NODE_REPO=${KIND_NODE_REPO:-beacon-kind-node}
t_all=$(date +%s)

command -v docker >/dev/null 2>&1 || die "no docker client on PATH"
timeout 30 docker info >/dev/null 2>&1 \
  || die "no Docker engine answers; run: eval \"\$(bash hack/kind/docker.sh up)\" (or: make kind-image)"

# 1. bases (H1's base-images.sh prints KEY=VALUE lines; only BEACON_*_IMAGE keys are taken)
t0=$(date +%s)
bases=$(bash "$here/base-images.sh") || die "base-images.sh failed"
while IFS='=' read -r k v; do
  case "$k" in BEACON_*_IMAGE) export "$k=$v" ;; esac
done <<<"$bases"
[ -n "${BEACON_NODE_BASE_IMAGE:-}" ] && [ -n "${BEACON_PROXY_BASE_IMAGE:-}" ] \
  || die "base-images.sh did not print BEACON_NODE_BASE_IMAGE and BEACON_PROXY_BASE_IMAGE"
say "bases ready in $(elapsed "$t0"): node base $BEACON_NODE_BASE_IMAGE, kube-proxy base $BEACON_PROXY_BASE_IMAGE"

# 2. binaries: the local control plane's (kube-apiserver, kube-controller-manager, kubectl, etcd) and the rest
t0=$(date +%s)
cp_bin=$(bash "$root/tools/k8s/build.sh" | tail -n1)
kind_bin=$(bash "$root/tools/k8s/build-kind.sh" | tail -n1)
for b in "$cp_bin"/{kube-apiserver,kube-controller-manager,kubectl,etcd} \
  "$kind_bin"/{kubelet,kubeadm,kube-scheduler,kube-proxy,coredns,pause}; do
  [ -x "$b" ] || die "missing binary $b"
done
say "binaries ready in $(elapsed "$t0")"

# 3. kind's node files, from its module in the Go module cache (never committed to this repo)
kind_src=$(GOPROXY=$(kind_goproxy) go mod download -json "sigs.k8s.io/kind@${KIND_VERSION}" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') \
  || die "cannot download sigs.k8s.io/kind@${KIND_VERSION} into the Go module cache"
kind_files="$kind_src/images/base/files"
[ -f "$kind_files/usr/local/bin/entrypoint" ] || die "kind's node files are missing under $kind_files"

# 4. the component images kubeadm will ask for, by name
images=$("$kind_bin/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION" 2>/dev/null) \
  || die "kubeadm config images list failed"
image_for() {  # image_for NAME: kubeadm's tag for component NAME (last path element before the tag)
  local img
  img=$(awk -v n="$1" '{ s = $0; sub(/:[^:\/]*$/, "", s); k = split(s, p, "/"); if (p[k] == n) print $0 }' <<<"$images")
  [ -n "$img" ] || die "kubeadm lists no image for $1: $images"
  echo "$img"
}
img_apiserver=$(image_for kube-apiserver)
img_controller=$(image_for kube-controller-manager)
img_scheduler=$(image_for kube-scheduler)
img_proxy=$(image_for kube-proxy)
img_etcd=$(image_for etcd)
img_coredns=$(image_for coredns)
img_pause=$(image_for pause)

image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null; }
node_base_id=$(image_id "$BEACON_NODE_BASE_IMAGE") || die "image $BEACON_NODE_BASE_IMAGE is not in the Docker store"
proxy_base_id=$(image_id "$BEACON_PROXY_BASE_IMAGE") || die "image $BEACON_PROXY_BASE_IMAGE is not in the Docker store"

# the content key: recipe (this script and hack/kind/node/), inputs (bases, binaries, kind's files) and tags
key=$( { cat "$0" "$here"/node/*; echo "$node_base_id $proxy_base_id ${cp_bin##*/} ${kind_bin##*/}";
  echo "$KIND_VERSION $KUBERNETES_VERSION"; echo "$images"; } | sha256sum | cut -c1-12)
tag="$NODE_REPO:${KUBERNETES_VERSION}-${key}"
if image_id "$tag" >/dev/null; then
  say "cached: $tag"
  echo "KIND_NODE_IMAGE=$tag"
  exit 0
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/beacon-node-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# 5. component images. Each carries the key of its inputs as a label, so an unchanged one is not rebuilt.
current() {  # current TAG KEY: true when TAG exists and was built from KEY
  [ "$(docker image inspect -f '{{index .Config.Labels "beacon.key"}}' "$1" 2>/dev/null)" = "$2" ]
}
scratch_image() {  # scratch_image TAG BINARY PATH_IN_IMAGE [ENTRYPOINT]: the binary, passwd/group/tmp, no base
  local tag=$1 binary=$2 dest=$3 entry=${4:-} root ikey
  # a cached binary never changes (its directory name is its key), so its path stands for its content
  ikey=$( { echo "$binary $dest $entry"; cat "$0"; } | sha256sum | cut -c1-12)
  if current "$tag" "$ikey"; then say "  $tag: up to date"; return; fi
  root="$stage/scratch-root"
  rm -rf "$root"; mkdir -p "$root/etc" "$root/tmp" "$(dirname "$root/$dest")"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  cp "$binary" "$root/$dest"
  local changes=(--change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' --change "LABEL beacon.key=$ikey")
  [ -z "$entry" ] || changes+=(--change "ENTRYPOINT [\"$entry\"]")
  tar -C "$root" --owner=0 --group=0 --numeric-owner -cf - . | docker import "${changes[@]}" - "$tag" >/dev/null
  say "  $tag: built"
}
t0=$(date +%s)
say "building the component images"
scratch_image "$img_apiserver" "$cp_bin/kube-apiserver" usr/local/bin/kube-apiserver
scratch_image "$img_controller" "$cp_bin/kube-controller-manager" usr/local/bin/kube-controller-manager
scratch_image "$img_scheduler" "$kind_bin/kube-scheduler" usr/local/bin/kube-scheduler
scratch_image "$img_etcd" "$cp_bin/etcd" usr/local/bin/etcd
scratch_image "$img_coredns" "$kind_bin/coredns" coredns /coredns
scratch_image "$img_pause" "$kind_bin/pause" pause /pause
proxy_key=$( { echo "$kind_bin/kube-proxy $proxy_base_id"; cat "$here/node/Dockerfile.kube-proxy"; } | sha256sum | cut -c1-12)
if current "$img_proxy" "$proxy_key"; then
  say "  $img_proxy: up to date"
else
  mkdir -p "$stage/proxy"
  cp "$kind_bin/kube-proxy" "$here/node/Dockerfile.kube-proxy" "$stage/proxy/"
  docker build -f "$stage/proxy/Dockerfile.kube-proxy" --build-arg "BASE_IMAGE=$BEACON_PROXY_BASE_IMAGE" \
    --label "beacon.key=$proxy_key" -t "$img_proxy" "$stage/proxy" >&2 || die "docker build of $img_proxy failed"
  rm -rf "$stage/proxy"
  say "  $img_proxy: built"
fi
mkdir -p "$stage/images"
docker save -o "$stage/images/components.tar" "$img_apiserver" "$img_controller" "$img_scheduler" "$img_proxy" \
  "$img_etcd" "$img_coredns" "$img_pause"
say "component images ready in $(elapsed "$t0") ($(du -sh "$stage/images/components.tar" | cut -f1) saved)"

# 6. the build context: binaries, kind's node files, beacon's node files
t0=$(date +%s)
mkdir -p "$stage/bin"
install -m 0755 "$kind_bin/kubelet" "$kind_bin/kubeadm" "$cp_bin/kubectl" "$stage/bin/"
r="$stage/rootfs"
install -d "$r/usr/local/bin" "$r/kind/bin" "$r/kind/manifests" "$r/etc/containerd" "$r/etc/default" \
  "$r/etc/sysctl.d" "$r/etc/systemd/system/kubelet.service.d"
# kind's entrypoint waits up to 5 s for a DNS answer about host.docker.internal, which an offline engine never
# gives; kind runs kubeadm on a cgroup v1 host without waiting for systemd, so shorten that wait to 1 s
sed 's/timeout 5 getent ahostsv4/timeout 1 getent ahostsv4/' "$kind_files/usr/local/bin/entrypoint" >"$r/usr/local/bin/entrypoint"
chmod 0755 "$r/usr/local/bin/entrypoint"
grep -q 'timeout 1 getent ahostsv4' "$r/usr/local/bin/entrypoint" || die "kind's entrypoint changed: no host.docker.internal lookup to shorten"
install -m 0755 "$kind_files"/kind/bin/*.sh "$r/kind/bin/"
install -m 0644 "$kind_files/kind/README.txt" "$r/kind/"
install -m 0644 "$kind_files/etc/crictl.yaml" "$r/etc/"
install -m 0644 "$kind_files/etc/default/kubelet" "$r/etc/default/"
install -m 0644 "$kind_files"/etc/sysctl.d/* "$r/etc/sysctl.d/"
for f in kubelet.service kubelet.slice undo-mount-hacks.service; do
  install -m 0644 "$kind_files/etc/systemd/system/$f" "$r/etc/systemd/system/"
done
install -m 0644 "$kind_files"/etc/systemd/system/kubelet.service.d/* "$r/etc/systemd/system/kubelet.service.d/"
# kind's containerd unit, for Debian's containerd: its binary path, no OOMScoreAdjust/Limit* (the host denies
# lowering the one and raising the others), and a closed proxy so that a missing image fails at once
sed -e 's|^ExecStart=.*|ExecStart=/usr/bin/containerd|' -e '/^OOMScoreAdjust=/d' -e '/^Limit[A-Z]*=/d' \
  -e '/^\[Service\]/a Environment="HTTP_PROXY=http://127.0.0.1:9" "HTTPS_PROXY=http://127.0.0.1:9" "NO_PROXY=localhost,127.0.0.1"' \
  "$kind_files/etc/systemd/system/containerd.service" >"$r/etc/systemd/system/containerd.service"
sed "s|@PAUSE_IMAGE@|$img_pause|" "$here/node/containerd-config.toml" >"$r/etc/containerd/config.toml"
chmod 0644 "$r/etc/systemd/system/containerd.service" "$r/etc/containerd/config.toml"
install -m 0644 "$here/node/beacon-import-images.service" "$here/node/beacon-cni.service" "$r/etc/systemd/system/"
install -m 0644 "$here/node/20-beacon-images.conf" "$r/etc/systemd/system/kubelet.service.d/"
install -m 0755 "$here/node/beacon-import-images" "$here/node/beacon-cni" "$r/usr/local/bin/"
install -m 0644 "$here/node/default-storage.yaml" "$r/kind/manifests/default-storage.yaml"
printf '%s' "$KUBERNETES_VERSION" >"$r/kind/version"
cp "$here/node/Dockerfile" "$stage/Dockerfile"

say "building $tag"
docker build --build-arg "BASE_IMAGE=$BEACON_NODE_BASE_IMAGE" --label "beacon.key=$key" -t "$tag" "$stage" >&2 \
  || die "docker build of the node image failed"
say "node image built in $(elapsed "$t0") ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"

# keep the store small: drop older node images nothing runs (a running cluster's image stays: rmi refuses it)
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' "$NODE_REPO"); do
  if [ "$old" != "$tag" ] && docker rmi "$old" >/dev/null 2>&1; then say "removed the older node image $old"; fi
done
say "done in $(elapsed "$t_all")"
echo "KIND_NODE_IMAGE=$tag"
