"""ConfigEntry end to end: the real operator process on the real apiserver, with kube-controller-manager's
deployment and replicaset controllers turning pod-template bumps into ReplicaSets (no kubelet: pods stay Pending,
so a rollout is observed as a new ReplicaSet)."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from beacon.config_core import (
    ANNOTATION_BASELINE,
    ANNOTATION_HASH,
    ANNOTATION_REVISION,
    ANNOTATION_ROLLBACK_OF,
    ANNOTATION_TEMPLATE_HASHES,
    LABEL_ENTRY_UID,
    config_map_data,
    content_hash,
)
from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import (
    Audit,
    OperatorProcess,
    apply,
    config_entry,
    eventually,
    get_json,
    opted_in_deployment,
)

pytestmark = pytest.mark.integration

DEBOUNCE = 2.0  # the operator's default --reload-debounce
SETTLE = DEBOUNCE + 6  # long enough for a debounced rollout to have happened if one were coming (busy 2-core CI)


@pytest.fixture(scope="module", autouse=True)
def _operator_stopped_afterwards(beacon_operator: OperatorProcess) -> Iterator[None]:
    """Leave no operator running into modules that write status by hand (test_crds); the next test that needs
    it starts it again through `operator_running`."""
    yield
    beacon_operator.stop()


@pytest.fixture(scope="module")
def custom_objects(cluster: DevCluster) -> k8s.CustomObjectsApi:
    """A direct API client, for bursts of updates faster than one kubectl process each."""
    return k8s.CustomObjectsApi(k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig)))  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------------------------------- helpers
def entry_json(cluster: DevCluster, ns: str, name: str) -> dict[str, Any]:
    return get_json(cluster, "configentry", "-n", ns, name) or {}


def status(cluster: DevCluster, ns: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = entry_json(cluster, ns, name).get("status") or {}
    return result


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def config_map(cluster: DevCluster, ns: str, name: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = get_json(cluster, "configmap", "-n", ns, name)
    return result


def cm_data(cluster: DevCluster, ns: str, name: str) -> dict[str, str] | None:
    cm = config_map(cluster, ns, name)
    return None if cm is None else dict(cm.get("data") or {})


def revisions(cluster: DevCluster, ns: str, uid: str) -> dict[int, dict[str, Any]]:
    data = get_json(cluster, "controllerrevisions", "-n", ns, "-l", f"{LABEL_ENTRY_UID}={uid}") or {}
    return {int(item["revision"]): item for item in data.get("items", [])}


def replica_sets(cluster: DevCluster, ns: str, app: str) -> list[dict[str, Any]]:
    data = get_json(cluster, "replicasets", "-n", ns, "-l", f"app={app}") or {}
    items: list[dict[str, Any]] = data.get("items", [])
    return items


def deployment(cluster: DevCluster, ns: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = get_json(cluster, "deployment", "-n", ns, name) or {}
    return result


def template_hashes(cluster: DevCluster, ns: str, name: str) -> str | None:
    template = deployment(cluster, ns, name).get("spec", {}).get("template", {})
    value = (template.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_TEMPLATE_HASHES)
    return None if value is None else str(value)


def baseline(cluster: DevCluster, ns: str, name: str) -> str | None:
    value = (deployment(cluster, ns, name).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_BASELINE)
    return None if value is None else str(value)


def expected_hash(data: dict[str, str]) -> str:
    return content_hash(config_map_data(data))


def materialised(cluster: DevCluster, ns: str, name: str, data: dict[str, str], *, timeout: float = 30) -> Any:
    """Wait until entry `name` reports the hash of `data` and is Ready; return its status."""
    digest = expected_hash(data)

    def check() -> dict[str, Any] | None:
        st = status(cluster, ns, name)
        ok = st.get("hash") == digest and condition(st, "Ready").get("status") == "True"
        return st if ok else None

    return eventually(check, timeout=timeout, what=f"{name} materialised with hash {digest}")


def patch_data(api: k8s.CustomObjectsApi, ns: str, name: str, spec: dict[str, Any]) -> None:
    api.patch_namespaced_custom_object(
        "beacon.dev",
        "v1alpha1",
        ns,
        "configentries",
        name,
        {"spec": spec},
        _content_type="application/merge-patch+json",
    )


def kubectl_apply(cluster: DevCluster, body: dict[str, Any]) -> Any:
    return cluster.kubectl(
        "apply", "--server-side", "--field-manager=tests", "-f", "-", input=json.dumps(body), check=False
    )


def rejected(cluster: DevCluster, body: dict[str, Any]) -> str:
    proc = kubectl_apply(cluster, body)
    assert proc.returncode != 0, "the apiserver accepted bad input"
    return str(proc.stderr)


def opted_in(cluster: DevCluster, ns: str, name: str, configs: list[str]) -> None:
    """Create a Deployment that opts in, and wait until beacon recorded its baseline and its first (and only)
    ReplicaSet exists: opting in rolls nothing out."""
    eventually(
        lambda: kubectl_apply(cluster, opted_in_deployment(name, ns, configs=configs)).returncode == 0,
        timeout=30,
        what="deployment created",
    )
    eventually(lambda: baseline(cluster, ns, name), timeout=30, what="baseline annotation recorded")
    eventually(lambda: len(replica_sets(cluster, ns, name)) == 1, timeout=30, what="the first ReplicaSet")


def holds(cluster: DevCluster, ns: str, name: str, want: dict[str, str]) -> Callable[[], bool]:
    """A check that ConfigMap `name` holds exactly `want`."""
    return lambda: cm_data(cluster, ns, name) == want


def operator_writes(audit: Audit, ns: str, since: float) -> list[dict[str, Any]]:
    return audit.writes(since=since, namespace=ns)


# ---------------------------------------------------------------------------------------------------- apply, update
def test_apply_materialises_and_each_update_records_a_revision(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    data = {"db/pool/size": "10", "log/level": "info", "feature/new-checkout": "false"}
    apply(cluster, config_entry("payments", namespace, data, service="payments", target="payments-config"))
    st = materialised(cluster, namespace, "payments", data)
    assert cm_data(cluster, namespace, "payments-config") == {
        "db.pool.size": "10",
        "log.level": "info",
        "feature.new-checkout": "false",
    }
    cm = config_map(cluster, namespace, "payments-config")
    assert cm is not None
    assert cm["metadata"]["annotations"][ANNOTATION_HASH] == st["hash"]
    assert cm["metadata"]["annotations"][ANNOTATION_REVISION] == "1"
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "ConfigEntry"
    assert cm["metadata"]["ownerReferences"][0]["controller"] is True
    assert st["currentRevision"] == 1
    assert st["observedGeneration"] == 1
    assert st["configMapName"] == "payments-config"
    assert condition(st, "Ready")["reason"] == "Materialised"
    assert condition(st, "Conflict")["status"] == "False"
    uid = entry_json(cluster, namespace, "payments")["metadata"]["uid"]
    history = revisions(cluster, namespace, uid)
    assert list(history) == [1]
    assert history[1]["data"]["data"] == cm["data"]
    assert history[1]["metadata"]["ownerReferences"][0]["uid"] == uid
    # columns: NAME, REVISION, HASH, ADOPTED ("0/0 workloads": nothing opted in), PHASE (empty: no tracked
    # rollout), READY, AGE; read by the header's positions, since a cell may be empty or hold blanks
    header, printed = cluster.kubectl("get", "configentries", "-n", namespace, "payments").stdout.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    cells = [printed[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    row = dict(zip(header.split(), cells, strict=True))
    assert list(row) == ["NAME", "REVISION", "HASH", "ADOPTED", "PHASE", "READY", "AGE"]
    assert [row["NAME"], row["REVISION"], row["HASH"], row["ADOPTED"], row["PHASE"], row["READY"]] == [
        "payments",
        "1",
        st["hash"],
        "0/0 workloads",
        "",
        "True",
    ]

    updated = {**data, "db/pool/size": "25", "upstream/ledger/url": "http://ledger:8080"}
    apply(cluster, config_entry("payments", namespace, updated, service="payments", target="payments-config"))
    st = materialised(cluster, namespace, "payments", updated)
    assert st["currentRevision"] == 2
    assert st["observedGeneration"] == 2
    assert cm_data(cluster, namespace, "payments-config") == {
        "db.pool.size": "25",
        "log.level": "info",
        "feature.new-checkout": "false",
        "upstream.ledger.url": "http://ledger:8080",
    }
    history = revisions(cluster, namespace, uid)
    assert sorted(history) == [1, 2]
    assert history[2]["data"]["data"] == cm_data(cluster, namespace, "payments-config")
    assert history[1]["data"]["data"] == {"db.pool.size": "10", "log.level": "info", "feature.new-checkout": "false"}


def test_history_is_bounded_by_revision_history_limit(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    for i in range(1, 6):
        data = {"step": str(i)}
        apply(cluster, config_entry("bounded", namespace, data, revisionHistoryLimit=3))
        materialised(cluster, namespace, "bounded", data)
    uid = entry_json(cluster, namespace, "bounded")["metadata"]["uid"]
    eventually(lambda: sorted(revisions(cluster, namespace, uid)) == [3, 4, 5], timeout=15, what="pruned to 3")
    assert status(cluster, namespace, "bounded")["currentRevision"] == 5


# ---------------------------------------------------------------------------------------------------- reloads
def test_a_burst_of_updates_gives_exactly_one_rollout(
    cluster: DevCluster,
    namespace: str,
    operator_running: OperatorProcess,
    audit: Audit,
    custom_objects: k8s.CustomObjectsApi,
) -> None:
    data = {"mode": "a"}
    apply(cluster, config_entry("web", namespace, data))
    first = materialised(cluster, namespace, "web", data)["hash"]
    opted_in(cluster, namespace, "web", ["web"])
    assert baseline(cluster, namespace, "web") == f"web={first}"
    assert template_hashes(cluster, namespace, "web") is None, "opting in must not roll out"

    burst_at = time.time()
    started = time.monotonic()
    for i in range(10):
        data = {"mode": "a", "counter": str(i)}
        patch_data(custom_objects, namespace, "web", {"data": data})
    burst = time.monotonic() - started
    final = expected_hash(data)
    materialised(cluster, namespace, "web", data)
    eventually(
        lambda: template_hashes(cluster, namespace, "web") == f"web={final}",
        timeout=30,
        what="pod template bumped to the final hash",
    )
    eventually(lambda: len(replica_sets(cluster, namespace, "web")) == 2, timeout=30, what="a second ReplicaSet")
    time.sleep(SETTLE)
    assert len(replica_sets(cluster, namespace, "web")) == 2, f"more than one rollout for a {burst:.1f}s burst"
    bumps = [
        w
        for w in operator_writes(audit, namespace, burst_at)
        if w["objectRef"]["resource"] == "deployments" and w["verb"] == "patch"
    ]
    assert len(bumps) == 1, bumps
    assert baseline(cluster, namespace, "web") is None, "the baseline is dropped once the template carries the hash"


def test_updates_spread_apart_roll_out_one_each_up_to_the_rate_limit(
    cluster: DevCluster,
    namespace: str,
    beacon_operator: OperatorProcess,
    operator_kubeconfig: Path,
    tmp_path: Path,
) -> None:
    # an operator of its own, with a short debounce and a rate limit of 2 rollouts per 30 s
    beacon_operator.stop()
    limited = OperatorProcess(
        cluster=cluster,
        kubeconfig=operator_kubeconfig,
        log_dir=tmp_path,
        extra_args=("--reload-debounce=1", "--reload-rate-limit=2/30"),
    )
    limited.start()
    try:

        def rollouts_are(count: int) -> bool:
            return len(replica_sets(cluster, namespace, "api")) == count

        data = {"v": "0"}
        apply(cluster, config_entry("api", namespace, data))
        materialised(cluster, namespace, "api", data)
        opted_in(cluster, namespace, "api", ["api"])
        # two updates, each after the previous rollout: one rollout each
        for i in (1, 2):
            data = {"v": str(i)}
            apply(cluster, config_entry("api", namespace, data))
            eventually(partial(rollouts_are, 1 + i), timeout=30, what=f"rollout {i}")
            assert template_hashes(cluster, namespace, "api") == f"api={expected_hash(data)}"
        # the third within the period is held back (and announced), and a fourth joins it
        apply(cluster, config_entry("api", namespace, {"v": "3"}))
        materialised(cluster, namespace, "api", {"v": "3"})
        eventually(
            lambda: any(e["reason"] == "ConfigReloadDeferred" for e in _events(cluster, namespace, "api")),
            timeout=20,
            what="a ConfigReloadDeferred event",
        )
        assert len(replica_sets(cluster, namespace, "api")) == 3, "rolled out beyond the rate limit"
        data = {"v": "4"}
        apply(cluster, config_entry("api", namespace, data))
        materialised(cluster, namespace, "api", data)
        assert len(replica_sets(cluster, namespace, "api")) == 3
        # ... and is rolled out once the period allows: never dropped, coalesced into one rollout
        eventually(
            lambda: template_hashes(cluster, namespace, "api") == f"api={expected_hash(data)}",
            timeout=60,
            what="the deferred rollout, with the latest hash",
        )
        eventually(lambda: len(replica_sets(cluster, namespace, "api")) == 4, timeout=30, what="rollout 3")
        time.sleep(4)
        assert len(replica_sets(cluster, namespace, "api")) == 4
        assert "beacon_config_reloads_total" in limited.metrics()
    finally:
        limited.stop()


def _events(cluster: DevCluster, ns: str, name: str) -> list[dict[str, Any]]:
    data = get_json(cluster, "events", "-n", ns) or {}
    return [e for e in data.get("items", []) if e["involvedObject"]["name"] == name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restarting_the_operator_rolls_nothing_out(
    sig: int, cluster: DevCluster, namespace: str, operator_running: OperatorProcess, audit: Audit
) -> None:
    data = {"defaults/timeout": "5"}
    apply(cluster, config_entry("defaults", namespace, data))
    svc = {"pool": "10"}
    apply(cluster, config_entry("svc", namespace, svc, service="svc", priority=3))
    materialised(cluster, namespace, "defaults", data)
    materialised(cluster, namespace, "svc", {**data, **svc})  # layered over the namespace-wide defaults
    # one workload already rolled out once (its template carries the hash), one only opted in (baseline only)
    opted_in(cluster, namespace, "rolled", ["svc", "defaults"])
    opted_in(cluster, namespace, "fresh", ["svc"])
    svc = {"pool": "20"}
    apply(cluster, config_entry("svc", namespace, svc, service="svc", priority=3))
    eventually(lambda: len(replica_sets(cluster, namespace, "rolled")) == 2, timeout=30, what="rolled out")
    eventually(lambda: len(replica_sets(cluster, namespace, "fresh")) == 2, timeout=30, what="fresh rolled out")
    apply(cluster, opted_in_deployment("late", namespace, configs=["svc"]))
    eventually(lambda: baseline(cluster, namespace, "late"), timeout=30, what="late baseline")
    eventually(lambda: len(replica_sets(cluster, namespace, "late")) == 1, timeout=30)
    time.sleep(DEBOUNCE + 1)
    before = {name: template_hashes(cluster, namespace, name) for name in ("rolled", "fresh", "late")}
    counts = {name: len(replica_sets(cluster, namespace, name)) for name in ("rolled", "fresh", "late")}
    statuses = {name: status(cluster, namespace, name) for name in ("defaults", "svc")}

    restart_at = time.time()
    operator_running.restart(sig)
    time.sleep(SETTLE)

    assert {name: len(replica_sets(cluster, namespace, name)) for name in counts} == counts
    assert {name: template_hashes(cluster, namespace, name) for name in before} == before
    assert {name: status(cluster, namespace, name) for name in statuses} == statuses
    writes = operator_writes(audit, namespace, restart_at)
    assert writes == [], [(w["verb"], w["objectRef"]) for w in writes]

    # a change made while the operator runs again still rolls out, exactly once
    svc = {"pool": "30"}
    apply(cluster, config_entry("svc", namespace, svc, service="svc", priority=3))
    eventually(lambda: len(replica_sets(cluster, namespace, "rolled")) == 3, timeout=30, what="rolled out again")
    eventually(lambda: len(replica_sets(cluster, namespace, "late")) == 2, timeout=30, what="late rolled out")


def test_a_change_made_while_the_operator_was_down_rolls_out_once(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    data = {"k": "1"}
    apply(cluster, config_entry("cfg", namespace, data))
    materialised(cluster, namespace, "cfg", data)
    opted_in(cluster, namespace, "app", ["cfg"])
    operator_running.stop()
    data = {"k": "2"}
    apply(cluster, config_entry("cfg", namespace, data))
    operator_running.start()
    materialised(cluster, namespace, "cfg", data)
    eventually(
        lambda: template_hashes(cluster, namespace, "app") == f"cfg={expected_hash(data)}",
        timeout=30,
        what="the template bumped after the restart",
    )
    time.sleep(SETTLE)
    assert len(replica_sets(cluster, namespace, "app")) == 2


def _beacon_updates(cm: dict[str, Any]) -> set[str]:
    """The data keys that beacon's field manager holds through an Update (a merge patch), not an Apply."""
    held: set[str] = set()
    for entry in cm["metadata"].get("managedFields") or []:
        if entry.get("manager") == "beacon" and entry.get("operation") == "Update":
            held |= {k[2:] for k in (entry.get("fieldsV1") or {}).get("f:data", {})}
    return held


