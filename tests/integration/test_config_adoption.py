"""Adoption and key-aware reloads end to end: the real operator on the real apiserver, kube-controller-manager's
deployment and replicaset controllers making ReplicaSets and Pods for real. There is no kubelet, so the test does
what one would: it sets a pod Ready through the status subresource (the controllers then scale the old
ReplicaSet down, and an unscheduled pod is deleted at once).

Two Deployments read one ConfigEntry's ConfigMap, each only some keys (`beacon.dev/reload: "app[db/]"` and
`"app[feature/flag]"`). Each edit restarts only the workload whose keys changed; the other counts as adopted. After
each step (an edit, new pods becoming Ready and old ones going, a rollback) status.adoption, the ADOPTED column
and `kubectl beacon config status` say how far the current revision has got, a pruned revision shows as pruned,
and a restart of the operator writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from beacon.config_core import ANNOTATION_TEMPLATE_HASHES, ANNOTATION_TEMPLATE_REVISIONS
from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import Audit, OperatorProcess, apply, config_entry, eventually, get_json

pytestmark = pytest.mark.integration

DEBOUNCE = 2.0  # the operator's default --reload-debounce
SETTLE = DEBOUNCE + 6  # long enough for a debounced rollout to have happened if one were coming


@pytest.fixture(scope="module", autouse=True)
def _operator_stopped_afterwards(beacon_operator: OperatorProcess) -> Iterator[None]:
    """Leave no operator running into modules that write status by hand (test_crds)."""
    yield
    beacon_operator.stop()


def _deployment(name: str, namespace: str, reload: str, *, kind: str = "Deployment") -> dict[str, Any]:
    labels = {"app": name}
    spec: dict[str, Any] = {
        "replicas": 1,
        "revisionHistoryLimit": 50,
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
        },
    }
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "annotations": {"beacon.dev/reload": reload}},
        "spec": spec,
    }


def _adoption(cluster: DevCluster, namespace: str) -> dict[str, Any]:
    body = get_json(cluster, "configentry", "-n", namespace, "app") or {}
    found: dict[str, Any] = (body.get("status") or {}).get("adoption") or {}
    return found


def _column(cluster: DevCluster, namespace: str) -> str:
    """The ADOPTED column of `kubectl get configentries`."""
    out = cluster.kubectl("get", "configentries", "-n", namespace, "app").stdout.splitlines()
    header, row = out[0], out[1]
    start = header.index("ADOPTED")
    return row[start : header.index("PHASE")].strip()


def _pods(cluster: DevCluster, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (get_json(cluster, "pods", "-n", namespace, "-l", f"app={app}") or {}).get(
        "items", []
    )
    return items


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions") or []
    )


def _make_ready(cluster: DevCluster, namespace: str, app: str) -> None:
    """Set every pod of `app` Ready, as a kubelet would once its containers pass their readiness probes."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}
    }
    for pod in _pods(cluster, namespace, app):
        if not _ready(pod):
            name = pod["metadata"]["name"]
            cluster.kubectl(
                "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
            )


def _replica_sets(cluster: DevCluster, namespace: str, app: str) -> int:
    return len((get_json(cluster, "replicasets", "-n", namespace, "-l", f"app={app}") or {}).get("items", []))


def _rollout_done(cluster: DevCluster, namespace: str, app: str, revision: int) -> None:
    """The new pod of `app` (its template records `revision`) made Ready; then the old one goes."""

    def new_pod() -> bool:
        return any(
            (p["metadata"].get("annotations") or {}).get(ANNOTATION_TEMPLATE_REVISIONS) == f"app={revision}"
            for p in _pods(cluster, namespace, app)
        )

    eventually(new_pod, timeout=30, what=f"a pod of {app} on revision {revision}")
    _make_ready(cluster, namespace, app)
    eventually(lambda: len(_pods(cluster, namespace, app)) == 1, timeout=30, what=f"the old pod of {app} gone")


def _expect(cluster: DevCluster, namespace: str, want: dict[str, Any], *, column: str, what: str) -> None:
    """status.adoption holds `want` (the fields it names), and the ADOPTED column shows `column`."""

    def check() -> bool:
        got = _adoption(cluster, namespace)
        return all(got.get(k) == v for k, v in want.items())

    try:
        eventually(check, timeout=30, what=what)
    finally:
        print(f"\n{what}: {json.dumps(_adoption(cluster, namespace))}")
    assert _column(cluster, namespace) == column


