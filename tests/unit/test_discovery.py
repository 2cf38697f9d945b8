"""The discovery engine's bookkeeping against an in-memory fake of beacon.kube (wiring only: the behaviour on a
real apiserver is proven in tests/integration). Covers what watch events alone cannot: the periodic resync that
repairs gaps after 410 Gone, seeding from published slices, coalescing writes, and transitions that name what
triggered them (a connection loss) in their Event and in the detections metric."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

from beacon import discovery
from beacon.discovery import Discovery
from beacon.kube import NotOursError
from beacon.targets import ProbeResult, Target, Trigger
from beacon_dev.fakekube import FakeKube


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
    return Discovery(kube=kube, probe=_ok, registry_interval_seconds=0.01)  # type: ignore[arg-type]


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


async def test_a_label_only_edit_of_an_entry_reaches_the_registry_tags() -> None:
    kube = FakeKube()
    body = entry("a", "uid-a", ["198.18.0.10"])
    kube.entries[("ns", "a")] = body
    d = _engine(kube)
    await d.entry_changed(body)
    await _settle(d, 0.5)
    relabelled = copy.deepcopy(body)
    relabelled["metadata"]["labels"] = {"team": "payments"}  # the spec is unchanged
    await d.entry_changed(relabelled)
    await _settle(d, 0.5)
    cm = kube.objects[("ConfigMap", "ns", "beacon-registry")]
    assert json.loads(cm["data"]["registry.json"])["services"]["a"]["tags"] == {"team": "payments"}
    await d.close()


class TheirServiceKube(FakeKube):
    """A Service of the entry's name exists and is someone else's: every reconcile meets the conflict."""

    async def ensure(self, obj: dict[str, Any], **options: Any) -> bool:
        if obj["kind"] == "Service":
            raise NotOursError("Service ns/a exists and is not managed by beacon")
        return await super().ensure(obj, **options)


async def test_an_entry_in_output_conflict_reports_it_once_however_often_its_health_flips() -> None:
    kube = TheirServiceKube()
    kube.entries[("ns", "a")] = entry("a", "uid-a", ["198.18.0.10"])
    kube.entries[("ns", "a")]["spec"]["healthCheck"]["unhealthyThreshold"] = 1
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 0.5)
    assert [w for w in kube.writes if w[0] == "status"] == [("status", "ServiceEntry", "a")]
    assert kube.entries[("ns", "a")]["status"]["conditions"][0]["reason"] == "OutputConflict"
    state = d._entries[("ns", "a")]
    target = d.prober._targets[("ns", "a", "198.18.0.10")][0]
    for i in range(50):  # 50 health flips while the conflict lasts
        ok = i % 2 == 0
        d._on_result(("ns", "a", "198.18.0.10"), target, ProbeResult(ok=ok, detail=f"flip {ok}", seconds=0.0))
        await _turns()
    assert [w for w in kube.writes if w[0] == "status"] == [("status", "ServiceEntry", "a")]  # no more writes
    assert len(state.transitions) <= 1  # nothing piles up (at most the flip of the last reconcile)
    await d.close()


async def test_deleted_entries_leave_no_locks_or_namespace_state_behind() -> None:
    kube = FakeKube()
    d = _engine(kube)
    bodies = [entry(f"e{i}", f"uid-{i}", [f"198.18.3.{i + 1}"]) for i in range(20)]
    for i, body in enumerate(bodies):
        body["metadata"]["namespace"] = f"ns{i % 4}"
        kube.entries[(f"ns{i % 4}", f"e{i}")] = body
        await d.entry_changed(body)
    await _settle(d, 0.5)
    assert d._locks
    for body in bodies:
        await d.entry_deleted(body["metadata"]["namespace"], body["metadata"]["name"])
    await _settle(d, 0.5)
    assert not d._locks
    assert not d._registry_locks
    assert not any(d._names.values())
    assert not d._records
    assert not d._expected
    assert not [k for k in kube.objects if k[0] == "ConfigMap"]  # the registries went with their last entries
    await d.close()


def _published_ready_slice(service: str, address: str) -> dict[str, Any]:
    """The EndpointSlice a previous beacon process published for `service`: `address` ready."""
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-ipv4-0",
            "namespace": "ns",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "operator.beacon.dev",
            },
        },
        "endpoints": [{"addresses": [address], "conditions": {"ready": True, "serving": True}}],
    }


async def test_seeding_keeps_published_ready_endpoints_ready() -> None:
    kube = FakeKube()
    body = entry("a", "uid-a", ["198.18.0.10"])
    body["spec"]["healthCheck"]["healthyThreshold"] = 5  # a fresh start would need 5 probes to turn ready
    kube.entries[("ns", "a")] = body
    kube.objects[("EndpointSlice", "ns", "a-ipv4-0")] = _published_ready_slice("a", "198.18.0.10")
    d = _engine(kube)
    await d.entry_changed(body)
    await _settle(d, 0.3)
    published = kube.objects[("EndpointSlice", "ns", "a-ipv4-0")]
    assert published["endpoints"][0]["conditions"]["ready"] is True
    await d.close()


class SlowSliceReadsKube(FakeKube):
    """Each listing of EndpointSlices answers what stood when it was asked, once its own gate opens: responses in
    flight, for as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[asyncio.Event] = []

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        items = await super().list(kind, namespace, label_selector=label_selector)
        if kind == "EndpointSlice":
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        return items


