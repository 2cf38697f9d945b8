#!/usr/bin/env bash
# Creates or deletes the kind cluster beacon's kind targets use, offline or not:
#
#   bash hack/kind/cluster.sh create    KIND_CLUSTER (beacon), KIND_NODES (1|2), KIND_NODE_IMAGE, KIND_CONFIG,
#   bash hack/kind/cluster.sh delete    KIND_OFFLINE (1|0; unset: 1 when BEACON_DOCKER_PRIVATE=1), KIND_DNS_UPSTREAM
#
# Why: kind's defaults need an image registry (kindest/node, kindnetd, local-path-provisioner) and take their
# addresses from 10/8 and 172.16/12. Offline (no registry, the CI machines), the cluster runs the node image of
# hack/kind/node-image.sh on a pre-created docker network `kind` in 198.19.1.0/24, with the pod and Service
# subnets of lib.sh, no default CNI (each node's beacon-cni service writes a bridge config for its podCIDR and
# routes the other nodes' podCIDRs), kubelet allowed on cgroup v1, and CoreDNS answering cluster names only (its
# `forward` to the machine's resolver is removed unless KIND_DNS_UPSTREAM=1). Not offline, it is plain kind, as a
# user with internet gets it. KIND_CONFIG replaces the generated config (the offline node image still applies).
# `create` returns once every node is Ready and CoreDNS and kube-proxy are rolled out; kind writes the
# kubeconfig context kind-$KIND_CLUSTER as usual. `delete` removes the cluster, and the `kind` network if this
# script created it and nothing else uses it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
. "$here/lib.sh"

say() { kind_say cluster "$@"; }
die() { kind_die cluster "$@"; }

CLUSTER=${KIND_CLUSTER:-beacon}
NODES=${KIND_NODES:-1}
WAIT=${KIND_WAIT:-300}
if [[ -n ${KIND_OFFLINE:-} ]]; then offline=$KIND_OFFLINE
elif [[ ${BEACON_DOCKER_PRIVATE:-0} == 1 ]]; then offline=1
else offline=0; fi
NETWORK=kind
NET_LABEL=dev.beacon.kind-network   # marks a `kind` network this script created (delete removes only that one)
old_dns_pods=""

[[ $NODES =~ ^[1-9]$ ]] || die "KIND_NODES must be 1..9, not '$NODES'"
command -v docker >/dev/null 2>&1 || die "no docker client on PATH"
timeout 30 docker info >/dev/null 2>&1 \
  || die "no Docker engine answers; run: eval \"\$(bash hack/kind/docker.sh up)\" (or use hack/kind/with-docker.sh)"
KIND=${KIND:-$(bash "$here/kind-bin.sh")}

cluster_exists() { "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; }
control_plane() {
  docker ps --filter "label=io.x-k8s.kind.cluster=$CLUSTER" --filter label=io.x-k8s.kind.role=control-plane \
    --format '{{.Names}}' | sort | head -n1
}
# kubectl as cluster admin, inside the control-plane node: needs no kubectl, kubeconfig or port on this machine
kc() { docker exec -i "$cp" kubectl --kubeconfig=/etc/kubernetes/admin.conf --request-timeout=30s "$@"; }

network_ours() { [[ $(docker network inspect -f "{{index .Labels \"$NET_LABEL\"}}" "$NETWORK" 2>/dev/null) == 1 ]]; }
remove_network_if_ours() {
  network_ours || return 0
  if [[ $(docker network inspect -f '{{len .Containers}}' "$NETWORK") == 0 ]]; then
    docker network rm "$NETWORK" >/dev/null && say "removed docker network $NETWORK"
  else
    say "docker network $NETWORK still has containers (another cluster); kept"
  fi
}

# the docker network `kind` must lie in lib.sh's range: kind reuses an existing network of that name, and would
# otherwise make one in 172.16/12
ensure_network() {
  local subnets
  if subnets=$(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' "$NETWORK" 2>/dev/null); then
    for s in $subnets; do
      case $s in
        *:*) ;;
        "$KIND_NETWORK_SUBNET") ;;
        *) die "docker network $NETWORK exists with subnet $s, outside $KIND_NETWORK_SUBNET; remove it (docker network rm $NETWORK) once no cluster uses it" ;;
      esac
    done
    say "reusing docker network $NETWORK ($subnets)"
    return
  fi
  docker network create -d bridge --subnet "$KIND_NETWORK_SUBNET" --gateway "$KIND_NETWORK_GATEWAY" \
    -o com.docker.network.bridge.enable_ip_masquerade=true --label "$NET_LABEL=1" "$NETWORK" >/dev/null
  say "created docker network $NETWORK ($KIND_NETWORK_SUBNET)"
}

write_config() {  # write_config FILE
  local i
  {
    echo "kind: Cluster"
    echo "apiVersion: kind.x-k8s.io/v1alpha4"
    if ((offline == 1)); then
      cat <<EOF
networking:
  disableDefaultCNI: true
  podSubnet: "$KIND_POD_SUBNET"
  serviceSubnet: "$KIND_SERVICE_SUBNET"
kubeadmConfigPatches:
  - |
    kind: KubeletConfiguration
    failCgroupV1: false
    oomScoreAdj: 0
EOF
    fi
    echo "nodes:"
    for ((i = 0; i < NODES; i++)); do
      if ((i == 0)); then echo "  - role: control-plane"; else echo "  - role: worker"; fi
      if [[ -n $image ]]; then echo "    image: $image"; fi
    done
  } >"$1"
}