def test_keys_written_by_merge_patch_go_when_the_entry_drops_them_running_or_restarted(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    """An update that only changes data goes as a merge patch, so beacon holds those keys through an Update entry,
    which no apply prunes; a key dropped later, with the operator running or while it was down, must still go."""
    data = {"a": "1", "b": "1", "c": "1"}
    apply(cluster, config_entry("merged", namespace, data))
    materialised(cluster, namespace, "merged", data)
    data = {"a": "2", "b": "2", "c": "2"}
    apply(cluster, config_entry("merged", namespace, data))
    materialised(cluster, namespace, "merged", data)
    cm = get_json(cluster, "configmap", "-n", namespace, "merged", "--show-managed-fields")
    assert _beacon_updates(cm) == set(config_map_data(data))  # the values went by merge patch
    data = {"a": "2", "c": "2"}
    apply(cluster, config_entry("merged", namespace, data))
    materialised(cluster, namespace, "merged", data)
    assert cm_data(cluster, namespace, "merged") == config_map_data(data)
    operator_running.stop()
    data = {"a": "3"}
    apply(cluster, config_entry("merged", namespace, data))
    operator_running.start()
    materialised(cluster, namespace, "merged", data)
    assert cm_data(cluster, namespace, "merged") == config_map_data(data)


def _workload(kind: str, name: str, ns: str, configs: str) -> dict[str, Any]:
    labels = {"app": name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
        },
    }
    if kind == "StatefulSet":
        spec |= {"serviceName": name, "replicas": 1}
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "annotations": {"beacon.dev/reload": configs}},
        "spec": spec,
    }


