"""The ConfigEntry engine's fan-out, without a cluster: a change reaches the entries of its scope only (the
namespace's entries for a namespace-wide one), a reconcile reads only the layers that can apply, a new hash
reaches only the workloads that read that ConfigMap, and start-up schedules each entry once.

Complexity is asserted by counting work, never by timing: materialising N entries of one namespace computes each
scope's layering once and visits O(N) layers (not O(N^2)), and an edit of all N entries schedules O(N)
reconciles. And the ControllerRevisions beacon owns: the watch re-queues the owner of one deleted or edited by
hand (never for beacon's own creations and prunings), whose reconcile writes it back exactly as beacon wrote it."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import Any

import pytest

from beacon import config_core
from beacon.config_core import (
    ANNOTATION_HASH,
    ANNOTATION_REVISION,
    ConfigEntry,
    Revision,
    config_map_data,
    content_hash,
    desired_revision,
)
from beacon.configs import Configs
from beacon.rollout_core import RollbackRecord

FAN_OUT = 0.02  # the engines below coalesce for this long: the tests wait SETTLE for a window to end
SETTLE = 0.1


class NoKube:
    """No call may reach the API in these tests: the engine's scheduling is replaced by a recorder."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected API call: {name}")


def config_entry(name: str, *, namespace: str = "ns", service: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"data": {"k": name}}
    if service is not None:
        spec["service"] = service
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}"}, "spec": spec}


def _engine() -> tuple[Configs, list[tuple[str, str]]]:
    configs = Configs(kube=NoKube(), coalesce_seconds=FAN_OUT)  # type: ignore[arg-type]
    scheduled: list[tuple[str, str]] = []
    configs._schedule = scheduled.append  # type: ignore[method-assign]
    configs.entries.enqueue = scheduled.append  # type: ignore[method-assign]  # the watches' way in
    return configs, scheduled


async def test_a_change_fans_out_only_within_its_scope() -> None:
    configs, scheduled = _engine()
    for body in (
        config_entry("global"),
        config_entry("cart-a", service="cart"),
        config_entry("cart-b", service="cart"),
        config_entry("shop-a", service="shop"),
        config_entry("cart-a", namespace="other", service="cart"),
        config_entry("global", namespace="other"),
    ):
        await configs.entry_changed(body)
    await asyncio.sleep(SETTLE)
    scheduled.clear()

    changed = config_entry("cart-a", service="cart")
    changed["spec"]["data"] = {"k": "new"}
    await configs.entry_changed(changed)
    assert sorted(set(scheduled)) == [("ns", "cart-a"), ("ns", "cart-b")]

    await asyncio.sleep(SETTLE)
    scheduled.clear()
    moved = config_entry("shop-a", service="cart")  # moves scope: both the old and the new scope
    await configs.entry_changed(moved)
    assert sorted(set(scheduled)) == [("ns", "cart-a"), ("ns", "cart-b"), ("ns", "shop-a")]

    await asyncio.sleep(SETTLE)
    scheduled.clear()
    wide = config_entry("global")
    wide["spec"]["data"] = {"k": "new"}
    await configs.entry_changed(wide)  # namespace-wide: its namespace's entries, and no other namespace's
    assert sorted(set(scheduled)) == [("ns", "cart-a"), ("ns", "cart-b"), ("ns", "global"), ("ns", "shop-a")]
    await asyncio.sleep(SETTLE)

    layers = configs._layers(configs._entries[("ns", "cart-b")].entry)
    assert sorted(e.name for e in layers) == ["cart-a", "cart-b", "global", "shop-a"]
    scheduled.clear()
    await configs.entry_deleted("ns", "cart-a")
    assert sorted(set(scheduled)) == [("ns", "cart-b"), ("ns", "shop-a")]
    assert sorted(e.name for e in configs._layers(configs._entries[("ns", "cart-b")].entry)) == [
        "cart-b",
        "global",
        "shop-a",
    ]
    await configs.close()


