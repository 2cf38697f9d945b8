#!/usr/bin/env bash
# `make kind-e2e`: beacon end to end on a kind cluster with real pods, kubelet and the operator running as the
# shipped two-replica Deployment from its image. It exists because the local suite (`make test`) has no kubelet:
# this is where beacon meets real pods, cluster DNS and a real rollout. It runs offline on CI machines (no image
# registry: every image is built locally) and with stock kind where Docker can pull.
#
# Stages (each prints a header and its elapsed seconds; a summary table closes the run):
#   node image  offline only: hack/kind/node-image.sh (cached), unless KIND_NODE_IMAGE is given
#   cluster up  hack/kind/cluster.sh create (reused if a cluster of that name exists; then it is not deleted)
#   image built / image loaded   hack/kind/operator-image.sh (no network in the build), `kind load docker-image`
#   deploy      `make deploy`; both replicas Ready, exactly one active
#   READY 2/2   a demo backend (two pods running `python -m http.server` from the image, /healthz from an
#               emptyDir) and a ServiceEntry selecting them
#   DNS         cluster DNS answers, from a pod, with both pod IPs
#   READY 1/2   one backend loses /healthz: READY 1/2, DNS answers with the healthy IP only
#   failover    the active operator pod is deleted; the standby publishes the backend's recovery
#   race        real-pod race, kubelet vs beacon: the same pods behind a ServiceEntry and an ordinary Service,
#               kubelet's readinessProbe set like beacon's check; for E2E_RACE_RUNS breaks of one pod's health,
#               when each EndpointSlice shows it not ready (watch arrival times; hack/kind/e2e/race.py)
#   reload      a Deployment that opts into ConfigEntry reloads reads the ConfigMap through envFrom: an edit
#               rolls out new pods that print the new value; ten quick edits make exactly one more rollout
#   canary      a tracked rollout (spec.canary, holdSeconds 12) over three Deployments whose readinessProbe reads
#               the config through envFrom: the canary takes revision N+1 from the copy <target>-r<N+1> first,
#               while the target ConfigMap and the others' pods (env, mounted file) keep N until the hold ends;
#               ADOPTED 1/3 -> 3/3; the canary's pods are created once for the revision
#   rollback    a change that fails the readinessProbe, rolloutTimeoutSeconds 30: the canary's new pods never
#               become Ready, beacon rolls back on its own (Rollout False/AutoRolledBack, the target ConfigMap
#               never holds the bad data, the canary runs N again); the other Deployments are never restarted
#
# Environment: IMG (beacon:dev), KIND_CLUSTER (beacon-e2e), KIND_NODES (1), KIND_CONFIG, KIND_NODE_IMAGE,
# KIND_OFFLINE (1 = no registry; implied by BEACON_DOCKER_PRIVATE=1, which hack/kind/docker.sh sets for its
# private engine), KUBECTL (`make kind-e2e` passes the pinned one; else kubectl on PATH, else the local control
# plane's), E2E_PYTHON (.venv/bin/python, needs the kubernetes package: `make deps`), E2E_TIMEOUT (180 s per
# wait), E2E_RACE_RUNS (5), KEEP_CLUSTER=1 keeps a cluster this script created. The Docker engine itself is
# hack/kind/with-docker.sh's job (`make kind-e2e`).
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
# shellcheck source=/dev/null
. hack/kind/lib.sh

IMG=${IMG:-beacon:dev}
CLUSTER=${KIND_CLUSTER:-beacon-e2e}
KIND_NODES=${KIND_NODES:-1}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
TIMEOUT=${E2E_TIMEOUT:-180}
RACE_RUNS=${E2E_RACE_RUNS:-5}
PY=${E2E_PYTHON:-$repo/.venv/bin/python}
NS=beacon-e2e
NAME=demo
FQDN="$NAME.$NS.svc.cluster.local"
# the race: beacon's check and kubelet's readinessProbe, the same numbers on both sides
RACE_INTERVAL=2
RACE_TIMEOUT=1
RACE_THRESHOLD=2
# the operator's reload defaults (README "Reloads"): --reload-debounce 2, --reload-max-delay 30
RELOAD_MAX_DELAY=30

offline=0
if [[ ${KIND_OFFLINE:-0} == 1 || ${BEACON_DOCKER_PRIVATE:-0} == 1 ]]; then offline=1; fi
export KIND_OFFLINE=$offline KIND_CLUSTER=$CLUSTER KIND_NODES

say() { printf '[kind-e2e] %s\n' "$*"; }
die() {
  printf '\n[kind-e2e] FAILED: %s\n' "$*" >&2
  exit 1
}