def _plugin(*args: str, cluster: DevCluster) -> str:
    env = {"KUBECONFIG": str(cluster.kubeconfig), "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "kubectl_beacon", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(f"\n$ kubectl beacon {' '.join(args)}\n{proc.stdout}{proc.stderr}", end="")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_key_aware_reloads_and_adoption_through_edits_rollouts_and_a_rollback(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess, audit: Audit
) -> None:
    data = {"db/host": "a", "feature/flag": "off", "other": "x"}
    apply(cluster, config_entry("app", namespace, data, revisionHistoryLimit=2))
    eventually(lambda: _adoption(cluster, namespace).get("revision") == 1, timeout=30, what="materialised")
    apply(cluster, _deployment("a", namespace, "app[db/]"))
    apply(cluster, _deployment("b", namespace, "app[feature/flag]"))
    for app in ("a", "b"):
        eventually(lambda app=app: len(_pods(cluster, namespace, app)) == 1, timeout=30, what=f"the pod of {app}")
        _make_ready(cluster, namespace, app)
    # opting in restarts nothing: the pods started before it are baseline, and their workloads are adopted
    _expect(
        cluster,
        namespace,
        {
            "summary": "2/2 workloads",
            "revisions": [{"revision": 1, "workloads": 2, "pods": 0, "readyPods": 0}],
            "baselinePods": 2,
        },
        column="2/2 workloads",
        what="opted in",
    )

    # 1. db/host changes: a restarts, b (which reads feature/flag only) does not and stays adopted
    data["db/host"] = "b"
    apply(cluster, config_entry("app", namespace, data, revisionHistoryLimit=2))
    eventually(lambda: _replica_sets(cluster, namespace, "a") == 2, timeout=30, what="a rolled out")
    eventually(lambda: len(_pods(cluster, namespace, "a")) == 2, timeout=30, what="a's new pod")
    _expect(
        cluster,
        namespace,
        {
            "summary": "1/2 workloads",
            "revisions": [{"revision": 2, "workloads": 1, "pods": 1, "readyPods": 0}],
            "baselinePods": 2,
        },
        column="1/2 workloads",
        what="edit 1: a rolling out",
    )
    _rollout_done(cluster, namespace, "a", 2)
    _expect(
        cluster,
        namespace,
        {
            "summary": "2/2 workloads",
            "revisions": [{"revision": 2, "workloads": 2, "pods": 1, "readyPods": 1}],
            "baselinePods": 1,
        },
        column="2/2 workloads",
        what="edit 1: a on revision 2",
    )
    assert _replica_sets(cluster, namespace, "b") == 1, "b was restarted by a change to a key it does not read"

    # 2. feature/flag changes: b restarts, a does not (its pod, rolled out for revision 2, counts as on 3)
    data["feature/flag"] = "on"
    apply(cluster, config_entry("app", namespace, data, revisionHistoryLimit=2))
    eventually(lambda: _replica_sets(cluster, namespace, "b") == 2, timeout=30, what="b rolled out")
    _rollout_done(cluster, namespace, "b", 3)
    _expect(
        cluster,
        namespace,
        {
            "summary": "2/2 workloads",
            "revisions": [{"revision": 3, "workloads": 2, "pods": 2, "readyPods": 2}],
            "baselinePods": 0,
        },
        column="2/2 workloads",
        what="edit 2: both on revision 3",
    )
    assert _replica_sets(cluster, namespace, "a") == 2, "a was restarted by a change to a key it does not read"

    # 3. db/host again, with a's new pod left not ready: a's old pod runs revision 2, pruned by now (limit 2)
    data["db/host"] = "c"
    apply(cluster, config_entry("app", namespace, data, revisionHistoryLimit=2))
    eventually(lambda: len(_pods(cluster, namespace, "a")) == 2, timeout=30, what="a's new pod")
    _expect(
        cluster,
        namespace,
        {
            "summary": "1/2 workloads",
            "revisions": [
                {"revision": 4, "workloads": 1, "pods": 2, "readyPods": 1},
                {"revision": 2, "pruned": True, "workloads": 0, "pods": 1, "readyPods": 1},
            ],
        },
        column="1/2 workloads",
        what="edit 3: a rolling out from a pruned revision",
    )
    out = _plugin("config", "status", "app", "-n", namespace, cluster=cluster)
    assert "ADOPTED 1/2 workloads" in out
    assert any(
        line.split()[:2] == ["Deployment/a", "db/"] and "4:0/1" in line and "2:1/1" in line for line in out.splitlines()
    )
    _rollout_done(cluster, namespace, "a", 4)
    _expect(
        cluster,
        namespace,
        {"summary": "2/2 workloads", "revisions": [{"revision": 4, "workloads": 2, "pods": 2, "readyPods": 2}]},
        column="2/2 workloads",
        what="edit 3: both on revision 4",
    )
    assert _replica_sets(cluster, namespace, "b") == 2

    # 4. rollback to revision 3 (recorded as 5): a's keys change back, b's do not
    apply(cluster, config_entry("app", namespace, data, revisionHistoryLimit=2, rollbackTo=3))
    eventually(lambda: _replica_sets(cluster, namespace, "a") == 4, timeout=30, what="a rolled back")
    eventually(lambda: len(_pods(cluster, namespace, "a")) == 2, timeout=30, what="a's new pod")
    _expect(
        cluster,
        namespace,
        {
            "summary": "1/2 workloads",
            "revision": 5,
            "revisions": [
                {"revision": 5, "workloads": 1, "pods": 2, "readyPods": 1},
                {"revision": 4, "workloads": 0, "pods": 1, "readyPods": 1},
            ],
        },
        column="1/2 workloads",
        what="rollback: a rolling back",
    )
    _rollout_done(cluster, namespace, "a", 5)
    _expect(
        cluster,
        namespace,
        {"summary": "2/2 workloads", "revisions": [{"revision": 5, "workloads": 2, "pods": 2, "readyPods": 2}]},
        column="2/2 workloads",
        what="rollback: both on revision 5",
    )
    assert _replica_sets(cluster, namespace, "b") == 2, "the rollback restarted b, whose keys it did not change"
    template = (get_json(cluster, "deployment", "-n", namespace, "b") or {})["spec"]["template"]["metadata"]
    assert template["annotations"][ANNOTATION_TEMPLATE_REVISIONS] == "app=3"
    assert ANNOTATION_TEMPLATE_HASHES in template["annotations"]
    out = _plugin("config", "status", "app", "-n", namespace, cluster=cluster)
    assert "ADOPTED 2/2 workloads" in out

    # a restart of the operator writes nothing: the adoption it computes again is the one status shows
    time.sleep(DEBOUNCE + 1)
    restart_at = time.time()
    operator_running.restart()
    time.sleep(SETTLE)
    writes = audit.writes(since=restart_at, namespace=namespace)
    assert writes == [], [(w["verb"], w["objectRef"]) for w in writes]
    assert _adoption(cluster, namespace)["summary"] == "2/2 workloads"