async def test_a_second_event_never_seeds_over_fresher_probe_results() -> None:
    """Two events of a new entry arrive while its published slices are being read (a restart: ADDED, then a
    MODIFIED). Seeding happens once, in the entry's work queue: the probe results that arrive after it are kept,
    not overwritten by a second seeding from the (older) published readiness."""
    kube = SlowSliceReadsKube()
    body = entry("a", "uid-a", ["198.18.0.10"])
    kube.entries[("ns", "a")] = body
    kube.objects[("EndpointSlice", "ns", "a-ipv4-0")] = _published_ready_slice("a", "198.18.0.10")
    d = _engine(kube)
    first = asyncio.create_task(d.entry_changed(body))
    await _turns()
    second = asyncio.create_task(d.entry_changed({**body, "metadata": {**body["metadata"], "generation": 1}}))
    await _turns()
    kube.gates[0].set()  # the first read answers: ready, as published before the restart
    await _turns(30)
    assert d._entries[("ns", "a")].health["198.18.0.10"].ready
    _fail(d, "a", "198.18.0.10", 3)  # the backend died meanwhile: three failures, unhealthy
    await _turns(30)
    assert not d._entries[("ns", "a")].health["198.18.0.10"].ready
    for gate in kube.gates[1:]:  # any later read answers with the old published readiness
        gate.set()
    await _turns(30)
    await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
    assert not d._entries[("ns", "a")].health["198.18.0.10"].ready, "seeded again over a fresher verdict"
    assert _readiness(kube, "a") == {"198.18.0.10": False}
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


async def test_a_new_entry_is_first_written_with_its_first_verdicts_and_no_event() -> None:
    """One write per output, endpoints already ready; passing the first checks is not news (no Event)."""
    kube = FakeKube()
    kube.entries[("ns", "a")] = entry("a", "uid-a", ["198.18.0.10", "198.18.0.11", "198.18.0.12"])
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 0.5)
    slice_writes = [w for w in kube.writes if w[1] == "EndpointSlice"]
    assert slice_writes == [("apply", "EndpointSlice", "a-ipv4-0")]
    published = kube.objects[("EndpointSlice", "ns", "a-ipv4-0")]
    assert [e["conditions"]["ready"] for e in published["endpoints"]] == [True, True, True]
    assert [w for w in kube.writes if w[0] in ("status", "event")] == [("status", "ServiceEntry", "a")]
    await d.close()


