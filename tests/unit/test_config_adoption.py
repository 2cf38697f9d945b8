"""Adoption and key-aware reloads without a cluster: the beacon.dev/reload syntax (compatible with plain names,
keys and prefixes in brackets, malformed values refused with a message), the hash of a workload's keys, the
revision each pod runs (current, recorded, baseline, pruned), the bounded status summary, and the engine end to
end in memory: a change to one workload's keys rolls out that workload only, a workload that skipped the revision
counts as adopted, status and metrics follow the pods, and the status is written only when the summary changes."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from beacon import metrics
from beacon.config_core import (
    ANNOTATION_BASELINE,
    ANNOTATION_TEMPLATE_HASHES,
    ANNOTATION_TEMPLATE_REVISIONS,
    BASELINE,
    UNKNOWN,
    PodConfig,
    ReloadSyntaxError,
    Revision,
    WorkloadConfig,
    adoption,
    config_map_data,
    content_hash,
    parse_reload,
    parse_revisions,
    pod_revision,
    selected_data,
    selection_hash,
    selects,
)
from beacon.configs import Configs, ReloadPolicy


# ---------------------------------------------------------------------------------------------------- syntax
def test_plain_names_read_every_key_as_before() -> None:
    assert parse_reload("payments, defaults") == {"defaults": None, "payments": None}
    assert parse_reload(" a,a ,, ") == {"a": None}
    assert parse_reload(None) == {} == parse_reload("")


def test_keys_and_prefixes_in_brackets() -> None:
    assert parse_reload("payments[db/, feature/flag], defaults") == {
        "defaults": None,
        "payments": ("db/", "feature/flag"),
    }
    # a name given twice reads the union; a bare name reads every key
    assert parse_reload("a[x], a[y/]") == {"a": ("x", "y/")}
    assert parse_reload("a[x], a") == {"a": None}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a[db/", "'[' without ']'"),
        ("a]db/", "']' without '['"),
        ("a[[x]]", "nested"),
        ("a[]", "list at least one key"),
        ("a[ , ]", "list at least one key"),
        ("Payments", "not a ConfigMap name"),
        ("a[db.pool]", "not a ConfigEntry key"),
        ("a[/db]", "not a ConfigEntry key"),
        ("a[db//]", "not a ConfigEntry key"),
        ("a[x] b", "unexpected 'b' after the keys of a"),
        ("a[x]y", "unexpected 'y'"),
        ("a" * 5000, "longer than"),
    ],
)
def test_malformed_values_are_refused_with_a_reason(value: str, says: str) -> None:
    with pytest.raises(ReloadSyntaxError) as caught:
        parse_reload(value)
    assert says in str(caught.value)


def test_a_selection_reads_its_keys_and_prefixes_only() -> None:
    data = config_map_data({"db/host": "h", "db/pool/size": "5", "dbx": "1", "feature/flag": "on", "other": "x"})
    assert selected_data(data, ("db/",)) == {"db.host": "h", "db.pool.size": "5"}
    assert selected_data(data, ("feature/flag", "other")) == {"feature.flag": "on", "other": "x"}
    assert selected_data(data, None) == data
    changed_elsewhere = {**data, "other": "y"}
    assert selection_hash(changed_elsewhere, ("db/",)) == selection_hash(data, ("db/",))
    assert selection_hash({**data, "db.host": "g"}, ("db/",)) != selection_hash(data, ("db/",))
    assert selection_hash(data, None) == content_hash(data)


def test_revisions_annotation_parsing() -> None:
    assert parse_revisions("a=3, b=12,c=x,=4") == {"a": 3, "b": 12}
    assert parse_revisions(None) == {}


def test_label_selectors() -> None:
    labels = {"app": "web", "tier": "front"}
    assert selects({"matchLabels": {"app": "web"}}, labels)
    assert not selects({"matchLabels": {"app": "api"}}, labels)
    assert selects({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}, labels)
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}, labels)
    assert selects({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, labels)
    assert not selects({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, labels)
    assert not selects({}, labels)
    assert not selects(None, labels)


# ---------------------------------------------------------------------------------------------------- adoption
def _pod(
    name: str, *, hash_: str | None = None, rev: int | None = None, ready: bool = True, gone: bool = False
) -> PodConfig:
    return PodConfig(
        name=name,
        labels={},
        hashes={"cm": hash_} if hash_ is not None else {},
        revisions={"cm": rev} if rev is not None else {},
        ready=ready,
        terminating=gone,
    )


def _workload(
    name: str, *pods: PodConfig, desired: str = "h3", template: str | None = "h3", **kw: Any
) -> WorkloadConfig:
    fields: dict[str, Any] = {
        "replicas": len([p for p in pods if not p.terminating]),
        "baseline_hash": None,
        "whole": True,
    }
    fields.update(kw)
    return WorkloadConfig(
        kind="Deployment", name=name, desired_hash=desired, template_hash=template, pods=pods, **fields
    )


HISTORY = [Revision(2, "e-2", "h2"), Revision(3, "e-3", "h3")]


def test_the_revision_of_a_pod() -> None:
    w = _workload("w")
    by_hash = {"h2": 2, "h3": 3}

    def rev(pod: PodConfig) -> object:
        return pod_revision(pod, config="cm", workload=w, current=3, by_hash=by_hash)

    assert rev(_pod("p", hash_="h3", rev=3)) == 3
    assert rev(_pod("p", hash_="h2", rev=2)) == 2
    assert rev(_pod("p", hash_="h1", rev=1)) == 1  # pruned: the annotation still tells it
    assert rev(_pod("p", hash_="h2")) == 2  # an annotation from before revisions were recorded: by its hash
    assert rev(_pod("p", hash_="h0")) == UNKNOWN
    assert rev(_pod("p")) == BASELINE
    # the hash it should run now makes it current, whatever revision its template recorded (a skip, a rollback)
    assert rev(_pod("p", hash_="h3", rev=1)) == 3


def test_a_rollout_in_progress_and_done() -> None:
    mid = adoption(
        config="cm",
        workloads=[
            _workload("a", _pod("a1", hash_="h3", rev=3, ready=False), _pod("a0", hash_="h2", rev=2)),
            _workload("b", _pod("b1", hash_="h3", rev=3), _pod("b2", hash_="h3", rev=3)),
        ],
        current=3,
        history=HISTORY,
    )
    assert mid.status == {
        "summary": "1/2 workloads",
        "revision": 3,
        "workloads": 2,
        "adoptedWorkloads": 1,
        "revisions": [
            {"revision": 3, "workloads": 1, "pods": 3, "readyPods": 2},
            {"revision": 2, "workloads": 0, "pods": 1, "readyPods": 1},
        ],
        "baselinePods": 0,
        "unknownPods": 0,
    }
    assert [(w.name, w.revision) for w in mid.workloads] == [("a", None), ("b", 3)]
    assert mid.workloads[0].pods == {3: (1, 0), 2: (1, 1)}

    done = adoption(
        config="cm",
        workloads=[
            _workload("a", _pod("a1", hash_="h3", rev=3), _pod("a0", hash_="h2", rev=2, gone=True)),
            _workload("b", _pod("b1", hash_="h3", rev=3), _pod("b2", hash_="h3", rev=3)),
        ],
        current=3,
        history=HISTORY,
    )
    assert done.status["summary"] == "2/2 workloads"
    assert done.status["revisions"] == [{"revision": 3, "workloads": 2, "pods": 3, "readyPods": 3}]


def test_too_few_pods_or_an_old_template_is_not_adopted() -> None:
    short = _workload("a", _pod("a1", hash_="h3", rev=3), replicas=2)
    stale_template = _workload("b", _pod("b1", hash_="h3", rev=3), template="h2")
    result = adoption(config="cm", workloads=[short, stale_template], current=3, history=HISTORY)
    assert result.status["adoptedWorkloads"] == 0
    scaled_to_zero = _workload("c", replicas=0)
    assert adoption(config="cm", workloads=[scaled_to_zero], current=3, history=HISTORY).status["summary"] == (
        "1/1 workloads"
    )


def test_baseline_pods_and_pruned_revisions() -> None:
    opted_in = _workload("a", _pod("a0"), template=None, baseline_hash="h3")  # nothing changed since it opted in
    changed_since = _workload("b", _pod("b0"), template=None, baseline_hash="h2")
    on_pruned = _workload("c", _pod("c0", hash_="h1", rev=1), template="h3")
    result = adoption(config="cm", workloads=[opted_in, changed_since, on_pruned], current=3, history=HISTORY)
    assert result.status["summary"] == "1/3 workloads"
    assert result.status["baselinePods"] == 2
    assert result.status["revisions"] == [
        {"revision": 3, "workloads": 1, "pods": 0, "readyPods": 0},
        {"revision": 1, "workloads": 1, "pods": 1, "readyPods": 1, "pruned": True},
    ]


def test_the_summary_is_bounded() -> None:
    workloads = [_workload(f"w{i}", _pod(f"p{i}", hash_=f"old{i}", rev=i), template="h3") for i in range(1, 30)]
    result = adoption(config="cm", workloads=workloads, current=30, history=[Revision(30, "e-30", "h3")])
    assert [item["revision"] for item in result.status["revisions"]] == [30, 29, 28, 27, 26]
    assert len(result.workloads) == 29  # the detail is per workload, for the metric and the plugin


# ---------------------------------------------------------------------------------------------------- the engine
def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            _merge(target.setdefault(key, {}), value)
        else:
            target[key] = copy.deepcopy(value)


class ClusterKube:
    """Entries' outputs, workloads and events in memory: reconciles and reloads run end to end."""

    def __init__(self) -> None:
        self.maps: dict[tuple[str, str], dict[str, Any]] = {}
        self.revisions: dict[tuple[str, str], dict[str, Any]] = {}
        self.workloads: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str, str]] = []
        self.pods: list[dict[str, Any]] = []
        self.watches: list[tuple[str, str | None]] = []

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        if kind == "Pod":
            return [copy.deepcopy(pod) for pod in self.pods]
        store = self.revisions if kind == "ControllerRevision" else self.maps
        return [copy.deepcopy(obj) for (ns, _), obj in sorted(store.items()) if ns == namespace]

    async def list_all(self, kind: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(body) for (k, _, _), body in sorted(self.workloads.items()) if k == kind]

    async def watch(self, kind: str, namespace: str | None, **_: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watches.append((kind, namespace))
        await asyncio.Event().wait()  # no events: the tests call pod_changed themselves
        yield "ADDED", {}

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        store = self.revisions if kind == "ControllerRevision" else self.maps
        found = store.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def create(self, obj: dict[str, Any]) -> bool:
        self.revisions[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = copy.deepcopy(obj)
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self.revisions.pop((namespace, name), None) is not None

    async def ensure(self, obj: dict[str, Any], **_: Any) -> bool:
        self.maps[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        return True

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        body = self.workloads[(kind, namespace, name)]
        _merge(body, patch)
        self.patches.append((name, copy.deepcopy(patch)))
        return copy.deepcopy(body)

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(copy.deepcopy(status))

    async def event(self, *, involved: dict[str, Any], type_: str, reason: str, message: str, now_iso: str) -> None:
        self.events.append((involved["metadata"]["name"], reason, message))

    def forget(self, kind: str, namespace: str, name: str) -> None:
        pass


def _entry(data: dict[str, str], *, generation: int = 1, rollback_to: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"data": dict(data)}
    if rollback_to is not None:
        spec["rollbackTo"] = rollback_to
    return {
        "metadata": {"name": "app", "namespace": "ns", "uid": "uid-app", "generation": generation},
        "spec": spec,
    }


def _deployment(name: str, reload: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "annotations": {"beacon.dev/reload": reload},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}},
        },
    }


