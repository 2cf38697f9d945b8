"""Progressive config rollouts end to end: waves under the global restart budget, resuming after a crash and a
SIGKILL, a canary on an immutable copy of the new revision, manual promotion, and automatic rollback.

Why it exists: a tracked rollout is a state machine spread over time and over operator processes (the wave in
progress lives in status.rollout, the restarts in the Deployments' pod templates), and what it promises is only
visible on a real control plane: which Deployments the operator patched and when (the apiserver's audit log keeps
the body of every workload patch, so a restart is told from any other write), what kube-controller-manager made of
it (one new ReplicaSet per restart), what the running pods mount (the target ConfigMap or a `<target>-r<N>` copy).
There is no kubelet, so the tests set pods Ready through the status subresource, as a kubelet would, and only the
pods of each Deployment's newest ReplicaSet: a wave's new pods become Ready exactly when the test says so, or never.

One operator serves the module, started with a small debounce and a small --restart-budget, so that the budget
shows in the timing of the waves; the waves test restarts it with the test-only crash point, and SIGKILLs it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from beacon.config_core import (
    ANNOTATION_HASH,
    ANNOTATION_REVISION,
    ANNOTATION_ROLLBACK_OF,
    ANNOTATION_TEMPLATE_HASHES,
    ANNOTATION_TEMPLATE_REVISIONS,
    LABEL_ENTRY_UID,
    config_map_data,
    parse_hashes,
    parse_revisions,
)
from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import Audit, OperatorProcess, apply, config_entry, eventually

pytestmark = pytest.mark.integration

ENTRY = "app"  # every test's ConfigEntry, and so its target ConfigMap
DEBOUNCE = 0.5  # --reload-debounce
BUDGET_COUNT, BUDGET_SECONDS = 2, 4.0  # --restart-budget: burst 2, refilled at 2 per 4 s
DELAY_SLACK = 0.5  # what the apiserver's receipt of a patch may lag behind the operator's taking a token
SETTLE = 4.0  # long enough for a restart that should not happen to have happened (debounce, budget)
CRASH_ENV = "BEACON_TEST_CRASH_POINT"
CRASH_AT = 3  # the crash point: after the 3rd restart patch, inside wave 1
HOLD = 5  # spec.canary.holdSeconds
ROLLOUT_TIMEOUT = 20  # spec.rollout.rolloutTimeoutSeconds of the rollback test
TIMEOUT_SLACK = 25  # how late after the timeout the rollback may come (a busy 2-core machine)

RS_REVISION = "deployment.kubernetes.io/revision"
POD_TEMPLATE_HASH = "pod-template-hash"


# ---------------------------------------------------------------------------------------------------- operator
@pytest.fixture(scope="module")
def rollout_operator(
    cluster: DevCluster,
    beacon_operator: OperatorProcess,
    operator_kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The module's operator; the session's is stopped meanwhile (two standalone operators would both act), and
    left stopped: the next test that needs it starts it again through the operator_running fixture."""
    beacon_operator.stop()
    op = OperatorProcess(
        cluster=cluster,
        kubeconfig=operator_kubeconfig,
        log_dir=tmp_path_factory.mktemp("rollout-operator"),
        extra_args=(
            "--resync-seconds=0",
            f"--reload-debounce={DEBOUNCE}",
            "--reload-rate-limit=20/60",  # the per-workload limit out of the way: the global budget is tested
            f"--restart-budget={BUDGET_COUNT}/{BUDGET_SECONDS:g}",
        ),
    )
    op.start()
    yield op
    op.stop()