async def test_a_new_entry_whose_first_probes_hang_is_published_by_the_deadline(monkeypatch: Any) -> None:
    monkeypatch.setattr(discovery, "FIRST_VERDICT_WAIT", 0.1)  # + the check's 1 s timeout

    async def hang(target: Target) -> ProbeResult:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    kube = FakeKube()
    kube.entries[("ns", "a")] = entry("a", "uid-a", ["198.18.0.10"])
    d = Discovery(kube=kube, probe=hang, registry_interval_seconds=0.01)  # type: ignore[arg-type]
    runner = asyncio.create_task(d.prober.run())
    await d.entry_changed(kube.entries[("ns", "a")])
    await asyncio.sleep(0.6)
    assert ("EndpointSlice", "ns", "a-ipv4-0") not in kube.objects  # still waiting for a first verdict
    await asyncio.sleep(1.0)
    published = kube.objects[("EndpointSlice", "ns", "a-ipv4-0")]
    assert published["endpoints"][0]["conditions"]["ready"] is False  # not probed yet: published not ready
    runner.cancel()
    await d.close()


async def test_entries_that_arrive_together_share_one_listing_of_their_published_slices() -> None:
    kube = FlakyKube()
    bodies = [entry(f"e{i}", f"uid-{i}", [f"198.18.1.{i + 1}"]) for i in range(30)]
    for body in bodies:
        kube.entries[("ns", body["metadata"]["name"])] = body
    d = _engine(kube)
    await asyncio.gather(*(d.entry_changed(body) for body in bodies))
    assert kube.lists <= 2  # the first entry's own listing, and one for everyone who asked meanwhile
    await _settle(d, 0.5)
    assert {name for kind, _, name in kube.objects if kind == "EndpointSlice"} == {f"e{i}-ipv4-0" for i in range(30)}
    assert kube.service_reads <= 3  # whether a Service of each name stands there: read in batches too
    settled = kube.service_reads
    await d.resync()
    await _settle(d, 0.3)
    assert kube.service_reads == settled  # written once, then compared with what was written: no more reads
    await d.close()