def test_a_malformed_opt_in_is_reported_and_restarts_nothing(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    apply(cluster, config_entry("app", namespace, {"db/host": "a"}))
    eventually(lambda: _adoption(cluster, namespace).get("revision") == 1, timeout=30, what="materialised")
    apply(cluster, _deployment("w", namespace, "app[db/"))

    def warned() -> bool:
        events = (get_json(cluster, "events", "-n", namespace) or {}).get("items", [])
        return any(
            e.get("reason") == "ConfigReloadInvalid" and "'[' without ']'" in e.get("message", "") for e in events
        )

    eventually(warned, timeout=30, what="a ConfigReloadInvalid event")
    apply(cluster, config_entry("app", namespace, {"db/host": "b"}))
    eventually(lambda: _adoption(cluster, namespace).get("revision") == 2, timeout=30, what="revision 2")
    time.sleep(SETTLE)
    assert _replica_sets(cluster, namespace, "w") == 1
    assert _adoption(cluster, namespace)["summary"] == "0/0 workloads"


def test_a_statefulset_is_adopted_the_same_way(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    """The StatefulSet controller replaces pod-0 in place (same name, new template): its annotation tells the
    revision all the same, and a change to a key it does not read leaves the pod alone."""
    data = {"db/host": "a", "other": "x"}
    apply(cluster, config_entry("app", namespace, data))
    eventually(lambda: _adoption(cluster, namespace).get("revision") == 1, timeout=30, what="materialised")
    apply(cluster, _deployment("s", namespace, "app[db/]", kind="StatefulSet"))
    eventually(lambda: len(_pods(cluster, namespace, "s")) == 1, timeout=30, what="pod s-0")
    _make_ready(cluster, namespace, "s")
    _expect(
        cluster, namespace, {"summary": "1/1 workloads", "baselinePods": 1}, column="1/1 workloads", what="opted in"
    )

    data["db/host"] = "b"
    apply(cluster, config_entry("app", namespace, data))

    def replaced() -> bool:
        pods = _pods(cluster, namespace, "s")
        annotations = [(p["metadata"].get("annotations") or {}).get(ANNOTATION_TEMPLATE_REVISIONS) for p in pods]
        return annotations == ["app=2"]

    eventually(replaced, timeout=60, what="s-0 replaced with the template of revision 2")
    _expect(
        cluster,
        namespace,
        {"summary": "0/1 workloads", "revisions": [{"revision": 2, "workloads": 0, "pods": 1, "readyPods": 0}]},
        column="0/1 workloads",
        what="s-0 on revision 2, not ready",
    )
    _make_ready(cluster, namespace, "s")
    _expect(
        cluster,
        namespace,
        {"summary": "1/1 workloads", "revisions": [{"revision": 2, "workloads": 1, "pods": 1, "readyPods": 1}]},
        column="1/1 workloads",
        what="s-0 ready on revision 2",
    )
    uid = _pods(cluster, namespace, "s")[0]["metadata"]["uid"]
    data["other"] = "y"
    apply(cluster, config_entry("app", namespace, data))
    _expect(
        cluster,
        namespace,
        {"summary": "1/1 workloads", "revisions": [{"revision": 3, "workloads": 1, "pods": 1, "readyPods": 1}]},
        column="1/1 workloads",
        what="revision 3 skipped by s: adopted",
    )
    time.sleep(SETTLE)
    assert [p["metadata"]["uid"] for p in _pods(cluster, namespace, "s")] == [uid]