# nodes read other Nodes (podCIDRs for routes); 1.37's Node authorizer lets a node read only its own
grant_node_list() {
  kc apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: beacon:nodes-read-nodes
rules:
  - apiGroups: [""]
    resources: [nodes]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: beacon:nodes-read-nodes
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: beacon:nodes-read-nodes
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: Group
    name: system:nodes
EOF
  say "granted list/watch on Nodes to the group system:nodes (pod routes between nodes)"
}

# CoreDNS without `forward`: names outside the cluster fail at once instead of leaving the machine
dns_cluster_only() {
  local cm
  cm=$(kc -n kube-system get configmap coredns -o json | python3 -c '
import json, re, sys
cm = json.load(sys.stdin)
corefile = cm["data"]["Corefile"]
new = re.sub(r"\n[ \t]*forward[ \t]+\.[ \t]+[^\n{]*(\{[^}]*\})?[ \t]*(?=\n)", "", corefile)
if new == corefile:
    sys.exit(0)
cm["data"]["Corefile"] = new
for k in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
    cm["metadata"].pop(k, None)
print(json.dumps(cm))')
  if [[ -n $cm ]]; then
    kc replace -f - >/dev/null <<<"$cm"
    # new pods read the new Corefile at once (the reload plugin would take a minute or more, a rollout restart
    # half a minute); the rollout wait below starts once these are gone
    old_dns_pods=$(kc -n kube-system get pods -l k8s-app=kube-dns -o name | xargs)
    if [[ -n $old_dns_pods ]]; then
      # shellcheck disable=SC2086 # a list of pod names
      kc -n kube-system delete $old_dns_pods --wait=false >/dev/null
    fi
    say "CoreDNS answers cluster names only (forward removed; KIND_DNS_UPSTREAM=1 keeps it)"
  fi
}

diagnose() {
  say "diagnostics:"
  kc get nodes -o wide >&2 || true
  kc get pods -A -o wide >&2 || true
  kc get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 25 >&2 || true
}

create() {
  local t0 cfg rc image=${KIND_NODE_IMAGE:-} created_net=0 count
  t0=$(date +%s)
  cluster_exists && die "kind cluster $CLUSTER exists already (delete it: KIND_CLUSTER=$CLUSTER bash hack/kind/cluster.sh delete)"
  if ((offline == 1)); then
    if [[ -z $image ]]; then
      image=$(bash "$here/node-image.sh" | tail -n1)
      image=${image#KIND_NODE_IMAGE=}
    fi
    docker image inspect "$image" >/dev/null 2>&1 || die "node image $image is not in the Docker store (offline: nothing is pulled)"
    network_ours || docker network inspect "$NETWORK" >/dev/null 2>&1 || created_net=1
    ensure_network
  fi
  cfg=$(mktemp "${TMPDIR:-/tmp}/beacon-kind-config.XXXXXX")
  if [[ -n ${KIND_CONFIG:-} ]]; then
    cp "$KIND_CONFIG" "$cfg"
  else
    write_config "$cfg"
  fi
  local args=(create cluster --name "$CLUSTER" --config "$cfg" --wait "${WAIT}s")
  if [[ -n $image ]]; then args+=(--image "$image"); fi
  say "creating kind cluster $CLUSTER (offline=$offline, image ${image:-"(kind's default)"})"
  rc=0
  "$KIND" "${args[@]}" >&2 || rc=$?
  rm -f "$cfg"
  if ((rc != 0)); then
    if ((created_net == 1)); then remove_network_if_ours; fi
    die "kind create cluster failed (exit $rc)"
  fi
  say "kind create cluster returned after $(( $(date +%s) - t0 ))s"

  cp=$(control_plane)
  [[ -n $cp ]] || die "no control-plane node found for cluster $CLUSTER"
  count=$(docker ps -q --filter "label=io.x-k8s.kind.cluster=$CLUSTER" --filter label=io.x-k8s.kind.role | wc -l)
  if ((offline == 1)); then
    if ((count > 1)); then grant_node_list; fi
    if [[ ${KIND_DNS_UPSTREAM:-0} != 1 ]]; then dns_cluster_only; fi
  fi
  # kind --wait returns once the control plane is Ready, before CoreDNS and kube-proxy are rolled out
  if [[ -n $old_dns_pods ]]; then
    # shellcheck disable=SC2086 # a list of pod names
    kc -n kube-system wait --for=delete $old_dns_pods --timeout="${WAIT}s" >/dev/null 2>&1 || true
  fi
  if ! kc wait --for=condition=Ready nodes --all --timeout="${WAIT}s" >/dev/null \
    || ! kc -n kube-system rollout status daemonset/kube-proxy --timeout="${WAIT}s" >&2 \
    || ! kc -n kube-system rollout status deployment/coredns --timeout="${WAIT}s" >&2; then
    diagnose
    die "cluster $CLUSTER did not become ready"
  fi
  say "cluster $CLUSTER is up: $count node(s), context kind-$CLUSTER, in $(( $(date +%s) - t0 ))s"
}

delete() {
  if cluster_exists; then
    "$KIND" delete cluster --name "$CLUSTER" >&2
  else
    say "no kind cluster $CLUSTER"
  fi
  remove_network_if_ours
}

case ${1:-} in
  create) create ;;
  delete) delete ;;
  *) die "usage: $0 create|delete (environment: see the comment at the top)" ;;
esac