class FlakyKube(FakeKube):
    """Writes the first slice of a reconcile, then fails the second one once (a write lost mid-reconcile)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None
        self.lists = 0
        self.service_reads = 0

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        self.lists += kind == "EndpointSlice"
        self.service_reads += kind == "Service"
        return await super().list(kind, namespace, label_selector=label_selector)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.service_reads += kind == "Service"
        return await super().get(kind, namespace, name)

    async def ensure(self, obj: dict[str, Any], **options: Any) -> bool:
        wrote = await super().ensure(obj, **options)
        if wrote and obj["kind"] == "EndpointSlice" and self.fail_after is not None:
            self.fail_after -= 1
            if self.fail_after < 0:
                self.fail_after = None
                raise RuntimeError("connection reset")
        return wrote


class SlowListKube(FlakyKube):
    """Listing a namespace's slices takes a while (its size), reading one entry's does not; counts both."""

    def __init__(self) -> None:
        super().__init__()
        self.full_lists = 0
        self.own_reads = 0

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        if kind == "EndpointSlice":
            if label_selector is not None and "kubernetes.io/service-name=" in label_selector:
                self.own_reads += 1
                await asyncio.sleep(0.01)
            else:
                self.full_lists += 1
                await asyncio.sleep(0.05)
        return await super().list(kind, namespace, label_selector=label_selector)


async def test_entries_trickling_into_a_big_namespace_read_their_own_slices_not_the_namespaces() -> None:
    """A restart: 200 entries are expected, and kopf delivers them a few at a time while a LIST of the namespace is
    slow. The first batch lists the namespace; the small batches after it read each entry's own slices, so the
    LISTs of the whole namespace stay a handful instead of one per batch."""
    kube = SlowListKube()
    bodies = [entry(f"e{i}", f"uid-{i}", [f"198.18.2.{i + 1}"]) for i in range(200)]
    for body in bodies:
        kube.entries[("ns", body["metadata"]["name"])] = body
    d = _engine(kube)
    d.expect({("ns", body["metadata"]["name"]) for body in bodies})

    async def deliver() -> None:
        for i in range(0, 200, 2):
            await asyncio.gather(*(d.entry_changed(body) for body in bodies[i : i + 2]))
            await asyncio.sleep(0.005)

    await deliver()
    await _settle(d, 0.5)
    assert kube.full_lists <= 2, kube.full_lists
    assert kube.own_reads >= 150
    assert {name for kind, _, name in kube.objects if kind == "EndpointSlice"} == {f"e{i}-ipv4-0" for i in range(200)}
    await d.close()


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
    await _turns()  # the reconcile seeds and refreshes the endpoints
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


# ---------------------------------------------------------------------------------------------- leading edge
def _readiness(kube: FakeKube, name: str) -> dict[str, bool]:
    return {
        address: bool(ep["conditions"]["ready"])
        for (kind, _, _), obj in kube.objects.items()
        if kind == "EndpointSlice" and obj["metadata"]["labels"]["kubernetes.io/service-name"] == name
        for ep in obj["endpoints"]
        for address in ep["addresses"]
    }


async def _turns(n: int = 10) -> None:
    """Let the event loop run a few rounds without letting any time pass for timers."""
    for _ in range(n):
        await asyncio.sleep(0)


def _fail(d: Discovery, name: str, address: str, times: int, *, namespace: str = "ns") -> None:
    state = d._entries[(namespace, name)]
    endpoint = next(e for e in state.endpoints if e.address == address)
    target = state.entry.target(endpoint)
    assert target is not None
    for _ in range(times):
        d._on_result(
            (namespace, name, address), target, ProbeResult(ok=False, detail="connection refused", seconds=0.0)
        )


async def test_the_decisive_probe_of_an_idle_entry_is_written_at_once() -> None:
    kube = FakeKube()
    addresses = ["198.18.0.10", "198.18.0.11"]
    kube.entries[("ns", "a")] = entry("a", "uid-a", addresses)
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 0.5)
    assert _readiness(kube, "a") == dict.fromkeys(addresses, True)
    settled = len(kube.writes)
    _fail(d, "a", "198.18.0.10", 2)  # below unhealthyThreshold (3): no transition, nothing to write
    await _turns()
    assert kube.writes[settled:] == []
    _fail(d, "a", "198.18.0.10", 1)  # the decisive one
    await _turns()  # no timer may run: a coalescing delay of any length would leave the slice as it was
    assert _readiness(kube, "a") == {"198.18.0.10": False, "198.18.0.11": True}
    assert ("apply", "EndpointSlice", "a-ipv4-0") in kube.writes[settled:]
    await d.close()


class GatedKube(FakeKube):
    """Holds every EndpointSlice write while `gate` is closed: a write in flight, for as long as a test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.reconciles = 0

    async def ensure(self, obj: dict[str, Any], **options: Any) -> bool:
        if obj["kind"] == "Service":
            self.reconciles += 1  # every reconcile ensures the Service first
        if obj["kind"] == "EndpointSlice":
            await self.gate.wait()
        return await super().ensure(obj, **options)


async def test_transitions_during_an_in_flight_write_coalesce_into_exactly_one_follow_up_write() -> None:
    kube = GatedKube()
    addresses = ["198.18.0.10", "198.18.0.11", "198.18.0.12"]
    kube.entries[("ns", "a")] = entry("a", "uid-a", addresses)
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 0.5)
    assert _readiness(kube, "a") == dict.fromkeys(addresses, True)
    reconciles, settled = kube.reconciles, len(kube.writes)

    kube.gate.clear()
    _fail(d, "a", addresses[0], 3)
    await _turns()
    assert kube.reconciles == reconciles + 1, "the first transition started a write at once"
    _fail(d, "a", addresses[1], 3)  # both arrive while that write is in flight
    await _turns()
    _fail(d, "a", addresses[2], 3)
    await _turns()
    assert kube.reconciles == reconciles + 1, "no second write while the first is in flight"
    kube.gate.set()
    await _turns(50)
    assert kube.reconciles == reconciles + 2, "exactly one follow-up write"
    slice_writes = [w for w in kube.writes[settled:] if w[1] == "EndpointSlice"]
    assert slice_writes == [("apply", "EndpointSlice", "a-ipv4-0")] * 2
    assert _readiness(kube, "a") == dict.fromkeys(addresses, False)
    await asyncio.sleep(0.1)  # and nothing more afterwards
    assert kube.reconciles == reconciles + 2
    await d.close()


