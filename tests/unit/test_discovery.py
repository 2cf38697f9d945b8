"""The discovery engine's bookkeeping against an in-memory fake of beacon.kube (wiring only: the behaviour on a
real apiserver is proven in tests/integration). Covers what watch events alone cannot: the periodic resync that
repairs gaps after 410 Gone, seeding from published slices, and coalescing writes."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

from beacon.discovery import Discovery
from beacon.kube import covers
from beacon.targets import ProbeResult, Target


class FakeKube:
    """Just enough of beacon.kube.Kube: objects in a dict, every write counted."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any] | None:
        assert method == "GET"
        if path == "/apis/beacon.dev/v1alpha1/serviceentries":
            return {"items": [copy.deepcopy(e) for e in self.entries.values()]}
        return {"items": []}

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        items = [o for (k, ns, _), o in self.objects.items() if k == kind and ns == namespace]
        if label_selector and "=" in label_selector:
            wanted = dict(part.split("=", 1) for part in label_selector.split(","))
            items = [o for o in items if covers(o["metadata"].get("labels") or {}, wanted)]
        return [copy.deepcopy(o) for o in items]

    async def ensure(self, obj: dict[str, Any]) -> bool:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if self.objects.get(key) == obj:
            return False
        self.objects[key] = copy.deepcopy(obj)
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.writes.append(("delete", kind, name))
        return self.objects.pop((kind, namespace, name), None) is not None

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.writes.append(("status", kind, name))
        self.entries[(namespace, name)]["status"] = status

    async def event(self, **_: Any) -> None:
        self.writes.append(("event", "Event", ""))

    def forget(self, *_: Any) -> None:
        pass

    def forget_namespace_entry(self, *_: Any) -> None:
        pass


def entry(name: str, uid: str, addresses: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": 1},
        "spec": {
            "ports": [{"name": "http", "port": 80}],
            "endpoints": [{"address": a} for a in addresses],
            "healthCheck": {"tcp": {"port": 80}, "intervalSeconds": 2, "timeoutSeconds": 1},
        },
    }


async def _ok(target: Target) -> ProbeResult:
    return ProbeResult(ok=True, detail="ok", seconds=0.0)


def _engine(kube: FakeKube) -> Discovery:
    return Discovery(kube=kube, probe=_ok, coalesce_seconds=0.01, registry_coalesce_seconds=0.01)  # type: ignore[arg-type]


def _registry_services(kube: FakeKube) -> set[str]:
    import json

    cm = kube.objects.get(("ConfigMap", "ns", "beacon-registry"))
    return set(json.loads(cm["data"]["registry.json"])["services"]) if cm else set()


async def _settle(d: Discovery, seconds: float = 0.3) -> None:
    runner = asyncio.create_task(d.prober.run())
    await asyncio.sleep(seconds)
    runner.cancel()


async def test_resync_drops_entries_deleted_during_a_watch_gap_and_adds_missed_ones() -> None:
    kube = FakeKube()
    kube.entries[("ns", "a")] = entry("a", "uid-a", ["198.18.0.10"])
    kube.entries[("ns", "b")] = entry("b", "uid-b", ["198.18.0.11"])
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await d.entry_changed(kube.entries[("ns", "b")])
    await _settle(d, 1.5)
    assert _registry_services(kube) == {"a", "b"}
    assert len(d.prober) == 2

    # during a gap: a is deleted, c is created, and b is deleted and re-created (new uid) - no events arrive
    del kube.entries[("ns", "a")]
    kube.entries[("ns", "b")] = entry("b", "uid-b2", ["198.18.0.12"])
    kube.entries[("ns", "c")] = entry("c", "uid-c", ["198.18.0.13"])
    await d.resync()
    await _settle(d, 1.5)
    assert _registry_services(kube) == {"b", "c"}
    probed = d.prober.keys()
    assert sorted(k[2] for k in probed) == ["198.18.0.12", "198.18.0.13"]
    await d.close()


async def test_unchanged_resync_and_repeated_events_write_nothing() -> None:
    kube = FakeKube()
    kube.entries[("ns", "a")] = entry("a", "uid-a", ["198.18.0.10", "198.18.0.11"])
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 1.5)
    settled = len(kube.writes)
    assert settled > 0
    for _ in range(3):
        await d.resync()
        await d.entry_changed(kube.entries[("ns", "a")])  # e.g. our own status patch coming back
    await _settle(d, 0.5)
    assert kube.writes[settled:] == []
    await d.close()