# --- stages and their timings ----------------------------------------------------------------------------------
stage_names=()
stage_secs=()
stage_name=""
stage_t0=""
run_t0=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
begin() {
  stage_name=$1
  stage_t0=$EPOCHREALTIME
  printf '\n[kind-e2e] ==== %s ====\n' "$stage_name"
}
end() {
  local secs
  secs=$(since "$stage_t0")
  stage_names+=("$stage_name")
  stage_secs+=("$secs")
  say "---- $stage_name: ${secs}s"
  stage_name=""
}
summary() {
  local i
  printf '\n[kind-e2e] %-14s %9s\n' stage seconds
  for i in "${!stage_names[@]}"; do
    printf '[kind-e2e] %-14s %9s\n' "${stage_names[$i]}" "${stage_secs[$i]}"
  done
  if [[ -n $stage_name ]]; then printf '[kind-e2e] %-14s %9s (failed)\n' "$stage_name" "$(since "$stage_t0")"; fi
  printf '[kind-e2e] %-14s %9s\n' total "$(since "$run_t0")"
  if [[ -n ${race_line:-} ]]; then say "race: $race_line"; fi
}

# --- tools -----------------------------------------------------------------------------------------------------
command -v docker >/dev/null || die "docker is not on PATH (kind-e2e needs a Docker engine: make kind-e2e)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (run it as: bash hack/kind/with-docker.sh bash hack/kind-e2e.sh)"
if [[ -z ${KIND:-} ]]; then
  # the pinned kind first (the one hack/kind/cluster.sh uses); a kind on PATH only if it cannot be built
  KIND=$(bash hack/kind/kind-bin.sh) || KIND=$(command -v kind) || die "no kind binary (hack/kind/kind-bin.sh failed)"
fi
if [[ -z ${KUBECTL:-} ]]; then
  KUBECTL=$(command -v kubectl) || KUBECTL="$(bash tools/k8s/build.sh | tail -n 1)/kubectl"
fi
[[ -x $KUBECTL ]] || KUBECTL=$(command -v "$KUBECTL") || die "kubectl ($KUBECTL) not found"
"$PY" -c 'import kubernetes' 2>/dev/null || die "$PY cannot import kubernetes (run make deps, or set E2E_PYTHON)"
say "kind: $KIND; kubectl: $KUBECTL; offline: $offline; nodes: $KIND_NODES; image: $IMG"

work=$(mktemp -d "${TMPDIR:-/tmp}/beacon-kind-e2e.XXXXXX")
KUBECONFIG_FILE=$work/kubeconfig
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" --context "kind-$CLUSTER" "$@"; }

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
  set +e
  if [[ -n ${watch_pid:-} ]]; then kill "$watch_pid" 2>/dev/null; fi
  if ((rc != 0)) && [[ -s $KUBECONFIG_FILE ]]; then
    say "diagnostics"
    k get nodes,pods,serviceentries,configentries,endpointslices -A -o wide
    if [[ $stage_name == canary || $stage_name == rollback ]]; then
      k -n "$NS" get deployments,replicasets,configmaps -o wide
      k -n "$NS" get configentry rollout -o yaml
    fi
    k -n beacon-system logs -l app.kubernetes.io/name=beacon --tail=100 --prefix
    k -n "$NS" get events --sort-by=.lastTimestamp | tail -n 40
  fi
  summary
  if ((created == 1)) && [[ $KEEP_CLUSTER != 1 ]]; then
    say "deleting kind cluster $CLUSTER"
    bash hack/kind/cluster.sh delete
  elif ((created == 1)); then
    say "KEEP_CLUSTER=1: kept kind cluster $CLUSTER (delete it with: KIND_CLUSTER=$CLUSTER bash hack/kind/cluster.sh delete)"
  fi
  rm -rf "$work"
  if ((rc == 0)); then say "passed"; else say "failed (exit $rc)"; fi
  exit "$rc"
}
trap on_exit EXIT