class GatedEventsKube(GatedKube):
    """A GatedKube that keeps each Event's message, and the readiness published when it was posted."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict[str, bool]]] = []

    async def event(self, **fields: Any) -> None:
        self.events.append((fields["message"], _readiness(self, "a")))


async def test_an_event_names_only_transitions_that_are_published() -> None:
    """A transition that arrives while a write is in flight is announced with the write that publishes it."""
    kube = GatedEventsKube()
    addresses = ["198.18.0.10", "198.18.0.11"]
    kube.entries[("ns", "a")] = entry("a", "uid-a", addresses)
    d = _engine(kube)
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 0.5)
    kube.gate.clear()
    _fail(d, "a", addresses[0], 3)
    await _turns()  # its write is in flight now
    _fail(d, "a", addresses[1], 3)
    await _turns()
    kube.gate.set()
    await _turns(50)
    assert len(kube.events) == 2
    for message, published in kube.events:
        named = [a for a in addresses if f"endpoint {a}:" in message]
        assert named, message
        assert all(published[a] is False for a in named), (message, published)  # announced once published
    await d.close()


# ---------------------------------------------------------------------------------------------- filtered caches
def _selector_entry(name: str, labels: dict[str, str], *, namespace: str = "ns") -> dict[str, Any]:
    body = entry(name, f"uid-{name}", [])
    body["metadata"]["namespace"] = namespace
    body["spec"]["selector"] = {"matchLabels": labels}
    return body


def _pod_body(name: str, ip: str, labels: dict[str, str], *, namespace: str = "ns") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": "node-1"},
        "status": {"podIP": ip},
    }


class CountingKube(FakeKube):
    """Counts the listings, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[str] = []

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        self.listed.append(kind)
        return await super().list(kind, namespace, label_selector=label_selector)


def _count_refreshes(d: Any) -> list[tuple[str, str]]:
    """Spy on the engine's endpoint refreshes: the keys of the entries refreshed, in order, from now on."""
    refreshed: list[tuple[str, str]] = []
    refresh = d._refresh_endpoints

    def counting(state: Any) -> None:
        refreshed.append(state.entry.key)
        refresh(state)

    d._refresh_endpoints = counting
    return refreshed


async def test_pods_and_leases_are_watched_only_where_an_entry_needs_them() -> None:
    kube = CountingKube()
    d = _engine(kube)
    kube.entries[("ns", "static")] = entry("static", "uid-s", ["198.18.0.10"])
    await d.entry_changed(kube.entries[("ns", "static")])
    await _turns()
    assert kube.watching == []  # static endpoints need no pods, a TCP check no leases
    for name in ("cart", "shop"):
        kube.entries[("ns", name)] = _selector_entry(name, {"app": name})
        await d.entry_changed(kube.entries[("ns", name)])
    leased = entry("leased", "uid-l", ["198.18.0.11"])
    leased["metadata"]["namespace"] = "other"
    leased["spec"]["healthCheck"] = {"lease": {}, "intervalSeconds": 2, "timeoutSeconds": 1}
    await d.entry_changed(leased)
    await _turns()
    assert sorted(kube.watching) == [("Lease", "other"), ("Pod", "ns")]  # one watch per namespace and kind
    await d.entry_deleted("ns", "cart")
    await _turns()
    assert sorted(kube.watching) == [("Lease", "other"), ("Pod", "ns")]  # shop still selects pods in ns
    await d.entry_deleted("ns", "shop")
    await d.entry_deleted("other", "leased")
    await _turns()
    assert kube.watching == []
    await d.close()