async def test_a_new_hash_reaches_only_the_workloads_that_read_that_config_map() -> None:
    configs, _ = _engine()
    evaluated: list[str] = []
    configs._evaluate = lambda w: evaluated.append(w.name)  # type: ignore[method-assign]

    def deployment(name: str, reads: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "ns", "uid": name, "annotations": {"beacon.dev/reload": reads}}}

    configs.workload_changed("Deployment", deployment("web", "web-config"))
    configs.workload_changed("Deployment", deployment("api", "api-config,shared"))
    configs.workload_changed("Deployment", {"metadata": {"name": "plain", "namespace": "ns", "uid": "plain"}})
    evaluated.clear()
    configs._set_hash("ns", "shared", "h1")
    assert evaluated == ["api"]
    configs.workload_changed("Deployment", deployment("api", "api-config"))  # stops reading "shared"
    evaluated.clear()
    configs._set_hash("ns", "shared", "h2")
    assert evaluated == []
    configs.workload_changed("Deployment", deployment("web", "web-config"), deleted=True)
    assert ("ns", "web-config") not in configs._readers
    await configs.close()


async def test_start_up_schedules_each_entry_once_without_fan_out() -> None:
    configs, scheduled = _engine()
    bodies = [config_entry("global"), *(config_entry(f"svc-{i}", service=f"s{i % 3}") for i in range(30))]

    async def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return bodies, []

    configs._list = listing  # type: ignore[method-assign]
    await configs.start()
    assert sorted(scheduled) == sorted({(b["metadata"]["namespace"], b["metadata"]["name"]) for b in bodies})
    await configs.close()