@pytest.fixture
def operator(rollout_operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The module's operator, started again if a test left it stopped; its logs are named at the end."""
    if rollout_operator.proc is None or rollout_operator.proc.poll() is not None:
        rollout_operator.start()
    yield rollout_operator
    print(f"\noperator logs: {rollout_operator.log_dir}")


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment (which OperatorProcess passes on) for the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _log_tail(op: OperatorProcess, lines: int = 40) -> str:
    return "\n".join(op.logs().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------- the API
class Api:
    """GETs and status patches as the cluster admin over one kept-alive connection: the tests poll a lot, and a
    kubectl process per read would be most of their time on 2 cores."""

    def __init__(self, cluster: DevCluster) -> None:
        self._host, self._port = "127.0.0.1", int(cluster.server.rsplit(":", 1)[1])
        self._context = cluster.admin_ssl_context()
        self._conn: http.client.HTTPSConnection | None = None

    def _request(self, method: str, path: str, body: Any = None, content_type: str = "") -> tuple[int, Any]:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(self._host, self._port, context=self._context, timeout=30)
            headers = {"Content-Type": content_type} if content_type else {}
            try:
                self._conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            return resp.status, json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    def get(self, path: str) -> dict[str, Any] | None:
        status, body = self._request("GET", path)
        if status == 404:
            return None
        assert status == 200, f"GET {path}: {status} {body}"
        found: dict[str, Any] = body
        return found

    def items(self, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (self.get(path) or {}).get("items") or []
        return items

    def patch_status(self, path: str, body: Mapping[str, Any]) -> None:
        status, out = self._request("PATCH", f"{path}/status", body, "application/merge-patch+json")
        assert status == 200, f"PATCH {path}/status: {status} {out}"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


@pytest.fixture(scope="module")
def api(cluster: DevCluster) -> Iterator[Api]:
    made = Api(cluster)
    yield made
    made.close()


def _entry(api: Api, ns: str) -> dict[str, Any]:
    return api.get(f"/apis/beacon.dev/v1alpha1/namespaces/{ns}/configentries/{ENTRY}") or {}


def _status(api: Api, ns: str) -> dict[str, Any]:
    found: dict[str, Any] = _entry(api, ns).get("status") or {}
    return found


def _rollout(api: Api, ns: str) -> dict[str, Any]:
    found: dict[str, Any] = _status(api, ns).get("rollout") or {}
    return found


def _condition(status: Mapping[str, Any], kind: str) -> dict[str, Any]:
    for c in status.get("conditions") or []:
        if c.get("type") == kind:
            found: dict[str, Any] = c
            return found
    return {}


def _config_map(api: Api, ns: str, name: str) -> dict[str, Any] | None:
    return api.get(f"/api/v1/namespaces/{ns}/configmaps/{name}")


def _revisions(api: Api, ns: str) -> dict[int, dict[str, Any]]:
    """The entry's ControllerRevisions by number."""
    return {int(r["revision"]): r for r in api.items(f"/apis/apps/v1/namespaces/{ns}/controllerrevisions")}


def _deployment(api: Api, ns: str, name: str) -> dict[str, Any]:
    found = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")
    assert found is not None, f"Deployment {name} is gone"
    return found


def _events(api: Api, ns: str, *, kind: str, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in api.items(f"/api/v1/namespaces/{ns}/events")
        if e["involvedObject"].get("kind") == kind and e["involvedObject"].get("name") == name
    ]


def _entry_event(api: Api, ns: str, reason: str) -> dict[str, Any] | None:
    return next((e for e in _events(api, ns, kind="ConfigEntry", name=ENTRY) if e.get("reason") == reason), None)


# ---------------------------------------------------------------------------------------------------- workloads
def _workload(name: str, ns: str, *, tier: str, mounts: bool) -> dict[str, Any]:
    """An opted-in Deployment of one replica (`beacon.dev/reload: app`). `mounts`: its pod reads the ConfigMap as
    a volume, with envFrom and with one env valueFrom (the references a canary restart rewrites)."""
    pod_labels = {"app": name}
    container: dict[str, Any] = {"name": "app", "image": "registry.invalid/app:1"}
    pod: dict[str, Any] = {"containers": [container]}
    if mounts:
        container["envFrom"] = [{"configMapRef": {"name": ENTRY}}]
        container["env"] = [{"name": "DB_HOST", "valueFrom": {"configMapKeyRef": {"name": ENTRY, "key": "db.host"}}}]
        container["volumeMounts"] = [{"name": "config", "mountPath": "/etc/app"}]
        pod["volumes"] = [{"name": "config", "configMap": {"name": ENTRY}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": name, "tier": tier},
            "annotations": {"beacon.dev/reload": ENTRY},
        },
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 50,
            "selector": {"matchLabels": pod_labels},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


def _config_refs(pod_spec: Mapping[str, Any]) -> set[str]:
    """Every ConfigMap name a pod spec (a template's, or a pod's) reads: volumes, projected sources, envFrom and
    env valueFrom of its containers and init containers; not the cluster's CA bundle, which the ServiceAccount
    admission adds to every pod (a projected volume)."""
    names: set[str] = set()
    for volume in pod_spec.get("volumes") or []:
        if "configMap" in volume:
            names.add(volume["configMap"]["name"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                names.add(source["configMap"]["name"])
    for container in [*(pod_spec.get("containers") or []), *(pod_spec.get("initContainers") or [])]:
        for ref in container.get("envFrom") or []:
            if "configMapRef" in ref:
                names.add(ref["configMapRef"]["name"])
        for env in container.get("env") or []:
            key_ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
            if key_ref:
                names.add(key_ref["name"])
    return names - {"kube-root-ca.crt"}


def _template(api: Api, ns: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = _deployment(api, ns, name)["spec"]["template"]
    return found


def _template_config(api: Api, ns: str, name: str) -> tuple[set[str], dict[str, str], dict[str, int]]:
    """(ConfigMaps referenced, beacon.dev/config-hashes, beacon.dev/config-revisions) of a Deployment's template."""
    template = _template(api, ns, name)
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    return (
        _config_refs(template["spec"]),
        parse_hashes(annotations.get(ANNOTATION_TEMPLATE_HASHES)) or {},
        parse_revisions(annotations.get(ANNOTATION_TEMPLATE_REVISIONS)),
    )


def _by_app(items: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        out.setdefault((item["metadata"].get("labels") or {}).get("app", ""), []).append(item)
    return out


def _replica_sets(api: Api, ns: str) -> dict[str, list[dict[str, Any]]]:
    return _by_app(api.items(f"/apis/apps/v1/namespaces/{ns}/replicasets"))


def _rs_counts(api: Api, ns: str, names: Iterable[str]) -> dict[str, int]:
    sets = _replica_sets(api, ns)
    return {name: len(sets.get(name, [])) for name in names}


def _restarted_at_least(api: Api, ns: str, names: Sequence[str], count: int) -> bool:
    """At least `count` of the Deployments have a second ReplicaSet."""
    return sum(n >= 2 for n in _rs_counts(api, ns, names).values()) >= count


def _pods(api: Api, ns: str) -> dict[str, list[dict[str, Any]]]:
    return _by_app(p for p in api.items(f"/api/v1/namespaces/{ns}/pods") if not p["metadata"].get("deletionTimestamp"))


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions") or []
    )


def _newest_hash(api: Api, ns: str, name: str) -> str | None:
    """The pod-template-hash of a Deployment's newest ReplicaSet, once the deployment controller has seen its
    current template (None before)."""
    deployment = _deployment(api, ns, name)
    if (deployment.get("status") or {}).get("observedGeneration", 0) < deployment["metadata"]["generation"]:
        return None
    sets = _replica_sets(api, ns).get(name, [])
    if not sets:
        return None
    newest = max(sets, key=lambda rs: int(rs["metadata"]["annotations"].get(RS_REVISION, "0")))
    found: str = newest["metadata"]["labels"][POD_TEMPLATE_HASH]
    return found


def _new_pods(api: Api, ns: str, name: str) -> list[dict[str, Any]]:
    """The pods of a Deployment's newest ReplicaSet (its current template)."""
    digest = _newest_hash(api, ns, name)
    if digest is None:
        return []
    return [p for p in _pods(api, ns).get(name, []) if p["metadata"]["labels"].get(POD_TEMPLATE_HASH) == digest]


def _make_ready(api: Api, ns: str, names: Iterable[str]) -> None:
    """Set the new pods of each Deployment Ready, as a kubelet would once they pass their readiness probes (pods
    of older templates are left as they are), and wait until each Deployment runs only those: the deployment
    controller scales the older ReplicaSets down, and an unscheduled pod is deleted at once."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}
    }
    for name in names:
        pods = eventually(functools.partial(_new_pods, api, ns, name), timeout=30, what=f"the new pod of {name}")
        for pod in pods:
            if not _ready(pod):
                api.patch_status(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}", status)
    for name in names:

        def only_new(name: str = name) -> bool:
            digest = _newest_hash(api, ns, name)
            pods = _pods(api, ns).get(name, [])
            return bool(pods) and all(
                p["metadata"]["labels"].get(POD_TEMPLATE_HASH) == digest and _ready(p) for p in pods
            )

        eventually(only_new, timeout=30, what=f"{name} running only its new pods, Ready")


# ---------------------------------------------------------------------------------------------------- the audit log
@dataclass(frozen=True)
class Restart:
    """A patch (or update) of a Deployment by the operator that changed its pod template's config-hashes."""

    name: str
    at: float  # the apiserver's receipt, epoch seconds
    hashes: str


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _hashes_written(request: Any) -> str | None:
    """The beacon.dev/config-hashes pod-template annotation a request body sets (merge or strategic patch, a
    whole object, or a JSON patch), else None."""
    if isinstance(request, dict):
        annotations = (((request.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations")
        value = (annotations or {}).get(ANNOTATION_TEMPLATE_HASHES)
        return value if isinstance(value, str) else None
    if isinstance(request, list):
        escaped = ANNOTATION_TEMPLATE_HASHES.replace("~", "~0").replace("/", "~1")
        for op in request:
            path = str(op.get("path", "")) if isinstance(op, dict) else ""
            if op.get("op") not in ("add", "replace") or not path.startswith("/spec/template/metadata/annotations"):
                continue
            value = op.get("value")
            if path.endswith("/" + escaped) and isinstance(value, str):
                return value
            if path == "/spec/template/metadata/annotations" and isinstance(value, dict):
                found = value.get(ANNOTATION_TEMPLATE_HASHES)
                return found if isinstance(found, str) else None
    return None


def _restarts(audit: Audit, ns: str, *, since: float, before: Mapping[str, str | None] | None = None) -> list[Restart]:
    """The operator's successful writes of Deployments in `ns` since `since` that changed the config-hashes
    annotation of the pod template, oldest first. `before`: each Deployment's value before `since` (None: none);
    a write that sets the value the template already has is no restart and is left out."""
    last: dict[str, str | None] = dict(before or {})
    out = []
    events = sorted(
        (e for e in audit.writes(since=since, namespace=ns) if e.get("verb") in ("patch", "update")),
        key=lambda e: str(e.get("requestReceivedTimestamp")),
    )
    for event in events:
        ref = event.get("objectRef") or {}
        if ref.get("resource") != "deployments" or ref.get("subresource"):
            continue
        if int((event.get("responseStatus") or {}).get("code", 0)) >= 300:
            continue
        value = _hashes_written(event.get("requestObject"))
        if value is None or last.get(ref["name"]) == value:
            continue
        last[ref["name"]] = value
        out.append(Restart(name=ref["name"], at=_epoch(event["requestReceivedTimestamp"]), hashes=value))
    return out


def _restarted(restarts: Iterable[Restart]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in restarts:
        counts[r.name] = counts.get(r.name, 0) + 1
    return counts


def _budget_violations(restarts: Sequence[Restart], *, count: int, seconds: float) -> list[str]:
    """Windows in which more restarts were made than a token bucket (burst `count`, refilled at `count` per
    `seconds`) allows: at most count + rate * (t_j - t_i) restarts from the i-th to the j-th (both included), the
    window widened by DELAY_SLACK for the apiserver's receipt lagging the operator's decision."""
    rate = count / seconds
    times = sorted(r.at for r in restarts)
    found = []
    for i, start in enumerate(times):
        for j in range(i + 1, len(times)):
            made = j - i + 1
            allowed = count + rate * (times[j] - start + DELAY_SLACK)
            if made > allowed:
                found.append(f"{made} restarts within {times[j] - start:.2f}s (a budget of {count}/{seconds:g}s)")
    return found


# ---------------------------------------------------------------------------------------------------- ADOPTED
def _column(cluster: DevCluster, ns: str, title: str = "ADOPTED") -> str:
    """A column of `kubectl get configentries`: from its title to where the next title starts."""
    out = cluster.kubectl("get", "configentries", "-n", ns, ENTRY).stdout.splitlines()
    header, row = out[0], out[1]
    start = header.index(title)
    rest = header[start + len(title) :]
    gap = len(rest) - len(rest.lstrip(" "))
    end = start + len(title) + gap if rest.strip() else len(row)
    return row[start:end].strip()


def _expect_adopted(cluster: DevCluster, api: Api, ns: str, summary: str, *, what: str) -> None:
    """status.adoption.summary becomes `summary`, and the ADOPTED column shows it."""
    try:
        eventually(lambda: (_status(api, ns).get("adoption") or {}).get("summary") == summary, timeout=30, what=what)
    finally:
        status = _status(api, ns)
        print(
            f"\n{what}: adoption {json.dumps(status.get('adoption'))}\n"
            f"  rollout {json.dumps(status.get('rollout'))}\n  rollback {json.dumps(status.get('rollback'))}"
        )
    assert _column(cluster, ns) == summary, f"{what}: ADOPTED column"


def _setup(
    cluster: DevCluster, api: Api, ns: str, data: dict[str, str], workloads: Sequence[dict[str, Any]], **spec: Any
) -> None:
    """The entry materialised as revision 1, then its opted-in Deployments, their first pods Ready: all adopted."""
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    eventually(lambda: _status(api, ns).get("currentRevision") == 1, timeout=30, what="revision 1 materialised")
    apply(cluster, {"apiVersion": "v1", "kind": "List", "items": list(workloads)})
    names = [w["metadata"]["name"] for w in workloads]
    _make_ready(api, ns, names)
    _expect_adopted(cluster, api, ns, f"{len(names)}/{len(names)} workloads", what="opted in")


def _wait_exit(op: OperatorProcess, timeout: float) -> int:
    assert op.proc is not None
    try:
        return op.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the operator did not exit within {timeout}s:\n{_log_tail(op)}") from None


# ---------------------------------------------------------------------------------------------------- 1. waves
def test_waves_wait_for_readiness_keep_the_restart_budget_and_survive_a_crash_and_a_sigkill(
    cluster: DevCluster, namespace: str, api: Api, operator: OperatorProcess, audit: Audit
) -> None:
    """12 Deployments, waves of 4: each wave starts only once the previous one's new pods are all Ready; the
    operator crashes right after a restart patch of wave 1 (before recording it) and is SIGKILLed in wave 2; every
    Deployment is restarted exactly once all the same, and no stretch of time holds more restarts than the
    budget allows."""
    ns = namespace
    names = [f"w{i:02d}" for i in range(12)]
    waves = [names[0:4], names[4:8], names[8:12]]  # sorted by kind, then name
    data = {"db/host": "a", "feature/flag": "off"}
    spec = {"rollout": {"waveSize": 4, "rolloutTimeoutSeconds": 600}}
    _setup(cluster, api, ns, data, [_workload(n, ns, tier="main", mounts=False) for n in names], **spec)
    assert _rs_counts(api, ns, names) == dict.fromkeys(names, 1)
    # opting in restarted nothing: no template carries beacon's annotation yet
    assert all(_template_config(api, ns, n)[1] == {} for n in names)
    previous: dict[str, str | None] = dict.fromkeys(names)

    # the operator, started again with the crash point: it exits right after its CRASH_AT-th restart patch
    operator.stop()
    incarnations = [time.time()]
    with _env(CRASH_ENV, f"after-restart-patch:{CRASH_AT}"):
        operator.start()
    try:
        edited = time.time()
        data["db/host"] = "b"
        apply(cluster, config_entry(ENTRY, ns, data, **spec))
        code = _wait_exit(operator, timeout=60)
    finally:
        operator.stop()  # nothing to do once it crashed; else no operator with the crash point is left running
    assert code == 137, f"the crash point was not hit (exit {code}):\n{_log_tail(operator)}"
    at_crash = _restarts(audit, ns, since=edited, before=previous)
    print(f"\ncrashed after restarting {[r.name for r in at_crash]}; rollout {json.dumps(_rollout(api, ns))}")
    assert len(at_crash) == CRASH_AT, [r.name for r in at_crash]
    assert {r.name for r in at_crash} <= set(waves[0]), "the crash point was hit outside wave 1"

    incarnations.append(time.time())
    operator.start()  # without the crash point
    wave_ready: list[float] = []  # when the test set each wave's last new pod Ready
    for number, members in enumerate(waves, start=1):
        later = [n for wave in waves[number:] for n in wave]

        def running(number: int = number, members: list[str] = members) -> bool:
            rollout = _rollout(api, ns)
            return rollout.get("wave") == number and sorted(rollout.get("members") or []) == sorted(
                f"Deployment/{n}" for n in members
            )

        eventually(running, timeout=60, what=f"wave {number} in status.rollout")
        assert _rollout(api, ns).get("phase") == "Waves"
        assert _rollout(api, ns).get("revision") == 2
        if number == 2:
            # SIGKILL in the middle of wave 2: once some of it is restarted (the budget paces the rest)
            eventually(
                functools.partial(_restarted_at_least, api, ns, members, 2),
                timeout=60,
                what="two Deployments of wave 2 restarted",
            )
            operator.stop(signal.SIGKILL)
            killed = _rs_counts(api, ns, members)
            print(f"\nSIGKILL in wave 2 with ReplicaSets {killed}; rollout {json.dumps(_rollout(api, ns))}")
            incarnations.append(time.time())
            operator.start()
        eventually(
            functools.partial(_restarted_at_least, api, ns, members, len(members)),
            timeout=60,
            what=f"every Deployment of wave {number} restarted",
        )
        _expect_adopted(cluster, api, ns, f"{4 * (number - 1)}/12 workloads", what=f"wave {number} restarted")

        # all but one of the wave Ready: the next wave waits
        _make_ready(api, ns, members[:-1])
        time.sleep(SETTLE)
        early = [r.name for r in _restarts(audit, ns, since=edited, before=previous) if r.name in later]
        assert early == [], f"wave {number + 1} started while {members[-1]} of wave {number} was not Ready"
        assert _rs_counts(api, ns, later) == dict.fromkeys(later, 1)
        assert _rollout(api, ns).get("wave") == number
        _expect_adopted(cluster, api, ns, f"{4 * number - 1}/12 workloads", what=f"wave {number}: 3 of 4 Ready")

        wave_ready.append(time.time())
        _make_ready(api, ns, members[-1:])
        _expect_adopted(cluster, api, ns, f"{4 * number}/12 workloads", what=f"wave {number} Ready")

    eventually(lambda: _rollout(api, ns).get("phase") == "Complete", timeout=30, what="the rollout Complete")
    status = _status(api, ns)
    assert status["currentRevision"] == 2
    rollout_condition = _condition(status, "Rollout")
    assert (rollout_condition.get("status"), rollout_condition.get("reason")) == ("True", "Complete"), status
    assert _column(cluster, ns) == "12/12 workloads"

    # every Deployment restarted exactly once for revision 2: by the audit log ...
    restarts = _restarts(audit, ns, since=edited, before=previous)
    print("\nrestarts: " + ", ".join(f"{r.name}@{r.at - edited:.1f}s" for r in restarts))
    assert _restarted(restarts) == dict.fromkeys(names, 1)
    want = f"{ENTRY}={status['hash']}"
    assert {r.hashes for r in restarts} == {want}
    # ... and by kube-controller-manager: the original ReplicaSet and one more
    assert _rs_counts(api, ns, names) == dict.fromkeys(names, 2)
    for name in names:
        _, hashes, revisions = _template_config(api, ns, name)
        assert (hashes, revisions) == ({ENTRY: status["hash"]}, {ENTRY: 2}), name

    # each wave's restarts came after the previous wave's last pod was set Ready
    by_name = {r.name: r.at for r in restarts}
    for number in (2, 3):
        first = min(by_name[n] for n in waves[number - 1])
        assert first >= wave_ready[number - 2], f"wave {number} started before wave {number - 1} was Ready"

    # the budget, within each operator process (a new process starts with a full bucket)
    bounds = [*incarnations[1:], float("inf")]
    for start, end in zip(incarnations, bounds, strict=True):
        mine = [r for r in restarts if start <= r.at < end]
        assert _budget_violations(mine, count=BUDGET_COUNT, seconds=BUDGET_SECONDS) == []


# ---------------------------------------------------------------------------------------------------- 2. canary
def _canary_setup(cluster: DevCluster, api: Api, ns: str, data: dict[str, str], **spec: Any) -> tuple[list[str], str]:
    """The entry (`spec`: its canary and rollout) and three Deployments reading its ConfigMap (volume, envFrom,
    env): c-front labelled tier=canary, x-back and y-back not. Returns the names and the entry's uid."""
    workloads = [
        _workload("c-front", ns, tier="canary", mounts=True),
        _workload("x-back", ns, tier="main", mounts=True),
        _workload("y-back", ns, tier="main", mounts=True),
    ]
    _setup(cluster, api, ns, data, workloads, **spec)
    return [w["metadata"]["name"] for w in workloads], str(_entry(api, ns)["metadata"]["uid"])


def _canary_started(api: Api, ns: str, *, revision: int, data: Mapping[str, str], uid: str) -> None:
    """The canary restarted onto `<target>-r<revision>`, an immutable copy of the revision's data owned by the
    entry, while the target ConfigMap still holds the previous revision."""
    eventually(lambda: _rs_counts(api, ns, ["c-front"])["c-front"] >= 2, timeout=30, what="the canary restarted")
    copy_name = f"{ENTRY}-r{revision}"
    copy = eventually(lambda: _config_map(api, ns, copy_name), timeout=10, what=f"ConfigMap {copy_name}")
    assert copy.get("immutable") is True
    assert copy.get("data") == config_map_data(data)
    labels = copy["metadata"].get("labels") or {}
    assert labels.get(LABEL_ENTRY_UID) == uid
    assert labels.get("beacon.dev/canary-revision") == str(revision)
    assert [r["uid"] for r in copy["metadata"].get("ownerReferences") or []] == [uid]
    stored = _revisions(api, ns)[revision]
    refs, hashes, revisions = _template_config(api, ns, "c-front")
    assert refs == {copy_name}, f"the canary's template reads {refs}"
    assert hashes == {ENTRY: stored["metadata"]["annotations"][ANNOTATION_HASH]}
    assert revisions == {ENTRY: revision}


def test_a_canary_runs_a_copy_of_the_new_revision_and_the_rest_follow_after_the_hold(
    cluster: DevCluster, namespace: str, api: Api, operator: OperatorProcess, audit: Audit
) -> None:
    ns = namespace
    data = {"db/host": "a", "feature/flag": "off"}
    old = dict(data)
    spec = {"canary": {"selector": {"matchLabels": {"tier": "canary"}}, "holdSeconds": HOLD}}
    names, uid = _canary_setup(cluster, api, ns, data, **spec)
    others = ["x-back", "y-back"]
    previous: dict[str, str | None] = dict.fromkeys(names)

    edited = time.time()
    data["db/host"] = "b"
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    _canary_started(api, ns, revision=2, data=data, uid=uid)
    target = _config_map(api, ns, ENTRY)
    assert target is not None
    assert target["data"] == config_map_data(old), "the target ConfigMap took revision 2 during the canary step"
    assert target["metadata"]["annotations"][ANNOTATION_REVISION] == "1"
    status = _status(api, ns)
    rollout = status.get("rollout") or {}
    assert status.get("currentRevision") == 1
    assert (rollout.get("revision"), rollout.get("phase"), rollout.get("wave")) == (2, "Canary", 0), rollout
    assert rollout.get("members") == ["Deployment/c-front"]
    _expect_adopted(cluster, api, ns, "0/3 workloads", what="canary restarted, not Ready")
    assert _rs_counts(api, ns, others) == dict.fromkeys(others, 1)

    # the canary's new pods Ready: the hold starts; they mount the copy
    ready_at = time.time()
    _make_ready(api, ns, ["c-front"])
    (pod,) = _pods(api, ns)["c-front"]
    assert _config_refs(pod["spec"]) == {f"{ENTRY}-r2"}
    phase = eventually(
        lambda: (found := _rollout(api, ns).get("phase")) != "Canary" and found, timeout=30, what="the canary step over"
    )
    if time.time() < ready_at + HOLD - 1:  # else the hold may be over already (a slow machine)
        assert phase == "Holding"
        assert _condition(_status(api, ns), "Rollout").get("reason") == "CanaryHolding"
        assert _rs_counts(api, ns, others) == dict.fromkeys(others, 1), "the others restarted during the hold"
        assert (_config_map(api, ns, ENTRY) or {}).get("data") == config_map_data(old)
    _expect_adopted(cluster, api, ns, "1/3 workloads", what="canary Ready, holding")

    # after the hold: promoted, the others restarted (one wave), the canary not again
    eventually(
        lambda: _rs_counts(api, ns, others) == dict.fromkeys(others, 2), timeout=HOLD + 30, what="the others restarted"
    )
    restarts = _restarts(audit, ns, since=edited, before=previous)
    first_other = min(r.at for r in restarts if r.name in others)
    assert first_other >= ready_at + HOLD, f"promoted {first_other - ready_at:.1f}s after the canary was Ready"
    target = _config_map(api, ns, ENTRY) or {}
    assert target.get("data") == config_map_data(data)
    assert target["metadata"]["annotations"][ANNOTATION_REVISION] == "2"
    assert _entry_event(api, ns, "ConfigPromoted") is not None
    status = _status(api, ns)
    assert status.get("currentRevision") == 2
    assert (status.get("rollout") or {}).get("phase") in ("Waves", "Complete")
    _expect_adopted(cluster, api, ns, "1/3 workloads", what="promoted, the others restarting")
    for name in others:
        refs, hashes, revisions = _template_config(api, ns, name)
        assert (refs, hashes, revisions) == ({ENTRY}, {ENTRY: status["hash"]}, {ENTRY: 2}), name

    _make_ready(api, ns, others)
    _expect_adopted(cluster, api, ns, "3/3 workloads", what="all on revision 2")
    eventually(lambda: _rollout(api, ns).get("phase") == "Complete", timeout=30, what="the rollout Complete")
    rollout_condition = _condition(_status(api, ns), "Rollout")
    assert (rollout_condition.get("status"), rollout_condition.get("reason")) == ("True", "Complete")

    # the canary was restarted once (it keeps the copy until its next restart); each other once
    time.sleep(SETTLE)
    restarts = _restarts(audit, ns, since=edited, before=previous)
    assert _restarted(restarts) == dict.fromkeys(names, 1)
    assert _rs_counts(api, ns, names) == dict.fromkeys(names, 2)
    assert _template_config(api, ns, "c-front")[0] == {f"{ENTRY}-r2"}
    assert _column(cluster, ns) == "3/3 workloads"


def test_manual_promotion_waits_for_the_promote_annotation(
    cluster: DevCluster, namespace: str, api: Api, operator: OperatorProcess, audit: Audit
) -> None:
    ns = namespace
    data = {"db/host": "a", "feature/flag": "off"}
    spec = {"canary": {"selector": {"matchLabels": {"tier": "canary"}}, "holdSeconds": 1, "promotion": "Manual"}}
    names, uid = _canary_setup(cluster, api, ns, data, **spec)
    others = ["x-back", "y-back"]
    previous: dict[str, str | None] = dict.fromkeys(names)

    edited = time.time()
    data["feature/flag"] = "on"
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    _canary_started(api, ns, revision=2, data=data, uid=uid)
    _make_ready(api, ns, ["c-front"])
    eventually(
        lambda: _rollout(api, ns).get("phase") == "AwaitingPromotion", timeout=30, what="phase AwaitingPromotion"
    )
    condition = _condition(_status(api, ns), "Rollout")
    assert (condition.get("status"), condition.get("reason")) == ("True", "AwaitingPromotion")
    _expect_adopted(cluster, api, ns, "1/3 workloads", what="awaiting promotion")

    # no promotion without the annotation, nor with one naming another revision
    time.sleep(SETTLE)
    cluster.kubectl("annotate", "configentry", ENTRY, "-n", ns, "beacon.dev/promote=1")
    time.sleep(SETTLE)
    assert _rollout(api, ns).get("phase") == "AwaitingPromotion"
    assert _rs_counts(api, ns, others) == dict.fromkeys(others, 1)
    assert [r.name for r in _restarts(audit, ns, since=edited, before=previous)] == ["c-front"]
    assert _status(api, ns).get("currentRevision") == 1

    promoted_at = time.time()
    cluster.kubectl("annotate", "--overwrite", "configentry", ENTRY, "-n", ns, "beacon.dev/promote=2")
    eventually(lambda: _rs_counts(api, ns, others) == dict.fromkeys(others, 2), timeout=30, what="the others restarted")
    restarts = _restarts(audit, ns, since=edited, before=previous)
    assert min(r.at for r in restarts if r.name in others) >= promoted_at
    assert (_config_map(api, ns, ENTRY) or {}).get("data") == config_map_data(data)
    _make_ready(api, ns, others)
    _expect_adopted(cluster, api, ns, "3/3 workloads", what="promoted by hand, all on revision 2")
    eventually(lambda: _rollout(api, ns).get("phase") == "Complete", timeout=30, what="the rollout Complete")
    assert _restarted(_restarts(audit, ns, since=edited, before=previous)) == dict.fromkeys(names, 1)


# ---------------------------------------------------------------------------------------------------- 3. rollback
def test_a_canary_that_never_gets_ready_is_rolled_back_and_its_data_not_retried(
    cluster: DevCluster, namespace: str, api: Api, operator: OperatorProcess, audit: Audit
) -> None:
    ns = namespace
    data = {"db/host": "a", "feature/flag": "off"}
    old = dict(data)
    spec: dict[str, Any] = {
        "canary": {"selector": {"matchLabels": {"tier": "canary"}}, "holdSeconds": HOLD},
        "rollout": {"rolloutTimeoutSeconds": ROLLOUT_TIMEOUT},
    }
    names, uid = _canary_setup(cluster, api, ns, data, **spec)
    others = ["x-back", "y-back"]
    previous: dict[str, str | None] = dict.fromkeys(names)
    hash1 = _status(api, ns)["hash"]

    edited = time.time()
    data["db/host"] = "bad"
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    _canary_started(api, ns, revision=2, data=data, uid=uid)
    _expect_adopted(cluster, api, ns, "0/3 workloads", what="canary restarted, never Ready")

    # the canary's new pods are never set Ready: rolled back once the timeout has passed
    eventually(
        lambda: _status(api, ns).get("rollback"),
        timeout=ROLLOUT_TIMEOUT + TIMEOUT_SLACK,
        what="the automatic rollback",
    )
    eventually(
        lambda: len([r for r in _restarts(audit, ns, since=edited, before=previous) if r.name == "c-front"]) == 2,
        timeout=30,
        what="the canary restarted back",
    )
    canary_restarts = [r for r in _restarts(audit, ns, since=edited, before=previous) if r.name == "c-front"]
    waited = canary_restarts[1].at - canary_restarts[0].at
    print(f"\nrolled back {waited:.1f}s after the canary's restart (timeout {ROLLOUT_TIMEOUT}s)")
    # the timeout runs from the step's start, a moment before the canary's patch
    assert ROLLOUT_TIMEOUT - 2 <= waited <= ROLLOUT_TIMEOUT + TIMEOUT_SLACK

    status = _status(api, ns)
    rollback = status["rollback"]
    assert (rollback.get("failedRevision"), rollback.get("restoredRevision"), rollback.get("revision")) == (2, 1, 3)
    assert "c-front" in str(rollback.get("message")), rollback
    condition = _condition(status, "Rollout")
    assert (condition.get("status"), condition.get("reason")) == ("False", "AutoRolledBack"), condition
    assert "c-front" in str(condition.get("message")), condition
    assert (status.get("rollout") or {}).get("phase") == "RolledBack"
    assert status.get("currentRevision") == 3
    assert status.get("hash") == hash1
    event = _entry_event(api, ns, "ConfigAutoRolledBack")
    assert event is not None
    assert event["type"] == "Warning"
    # revision 3 carries revision 1's data, and says so
    revisions = _revisions(api, ns)
    assert sorted(revisions) == [1, 2, 3]
    assert revisions[3]["metadata"]["annotations"].get(ANNOTATION_ROLLBACK_OF) == "1"
    assert revisions[3]["data"] == revisions[1]["data"]
    target = _config_map(api, ns, ENTRY) or {}
    assert target.get("data") == config_map_data(old)
    # the canary points at the target again, with revision 1's content hash
    refs, hashes, template_revisions = _template_config(api, ns, "c-front")
    assert (refs, hashes, template_revisions) == ({ENTRY}, {ENTRY: hash1}, {ENTRY: 3})
    _expect_adopted(cluster, api, ns, "2/3 workloads", what="rolled back, the canary's new pods not Ready")

    # its new pods Ready: the canary runs revision 1's content again, from the target ConfigMap
    _make_ready(api, ns, ["c-front"])
    (pod,) = _pods(api, ns)["c-front"]
    assert _config_refs(pod["spec"]) == {ENTRY}
    pod_annotations = pod["metadata"].get("annotations") or {}
    assert parse_hashes(pod_annotations.get(ANNOTATION_TEMPLATE_HASHES)) == {ENTRY: hash1}
    _expect_adopted(cluster, api, ns, "3/3 workloads", what="rolled back, the canary Ready")
    assert _rs_counts(api, ns, others) == dict.fromkeys(others, 1)
    assert not [r for r in _restarts(audit, ns, since=edited, before=previous) if r.name in others]

    # the failed data is not tried again while spec.data is unchanged: not later, not after a restart
    def unchanged(what: str) -> None:
        restarts = _restarts(audit, ns, since=edited, before=previous)
        assert _restarted(restarts) == {"c-front": 2}, f"{what}: {[r.name for r in restarts]}"
        assert sorted(_revisions(api, ns)) == [1, 2, 3], what
        assert _config_map(api, ns, f"{ENTRY}-r4") is None, what
        assert (_config_map(api, ns, ENTRY) or {}).get("data") == config_map_data(old), what
        now = _status(api, ns)
        assert now.get("currentRevision") == 3, what
        assert (now.get("rollback") or {}).get("failedRevision") == 2, what
        assert _condition(now, "Rollout").get("reason") == "AutoRolledBack", what
        assert _column(cluster, ns) == "3/3 workloads", what

    time.sleep(2 * SETTLE)
    unchanged("a while after the rollback")
    operator.restart()
    time.sleep(2 * SETTLE)
    unchanged("after an operator restart")

    # new data: a new rollout, canary first
    data["db/host"] = "c"
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    eventually(lambda: _rollout(api, ns).get("revision") == 4, timeout=30, what="a rollout of revision 4")
    eventually(lambda: _rs_counts(api, ns, ["c-front"])["c-front"] >= 4, timeout=30, what="the canary restarted")
    _canary_started(api, ns, revision=4, data=data, uid=uid)
    assert _rollout(api, ns).get("phase") == "Canary"
    assert _rs_counts(api, ns, others) == dict.fromkeys(others, 1)
    _make_ready(api, ns, ["c-front"])
    eventually(
        lambda: _rs_counts(api, ns, others) == dict.fromkeys(others, 2), timeout=HOLD + 30, what="the others restarted"
    )
    _make_ready(api, ns, others)
    _expect_adopted(cluster, api, ns, "3/3 workloads", what="revision 4 rolled out")
    eventually(lambda: _rollout(api, ns).get("phase") == "Complete", timeout=30, what="the rollout Complete")
    assert (_config_map(api, ns, ENTRY) or {}).get("data") == config_map_data(data)
    assert _status(api, ns).get("currentRevision") == 4


# ---------------------------------------------------------------------------------------------------- 5. supersede
def test_a_newer_revision_supersedes_the_older_for_the_workloads_that_have_not_taken_it(
    cluster: DevCluster, namespace: str, api: Api, operator: OperatorProcess, audit: Audit
) -> None:
    """Revision 3 arrives while wave 1 of revision 2 is rolling: a new rollout starts at once, the Deployments
    that had taken 2 take 3 in its waves, and those that had not never take 2 (README "Newer revisions
    supersede")."""
    ns = namespace
    names = ["d0", "d1", "d2", "d3"]
    data = {"db/host": "a", "feature/flag": "off"}
    spec = {"rollout": {"waveSize": 2, "rolloutTimeoutSeconds": 600}}
    _setup(cluster, api, ns, data, [_workload(n, ns, tier="main", mounts=False) for n in names], **spec)
    previous: dict[str, str | None] = dict.fromkeys(names)
    edited = time.time()
    data["db/host"] = "b"
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    eventually(
        lambda: {r.name for r in _restarts(audit, ns, since=edited, before=previous)} == {"d0", "d1"},
        timeout=30,
        what="wave 1 of revision 2 restarted",
    )
    hash2 = _status(api, ns)["hash"]
    data["db/host"] = "c"
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    eventually(lambda: _rollout(api, ns).get("revision") == 3, timeout=30, what="the rollout of revision 3")
    assert _rollout(api, ns)["members"] == ["Deployment/d0", "Deployment/d1"]
    eventually(
        lambda: len(_restarts(audit, ns, since=edited, before=previous)) == 4,
        timeout=30,
        what="wave 1 of revision 3 restarted (d0 and d1 again)",
    )
    _make_ready(api, ns, ["d0", "d1"])
    eventually(lambda: _rollout(api, ns).get("wave") == 2, timeout=30, what="wave 2 of revision 3")
    eventually(lambda: len(_restarts(audit, ns, since=edited, before=previous)) == 6, timeout=30, what="wave 2")
    _make_ready(api, ns, ["d2", "d3"])
    eventually(lambda: _rollout(api, ns).get("phase") == "Complete", timeout=30, what="revision 3 complete")
    _expect_adopted(cluster, api, ns, "4/4 workloads", what="revision 3 everywhere")
    restarts = _restarts(audit, ns, since=edited, before=previous)
    hash3 = _status(api, ns)["hash"]
    assert _restarted(restarts) == {"d0": 2, "d1": 2, "d2": 1, "d3": 1}
    assert [r.hashes for r in restarts if r.name in ("d2", "d3")] == [f"{ENTRY}={hash3}"] * 2, "2 was skipped"
    assert {r.hashes for r in restarts if r.name in ("d0", "d1")} == {f"{ENTRY}={hash2}", f"{ENTRY}={hash3}"}


# ---------------------------------------------------------------------------------------------------- 6. deadline
def test_a_progress_deadline_fails_the_rollout_and_an_on_delete_statefulset_is_not_waited_for(
    cluster: DevCluster, namespace: str, api: Api, operator: OperatorProcess
) -> None:
    """A Deployment whose new pods do not progress within its progressDeadlineSeconds fails the rollout long
    before rolloutTimeoutSeconds (the deployment controller's verdict), and it is rolled back. A StatefulSet
    with an OnDelete update strategy in the same wave is patched but not waited for, with a Warning Event."""
    ns = namespace
    data = {"db/host": "a", "feature/flag": "off"}
    spec = {"rollout": {"rolloutTimeoutSeconds": 3600}}
    slow = _workload("slow", ns, tier="main", mounts=False)
    slow["spec"]["progressDeadlineSeconds"] = 6
    labels = {"app": "ondelete"}
    stateful = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "ondelete", "namespace": ns, "annotations": {"beacon.dev/reload": ENTRY}},
        "spec": {
            "replicas": 1,
            "serviceName": "ondelete",
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        },
    }
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    eventually(lambda: _status(api, ns).get("currentRevision") == 1, timeout=30, what="revision 1 materialised")
    apply(cluster, {"apiVersion": "v1", "kind": "List", "items": [slow, stateful]})
    _make_ready(api, ns, ["slow"])
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = {
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}
    }
    eventually(lambda: api.get(f"/api/v1/namespaces/{ns}/pods/ondelete-0"), timeout=30, what="the StatefulSet's pod")
    api.patch_status(f"/api/v1/namespaces/{ns}/pods/ondelete-0", ready)
    _expect_adopted(cluster, api, ns, "2/2 workloads", what="opted in")

    edited = time.monotonic()
    data["db/host"] = "b"
    apply(cluster, config_entry(ENTRY, ns, data, **spec))
    eventually(
        lambda: any(
            e.get("reason") == "ConfigRolloutSkipped" for e in _events(api, ns, kind="StatefulSet", name="ondelete")
        ),
        timeout=30,
        what="the OnDelete StatefulSet's Warning Event",
    )
    eventually(lambda: _template_config(api, ns, "slow")[2] == {ENTRY: 2}, timeout=30, what="slow restarted for 2")
    rollback = eventually(lambda: _status(api, ns).get("rollback"), timeout=90, what="the rollback")
    took = time.monotonic() - edited
    print(f"\nrolled back {took:.1f}s after the edit: {json.dumps(rollback)}")
    assert "ProgressDeadlineExceeded" in rollback["message"], rollback
    assert "Deployment/slow" in rollback["message"], "the StatefulSet was not waited for, so it did not fail"
    assert took < 90, "the deadline, not rolloutTimeoutSeconds (an hour), failed it"
    condition = _condition(_status(api, ns), "Rollout")
    assert (condition.get("status"), condition.get("reason")) == ("False", "AutoRolledBack")
    eventually(lambda: _template_config(api, ns, "slow")[2] == {ENTRY: 3}, timeout=30, what="slow back on 1's data")
