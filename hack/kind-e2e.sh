#!/usr/bin/env bash
# `make kind-e2e`: beacon end to end on a kind cluster, for hosts with Docker (the local suite runs without it).
#
# The same steps the integration suite proves on the local control plane, here with a kubelet, real pods and the
# operator running as the shipped two-replica Deployment from the image:
#   1. a kind cluster (reused if it already exists; deleted afterwards only if this script created it),
#   2. docker build + kind load of the image ($IMG),
#   3. `make deploy` (CRDs, RBAC, Deployment, peering object); both replicas become Ready, exactly one is active,
#   4. a demo backend: two pods running `python -m http.server` from the same image, serving /healthz from an
#      emptyDir, and a ServiceEntry selecting them,
#   5. READY 2/2 in `kubectl get serviceentries`, and cluster DNS answers, from a pod, with both pod IPs,
#   6. one backend turns unhealthy (its /healthz removed): READY 1/2 and DNS answers with the healthy IP only,
#   7. the active operator pod is deleted: the standby takes over, and the backend's recovery is published again.
#
# Environment: IMG (default beacon:dev), KIND_CLUSTER (default beacon-e2e), KUBECTL (default kubectl),
# KEEP_CLUSTER=1 to keep a cluster this script created.
set -euo pipefail

IMG=${IMG:-beacon:dev}
CLUSTER=${KIND_CLUSTER:-beacon-e2e}
KUBECTL=${KUBECTL:-kubectl}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
NS=beacon-e2e
NAME=demo
FQDN="$NAME.$NS.svc.cluster.local"
TIMEOUT=${E2E_TIMEOUT:-180}

cd "$(dirname "$0")/.."

say() { printf '\n[kind-e2e] %s\n' "$*"; }
die() {
  printf '\n[kind-e2e] FAILED: %s\n' "$*" >&2
  exit 1
}
for tool in docker kind "$KUBECTL"; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH (kind-e2e needs Docker, kind and kubectl)"
done

k() { "$KUBECTL" --context "kind-$CLUSTER" "$@"; }

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 2 s until it succeeds
wait_for() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    ((SECONDS < deadline)) || die "$what did not happen within ${timeout}s"
    sleep 2
  done
}

created=0
on_exit() {
  local rc=$?
  if ((rc != 0)); then
    say "diagnostics"
    k get pods,serviceentries,endpointslices -A -o wide || true
    k -n beacon-system logs -l app.kubernetes.io/name=beacon --tail=100 --prefix || true
  fi
  if ((created == 1)) && [[ $KEEP_CLUSTER != 1 ]]; then
    say "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap on_exit EXIT

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "reusing kind cluster $CLUSTER"
else
  say "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 180s
  created=1
fi

say "building $IMG and loading it into the cluster"
docker build -t "$IMG" .
kind load docker-image "$IMG" --name "$CLUSTER"

say "deploying beacon (make deploy)"
make --no-print-directory deploy IMG="$IMG" KUBECTL="$KUBECTL --context kind-$CLUSTER"
k -n beacon-system rollout status deployment/beacon-operator --timeout="${TIMEOUT}s"

# The operator logs "beacon is active" once kopf peering has made it the working replica.
active_pods() {
  local pod
  for pod in $(k -n beacon-system get pods -l app.kubernetes.io/name=beacon -o name); do
    if k -n beacon-system logs "$pod" 2>/dev/null | grep -q "beacon is active"; then echo "$pod"; fi
  done
}
one_active() { [[ $(active_pods | wc -l) -eq 1 ]]; }
wait_for "$TIMEOUT" "exactly one active operator replica" one_active
active=$(active_pods)
say "active replica: $active"

say "demo backend: two pods serving /healthz, and a ServiceEntry selecting them"
k apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $NAME
  namespace: $NS
spec:
  replicas: 2
  selector:
    matchLabels: {app: $NAME}
  template:
    metadata:
      labels: {app: $NAME}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: http
          image: $IMG
          imagePullPolicy: IfNotPresent
          command: [sh, -c, "touch /srv/healthz && exec python -m http.server 8080 --directory /srv"]
          ports:
            - {name: http, containerPort: 8080}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts:
            - {name: srv, mountPath: /srv}
      volumes:
        - {name: srv, emptyDir: {}}
---
apiVersion: beacon.dev/v1alpha1
kind: ServiceEntry
metadata:
  name: $NAME
  namespace: $NS
spec:
  ports:
    - {name: http, port: 8080}
  selector:
    matchLabels: {app: $NAME}
  healthCheck:
    http: {path: /healthz, port: http}
    intervalSeconds: 2
    unhealthyThreshold: 2
EOF
k -n "$NS" rollout status "deployment/$NAME" --timeout="${TIMEOUT}s"

ready_is() { [[ $(k -n "$NS" get serviceentry "$NAME" -o 'jsonpath={.status.readySummary}') == "$1" ]]; }

# resolve: the A records of the ServiceEntry's name, asked from a pod through cluster DNS, sorted, one line
resolve() {
  k -n "$NS" run "dns-$RANDOM" --rm -i --quiet --restart=Never --image="$IMG" --image-pull-policy=IfNotPresent \
    --command -- python -c '
import socket, sys
try:
    print(" ".join(sorted(socket.gethostbyname_ex(sys.argv[1])[2])))
except socket.gaierror:
    print("")
' "$FQDN" 2>/dev/null | head -n 1
}
dns_is() { [[ $(resolve) == "$1" ]]; }
pod_ips() { k -n "$NS" get pods -l "app=$NAME" -o 'jsonpath={.items[*].status.podIP}' | tr ' ' '\n' | sort | xargs; }

wait_for "$TIMEOUT" "READY 2/2" ready_is 2/2
k -n "$NS" get serviceentries
both=$(pod_ips)
wait_for "$TIMEOUT" "DNS answering with both pod IPs ($both)" dns_is "$both"
say "$FQDN -> $both"

sick=$(k -n "$NS" get pods -l "app=$NAME" -o 'jsonpath={.items[0].metadata.name}')
sick_ip=$(k -n "$NS" get pod "$sick" -o 'jsonpath={.status.podIP}')
healthy_ip=$(tr ' ' '\n' <<<"$both" | grep -vx "$sick_ip")
say "making $sick ($sick_ip) unhealthy"
k -n "$NS" exec "$sick" -- rm /srv/healthz
wait_for "$TIMEOUT" "READY 1/2" ready_is 1/2
k -n "$NS" get serviceentries
wait_for "$TIMEOUT" "DNS answering with the healthy pod only ($healthy_ip)" dns_is "$healthy_ip"
say "$FQDN -> $healthy_ip"

say "deleting the active operator replica ($active); the standby takes over"
k -n beacon-system delete "$active" --wait=false
k -n "$NS" exec "$sick" -- touch /srv/healthz
wait_for "$TIMEOUT" "READY 2/2 again, published by the new active replica" ready_is 2/2
wait_for "$TIMEOUT" "DNS answering with both pod IPs again" dns_is "$both"
k -n "$NS" get serviceentries
say "passed"