async def test_a_pod_no_entry_selects_does_no_work_and_is_not_cached() -> None:
    kube = CountingKube()
    d = _engine(kube)
    for name, labels in (("cart", {"app": "cart"}), ("shop", {"app": "shop", "tier": "web"})):
        kube.entries[("ns", name)] = _selector_entry(name, labels)
        await d.entry_changed(kube.entries[("ns", name)])
    await _turns()  # their first reconciles
    refreshed = _count_refreshes(d)
    listings = len(kube.listed)

    d.pod_changed("elsewhere", _pod_body("cart-1", "198.18.0.20", {"app": "cart"}, namespace="elsewhere"))
    d.pod_changed("ns", _pod_body("other-1", "198.18.0.21", {"app": "other"}))
    d.pod_changed("ns", _pod_body("shop-x", "198.18.0.22", {"app": "shop", "tier": "db"}))  # one label of two
    d.pod_changed("ns", _pod_body("other-1", "198.18.0.21", {"app": "other"}), deleted=True)
    assert refreshed == []
    assert d._pods == {}
    assert d._pod_entries == {}
    assert len(kube.listed) == listings, "a pod event never lists"
    assert not any(d.entries.is_dirty(k) for k in d._entries)

    # a pod that matches touches exactly its entry (refreshed by its reconcile), and is cached
    d.pod_changed("ns", _pod_body("cart-1", "198.18.0.23", {"app": "cart", "extra": "x"}))
    assert set(d._pods["ns"]) == {"cart-1"}
    await _turns()
    assert refreshed == [("ns", "cart")]
    assert [e.address for e in d._entries[("ns", "cart")].endpoints] == ["198.18.0.23"]
    # relabelled away from every selector: refreshes the entry it left, and is no longer cached
    d.pod_changed("ns", _pod_body("cart-1", "198.18.0.23", {"app": "other"}))
    await _turns()
    assert refreshed == [("ns", "cart")] * 2
    assert d._pods == {}
    assert [e.address for e in d._entries[("ns", "cart")].endpoints] == []
    await d.close()


async def test_an_entry_created_after_its_pods_still_finds_them() -> None:
    kube = CountingKube()
    d = _engine(kube)
    pods = {
        "cart-1": _pod_body("cart-1", "198.18.0.30", {"app": "cart"}),
        "cart-2": _pod_body("cart-2", "198.18.0.31", {"app": "cart", "version": "2"}),
        "other": _pod_body("other", "198.18.0.32", {"app": "other"}),
    }
    for name, body in pods.items():
        kube.objects[("Pod", "ns", name)] = body
        d.pod_changed("ns", body)  # the watch delivered them before the entry existed: none is cached
    assert d._pods == {}

    body = _selector_entry("cart", {"app": "cart"})
    kube.entries[("ns", "cart")] = body
    await d.entry_changed(body)
    await _turns()  # the reconcile lists the selected pods
    assert sorted(e.address for e in d._entries[("ns", "cart")].endpoints) == ["198.18.0.30", "198.18.0.31"]
    assert set(d._pods["ns"]) == {"cart-1", "cart-2"}, "only the selected pods are cached"
    await _settle(d, 0.5)
    assert _readiness(kube, "cart") == {"198.18.0.30": True, "198.18.0.31": True}

    # the entry goes: its pods are no longer cached
    await d.entry_deleted("ns", "cart")
    assert d._pods == {}
    assert d._pod_entries == {}
    await d.close()