@pytest.mark.parametrize("kind", ["StatefulSet", "DaemonSet"])
def test_statefulsets_and_daemonsets_are_reloaded_too(
    kind: str, cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    resource = kind.lower()
    data = {"k": "1"}
    apply(cluster, config_entry("cfg", namespace, data))
    materialised(cluster, namespace, "cfg", data)
    apply(cluster, _workload(kind, "wl", namespace, "cfg"))

    def annotations() -> tuple[dict[str, str], dict[str, str]]:
        body = get_json(cluster, resource, "-n", namespace, "wl") or {}
        meta = body.get("metadata", {}).get("annotations") or {}
        template = body.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
        return meta, template

    eventually(lambda: annotations()[0].get(ANNOTATION_BASELINE) == f"cfg={expected_hash(data)}", timeout=30)
    assert ANNOTATION_TEMPLATE_HASHES not in annotations()[1]
    data = {"k": "2"}
    apply(cluster, config_entry("cfg", namespace, data))
    eventually(
        lambda: annotations()[1].get(ANNOTATION_TEMPLATE_HASHES) == f"cfg={expected_hash(data)}",
        timeout=30,
        what=f"{kind} template bumped",
    )


def test_a_configmap_deleted_or_edited_by_hand_is_written_back(
    cluster: DevCluster,
    namespace: str,
    beacon_operator: OperatorProcess,
    operator_kubeconfig: Path,
    tmp_path: Path,
) -> None:
    beacon_operator.stop()
    resyncing = OperatorProcess(
        cluster=cluster, kubeconfig=operator_kubeconfig, log_dir=tmp_path, extra_args=("--resync-seconds=2",)
    )
    resyncing.start()
    try:
        _break_the_configmap_and_see_it_repaired(cluster, namespace, "cfg", timeout=30)
        assert status(cluster, namespace, "cfg")["currentRevision"] == 1
    finally:
        resyncing.stop()


def _break_the_configmap_and_see_it_repaired(cluster: DevCluster, namespace: str, name: str, *, timeout: float) -> None:
    """Materialise `name`, then delete its ConfigMap and edit it by hand: each is undone within `timeout`, and a
    repair is not a new revision."""
    data = {"k": "1"}
    apply(cluster, config_entry(name, namespace, data))
    materialised(cluster, namespace, name, data)
    want = cm_data(cluster, namespace, name) or {}
    cluster.kubectl("delete", "configmap", name, "-n", namespace)
    eventually(holds(cluster, namespace, name, want), timeout=timeout, what="deleted ConfigMap recreated")
    patch = json.dumps({"data": {"k": "edited", "extra": "x"}})
    cluster.kubectl("patch", "configmap", name, "-n", namespace, "--type=merge", "-p", patch)
    eventually(holds(cluster, namespace, name, want), timeout=timeout, what="edited ConfigMap restored")
    uid = entry_json(cluster, namespace, name)["metadata"]["uid"]
    assert sorted(revisions(cluster, namespace, uid)) == [1], "a repair is not a new revision"


def test_a_materialised_configmap_is_written_back_by_the_watch_within_2_s(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    """The session's operator runs with the periodic resync off (--resync-seconds=0): only its watch of the
    materialised ConfigMaps can undo a deletion or an edit, and it does within 2 s."""
    _break_the_configmap_and_see_it_repaired(cluster, namespace, "watched", timeout=2)


def _revision_as_written(item: dict[str, Any]) -> dict[str, Any]:
    """What beacon writes of a ControllerRevision (and what a repair must restore): everything but the fields the
    apiserver sets."""
    meta = item["metadata"]
    kept = {k: meta.get(k) for k in ("name", "namespace", "labels", "annotations", "ownerReferences")}
    return {"metadata": kept, "revision": item["revision"], "data": item["data"]}


def test_a_controllerrevision_deleted_or_edited_by_hand_is_written_back_by_the_watch_within_2_s(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    """With the periodic resync off, the watch of the ControllerRevisions re-queues the entry whose revision was
    deleted or edited by hand, and it is written back exactly as beacon wrote it within 2 s: the current revision
    deleted (recreated from the content beacon materialised), an older one edited in its metadata and number
    (restored with its own data), the current one edited in its data (restored from beacon's content). The data
    of a revision is immutable and the apiserver refuses patches of beacon's revisions, so a hand edit is a
    replacement (`kubectl replace --force`: deleted and created again, edited). A repair is not a new revision, and
    the ConfigMap is untouched."""
    apply(cluster, config_entry("hist", namespace, {"k": "1"}))
    materialised(cluster, namespace, "hist", {"k": "1"})
    apply(cluster, config_entry("hist", namespace, {"k": "2"}))
    materialised(cluster, namespace, "hist", {"k": "2"})
    uid = entry_json(cluster, namespace, "hist")["metadata"]["uid"]
    written = {n: _revision_as_written(item) for n, item in revisions(cluster, namespace, uid).items()}
    assert sorted(written) == [1, 2]
    want_map = cm_data(cluster, namespace, "hist")

    def restored() -> bool:
        found = get_json(cluster, "controllerrevisions", "-n", namespace) or {}
        now = {int(i["revision"]): _revision_as_written(i) for i in found.get("items", [])}
        return now == written

    cluster.kubectl("delete", "controllerrevision", "hist-2", "-n", namespace)
    eventually(restored, timeout=2, interval=0.1, what="deleted current ControllerRevision recreated")

    def replace_by_hand(number: int, edit: Callable[[dict[str, Any]], None]) -> None:
        obj = json.loads(json.dumps(written[number]))
        edit(obj)
        obj |= {"apiVersion": "apps/v1", "kind": "ControllerRevision"}
        cluster.kubectl("replace", "--force", "-f", "-", input=json.dumps(obj))

    def metadata_and_number(obj: dict[str, Any]) -> None:
        obj["metadata"]["annotations"] |= {"by": "hand", ANNOTATION_HASH: "0" * 16}
        obj["metadata"]["labels"] |= {"by": "hand"}
        obj["revision"] = 9

    replace_by_hand(1, metadata_and_number)
    eventually(restored, timeout=2, interval=0.1, what="ControllerRevision edited in its metadata restored")

    replace_by_hand(2, lambda obj: obj["data"]["data"].update({"k": "edited", "extra": "x"}))
    eventually(restored, timeout=2, interval=0.1, what="ControllerRevision edited in its data restored")

    st = status(cluster, namespace, "hist")
    assert st["currentRevision"] == 2, "a repair is not a new revision"
    assert cm_data(cluster, namespace, "hist") == want_map


# ---------------------------------------------------------------------------------------------------- rollback
def test_rollback_restores_the_exact_content_and_records_a_new_revision(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    original = {"greeting": "héllo wörld  ", "multi/line": "a\nb\n\n", "json/blob": '{"x": [1, 2]}', "empty": ""}
    apply(cluster, config_entry("rb", namespace, original))
    materialised(cluster, namespace, "rb", original)
    uid = entry_json(cluster, namespace, "rb")["metadata"]["uid"]
    changed = {"greeting": "hi", "new/key": "1"}
    apply(cluster, config_entry("rb", namespace, changed))
    materialised(cluster, namespace, "rb", changed)
    stored = revisions(cluster, namespace, uid)[1]["data"]["data"]

    apply(cluster, config_entry("rb", namespace, changed, rollbackTo=1))
    st = materialised(cluster, namespace, "rb", original)
    assert cm_data(cluster, namespace, "rb") == stored
    raw = cluster.kubectl("get", "configmap", "-n", namespace, "rb", "-o", "jsonpath={.data.multi\\.line}").stdout
    assert raw == "a\nb\n\n"
    assert st["currentRevision"] == 3
    assert condition(st, "Ready")["reason"] == "RolledBack"
    assert "pinned to revision 1" in condition(st, "Ready")["message"]
    history = revisions(cluster, namespace, uid)
    assert sorted(history) == [1, 2, 3]
    assert history[3]["data"]["data"] == stored
    assert history[3]["metadata"]["annotations"][ANNOTATION_ROLLBACK_OF] == "1"

    # removing rollbackTo returns to spec.data, as one more revision
    apply(cluster, config_entry("rb", namespace, changed))
    st = materialised(cluster, namespace, "rb", changed)
    assert st["currentRevision"] == 4
    assert condition(st, "Ready")["reason"] == "Materialised"


# ---------------------------------------------------------------------------------------------------- layering
def test_layering_scope_priority_and_conflicts(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    entries = [
        config_entry("defaults", namespace, {"a": "1", "b": "1", "c": "1"}),
        config_entry("extra", namespace, {"b": "2"}),  # same scope and priority as defaults: conflict on b
        config_entry("pay-low", namespace, {"c": "low", "d": "low"}, service="payments"),
        config_entry("pay-high", namespace, {"d": "high"}, service="payments", priority=5),
        config_entry("pay-zed", namespace, {"d": "zed"}, service="payments", priority=5),  # ties with pay-high
    ]
    for body in entries:
        apply(cluster, body)
    namespace_wide = {"a": "1", "b": "2", "c": "1"}  # extra sorts after defaults: it wins b
    payments = {"a": "1", "b": "2", "c": "low", "d": "zed"}  # scope, then priority, then the last name
    for name, want in [("defaults", namespace_wide), ("extra", namespace_wide)]:
        eventually(holds(cluster, namespace, name, want), timeout=30, what=f"{name} content")
    for name in ("pay-low", "pay-high", "pay-zed"):
        eventually(holds(cluster, namespace, name, payments), timeout=30, what=f"{name} content")
        materialised(cluster, namespace, name, payments)

    def conflict_of(name: str) -> dict[str, Any]:
        return condition(status(cluster, namespace, name), "Conflict")

    def conflicting(name: str) -> dict[str, Any] | None:
        found = conflict_of(name)
        return found if found.get("status") == "True" else None

    for name, other, key, winner in [
        ("defaults", "extra", "b", "extra"),
        ("extra", "defaults", "b", "extra"),
        ("pay-high", "pay-zed", "d", "pay-zed"),
        ("pay-zed", "pay-high", "d", "pay-zed"),
    ]:
        found = eventually(partial(conflicting, name), timeout=15, what=f"{name} Conflict=True")
        assert found["reason"] == "KeyConflict"
        assert f"{key} (also set by {other}; {winner} wins)" in found["message"]
    assert conflict_of("pay-low")["status"] == "False"

    # removing the conflicting namespace-wide entry re-materialises every dependent entry and clears the conflict
    cluster.kubectl("delete", "configentry", "extra", "-n", namespace)
    namespace_wide["b"] = payments["b"] = "1"
    eventually(lambda: cm_data(cluster, namespace, "defaults") == namespace_wide, timeout=30, what="defaults b=1")
    for name in ("pay-low", "pay-high", "pay-zed"):
        eventually(holds(cluster, namespace, name, payments), timeout=30, what=f"{name} b=1")
    eventually(lambda: conflict_of("defaults").get("status") == "False", timeout=15, what="conflict cleared")


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_and_the_last_good_configmap_survives(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    good = {"db/pool/size": "10"}
    apply(cluster, config_entry("cfg", namespace, good))
    st = materialised(cluster, namespace, "cfg", good)
    kept = cm_data(cluster, namespace, "cfg")
    assert kept == {"db.pool.size": "10"}

    # keys that are not allowed, and data over the size limits: rejected by the schema and CEL
    for data, message in [
        ({"db.pool.size": "10"}, "data keys must be '/'-separated segments of letters, digits, '-' and '_'"),
        ({"db pool": "10"}, "data keys must be '/'-separated segments"),
        ({"/db": "10"}, "data keys must be '/'-separated segments"),
        ({"blob": "x" * 65537}, "Too long"),
        ({f"b{i}": "x" * 60000 for i in range(4)}, "data is too large: keys and values may total at most 196608"),
    ]:
        assert message in rejected(cluster, config_entry("cfg", namespace, data))

    # a rollback to a revision that does not exist: a False Ready condition with a reason
    apply(cluster, config_entry("cfg", namespace, good, rollbackTo=99))

    def refused() -> dict[str, Any] | None:
        ready = condition(status(cluster, namespace, "cfg"), "Ready")
        return ready if ready.get("reason") == "RevisionNotFound" else None

    ready = eventually(refused, timeout=30, what="Ready=False RevisionNotFound")
    assert ready["status"] == "False"
    assert "spec.rollbackTo: revision 99 does not exist (kept revisions: 1)" in ready["message"]
    now = status(cluster, namespace, "cfg")
    assert (now["currentRevision"], now["hash"], now["observedGeneration"]) == (1, st["hash"], 2)
    assert cm_data(cluster, namespace, "cfg") == kept
    assert "False" in cluster.kubectl("get", "configentry", "-n", namespace, "cfg", "--no-headers").stdout

    # a target that is someone else's ConfigMap is never overwritten
    cluster.kubectl("create", "configmap", "theirs", "-n", namespace, "--from-literal=owner=them")
    # (scoped to another service, so that it is not a layer of cfg)
    apply(cluster, config_entry("grabber", namespace, {"k": "v"}, service="other", target="theirs"))

    def target_conflict() -> dict[str, Any] | None:
        ready = condition(status(cluster, namespace, "grabber"), "Ready")
        return ready if ready.get("reason") == "TargetConflict" else None

    assert "theirs" in eventually(target_conflict, timeout=30, what="TargetConflict")["message"]
    assert cm_data(cluster, namespace, "theirs") == {"owner": "them"}

    # back to good input: Ready again, same content, no new revision
    apply(cluster, config_entry("cfg", namespace, good))
    eventually(lambda: condition(status(cluster, namespace, "cfg"), "Ready").get("status") == "True", timeout=30)
    assert status(cluster, namespace, "cfg")["currentRevision"] == 1
    assert cm_data(cluster, namespace, "cfg") == kept


def test_merged_data_over_the_size_limit_keeps_the_last_good_configmaps(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    # each entry is within the CRD's limits (65536 per value, 196608 in all); six of them layered are not
    # within a ConfigMap's
    def blobs(i: int) -> dict[str, str]:
        return {f"blob{i}/{j}": str(i) * 63_000 for j in range(3)}

    def big(i: int) -> dict[str, Any]:
        return config_entry(f"big{i}", namespace, blobs(i))

    cluster.kubectl(
        "apply",
        "--server-side",
        "--field-manager=tests",
        "-f",
        "-",
        input="\n---\n".join(json.dumps(big(i)) for i in range(5)),
    )
    whole = {k: v for i in range(5) for k, v in blobs(i).items()}
    for i in range(5):
        materialised(cluster, namespace, f"big{i}", whole, timeout=60)
    apply(cluster, big(5))

    def too_large(name: str) -> bool:
        ready = condition(status(cluster, namespace, name), "Ready")
        return ready.get("status") == "False" and ready.get("reason") == "TooLarge"

    for i in range(6):
        eventually(partial(too_large, f"big{i}"), timeout=60, what=f"big{i} TooLarge")
    assert "over the limit of 1000000 bytes" in condition(status(cluster, namespace, "big5"), "Ready")["message"]
    for i in range(5):
        assert cm_data(cluster, namespace, f"big{i}") == config_map_data(whole), f"big{i}'s ConfigMap was clobbered"
    assert config_map(cluster, namespace, "big5") is None


# ---------------------------------------------------------------------------------------------------- delete
def test_delete_removes_the_configmap_and_the_history(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    apply(cluster, config_entry("gone", namespace, {"k": "1"}))
    materialised(cluster, namespace, "gone", {"k": "1"})
    apply(cluster, config_entry("gone", namespace, {"k": "2"}))
    materialised(cluster, namespace, "gone", {"k": "2"})
    uid = entry_json(cluster, namespace, "gone")["metadata"]["uid"]
    assert sorted(revisions(cluster, namespace, uid)) == [1, 2]
    cluster.kubectl("delete", "configentry", "gone", "-n", namespace)
    eventually(lambda: config_map(cluster, namespace, "gone") is None, timeout=60, what="ConfigMap removed")
    eventually(lambda: revisions(cluster, namespace, uid) == {}, timeout=60, what="ControllerRevisions removed")