# --- node image (offline) and cluster --------------------------------------------------------------------------
if ((offline == 1)) && [[ -z ${KIND_NODE_IMAGE:-} ]]; then
  begin "node image"
  node_out=$(bash hack/kind/node-image.sh)
  node_line=${node_out##*$'\n'}
  [[ $node_line == KIND_NODE_IMAGE=?* ]] || die "hack/kind/node-image.sh did not print KIND_NODE_IMAGE=<tag> last"
  export KIND_NODE_IMAGE=${node_line#KIND_NODE_IMAGE=}
  say "node image: $KIND_NODE_IMAGE"
  end
fi

begin "cluster up"
clusters=$("$KIND" get clusters 2>/dev/null || true)
if grep -qx "$CLUSTER" <<<"$clusters"; then
  say "reusing kind cluster $CLUSTER (it is kept afterwards)"
else
  say "creating kind cluster $CLUSTER ($KIND_NODES node(s))"
  created=1
  bash hack/kind/cluster.sh create
fi
"$KIND" get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
k get nodes -o wide
end

# --- the operator image ----------------------------------------------------------------------------------------
begin "image built"
IMG=$IMG bash hack/kind/operator-image.sh
end

begin "image loaded"
"$KIND" load docker-image "$IMG" --name "$CLUSTER"
end

# --- deploy ----------------------------------------------------------------------------------------------------
begin "deploy"
if [[ $(k get namespace "$NS" -o name --ignore-not-found) ]]; then
  say "removing namespace $NS left by an earlier run"
  k delete namespace "$NS" --wait=true --timeout="${TIMEOUT}s"
fi
make --no-print-directory deploy IMG="$IMG" KUBECTL="$KUBECTL --kubeconfig $KUBECONFIG_FILE --context kind-$CLUSTER"
k -n beacon-system rollout status deployment/beacon-operator --timeout="${TIMEOUT}s"

# A replica is active when beacon logged "beacon is active" and kopf's last word on peering was not a pause: kopf
# logs "Pausing operations in favour of ..." / "Resuming operations ..." as it pauses and resumes a replica.
# Two replicas that start together can both begin activating before kopf pauses one (README "High availability",
# Limits); such a paused replica is reported, not counted. Each log is captured before it is read: `logs | grep -q`
# under pipefail fails with SIGPIPE (141) when grep exits at its match.
active_pods() {
  local pod log state
  for pod in $(k -n beacon-system get pods -l app.kubernetes.io/name=beacon -o name); do
    log=$(k -n beacon-system logs "$pod" 2>/dev/null) || continue
    state=$(awk '/beacon is active/ { a = 1 } /Pausing operations/ { p = 1 } /Resuming operations/ { p = 0 }
      END { print (a ? (p ? "paused-after-activation" : "active") : "standby") }' <<<"$log")
    case $state in
      active) echo "$pod" ;;
      paused-after-activation) say "note: $pod logged 'beacon is active' but kopf has paused it" >&2 ;;
    esac
  done
}
one_active() { [[ $(active_pods | wc -l) -eq 1 ]]; }
wait_for "$TIMEOUT" "exactly one active operator replica" one_active
active=$(active_pods)
say "active replica: $active"
end

# --- the demo backend ------------------------------------------------------------------------------------------
# http_pods NAME REPLICAS [READINESS-PROBE-YAML]: a Deployment of pods serving /srv (and /healthz) from the image
http_pods() {
  local name=$1 replicas=$2 probe=${3:-}
  cat <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $name
  namespace: $NS
spec:
  replicas: $replicas
  selector:
    matchLabels: {app: $name}
  template:
    metadata:
      labels: {app: $name}
    spec:
      terminationGracePeriodSeconds: 2
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
$probe
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts:
            - {name: srv, mountPath: /srv}
      volumes:
        - {name: srv, emptyDir: {}}
EOF
}

begin "READY 2/2"
say "demo backend: two pods serving /healthz, and a ServiceEntry selecting them"
k apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
---
$(http_pods "$NAME" 2)
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
---
apiVersion: v1
kind: Pod
metadata:
  name: dns-client
  namespace: $NS
spec:
  terminationGracePeriodSeconds: 1
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: client
      image: $IMG
      imagePullPolicy: IfNotPresent
      command: [sleep, "2147483647"]
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
EOF
k -n "$NS" rollout status "deployment/$NAME" --timeout="${TIMEOUT}s"
k -n "$NS" wait --for=condition=Ready pod/dns-client --timeout="${TIMEOUT}s"

ready_is() { [[ $(k -n "$NS" get serviceentry "$NAME" -o 'jsonpath={.status.readySummary}') == "$1" ]]; }

# resolve: the A records of the ServiceEntry's name, asked from a pod (dns-client, running the image) through
# cluster DNS, sorted, on one line. An exec into a running pod, not `kubectl run --rm -i`: that loses the output of
# a container which exits within a second. The output is captured whole (a `| head` could end kubectl early).
resolve() {
  local out
  out=$(k -n "$NS" exec dns-client -- python -c '
import socket, sys
try:
    print(" ".join(sorted(socket.gethostbyname_ex(sys.argv[1])[2])))
except socket.gaierror:
    print("")
' "$FQDN" 2>/dev/null) || true
  printf '%s\n' "${out%%$'\n'*}"
}
dns_is() { [[ $(resolve) == "$1" ]]; }
pod_ips() { k -n "$NS" get pods -l "app=$NAME" -o 'jsonpath={.items[*].status.podIP}' | tr ' ' '\n' | sort | xargs; }

wait_for "$TIMEOUT" "READY 2/2" ready_is 2/2
k -n "$NS" get serviceentries
end

begin "DNS"
both=$(pod_ips)
wait_for "$TIMEOUT" "DNS answering with both pod IPs ($both)" dns_is "$both"
say "$FQDN -> $both"
end

begin "READY 1/2"
sick=$(k -n "$NS" get pods -l "app=$NAME" -o 'jsonpath={.items[0].metadata.name}')
sick_ip=$(k -n "$NS" get pod "$sick" -o 'jsonpath={.status.podIP}')
healthy_ip=$(tr ' ' '\n' <<<"$both" | grep -vx "$sick_ip")
say "making $sick ($sick_ip) unhealthy"
k -n "$NS" exec "$sick" -- rm /srv/healthz
wait_for "$TIMEOUT" "READY 1/2" ready_is 1/2
k -n "$NS" get serviceentries
wait_for "$TIMEOUT" "DNS answering with the healthy pod only ($healthy_ip)" dns_is "$healthy_ip"
say "$FQDN -> $healthy_ip"
end

begin "failover"
say "deleting the active operator replica ($active); the standby takes over"
k -n beacon-system delete "$active" --wait=false
k -n "$NS" exec "$sick" -- touch /srv/healthz
wait_for "$TIMEOUT" "READY 2/2 again, published by the new active replica" ready_is 2/2
wait_for "$TIMEOUT" "DNS answering with both pod IPs again" dns_is "$both"
k -n "$NS" get serviceentries
wait_for "$TIMEOUT" "exactly one active operator replica after the failover" one_active
say "active replica now: $(active_pods)"
end

# --- race: kubelet vs beacon -----------------------------------------------------------------------------------
begin "race"
probe="          readinessProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: $RACE_INTERVAL
            timeoutSeconds: $RACE_TIMEOUT
            failureThreshold: $RACE_THRESHOLD
            successThreshold: 1"
say "pods with a readinessProbe (period ${RACE_INTERVAL}s, timeout ${RACE_TIMEOUT}s, failureThreshold $RACE_THRESHOLD)" \
  "behind a ServiceEntry with the same check, and an ordinary Service"
k apply -f - <<EOF
$(http_pods race 2 "$probe")
---
apiVersion: v1
kind: Service
metadata:
  name: race-kcm
  namespace: $NS
spec:
  selector: {app: race}
  ports:
    - {name: http, port: 8080, targetPort: http}
---
apiVersion: beacon.dev/v1alpha1
kind: ServiceEntry
metadata:
  name: race
  namespace: $NS
spec:
  ports:
    - {name: http, port: 8080}
  selector:
    matchLabels: {app: race}
  healthCheck:
    http: {path: /healthz, port: http}
    intervalSeconds: $RACE_INTERVAL
    timeoutSeconds: $RACE_TIMEOUT
    healthyThreshold: 1
    unhealthyThreshold: $RACE_THRESHOLD
EOF
k -n "$NS" rollout status deployment/race --timeout="${TIMEOUT}s"
race_ready() { [[ $(k -n "$NS" get serviceentry race -o 'jsonpath={.status.readySummary}') == 2/2 ]]; }
wait_for "$TIMEOUT" "READY 2/2 for the race ServiceEntry" race_ready
race_pod=$(k -n "$NS" get pods -l app=race -o 'jsonpath={.items[0].metadata.name}')
"$PY" hack/kind/e2e/race.py --kubeconfig "$KUBECONFIG_FILE" --context "kind-$CLUSTER" --kubectl "$KUBECTL" \
  --namespace "$NS" --pod "$race_pod" --beacon-service race --kcm-service race-kcm --runs "$RACE_RUNS" \
  --interval "$RACE_INTERVAL" --timeout 60 --summary-file "$work/race.txt"
race_line=$(<"$work/race.txt")
end

# --- reload: ConfigEntry -> ConfigMap -> envFrom, rolled out by beacon ----------------------------------------
begin "reload"
revision() { k -n "$NS" get deployment reload -o 'jsonpath={.metadata.annotations.deployment\.kubernetes\.io/revision}'; }
# the pods of the Deployment's current ReplicaSet, once no other pod of it is left: "name uid replicaset" lines
current_pods() {
  k -n "$NS" get pods -l app=reload \
    -o 'jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.metadata.ownerReferences[0].name}{"\n"}{end}'
}
settled() {
  local pods
  pods=$(current_pods)
  [[ $(grep -c . <<<"$pods") -eq 2 ]] && [[ $(cut -d' ' -f3 <<<"$pods" | sort -u | wc -l) -eq 1 ]]
}
# every current pod has printed GREETING=$1
pods_print() {
  local name log
  for name in $(current_pods | cut -d' ' -f1); do
    log=$(k -n "$NS" logs "$name" 2>/dev/null) || return 1
    grep -qx "GREETING=$1" <<<"$log" || return 1
  done
}
has_baseline() { [[ -n $(k -n "$NS" get deployment reload -o 'jsonpath={.metadata.annotations.beacon\.dev/config-hashes-baseline}') ]]; }
configmap_has() { [[ $(k -n "$NS" get configmap reload -o 'jsonpath={.data.GREETING}' 2>/dev/null) == "$1" ]]; }

say "a ConfigEntry 'reload' (GREETING=v1) and a Deployment that opts in (beacon.dev/reload: reload) and reads it via envFrom"
k apply -f - <<EOF
apiVersion: beacon.dev/v1alpha1
kind: ConfigEntry
metadata:
  name: reload
  namespace: $NS
spec:
  data:
    GREETING: v1
EOF
wait_for "$TIMEOUT" "ConfigMap reload with GREETING=v1" configmap_has v1
k apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reload
  namespace: $NS
  annotations:
    beacon.dev/reload: reload
spec:
  replicas: 2
  selector:
    matchLabels: {app: reload}
  template:
    metadata:
      labels: {app: reload}
    spec:
      terminationGracePeriodSeconds: 2
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: app
          image: $IMG
          imagePullPolicy: IfNotPresent
          command: [sh, -c, 'echo "GREETING=\$GREETING" && exec sleep 2147483647']
          envFrom:
            - configMapRef: {name: reload}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
EOF
k -n "$NS" rollout status deployment/reload --timeout="${TIMEOUT}s"
wait_for "$TIMEOUT" "the first pods settled" settled
wait_for "$TIMEOUT" "the pods printing GREETING=v1" pods_print v1
wait_for "$TIMEOUT" "beacon's reload baseline on the Deployment" has_baseline
rev1=$(revision)
pods1=$(current_pods)
say "revision $rev1; pods: $(cut -d' ' -f1 <<<"$pods1" | xargs)"
[[ $rev1 == 1 ]] || die "opting in rolled the Deployment out (revision $rev1, expected 1)"

say "edit: GREETING=v2"
k -n "$NS" patch configentry reload --type merge -p '{"spec":{"data":{"GREETING":"v2"}}}'
rev_is() { [[ $(revision) == "$1" ]]; }
wait_for "$TIMEOUT" "Deployment revision 2 (a rollout by beacon)" rev_is 2
k -n "$NS" rollout status deployment/reload --timeout="${TIMEOUT}s"
wait_for "$TIMEOUT" "the old pods gone" settled
pods2=$(current_pods)
rs1=$(head -n 1 <<<"$pods1" | cut -d' ' -f3)
rs2=$(head -n 1 <<<"$pods2" | cut -d' ' -f3)
[[ $rs2 != "$rs1" ]] || die "the pods after the edit still belong to ReplicaSet $rs1"
if grep -qxF -f <(cut -d' ' -f2 <<<"$pods1") <(cut -d' ' -f2 <<<"$pods2"); then
  die "a pod survived the rollout (same UID before and after)"
fi
wait_for "$TIMEOUT" "the new pods printing GREETING=v2" pods_print v2
say "new ReplicaSet $rs2, new pods $(cut -d' ' -f1 <<<"$pods2" | xargs), all printing GREETING=v2"

say "ten quick edits: GREETING=v3..v12"
burst_t0=$SECONDS
"$PY" hack/kind/e2e/config_burst.py --kubeconfig "$KUBECONFIG_FILE" --context "kind-$CLUSTER" \
  --namespace "$NS" --name reload --key GREETING v3 v4 v5 v6 v7 v8 v9 v10 v11 v12
wait_for "$TIMEOUT" "Deployment revision 3 (one rollout for the burst)" rev_is 3
# Any rollout of this burst happens within --reload-max-delay of its first change: wait that long (and a margin)
# before counting revisions.
quiet=$((RELOAD_MAX_DELAY + 5 - (SECONDS - burst_t0)))
if ((quiet > 0)); then
  say "revision 3 after $((SECONDS - burst_t0))s; waiting ${quiet}s more (reload max delay ${RELOAD_MAX_DELAY}s) for any further rollout"
  sleep "$quiet"
fi
rev3=$(revision)
[[ $rev3 == 3 ]] || die "ten quick edits gave revision $rev3, expected exactly one rollout (revision 3)"
k -n "$NS" rollout status deployment/reload --timeout="${TIMEOUT}s"
wait_for "$TIMEOUT" "the old pods gone" settled
wait_for "$TIMEOUT" "the new pods printing GREETING=v12" pods_print v12
configmap_has v12 || die "the ConfigMap does not hold GREETING=v12"
say "ten edits -> one rollout (revision $rev3); pods $(current_pods | cut -d' ' -f1 | xargs) print GREETING=v12"
k -n "$NS" get configentries
end

# --- canary and rollback: a tracked rollout (spec.canary, spec.rollout) over three Deployments -----------------
# Three one-replica Deployments opt into reloads of the ConfigEntry "rollout" and read its ConfigMap through
# envFrom; rollout-canary (labelled tier=canary) and rollout-a also mount it at /etc/rollout. Each pod's
# readinessProbe is `test "$MODE" = good` on the environment the pod started with, so only a restart changes what
# a pod sees, and MODE=bad gives new pods that never become Ready. hack/kind/e2e/rollout_watch.py applies each
# change and follows the entry and its ConfigMap by watch (the order of phases, ADOPTED and the ConfigMap's data);
# this script checks the Deployments, their ReplicaSets and what their running pods see.
ROLLOUT_HOLD=12    # spec.canary.holdSeconds
ROLLOUT_TIMEOUT=30 # spec.rollout.rolloutTimeoutSeconds of the failing change
ROLLOUT_SLACK=45   # how late after that timeout the automatic rollback may come
watch_pid=""

rollout_app() { # NAME TIER MOUNT: a Deployment reading the ConfigMap "rollout" (MOUNT=1: also as a volume)
  local name=$1 tier=$2 mount=$3 mounts="" volumes=""
  if ((mount == 1)); then
    mounts="          volumeMounts:
            - {name: config, mountPath: /etc/rollout, readOnly: true}"
    volumes="      volumes:
        - name: config
          configMap: {name: rollout}"
  fi
  cat <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $name
  namespace: $NS
  labels: {app: $name, tier: $tier}
  annotations:
    beacon.dev/reload: rollout
spec:
  replicas: 1
  selector:
    matchLabels: {app: $name}
  template:
    metadata:
      labels: {app: $name}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: app
          image: $IMG
          imagePullPolicy: IfNotPresent
          command: [sh, -c, 'echo "MODE=\$MODE VERSION=\$VERSION" && exec sleep 2147483647']
          envFrom:
            - configMapRef: {name: rollout}
          readinessProbe:
            exec:
              command: [sh, -c, 'test "\$MODE" = good']
            periodSeconds: 1
            failureThreshold: 1
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
$mounts
$volumes
EOF
}

entry_field() { k -n "$NS" get configentry rollout -o "jsonpath={$1}"; }
rollout_condition() { entry_field '.status.conditions[?(@.type=="Rollout")].status}/{.status.conditions[?(@.type=="Rollout")].reason'; }
adopted_is() { [[ $(entry_field .status.adoption.summary) == "$1" ]]; }
cm_value() { k -n "$NS" get configmap "$1" -o "jsonpath={.data.$2}" 2>/dev/null; }
cm_value_is() { [[ $(cm_value "$1" "$2") == "$3" ]]; }
dep_revision() { k -n "$NS" get deployment "$1" -o 'jsonpath={.metadata.annotations.deployment\.kubernetes\.io/revision}'; }
rs_count() { k -n "$NS" get replicasets -l "app=$1" -o name | grep -c .; }
# refs_are NAME CONFIGMAP...: the ConfigMaps the Deployment's pod template reads (envFrom, then volumes)
refs_are() {
  local name=$1
  shift
  [[ $(k -n "$NS" get deployment "$name" -o 'jsonpath={.spec.template.spec.containers[*].envFrom[*].configMapRef.name} {.spec.template.spec.volumes[*].configMap.name}' | xargs) == "$*" ]]
}
# the ReplicaSet of the Deployment's current revision
current_rs() {
  local rev
  rev=$(dep_revision "$1")
  k -n "$NS" get replicasets -l "app=$1" \
    -o 'jsonpath={range .items[*]}{.metadata.name} {.metadata.annotations.deployment\.kubernetes\.io/revision}{"\n"}{end}' |
    awk -v rev="$rev" '$2 == rev { print $1 }'
}
# the Deployment's pods (terminating ones too): "name replicaset ready" lines
app_pods() {
  k -n "$NS" get pods -l "app=$1" \
    -o 'jsonpath={range .items[*]}{.metadata.name} {.metadata.ownerReferences[0].name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}'
}
pod_env() { k -n "$NS" exec "$1" -- printenv "$2" 2>/dev/null; }
pod_file() { k -n "$NS" exec "$1" -- cat "/etc/rollout/$2" 2>/dev/null; }
# runs NAME VERSION: the Deployment's only pod belongs to its current ReplicaSet, is Ready, and its environment
# has VERSION and MODE=good; the pod's name is left in $the_pod
the_pod=""
runs() {
  local pods rs pod owner ready
  pods=$(app_pods "$1")
  rs=$(current_rs "$1")
  [[ -n $rs && $(grep -c . <<<"$pods") -eq 1 ]] || return 1
  read -r pod owner ready <<<"$pods"
  [[ $owner == "$rs" && $ready == True ]] || return 1
  [[ $(pod_env "$pod" VERSION) == "$2" && $(pod_env "$pod" MODE) == good ]] || return 1
  the_pod=$pod
}
# untouched APP...: in one request, what a restart would change: the Deployments (revision, what the template
# reads), their ReplicaSets and their pods (name, Ready); compared before and after
untouched() {
  local IFS=,
  k -n "$NS" get deployments,replicasets,pods -l "app in ($*)" \
    -o 'jsonpath={range .items[*]}{.kind} {.metadata.name} {.metadata.annotations.deployment\.kubernetes\.io/revision} {.spec.template.spec.containers[*].envFrom[*].configMapRef.name} {.spec.template.spec.volumes[*].configMap.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    sort
}
rollout_watch() { # ARGS...: rollout_watch.py in the background, its pid in $watch_pid
  "$PY" hack/kind/e2e/rollout_watch.py --kubeconfig "$KUBECONFIG_FILE" --context "kind-$CLUSTER" --namespace "$NS" \
    --entry rollout --configmap rollout --key VERSION --workloads 3 --canaries 1 "$@" &
  watch_pid=$!
}
watch_ends() {
  local pid=$watch_pid
  watch_pid=""
  wait "$pid" || die "$1 (rollout_watch.py above says why)"
}

begin "canary"
say "a ConfigEntry 'rollout' (MODE=good VERSION=v1) with spec.canary {tier: canary, holdSeconds: $ROLLOUT_HOLD}" \
  "and three Deployments reading it: rollout-canary (tier=canary, also mounts it), rollout-a (also mounts it), rollout-b"
k apply -f - <<EOF
apiVersion: beacon.dev/v1alpha1
kind: ConfigEntry
metadata:
  name: rollout
  namespace: $NS
spec:
  data:
    MODE: good
    VERSION: v1
  canary:
    selector:
      matchLabels: {tier: canary}
    holdSeconds: $ROLLOUT_HOLD
EOF
wait_for "$TIMEOUT" "ConfigMap rollout with VERSION=v1" cm_value_is rollout VERSION v1
k apply -f - <<EOF
$(rollout_app rollout-canary canary 1)
---
$(rollout_app rollout-a main 1)
---
$(rollout_app rollout-b main 0)
EOF
for app in rollout-canary rollout-a rollout-b; do
  k -n "$NS" rollout status "deployment/$app" --timeout="${TIMEOUT}s"
  wait_for "$TIMEOUT" "$app on one Ready pod with VERSION=v1" runs "$app" v1
done
wait_for "$TIMEOUT" "ADOPTED 3/3 workloads before the change" adopted_is "3/3 workloads"
runs rollout-a v1 || die "rollout-a does not run VERSION=v1"
a_pod=$the_pod
others=$(untouched rollout-a rollout-b)
canary_rs=$(rs_count rollout-canary)
canary_rev=$(dep_revision rollout-canary)
a_rev=$(dep_revision rollout-a)
b_rev=$(dep_revision rollout-b)
n=$(entry_field .status.currentRevision)
r=$((n + 1))
say "revision $n on every workload: $(k -n "$NS" get configentry rollout --no-headers | xargs)"

say "change: VERSION=v2 (another good value) -> revision $r, to the canary first"
rollout_watch --patch '{"data":{"VERSION":"v2"}}' --expect canary --revision "$r" --old v1 --new v2 \
  --hold "$ROLLOUT_HOLD" --timeout "$TIMEOUT"
wait_for "$TIMEOUT" "rollout-canary's template reading rollout-r$r" refs_are rollout-canary "rollout-r$r" "rollout-r$r"
wait_for "$TIMEOUT" "rollout-canary on one Ready pod with VERSION=v2" runs rollout-canary v2
canary_pod=$the_pod
checks_t0=$EPOCHREALTIME
# While the canary holds (holdSeconds from its Ready), everything else is still on revision n, checked in a few
# requests: the target ConfigMap, the other Deployments (not restarted: same revision, template, ReplicaSets and
# pods) and what their running pods see (env, and rollout-a's mounted file).
cm_value_is rollout VERSION v1 || die "the target ConfigMap holds VERSION=$(cm_value rollout VERSION) during the canary step"
[[ $(untouched rollout-a rollout-b) == "$others" ]] ||
  die "rollout-a or rollout-b changed during the canary step:"$'\n'"$(diff <(echo "$others") <(untouched rollout-a rollout-b))"
b_pod=$(app_pods rollout-b | cut -d' ' -f1)
[[ $(pod_env "$a_pod" VERSION)/$(pod_env "$b_pod" VERSION) == v1/v1 ]] || die "rollout-a's or rollout-b's pod has not VERSION=v1"
[[ $(pod_file "$a_pod" VERSION) == v1 ]] || die "rollout-a's pod sees VERSION=$(pod_file "$a_pod" VERSION) in its mounted file"
phase=$(entry_field '.status.rollout.revision}/{.status.rollout.phase')
k -n "$NS" get configentry rollout
[[ $phase == "$r/Canary" || $phase == "$r/Holding" ]] ||
  die "rollout $phase when the canary-step checks ended: promoted before them (holdSeconds $ROLLOUT_HOLD too short here?)"
say "rollout $phase: the target ConfigMap, rollout-a and rollout-b (env, mounted file) still on revision $n" \
  "(checked in $(since "$checks_t0")s of the ${ROLLOUT_HOLD}s hold)"
[[ $(pod_file "$canary_pod" VERSION) == v2 ]] || die "the canary's pod $canary_pod mounts VERSION=$(pod_file "$canary_pod" VERSION)"
[[ $(cm_value "rollout-r$r" VERSION) == v2 ]] || die "ConfigMap rollout-r$r does not hold VERSION=v2"
[[ $(k -n "$NS" get configmap "rollout-r$r" -o 'jsonpath={.metadata.labels.beacon\.dev/canary-revision} {.immutable}') == "$r true" ]] ||
  die "ConfigMap rollout-r$r is not an immutable copy labelled beacon.dev/canary-revision=$r"
say "canary: pod $canary_pod runs revision $r from rollout-r$r (env VERSION=v2, mounted file v2)"

watch_ends "the canary rollout of revision $r"
for app in rollout-a rollout-b; do
  k -n "$NS" rollout status "deployment/$app" --timeout="${TIMEOUT}s"
  wait_for "$TIMEOUT" "$app on one Ready pod with VERSION=v2" runs "$app" v2
done
[[ $(dep_revision rollout-a) == $((a_rev + 1)) && $(dep_revision rollout-b) == $((b_rev + 1)) ]] ||
  die "rollout-a and rollout-b are at Deployment revisions $(dep_revision rollout-a), $(dep_revision rollout-b)" \
    "(from $a_rev, $b_rev): not one rollout each"
runs rollout-a v2 || die "rollout-a does not run VERSION=v2"
[[ $(pod_file "$the_pod" VERSION) == v2 ]] || die "rollout-a's new pod $the_pod does not see VERSION=v2 in its mounted file"
runs rollout-canary v2 || die "the canary no longer runs VERSION=v2 after the promotion"
[[ $the_pod == "$canary_pod" ]] || die "the canary was restarted again at the promotion (pod $canary_pod -> $the_pod)"
[[ $(rs_count rollout-canary) == $((canary_rs + 1)) && $(dep_revision rollout-canary) == $((canary_rev + 1)) ]] ||
  die "rollout-canary's pods were created more than once for revision $r ($(rs_count rollout-canary) ReplicaSets)"
[[ $(rollout_condition) == True/Complete ]] || die "condition Rollout is $(rollout_condition), not True/Complete"
k -n "$NS" get configentry rollout
say "the canary first (1/3), then rollout-a and rollout-b after the ${ROLLOUT_HOLD}s hold (3/3); the canary's pods created once"
end

begin "rollback"
others=$(untouched rollout-a rollout-b)
n=$(entry_field .status.currentRevision)
r=$((n + 1))
say "change: MODE=bad VERSION=v3 (fails the readinessProbe), rolloutTimeoutSeconds $ROLLOUT_TIMEOUT -> revision $r"
rollout_watch --patch "{\"data\":{\"MODE\":\"bad\",\"VERSION\":\"v3\"},\"rollout\":{\"rolloutTimeoutSeconds\":$ROLLOUT_TIMEOUT}}" \
  --expect rollback --revision "$r" --old v2 --new v3 --rollout-timeout "$ROLLOUT_TIMEOUT" --slack "$ROLLOUT_SLACK" \
  --timeout $((ROLLOUT_TIMEOUT + ROLLOUT_SLACK + 30))
wait_for "$TIMEOUT" "rollout-canary's template reading rollout-r$r" refs_are rollout-canary "rollout-r$r" "rollout-r$r"
bad_pod() {
  local pod owner ready
  while read -r pod owner ready; do
    if [[ -n $pod && $(pod_env "$pod" MODE) == bad ]]; then
      [[ $ready != True ]] || die "the canary's pod $pod runs MODE=bad and is Ready"
      say "the canary's new pod $pod runs MODE=bad and is not Ready"
      return 0
    fi
  done <<<"$(app_pods rollout-canary)"
  return 1
}
wait_for "$TIMEOUT" "a canary pod running MODE=bad" bad_pod
watch_ends "the automatic rollback of revision $r"
[[ $(rollout_condition) == False/AutoRolledBack ]] || die "condition Rollout is $(rollout_condition), not False/AutoRolledBack"
[[ $(cm_value rollout MODE)/$(cm_value rollout VERSION) == good/v2 ]] || die "the target ConfigMap does not hold revision $n's data"
wait_for "$TIMEOUT" "rollout-canary's template reading the target ConfigMap again" refs_are rollout-canary rollout rollout
k -n "$NS" rollout status deployment/rollout-canary --timeout="${TIMEOUT}s"
wait_for "$TIMEOUT" "rollout-canary on one Ready pod with VERSION=v2 and MODE=good again" runs rollout-canary v2
wait_for "$TIMEOUT" "ADOPTED 3/3 workloads after the rollback" adopted_is "3/3 workloads"
[[ $(untouched rollout-a rollout-b) == "$others" ]] ||
  die "rollout-a or rollout-b was restarted:"$'\n'"$(diff <(echo "$others") <(untouched rollout-a rollout-b))"
k -n "$NS" get configentry rollout
say "the canary's new pods never became Ready; beacon rolled back on its own; rollout-a and rollout-b never restarted"
end