async def test_leases_are_cached_only_where_a_lease_check_needs_them() -> None:
    kube = CountingKube()
    d = _engine(kube)

    def lease(name: str, namespace: str = "ns") -> dict[str, Any]:
        return {
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"renewTime": "2026-01-01T00:00:00.000000Z", "leaseDurationSeconds": 3600},
        }

    kube.objects[("Lease", "ns", "beat-198.18.0.40")] = lease("beat-198.18.0.40")
    d.lease_changed("ns", lease("beat-198.18.0.40"))
    d.lease_changed("ns", lease("kube-scheduler"))
    assert d._leases == {}, "no lease check in the namespace: nothing cached"

    body = entry("beat", "uid-beat", ["198.18.0.40"])
    body["spec"]["healthCheck"] = {"lease": {}, "intervalSeconds": 2, "timeoutSeconds": 1}
    kube.entries[("ns", "beat")] = body
    await d.entry_changed(body)
    await _turns()  # the namespace's leases are listed
    record = d.lease_lookup("ns", "beat-198.18.0.40")
    assert record is not None, "the lease created before its entry was listed"
    assert record.duration == 3600
    d.lease_changed("elsewhere", lease("beat-198.18.0.40", namespace="elsewhere"))
    assert d.lease_lookup("elsewhere", "beat-198.18.0.40") is None
    assert set(d._leases) == {"ns"}

    await d.entry_deleted("ns", "beat")
    assert d._leases == {}
    await d.close()


async def test_a_burst_of_pod_events_costs_one_refresh_per_write_not_one_per_event() -> None:
    kube = CountingKube()
    d = _engine(kube)
    body = _selector_entry("web", {"app": "web"})
    kube.entries[("ns", "web")] = body
    await d.entry_changed(body)
    await _turns()
    refreshed = _count_refreshes(d)
    for i in range(200):  # the watch delivers them back to back
        d.pod_changed("ns", _pod_body(f"web-{i}", f"198.18.1.{i + 1}", {"app": "web"}))
    await _turns()
    assert refreshed == [("ns", "web")]
    assert len(d._entries[("ns", "web")].endpoints) == 200
    assert len(d.prober) == 200, "every new pod is handed to the prober by that one refresh"
    await d.close()


async def test_releasing_a_namespace_forgets_it_without_a_write_once_its_reconcile_in_flight_is_done() -> None:
    """Sharded mode: a namespace given to another replica is dropped from memory and from the prober, nothing
    is written or deleted (the next owner seeds from what stands), and a write under way finishes first."""
    kube = GatedKube()
    served = {"ns", "other"}
    d = Discovery(kube=kube, probe=_ok, registry_interval_seconds=0.01, serves=served.__contains__)  # type: ignore[arg-type]
    mine = entry("a", "uid-a", ["198.18.0.10"])
    theirs = entry("b", "uid-b", ["198.18.0.11"])
    theirs["metadata"]["namespace"] = "other"
    for body in (mine, theirs):
        kube.entries[(body["metadata"]["namespace"], body["metadata"]["name"])] = body
        await d.entry_changed(body)
    await _settle(d, 0.5)
    assert len(d.prober) == 2
    kube.gate.clear()  # the next EndpointSlice write of "other" hangs in flight
    _fail(d, "b", "198.18.0.11", 3, namespace="other")
    await _turns()
    writes = len(kube.writes)
    served.discard("other")
    release = asyncio.ensure_future(d.release(served.__contains__))
    await _turns()
    assert not release.done(), "a write of the released namespace is still under way"
    kube.gate.set()
    assert await asyncio.wait_for(release, timeout=2) == {"other"}
    assert ("other", "b") not in d._entries
    assert len(d.prober) == 1
    done = len(kube.writes)
    assert not [w for w in kube.writes[writes:done] if w[0] == "delete"], kube.writes[writes:done]
    await d.entry_changed(theirs)  # its events keep coming: they cost nothing now
    await _settle(d, 0.3)
    assert kube.writes[done:] == []
    assert ("other", "b") not in d._entries
    await d.close()