def _pod_body(workload: dict[str, Any], name: str, *, ready: bool, gone: bool = False) -> dict[str, Any]:
    template = workload["spec"]["template"]["metadata"]
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "labels": dict(template["labels"]),
        "annotations": dict(template.get("annotations") or {}),
    }
    if gone:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": meta, "status": {"conditions": conditions}}


async def _until(check: Any, what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_change_to_one_workloads_keys_rolls_out_that_workload_only_and_adoption_follows() -> None:
    kube = ClusterKube()
    policy = ReloadPolicy(debounce=0.02, max_delay=0.1, rate_count=10, rate_period=1.0)
    configs = Configs(kube=kube, policy=policy, coalesce_seconds=0.01)  # type: ignore[arg-type]
    configs._pods_synced.add("ns")  # the pods of "ns" listed (the events below are the watch's)
    data = {"db/host": "a", "feature/flag": "off", "other": "x"}
    await configs.entry_changed(_entry(data))

    def adoption_status() -> dict[str, Any]:
        return dict((kube.statuses[-1] if kube.statuses else {}).get("adoption") or {})

    await _until(lambda: adoption_status().get("summary") == "0/0 workloads", "materialised")
    a, b = _deployment("a", "app[db/]"), _deployment("b", "app[feature/flag, nothing/]")
    for body in (a, b):
        kube.workloads[("Deployment", "ns", body["metadata"]["name"])] = body
        configs.workload_changed("Deployment", copy.deepcopy(body))
    await _until(lambda: all(ANNOTATION_BASELINE in w["metadata"]["annotations"] for w in (a, b)), "baselines")
    assert not [p for p in kube.patches if "spec" in p[1]], "opting in restarts nothing"
    for body in (a, b):
        configs.workload_changed("Deployment", copy.deepcopy(body))
    configs.pod_changed("ns", _pod_body(a, "a0", ready=True))
    configs.pod_changed("ns", _pod_body(b, "b0", ready=True))
    await _until(lambda: adoption_status().get("summary") == "2/2 workloads", "baseline pods adopted")
    assert adoption_status()["baselinePods"] == 2

    # a key nobody selected: a new revision, no rollout, both workloads adopted on it
    await configs.entry_changed(_entry({**data, "other": "y"}, generation=2))
    await _until(lambda: adoption_status().get("revision") == 2, "revision 2")
    await asyncio.sleep(0.2)
    assert not [p for p in kube.patches if "spec" in p[1]]
    assert adoption_status()["summary"] == "2/2 workloads"

    # a key of a: a rolls out (its template records the revision), b does not and stays adopted
    await configs.entry_changed(_entry({**data, "other": "y", "db/host": "b"}, generation=3))
    await _until(lambda: any(p[0] == "a" and "spec" in p[1] for p in kube.patches), "a rolled out")
    await asyncio.sleep(0.2)
    rolled = [p[0] for p in kube.patches if "spec" in p[1]]
    assert rolled == ["a"]
    template = a["spec"]["template"]["metadata"]["annotations"]
    assert template[ANNOTATION_TEMPLATE_REVISIONS] == "app=3"
    cm = config_map_data({**data, "other": "y", "db/host": "b"})
    assert template[ANNOTATION_TEMPLATE_HASHES] == f"app={selection_hash(cm, ('db/',))}"
    configs.workload_changed("Deployment", copy.deepcopy(a))
    await _until(lambda: adoption_status().get("summary") == "1/2 workloads", "a not yet on 3")

    configs.pod_changed("ns", _pod_body(a, "a1", ready=False))
    await _until(lambda: adoption_status()["revisions"][0]["pods"] == 1, "a1 counted")
    assert adoption_status()["revisions"][0] == {"revision": 3, "workloads": 1, "pods": 1, "readyPods": 0}
    configs.pod_changed("ns", _pod_body(a, "a1", ready=True))
    configs.pod_changed("ns", _pod_body(a, "a0", ready=True, gone=True))
    await _until(lambda: adoption_status().get("summary") == "2/2 workloads", "a on 3")
    assert adoption_status()["baselinePods"] == 1  # b's pod: b skipped revisions 2 and 3, correctly

    text = metrics.REGISTRY.get_sample_value
    labels = {"namespace": "ns", "entry": "app", "workload": "Deployment/a", "revision": "3"}
    assert text("beacon_config_workload_pods", labels) == 1
    assert text("beacon_config_workload_adopted", {"namespace": "ns", "entry": "app", "workload": "Deployment/b"}) == 1

    # a pod event that changes nothing the summary shows writes no status
    writes = len(kube.statuses)
    configs.pod_changed("ns", _pod_body(a, "a0", ready=False, gone=True))
    configs.pod_changed("ns", {**_pod_body(b, "b0", ready=True), "spec": {"nodeName": "n1"}})
    await asyncio.sleep(0.2)
    assert len(kube.statuses) == writes

    # a rollback to revision 2: a's keys change back, so a rolls out again; b does not
    await configs.entry_changed(_entry({**data, "other": "y", "db/host": "b"}, generation=4, rollback_to=2))
    await _until(lambda: len([p for p in kube.patches if "spec" in p[1]]) == 2, "a rolled back")
    assert a["spec"]["template"]["metadata"]["annotations"][ANNOTATION_TEMPLATE_REVISIONS] == "app=4"
    configs.workload_changed("Deployment", copy.deepcopy(a))
    await _until(lambda: adoption_status().get("summary") == "1/2 workloads", "a behind after the rollback")
    assert adoption_status()["revisions"][:2] == [
        {"revision": 4, "workloads": 1, "pods": 0, "readyPods": 0},
        {"revision": 3, "workloads": 1, "pods": 1, "readyPods": 1},  # a: all its pods still run 3
    ]
    configs.pod_changed("ns", _pod_body(a, "a2", ready=True))
    configs.pod_changed("ns", _pod_body(a, "a1", ready=True), deleted=True)
    await _until(lambda: adoption_status().get("summary") == "2/2 workloads", "a on 4")
    assert [p[0] for p in kube.patches if "spec" in p[1]] == ["a", "a"]

    # b stops opting in: its series go, and the summary counts a alone
    b["metadata"]["annotations"] = {}
    configs.workload_changed("Deployment", copy.deepcopy(b))
    await _until(lambda: adoption_status().get("summary") == "1/1 workloads", "b gone")
    assert (
        text("beacon_config_workload_adopted", {"namespace": "ns", "entry": "app", "workload": "Deployment/b"}) is None
    )
    await configs.close()


async def test_a_malformed_opt_in_is_reported_once_and_reloads_nothing() -> None:
    kube = ClusterKube()
    configs = Configs(kube=kube, coalesce_seconds=0.01)  # type: ignore[arg-type]
    bad = _deployment("w", "app[db/")
    kube.workloads[("Deployment", "ns", "w")] = bad
    configs.workload_changed("Deployment", bad)
    configs.workload_changed("Deployment", bad)
    await asyncio.sleep(0.05)
    assert [(name, reason) for name, reason, _ in kube.events] == [("w", "ConfigReloadInvalid")]
    assert "'[' without ']'" in kube.events[0][2]
    assert configs._workloads == {}
    fixed = _deployment("w", "app[db/]")
    configs.workload_changed("Deployment", fixed)
    assert configs._workloads[("Deployment", "ns", "w")].keys == {"app": ("db/",)}
    configs.workload_changed("Deployment", bad)  # the same mistake again, after a fix: said again
    await asyncio.sleep(0.05)
    assert len(kube.events) == 2
    await configs.close()


async def test_adoption_waits_for_the_workloads_and_their_pods_so_a_restart_writes_what_status_shows() -> None:
    """After a restart the entries reconcile before kopf delivers the workloads, and before their pods are
    listed: the adoption the status shows is kept until both are in, then computed from them."""
    kube = ClusterKube()
    configs = Configs(kube=kube, coalesce_seconds=0.01)  # type: ignore[arg-type]
    shown = {"summary": "1/1 workloads", "revision": 1, "workloads": 1, "adoptedWorkloads": 1, "revisions": []}
    body = _entry({"db/host": "a"})
    body["status"] = {"adoption": shown}

    async def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return [body], []

    configs._list = listing  # type: ignore[method-assign]
    await configs.start()
    await _until(lambda: kube.statuses, "a status")  # Ready, revision, hash: written; the adoption kept
    assert kube.statuses[-1]["adoption"] == shown

    a = _deployment("a", "app[db/]")
    kube.workloads[("Deployment", "ns", "a")] = a
    kube.pods = [_pod_body(a, "a0", ready=True)]
    await configs.list_workloads()
    await asyncio.sleep(0.1)
    assert kube.statuses[-1]["adoption"] == shown  # a reads the entry, and its pods are not listed yet
    configs.watch_outputs = lambda: None  # type: ignore[method-assign]
    configs._watching = True
    configs._sync_pod_watch("ns")
    await _until(lambda: "ns" in configs._pods_synced, "the pods listed")
    await _until(lambda: kube.statuses[-1]["adoption"].get("baselinePods") == 1, "the adoption computed")
    assert kube.statuses[-1]["adoption"]["summary"] == "1/1 workloads"
    assert kube.watches == [("Pod", "ns")]  # the namespace's pods only, once listed
    await configs.close()


async def test_a_burst_of_pod_events_computes_the_adoption_once_per_window() -> None:
    """A rollout of N pods sends O(N) pod events; each would cost O(N) to count: they are coalesced."""
    kube = ClusterKube()
    configs = Configs(kube=kube, coalesce_seconds=0.05)  # type: ignore[arg-type]
    configs._pods_synced.add("ns")
    await configs.entry_changed(_entry({"k": "v"}))
    await _until(lambda: kube.statuses, "materialised")
    web = _deployment("web", "app")
    web["spec"]["replicas"] = 300
    kube.workloads[("Deployment", "ns", "web")] = web
    configs.workload_changed("Deployment", web)
    await asyncio.sleep(0.2)
    computed = 0
    compute = configs._adoption

    def counting(state: Any) -> Any:
        nonlocal computed
        computed += 1
        return compute(state)

    configs._adoption = counting  # type: ignore[method-assign]
    for i in range(300):
        configs.pod_changed("ns", _pod_body(web, f"web-{i}", ready=True))
    await _until(lambda: kube.statuses[-1]["adoption"]["baselinePods"] == 300, "300 pods counted")
    assert computed <= 3, computed  # the window's flush and the entry's reconcile, not one per pod
    await configs.close()


async def test_after_a_restart_a_key_aware_workload_waits_for_the_data_of_its_config() -> None:
    """The hashes of the ConfigMaps are known from start-up's listing, their data only once the entry is loaded:
    a workload that reads some keys is decided then, never with that ConfigMap left out of its rollout."""
    kube = ClusterKube()
    configs = Configs(kube=kube, coalesce_seconds=0.01)  # type: ignore[arg-type]
    data = config_map_data({"db/host": "a", "other": "x"})
    configs._hashes[("ns", "app")] = content_hash(data)
    configs._hashes[("ns", "plain")] = "p2"
    w = _deployment("w", "app[db/], plain")
    annotations = {ANNOTATION_TEMPLATE_HASHES: f"app={selection_hash(data, ('db/',))},plain=p1"}
    w["spec"]["template"]["metadata"]["annotations"] = annotations
    kube.workloads[("Deployment", "ns", "w")] = w
    configs.workload_changed("Deployment", copy.deepcopy(w))
    await asyncio.sleep(0.1)
    assert kube.patches == []  # plain changed, but app's keys are not known yet: no rollout without app
    configs._set_hash("ns", "app", content_hash(data), revision=4, data=data)
    await _until(lambda: kube.patches, "the rollout")
    await asyncio.sleep(0.05)
    ((_, patch),) = kube.patches
    template = patch["spec"]["template"]["metadata"]["annotations"]
    assert template[ANNOTATION_TEMPLATE_HASHES] == f"app={selection_hash(data, ('db/',))},plain=p2"
    await configs.close()
