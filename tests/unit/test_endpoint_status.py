"""The per-endpoint status (what `kubectl beacon status` shows): state, since, and the probe that decided the
endpoint's health (detail, latency, consecutive count). Bounded (16 items, 64-character details) and written only
when what it shows changes: a probe that decides nothing, however different its latency, costs no write, and a
restart that finds the health it published writes nothing either."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from beacon.discovery import Discovery
from beacon.health import Decision, EndpointHealth, Status, Thresholds, observe, seeded, settled
from beacon.models import Endpoint, ServiceEntry
from beacon.reconcile import STATUS_ENDPOINTS_MAX, View, desired_status, endpoint_status, status_changed
from beacon.targets import ProbeResult, Target
from beacon_dev.fakekube import FakeKube

NOW = 1_700_000_000.0


def make_entry() -> ServiceEntry:
    return ServiceEntry.from_body(
        {
            "metadata": {"name": "payments", "namespace": "shop", "uid": "u", "generation": 1},
            "spec": {"ports": [{"name": "http", "port": 80}], "endpoints": [{"address": "198.18.0.1"}]},
        }
    )


def view(address: str, health: EndpointHealth) -> View:
    return View(endpoint=Endpoint(address=address, ports={"http": 80}), health=health)


# ------------------------------------------------------------------------------------------------ the decision
def test_a_transition_records_the_probe_that_made_it_and_only_a_transition_changes_it() -> None:
    thresholds = Thresholds(healthy=2, unhealthy=3)
    health = EndpointHealth(since=0.0)
    health, changed = observe(health, ok=True, detail="HTTP 200", now=1.0, thresholds=thresholds, latency=0.002)
    assert not changed
    assert health.decision is None
    health, changed = observe(health, ok=True, detail="HTTP 204", now=2.0, thresholds=thresholds, latency=0.0031)
    assert changed
    assert health.decision == Decision("HTTP 204", 0.0031, 2)
    for now, latency in ((3.0, 0.5), (4.0, 0.7)):  # failures below the threshold: the decision stands
        health, changed = observe(health, ok=False, detail="timed out", now=now, thresholds=thresholds, latency=latency)
        assert not changed
        assert health.decision == Decision("HTTP 204", 0.0031, 2)
    health, changed = observe(health, ok=False, detail="timed out", now=5.0, thresholds=thresholds, latency=1.0)
    assert changed
    assert health.decision == Decision("timed out", 1.0, 3)


@given(
    results=st.lists(st.tuples(st.booleans(), st.sampled_from(["HTTP 200", "HTTP 503"]), st.floats(0, 2))),
    healthy=st.integers(1, 3),
    unhealthy=st.integers(1, 3),
    start=st.sampled_from([None, True, False]),
)
def test_skipping_settled_results_keeps_the_same_decision(
    results: list[tuple[bool, str, float]], healthy: int, unhealthy: int, start: bool | None
) -> None:
    """Discovery skips results that `settled` says change nothing: the decision (hence the status) is the same
    as when every result is applied."""
    thresholds = Thresholds(healthy=healthy, unhealthy=unhealthy)
    full = skipping = seeded(ready=start, now=0.0)
    for index, (ok, detail, latency) in enumerate(results):
        now = float(index + 1)
        full, _ = observe(full, ok=ok, detail=detail, now=now, thresholds=thresholds, latency=latency)
        if not settled(skipping, ok=ok, detail=detail):
            skipping, _ = observe(skipping, ok=ok, detail=detail, now=now, thresholds=thresholds, latency=latency)
        assert skipping.decision == full.decision


# ------------------------------------------------------------------------------------------------ the item
def test_an_item_shows_state_check_since_and_the_deciding_probe() -> None:
    health = EndpointHealth(
        status=Status.CRITICAL,
        since=NOW - 90,
        detail="later detail",
        decision=Decision("connection refused", 0.000412, 3),
    )
    assert endpoint_status(view("198.18.0.1", health), None, now=NOW) == {
        "address": "198.18.0.1",
        "state": "Unhealthy",
        "check": "critical",
        "since": "2023-11-14T22:11:50Z",
        "probe": "connection refused",
        "latencyMs": 0.41,
        "consecutive": 3,
    }


def test_a_long_probe_detail_is_cut_to_64_characters() -> None:
    health = EndpointHealth(status=Status.PASSING, since=NOW, decision=Decision("x" * 500, None, 1))
    item = endpoint_status(view("198.18.0.1", health), None, now=NOW)
    assert item["probe"] == "x" * 64
    assert "latencyMs" not in item


def test_since_stays_while_the_state_does() -> None:
    health = EndpointHealth(status=Status.PASSING, since=NOW, decision=Decision("HTTP 200", 0.001, 1))
    previous = {"address": "198.18.0.1", "state": "Healthy", "since": "2020-01-01T00:00:00Z"}
    assert endpoint_status(view("198.18.0.1", health), previous, now=NOW)["since"] == "2020-01-01T00:00:00Z"


def test_a_restart_keeps_what_was_published_and_writes_nothing() -> None:
    """After a restart an endpoint's health is seeded from its EndpointSlice (no decision of its own): the status
    it would write is the one it finds, so there is nothing to write."""
    entry = make_entry()
    decided = EndpointHealth(status=Status.PASSING, since=NOW - 3600, decision=Decision("HTTP 200", 0.0008, 1))
    published = desired_status(entry, [view("198.18.0.1", decided)], now=NOW - 3600)
    restored = seeded(ready=True, now=NOW)  # restart time, "restored from the published EndpointSlice"
    again = desired_status(
        entry,
        [view("198.18.0.1", restored)],
        previous_conditions=published["conditions"],
        previous_endpoints=published["endpoints"],
        now=NOW,
    )
    assert again["endpoints"] == published["endpoints"]
    assert not status_changed(published, again)


def test_status_changed_ignores_since_but_not_the_state_or_the_probe() -> None:
    entry = make_entry()
    health = EndpointHealth(status=Status.PASSING, since=NOW, decision=Decision("HTTP 200", 0.001, 1))
    a = desired_status(entry, [view("198.18.0.1", health)], now=NOW)
    b = copy.deepcopy(a)
    b["endpoints"][0]["since"] = "2030-01-01T00:00:00Z"
    assert not status_changed(a, b)
    b["endpoints"][0]["latencyMs"] = 9.0
    assert status_changed(a, b)


def test_above_16_endpoints_only_those_not_healthy_are_listed() -> None:
    entry = make_entry()
    passing = EndpointHealth(status=Status.PASSING, since=NOW)
    critical = EndpointHealth(status=Status.CRITICAL, since=NOW)
    addresses = [f"198.18.1.{i}" for i in range(1, 41)]
    views = [view(a, critical if i % 2 else passing) for i, a in enumerate(addresses)]
    status = desired_status(entry, views, now=NOW)
    listed = status["endpoints"]
    assert len(listed) == STATUS_ENDPOINTS_MAX
    assert {e["state"] for e in listed} == {"Unhealthy"}
    assert [e["address"] for e in listed] == [a for i, a in enumerate(addresses) if i % 2][:16]
    healthy = desired_status(entry, [view(a, passing) for a in addresses], now=NOW)
    assert "endpoints" not in healthy


def test_a_full_item_stays_small() -> None:
    """Status rides every watch event: 16 items of the longest kind stay within a few KiB."""
    health = EndpointHealth(status=Status.CRITICAL, since=NOW, decision=Decision("y" * 500, 12.345678, 100))
    address = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
    status = desired_status(make_entry(), [view(address, health)] * 16, now=NOW)
    assert len(repr(status["endpoints"])) < 16 * 260


# ------------------------------------------------------------------------------------------------ the engine
async def _never(target: Target) -> ProbeResult:
    raise AssertionError("the test feeds the results itself")


def body() -> dict[str, Any]:
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": "web", "namespace": "ns", "uid": "uid-web", "generation": 1},
        "spec": {
            "ports": [{"name": "http", "port": 80}],
            "endpoints": [{"address": "198.18.0.10"}],
            "healthCheck": {"tcp": {"port": 80}, "intervalSeconds": 60, "unhealthyThreshold": 3},
        },
    }


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_probes_that_decide_nothing_write_no_status_whatever_their_latency() -> None:
    kube = FakeKube()
    d = Discovery(kube=kube, probe=_never, registry_interval_seconds=0.0)  # type: ignore[arg-type]
    await d.entry_changed(body())
    await turns()
    state = d._entries[("ns", "web")]
    target = state.entry.target(state.endpoints[0])
    assert target is not None
    key = ("ns", "web", "198.18.0.10")
    d._on_result(key, target, ProbeResult(ok=True, detail="TCP connect ok", seconds=0.0021))
    await turns()
    assert kube.status is not None
    assert kube.status["endpoints"][0] | {"since": "-"} == {
        "address": "198.18.0.10",
        "state": "Healthy",
        "check": "passing",
        "since": "-",
        "probe": "TCP connect ok",
        "latencyMs": 2.1,
        "consecutive": 1,
    }
    writes = len(kube.writes)
    for seconds in (0.0005, 0.09, 0.3):  # faster, slower: nothing the status shows changes
        d._on_result(key, target, ProbeResult(ok=True, detail="TCP connect ok", seconds=seconds))
    for _ in range(2):  # failures below the threshold: no transition either
        d._on_result(key, target, ProbeResult(ok=False, detail="connection refused", seconds=0.0001))
    d._on_result(key, target, ProbeResult(ok=True, detail="TCP connect ok", seconds=0.004))
    await turns()
    assert kube.writes[writes:] == []
    for _ in range(3):
        d._on_result(key, target, ProbeResult(ok=False, detail="connection refused", seconds=0.0003))
    await turns()
    assert [w[:2] for w in kube.writes[writes:]].count(("status", "ServiceEntry")) == 1
    item = kube.status["endpoints"][0]
    assert (item["state"], item["probe"], item["latencyMs"], item["consecutive"]) == (
        "Unhealthy",
        "connection refused",
        0.3,
        3,
    )
    await d.close()