# ---------------------------------------------------------------------------------------------- triggers
class EventKube(FakeKube):
    """Keeps every Event posted."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    async def event(self, **event: Any) -> None:
        self.events.append(event)
        await super().event()


async def test_a_transition_after_a_connection_loss_says_so_in_its_event_and_counts_as_such_a_detection() -> None:
    from beacon.metrics import REGISTRY

    def detections(trigger: str) -> float:
        return REGISTRY.get_sample_value("beacon_detections_total", {"trigger": trigger}) or 0.0

    kube = EventKube()
    body = entry("a", "uid-a", ["198.18.0.10", "198.18.0.11"])
    kube.entries[("ns", "a")] = body
    d = _engine(kube)
    await d.entry_changed(body)
    await _settle(d, 0.5)
    assert _readiness(kube, "a") == {"198.18.0.10": True, "198.18.0.11": True}
    before = {trigger: detections(trigger) for trigger in ("interval", "connection-loss")}
    state = d._entries[("ns", "a")]
    cases: list[tuple[str, Trigger]] = [("198.18.0.10", "connection-loss"), ("198.18.0.11", "interval")]
    for address, trigger in cases:
        target = state.entry.target(next(e for e in state.endpoints if e.address == address))
        assert target is not None
        for _ in range(3):
            result = ProbeResult(ok=False, detail="connection refused", seconds=0.0, trigger=trigger)
            d._on_result(("ns", "a", address), target, result)
    await _turns()
    assert _readiness(kube, "a") == {"198.18.0.10": False, "198.18.0.11": False}
    (event,) = [e for e in kube.events if e["reason"] == "EndpointUnhealthy"]
    parts = dict(part.split(": ", 1) for part in event["message"].split("; "))
    assert parts == {
        "endpoint 198.18.0.10": "passing -> critical (connection refused) after the connection was lost",
        "endpoint 198.18.0.11": "passing -> critical (connection refused)",
    }
    assert {t: detections(t) - before[t] for t in before} == {"interval": 1.0, "connection-loss": 1.0}
    await d.close()


def _result(d: Discovery, name: str, address: str, *, ok: bool) -> None:
    state = d._entries[("ns", name)]
    target = state.entry.target(next(e for e in state.endpoints if e.address == address))
    assert target is not None
    detail = "ok" if ok else "connection timed out"
    d._on_result(("ns", name, address), target, ProbeResult(ok=ok, detail=detail, seconds=0.0))


def _conditions(kube: FakeKube, name: str) -> dict[str, str]:
    status = kube.entries[("ns", name)].get("status") or {}
    return {c["type"]: c["reason"] for c in status.get("conditions") or []}


async def test_a_mass_failure_withdraws_nothing_and_after_it_only_fresh_failures_withdraw() -> None:
    """Every raw result feeds self-preservation; while it is on, published endpoints stay ready; once it is off, a
    held endpoint goes only after `unhealthyThreshold` failures of probes started after the exit."""
    kube = FakeKube()
    addresses = [f"198.18.0.{i}" for i in range(10, 40)]
    kube.entries[("ns", "a")] = entry("a", "uid-a", addresses)
    clock = [1_000.0]
    d = Discovery(kube=kube, probe=_ok, registry_interval_seconds=0.01, wall_clock=lambda: clock[0])  # type: ignore[arg-type]
    await d.entry_changed(kube.entries[("ns", "a")])
    await _settle(d, 0.5)
    assert _readiness(kube, "a") == dict.fromkeys(addresses, True)
    for _ in range(3):  # unhealthyThreshold: every endpoint's health turns critical
        clock[0] += 1
        for address in addresses:
            _result(d, "a", address, ok=False)
    await _turns(50)
    assert d.self_preservation.active(clock[0])
    assert _readiness(kube, "a") == dict.fromkeys(addresses, True)
    assert _conditions(kube, "a")["SelfPreservation"] == "HeldBySelfPreservation"
    clock[0] += 1
    dead = addresses[:5]
    for address in addresses[5:]:  # the path heals; 5 endpoints really are dead: 5 of 30 fail, below 30%
        _result(d, "a", address, ok=True)
    await _turns(50)
    assert not d.self_preservation.active(clock[0])
    assert _readiness(kube, "a") == dict.fromkeys(addresses, True), "failures before the exit are no evidence"
    for _ in range(3):
        clock[0] += 1
        for address in dead:
            _result(d, "a", address, ok=False)
        await _turns(50)
    assert _readiness(kube, "a") == {a: a not in dead for a in addresses}
    assert "SelfPreservation" not in _conditions(kube, "a")
    await d.close()