class StatusKube:
    """Records status patches; nothing else may reach the API."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, str, dict[str, Any]]] = []

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append((namespace, name, status))


async def test_an_entry_that_cannot_be_read_is_refused_alone_and_never_blocks_start_up() -> None:
    kube = StatusKube()
    configs = Configs(kube=kube)  # type: ignore[arg-type]
    scheduled: list[tuple[str, str]] = []
    configs._schedule = scheduled.append  # type: ignore[method-assign]
    broken = config_entry("broken")
    broken["spec"]["priority"] = "high"  # an integer by schema; a bypassed schema let it in
    bodies = [config_entry("good"), broken, config_entry("also-good")]

    async def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return bodies, []

    configs._list = listing  # type: ignore[method-assign]
    await configs.start()
    assert sorted(scheduled) == [("ns", "also-good"), ("ns", "good")]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    ((namespace, name, status),) = kube.statuses
    assert (namespace, name) == ("ns", "broken")
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "high" in ready["message"]
    broken["status"] = status  # the status patch comes back as a watch event: nothing more to say
    await configs.entry_changed(broken)
    await asyncio.sleep(0)
    assert len(kube.statuses) == 1
    await configs.close()


# ---------------------------------------------------------------------------------------------------- complexity
class FakeKube:
    """An empty cluster that accepts every write: enough for reconciles to run end to end in memory."""

    def __init__(self) -> None:
        self.maps: dict[tuple[str, str], dict[str, Any]] = {}
        self.revisions: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        store = self.revisions if kind == "ControllerRevision" else self.maps
        return [copy.deepcopy(obj) for (ns, _), obj in sorted(store.items()) if ns == namespace]

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        store = self.revisions if kind == "ControllerRevision" else self.maps
        found = store.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def create(self, obj: dict[str, Any]) -> bool:
        self.calls.append(("create", obj["metadata"]["name"]))
        self.revisions[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = copy.deepcopy(obj)
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.calls.append(("delete", name))
        return self.revisions.pop((namespace, name), None) is not None

    async def ensure(self, obj: dict[str, Any], **_: Any) -> bool:
        self.maps[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        return True

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        pass

    def forget(self, kind: str, namespace: str, name: str) -> None:
        pass


def wide_entry(i: int) -> dict[str, Any]:
    """Namespace-wide entries that all set one key at one priority: every one layers on (and conflicts with)
    every other, the worst case for per-entry layering."""
    body = config_entry(f"e-{i:04d}")
    body["spec"]["data"] = {"shared": str(i), f"own/e-{i:04d}": "1"} if i < 20 else {"shared": str(i)}
    return body


async def _materialise_all(configs: Configs, kube: FakeKube, n: int) -> None:
    for _ in range(500):
        if len(kube.maps) == n and not configs.entries.queue._dirty:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(kube.maps)} of {n} ConfigMaps materialised")


async def test_start_up_and_materialising_a_namespace_layer_each_entry_a_constant_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """N namespace-wide entries (plus a few service-scoped ones) in one namespace: start-up and the first
    materialisation of all of them compute each scope's layering once and look at each entry's keys a bounded
    number of times. Per-entry layering (the namespace's entries read again for every entry) looks N^2 times."""
    n, services = 400, 3
    looked_at = 0
    layerings = 0
    real_invalid_keys, real_layering = config_core.invalid_keys, config_core.layering

    def counting_invalid_keys(data: Any) -> list[str]:  # every layer planning looks at passes through here
        nonlocal looked_at
        looked_at += 1
        return real_invalid_keys(data)

    def counting_layering(*args: Any, **kwargs: Any) -> Any:
        nonlocal layerings
        layerings += 1
        return real_layering(*args, **kwargs)

    monkeypatch.setattr(config_core, "invalid_keys", counting_invalid_keys)
    monkeypatch.setattr("beacon.configs.layering", counting_layering)
    kube = FakeKube()
    configs = Configs(kube=kube, coalesce_seconds=0.0)  # type: ignore[arg-type]
    bodies = [wide_entry(i) for i in range(n)] + [config_entry(f"s-{i}", service=f"svc-{i}") for i in range(services)]

    async def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return bodies, []

    configs._list = listing  # type: ignore[method-assign]
    await configs.start()
    await _materialise_all(configs, kube, len(bodies))
    assert looked_at <= 3 * len(bodies), f"{looked_at} layer visits for {len(bodies)} entries"
    assert layerings <= 1 + services, f"{layerings} layerings for {1 + services} scopes"
    # and the result is the layering itself: every namespace-wide entry holds the merge of all of them
    merged = {"shared": str(n - 1), **{f"own/e-{i:04d}": "1" for i in range(20)}}
    assert kube.maps[("ns", "e-0000")]["data"] == config_map_data(merged)
    assert kube.maps[("ns", "s-1")]["data"] == config_map_data({**merged, "k": "s-1"})
    await configs.close()


async def test_editing_every_entry_of_a_namespace_schedules_each_a_bounded_number_of_times() -> None:
    """An edit to all N namespace-wide entries (each one's change fans out to the whole namespace) schedules
    O(N) reconciles, and every entry is scheduled after the last edit. Uncoalesced it is N x N."""
    configs, scheduled = _engine()
    n = 300
    for i in range(n):
        await configs.entry_changed(wide_entry(i))
    await asyncio.sleep(SETTLE)
    scheduled.clear()
    for i in range(n):
        body = wide_entry(i)
        body["spec"]["data"] = {"shared": f"edited-{i}"}
        await configs.entry_changed(body)
    assert len(scheduled) <= 3 * n, f"{len(scheduled)} schedules for {n} edits"
    tail = len(scheduled)
    await asyncio.sleep(SETTLE)  # the window ends: the edits after the first fan-out reach every entry again
    assert sorted(set(scheduled[tail:])) == sorted(("ns", f"e-{i:04d}") for i in range(n))
    assert len(scheduled) <= 3 * n
    await configs.close()


async def test_layering_of_a_scope_is_computed_once_until_it_changes() -> None:
    configs, _ = _engine()
    for body in (config_entry("global"), config_entry("a", service="cart"), config_entry("b", service="shop")):
        configs._take(body, fan_out=False)
    cart = configs._layering("ns", "cart")
    assert configs._layering("ns", "cart") is cart
    shop = configs._layering("ns", "shop")
    changed = config_entry("b", service="shop")
    changed["spec"]["data"] = {"k": "changed"}
    configs._take(changed, fan_out=False)  # a service's change outdates that service's layering only
    assert configs._layering("ns", "cart") is cart
    assert configs._layering("ns", "shop") is not shop
    wide = config_entry("global")
    wide["spec"]["data"] = {"k": "wide", "x": "1"}
    configs._take(wide, fan_out=False)  # a namespace-wide change outdates every layering of the namespace
    assert configs._layering("ns", "cart") is not cart
    assert configs._layering("ns", "cart").merged.values == {"k": "a", "x": "1"}
    await configs.close()


# ---------------------------------------------------------------------------------------------------- revisions
def _revision_of(configs: Configs, name: str, number: int = 1) -> tuple[ConfigEntry, Revision, dict[str, Any]]:
    entry = configs._entries[("ns", name)].entry
    data = config_map_data(dict(entry.data))
    digest = content_hash(data)
    obj = desired_revision(entry, data=data, digest=digest, revision=number, rollback_of=None)
    obj["metadata"]["resourceVersion"] = "7"
    return entry, Revision(number, obj["metadata"]["name"], digest), obj


def _loaded(configs: Configs, name: str, *revisions: Revision) -> None:
    state = configs._entries[("ns", name)]
    state.loaded = True
    state.history = {r.number: r for r in revisions}


async def test_the_revision_watch_requeues_the_owner_only_for_changes_made_by_others() -> None:
    configs, scheduled = _engine()
    await configs.entry_changed(config_entry("cfg"))
    await asyncio.sleep(SETTLE)
    scheduled.clear()
    _, recorded, obj = _revision_of(configs, "cfg")

    configs._revision_changed("ADDED", obj)  # before the entry is loaded: its history is read then
    assert scheduled == []
    _loaded(configs, "cfg", recorded)
    configs._revision_changed("ADDED", obj)  # beacon's own creation coming back
    configs._revision_changed("MODIFIED", obj)
    assert scheduled == []
    pruned = copy.deepcopy(obj)
    pruned["metadata"]["name"] = "cfg-0"
    configs._revision_changed("DELETED", pruned)  # not in the history (beacon pruned it first)
    assert scheduled == []

    configs._revision_changed("DELETED", obj)  # deleted by hand
    assert scheduled == [("ns", "cfg")]
    for edit in (
        lambda o: o["metadata"]["annotations"].update({ANNOTATION_HASH: "0" * 16}),
        lambda o: o["metadata"]["labels"].update({"extra": "x"}),
        lambda o: o.update({"revision": 9}),
        lambda o: o["metadata"].update({"ownerReferences": []}),
        lambda o: o["data"]["data"].update({"k": "edited"}),
    ):
        scheduled.clear()
        edited = copy.deepcopy(obj)
        edit(edited)
        configs._revision_changed("MODIFIED", edited)
        assert scheduled == [("ns", "cfg")]
    assert configs._entries[("ns", "cfg")].suspect == {recorded.name}
    await configs.close()


async def _reconciled_with_history(kube: FakeKube, *, limit: int = 10) -> tuple[Configs, list[dict[str, Any]]]:
    """An entry materialised three times (revisions 1..3), all in memory as the engine recorded them."""
    configs = Configs(kube=kube, coalesce_seconds=0.0)  # type: ignore[arg-type]
    configs._schedule = lambda key: None  # type: ignore[method-assign]
    stored = []
    for number in (1, 2, 3):
        body = config_entry("cfg")
        body["spec"]["data"] = {"k": str(number)}
        body["spec"]["revisionHistoryLimit"] = limit
        configs._take(body, fan_out=False)
        await configs.reconcile(("ns", "cfg"))
        stored.append(copy.deepcopy(kube.revisions[("ns", f"cfg-{number}")]))
    return configs, stored


async def test_a_revision_deleted_or_edited_by_hand_is_written_back_exactly() -> None:
    kube = FakeKube()
    configs, stored = await _reconciled_with_history(kube)
    state = configs._entries[("ns", "cfg")]

    # the current revision deleted: recreated from the content beacon materialised last
    del kube.revisions[("ns", "cfg-3")]
    configs._revision_changed("DELETED", stored[2])
    await configs.reconcile(("ns", "cfg"))
    assert kube.revisions[("ns", "cfg-3")] == stored[2]

    # an older one edited: its data is immutable, so the object itself holds it; deleted and created again
    edited = copy.deepcopy(stored[0])
    edited["metadata"]["annotations"]["note"] = "by hand"
    edited["revision"] = 7
    kube.revisions[("ns", "cfg-1")] = edited
    configs._revision_changed("MODIFIED", edited)
    kube.calls.clear()
    await configs.reconcile(("ns", "cfg"))
    assert kube.revisions[("ns", "cfg-1")] == stored[0]
    assert [c for c in kube.calls if c[0] != "get"] == [("delete", "cfg-1"), ("create", "cfg-1")]

    # an older one deleted, its content in no other revision and not in memory: dropped from the history
    del kube.revisions[("ns", "cfg-2")]
    configs._revision_changed("DELETED", stored[1])
    await configs.reconcile(("ns", "cfg"))
    assert ("ns", "cfg-2") not in kube.revisions
    assert sorted(state.history) == [1, 3]

    # beacon's own repair coming back (its deletion and creation) is checked, and nothing more is written
    configs._revision_changed("DELETED", stored[0])
    kube.calls.clear()
    await configs.reconcile(("ns", "cfg"))
    assert [c for c in kube.calls if c[0] != "get"] == []
    assert state.suspect == set()
    await configs.close()


async def test_a_deleted_revision_is_recovered_from_another_with_the_same_content() -> None:
    kube = FakeKube()
    configs, stored = await _reconciled_with_history(kube)
    body = config_entry("cfg")  # back to the content of revision 1: revision 4, same hash
    body["spec"]["data"] = {"k": "1"}
    configs._take(body, fan_out=False)
    await configs.reconcile(("ns", "cfg"))
    state = configs._entries[("ns", "cfg")]
    assert state.history[4].hash == state.history[1].hash
    del kube.revisions[("ns", "cfg-1")]
    configs._revision_changed("DELETED", stored[0])
    state.content = None  # not in memory either: only revision 4 still holds that content
    await configs.reconcile(("ns", "cfg"))
    assert kube.revisions[("ns", "cfg-1")] == stored[0]
    await configs.close()


async def test_pruning_is_not_mistaken_for_a_deletion_by_hand() -> None:
    kube = FakeKube()
    configs, stored = await _reconciled_with_history(kube, limit=2)
    state = configs._entries[("ns", "cfg")]
    assert sorted(state.history) == [2, 3]
    scheduled: list[tuple[str, str]] = []
    configs._schedule = scheduled.append  # type: ignore[method-assign]
    configs._revision_changed("DELETED", stored[0])  # the pruning of revision 1 coming back
    assert scheduled == []
    assert state.suspect == set()
    await configs.close()


async def test_a_revision_deleted_while_its_entry_is_reloaded_is_still_written_back() -> None:
    """The ConfigMap and a revision deleted together: the ConfigMap's event makes the entry re-read the API, whose
    listing lacks the revision; beacon's record of it stands and the revision is written back."""
    kube = FakeKube()
    configs, stored = await _reconciled_with_history(kube)
    del kube.revisions[("ns", "cfg-3")]
    configs._entries[("ns", "cfg")].loaded = False  # what the ConfigMap watch does
    await configs.reconcile(("ns", "cfg"))
    assert kube.revisions[("ns", "cfg-3")] == stored[2]
    assert sorted(configs._entries[("ns", "cfg")].history) == [1, 2, 3]
    await configs.close()


class OrderKube(FakeKube):
    """Records the order of writes; the first revision creation can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.fail_create = False

    async def create(self, obj: dict[str, Any]) -> bool:
        if self.fail_create:
            self.fail_create = False
            raise RuntimeError("apiserver unavailable")
        self.writes.append(f"revision {obj['metadata']['name']}")
        return await super().create(obj)

    async def ensure(self, obj: dict[str, Any], **options: Any) -> bool:
        self.writes.append(f"configmap {obj['metadata']['annotations'][ANNOTATION_REVISION]}")
        return await super().ensure(obj, **options)


async def test_the_config_map_is_written_before_its_revision_and_a_failure_between_keeps_the_number() -> None:
    """What the workloads read goes first (a namespace-wide edit writes every ConfigMap before any bookkeeping);
    a failed revision creation is retried under the same number, so the ConfigMap never names a lost one."""
    kube = OrderKube()
    configs = Configs(kube=kube, coalesce_seconds=0.0)  # type: ignore[arg-type]
    configs._schedule = lambda key: None  # type: ignore[method-assign]
    body = config_entry("cfg")
    body["spec"]["data"] = {"k": "1"}
    configs._take(body, fan_out=False)
    await configs.reconcile(("ns", "cfg"))
    assert kube.writes == ["configmap 1", "revision cfg-1"]
    body["spec"]["data"] = {"k": "2"}
    configs._take(body, fan_out=False)
    kube.fail_create, kube.writes = True, []
    with pytest.raises(RuntimeError):
        await configs.reconcile(("ns", "cfg"))
    await configs.reconcile(("ns", "cfg"))  # the queue's retry
    assert kube.writes == ["configmap 2", "configmap 2", "revision cfg-2"]
    assert sorted(configs._entries[("ns", "cfg")].history) == [1, 2]
    await configs.close()


async def test_releasing_a_namespace_forgets_its_entries_and_writes_nothing() -> None:
    """Sharded mode: entries of a namespace given to another replica are dropped, nothing is written for them,
    and their later events cost nothing."""
    kube = OrderKube()
    served = {"ns", "other"}
    configs = Configs(kube=kube, coalesce_seconds=0.0, serves=served.__contains__)  # type: ignore[arg-type]
    mine, theirs = config_entry("cfg"), config_entry("cfg", namespace="other")
    for body in (mine, theirs):
        await configs.entry_changed(body)
    await asyncio.sleep(SETTLE)
    assert {key[0] for key in configs._entries} == {"ns", "other"}
    served.discard("other")
    assert await configs.release(served.__contains__) == {"other"}
    assert set(configs._entries) == {("ns", "cfg")}
    kube.writes = []
    theirs["spec"]["data"] = {"k": "changed"}
    await configs.entry_changed(theirs)
    await asyncio.sleep(SETTLE)
    assert kube.writes == []
    assert set(configs._entries) == {("ns", "cfg")}
    await configs.close()


class ForgetfulKube(NoKube):
    """No API call either; dropping cached objects (which calls nothing) is allowed."""

    def forget(self, *_args: str) -> None:
        return None


def _reader(name: str, template_hash: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": name, "annotations": {"beacon.dev/reload": "app"}},
        "spec": {"template": {"metadata": {"annotations": {"beacon.dev/config-hashes": f"app={template_hash}"}}}},
    }


async def test_a_restarted_operator_moves_only_the_members_its_status_names() -> None:
    """A tracked rollout resumes from status.rollout: before any reconcile, the readers that the step in progress
    names may move to the new content, the others keep what they run; a finished rollout releases them all; an
    entry handed to another replica restarts nobody on its way out."""
    served = {"ns"}
    configs = Configs(kube=ForgetfulKube(), coalesce_seconds=FAN_OUT, serves=served.__contains__)  # type: ignore[arg-type]
    configs._schedule = lambda key: None  # type: ignore[method-assign]
    enqueued: list[str] = []
    configs.reloads.enqueue = lambda key: enqueued.append(key[2])  # type: ignore[method-assign]
    configs._set_hash("ns", "app", "h2")  # the target ConfigMap already holds revision 2 (waves, no canary)
    body = config_entry("app")
    body["spec"]["rollout"] = {"waveSize": 2}
    rollout = {"revision": 2, "hash": "h2", "phase": "Waves", "wave": 1, "members": ["Deployment/a", "Deployment/b"]}
    body["status"] = {"rollout": rollout, "configMapName": "app"}
    configs._take(body, fan_out=False)
    for name in "abcd":
        configs.workload_changed("Deployment", _reader(name, "h1"))
    desired = {name: configs._desired(configs._workloads[("Deployment", "ns", name)]) for name in "abcd"}
    assert desired == {"a": {"app": "h2"}, "b": {"app": "h2"}, "c": {"app": "h1"}, "d": {"app": "h1"}}
    assert sorted(set(enqueued)) == ["a", "b"]

    enqueued.clear()
    state = configs._entries[("ns", "app")]
    assert state.rollout is not None
    state.rollout = dataclasses.replace(state.rollout, members=("Deployment/c",))
    configs._sync_gate(state)
    assert sorted(set(enqueued)) == ["c"], "the next wave: its members only"

    enqueued.clear()
    served.discard("ns")
    await configs.release(served.__contains__)
    assert enqueued == [], "a namespace handed over restarts nothing"
    await configs.close()


async def test_a_finished_rollout_releases_every_reader() -> None:
    configs = Configs(kube=NoKube(), coalesce_seconds=FAN_OUT)  # type: ignore[arg-type]
    configs._schedule = lambda key: None  # type: ignore[method-assign]
    enqueued: list[str] = []
    configs.reloads.enqueue = lambda key: enqueued.append(key[2])  # type: ignore[method-assign]
    configs._set_hash("ns", "app", "h2")
    body = config_entry("app")
    body["spec"]["canary"] = {"selector": {"matchLabels": {"tier": "canary"}}}
    body["status"] = {"rollout": {"revision": 2, "hash": "h2", "phase": "Complete"}, "configMapName": "app"}
    configs._take(body, fan_out=False)
    for name in "ab":
        configs.workload_changed("Deployment", _reader(name, "h1"))
    assert sorted(set(enqueued)) == ["a", "b"]
    # the same status with a ConfigMap that holds something else (a crash between the two writes) holds them
    other = Configs(kube=NoKube(), coalesce_seconds=FAN_OUT)  # type: ignore[arg-type]
    other._schedule = lambda key: None  # type: ignore[method-assign]
    held: list[str] = []
    other.reloads.enqueue = lambda key: held.append(key[2])  # type: ignore[method-assign]
    other._set_hash("ns", "app", "h3")
    other._take(body, fan_out=False)
    for name in "ab":
        other.workload_changed("Deployment", _reader(name, "h1"))
    assert held == []
    await configs.close()
    await other.close()


async def test_an_automatic_rollback_holds_until_the_content_that_failed_changes() -> None:
    """status.rollback serves the restored revision's content (as a new revision) while spec.data is what failed
    and the merged content is what failed; a change of another entry's layer is new content and ends it."""
    kube = FakeKube()
    configs = Configs(kube=kube, coalesce_seconds=0.0)  # type: ignore[arg-type]
    configs._schedule = lambda key: None  # type: ignore[method-assign]
    base = config_entry("base")
    base["spec"]["data"] = {"k": "1"}
    svc = config_entry("svc", service="s")
    svc["spec"].update({"data": {"own": "a"}, "rollout": {"waveSize": 1}})
    for body in (base, svc):
        configs._take(body, fan_out=False)
        await configs.reconcile(("ns", body["metadata"]["name"]))
    base["spec"]["data"] = {"k": "2"}
    configs._take(base, fan_out=False)
    await configs.reconcile(("ns", "svc"))
    state = configs._entries[("ns", "svc")]
    assert state.current is not None
    assert state.current.revision == 2
    failed_hash = state.current.hash
    # revision 2 failed its rollout (as `_release` records it); the next reconcile serves revision 1 as 3
    state.rollback = RollbackRecord(2, 1, content_hash(svc["spec"]["data"]), "Deployment/x: not Ready")
    await configs.reconcile(("ns", "svc"))
    served = kube.maps[("ns", "svc")]
    assert served["data"] == {"k": "1", "own": "a"}
    assert served["metadata"]["annotations"][ANNOTATION_REVISION] == "3"
    assert state.rollout is not None
    assert (state.rollout.phase, state.rollback.revision if state.rollback else None) == ("RolledBack", 3)
    assert kube.revisions[("ns", "svc-3")]["metadata"]["annotations"]["beacon.dev/rollback-of"] == "1"
    await configs.reconcile(("ns", "svc"))  # nothing changed: the failed content is not tried again
    assert kube.maps[("ns", "svc")]["data"] == {"k": "1", "own": "a"}
    assert configs._entries[("ns", "svc")].history[2].hash == failed_hash, "the failed revision is kept"
    # another entry's layer changes: the merged content is new, and released as any other
    base["spec"]["data"] = {"k": "3"}
    configs._take(base, fan_out=False)
    await configs.reconcile(("ns", "svc"))
    assert state.rollback is None
    assert kube.maps[("ns", "svc")]["data"] == {"k": "3", "own": "a"}
    assert kube.maps[("ns", "svc")]["metadata"]["annotations"][ANNOTATION_REVISION] == "4"
    await configs.close()