async def test_seeding_keeps_published_ready_endpoints_ready() -> None:
    kube = FakeKube()
    body = entry("a", "uid-a", ["198.18.0.10"])
    body["spec"]["healthCheck"]["healthyThreshold"] = 5  # a fresh start would need 5 probes to turn ready
    kube.entries[("ns", "a")] = body
    kube.objects[("EndpointSlice", "ns", "a-ipv4-0")] = {
        "kind": "EndpointSlice",
        "metadata": {
            "name": "a-ipv4-0",
            "namespace": "ns",
            "labels": {
                "kubernetes.io/service-name": "a",
                "endpointslice.kubernetes.io/managed-by": "operator.beacon.dev",
            },
        },
        "endpoints": [{"addresses": ["198.18.0.10"], "conditions": {"ready": True, "serving": True}}],
    }
    d = _engine(kube)
    await d.entry_changed(body)
    await _settle(d, 0.3)
    published = kube.objects[("EndpointSlice", "ns", "a-ipv4-0")]
    assert published["endpoints"][0]["conditions"]["ready"] is True
    await d.close()


async def test_one_new_endpoint_writes_one_slice_and_transitions_are_logged_at_info(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="beacon.discovery")
    kube = FakeKube()
    addresses = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(250)]
    kube.entries[("ns", "a")] = entry("a", "uid-a", addresses)
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 1.5)
    transitions = [r.levelno for r in caplog.records if "unknown -> passing" in r.getMessage()]
    assert transitions
    assert set(transitions) == {logging.INFO}
    settled = len(kube.writes)
    # 198.18.0.0 sorts before every other address: packed in order, it would shift all three slices
    kube.entries[("ns", "a")] = entry("a", "uid-a", ["198.18.0.0", *addresses])
    kube.entries[("ns", "a")]["metadata"]["generation"] = 2
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 1.5)
    # written once as not probed yet, once more when its first probe passes: always the same, one slice
    slice_writes = {w for w in kube.writes[settled:] if w[1] == "EndpointSlice"}
    assert slice_writes == {("apply", "EndpointSlice", "a-ipv4-2")}
    await d.close()


class FlakyKube(FakeKube):
    """Writes the first slice of a reconcile, then fails the second one once (a write lost mid-reconcile)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None
        self.lists = 0

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        self.lists += kind == "EndpointSlice"
        return await super().list(kind, namespace, label_selector=label_selector)

    async def ensure(self, obj: dict[str, Any]) -> bool:
        wrote = await super().ensure(obj)
        if wrote and obj["kind"] == "EndpointSlice" and self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                self.fail_after = None
                raise RuntimeError("connection reset")
        return wrote


async def test_after_a_failed_reconcile_the_slices_are_listed_again_and_nothing_is_duplicated() -> None:
    kube = FlakyKube()
    addresses = [f"198.18.1.{i}" for i in range(1, 151)]
    body = entry("a", "uid-a", addresses)
    body["spec"].pop("healthCheck")  # no probes: every endpoint is ready at once
    kube.entries[("ns", "a")] = body
    d = _engine(kube)
    await d.entry_changed(body)
    await _settle(d, 0.5)
    lists = kube.lists
    # one endpoint leaves the full first slice and 61 arrive: one fills its hole, 60 make a third slice, whose
    # write fails (after reaching the API)
    grown = copy.deepcopy(body)
    grown["metadata"]["generation"] = 2
    grown["spec"]["endpoints"] = [{"address": a} for a in addresses[1:]]
    grown["spec"]["endpoints"] += [{"address": f"198.18.2.{i}"} for i in range(1, 62)]
    kube.fail_after = 1
    await d.entry_changed(grown)
    await _settle(d, 2.5)  # the retry comes after 1 s
    assert kube.fail_after is None, "the write failed"
    assert kube.lists > lists, "the retry listed the slices again"
    published = [
        a
        for (kind, _, _), obj in kube.objects.items()
        if kind == "EndpointSlice"
        for ep in obj["endpoints"]
        for a in ep["addresses"]
    ]
    assert sorted(published) == sorted(addresses[1:] + [f"198.18.2.{i}" for i in range(1, 62)])
    await d.close()


async def test_a_result_that_changes_nothing_does_no_bookkeeping() -> None:
    kube = FakeKube()
    body = entry("a", "uid-a", ["198.18.0.10"])
    body["spec"]["healthCheck"]["deregisterAfterSeconds"] = 60
    kube.entries[("ns", "a")] = body
    d = _engine(kube)
    await d.entry_changed(body)
    key = ("ns", "a", "198.18.0.10")
    target = d._entries[("ns", "a")].entry.target(d._entries[("ns", "a")].endpoints[0])
    assert target is not None
    state = d._entries[("ns", "a")]
    ok = ProbeResult(ok=True, detail="TCP connect ok", seconds=0.001)
    d._on_result(key, target, ok)
    passing = state.health["198.18.0.10"]
    assert passing.ready
    for _ in range(5):
        d._on_result(key, target, ok)
    assert state.health["198.18.0.10"] is passing  # untouched, not re-created per result
    fail = ProbeResult(ok=False, detail="timed out after 1s", seconds=1.0)
    for _ in range(3):
        d._on_result(key, target, fail)
    critical = state.health["198.18.0.10"]
    assert not critical.ready
    d._on_result(key, target, fail)
    # CRITICAL with deregisterAfterSeconds: time still matters, so the result is applied
    assert state.health["198.18.0.10"] is not critical
    await d.close()
