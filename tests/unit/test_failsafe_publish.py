"""What the fail-safe policies publish (`reconcile.visible` with a `Guard`): slices, Endpoints, status and the
registry record for endpoints held by self-preservation, suppressed by flap damping, and entries under their panic
floor. The policies themselves are tested in test_failsafe.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from beacon.failsafe import DampingPolicy, FlapDamper, SelfPreservation, SelfPreservationPolicy
from beacon.health import EndpointHealth, Status
from beacon.models import Endpoint, ServiceEntry
from beacon.reconcile import (
    Guard,
    ProbeKey,
    damping_policy,
    desired_endpoints,
    desired_slices,
    desired_status,
    registry_record,
    status_changed,
    visible,
)

NOW = 1_700_000_000.0
PASSING = EndpointHealth(status=Status.PASSING)
CRITICAL = EndpointHealth(status=Status.CRITICAL, since=NOW - 600)


def entry(**check: Any) -> ServiceEntry:
    spec = {"ports": [{"name": "http", "port": 8080}], "healthCheck": {"http": {}, **check}}
    return ServiceEntry.from_body(
        {"metadata": {"name": "api", "namespace": "shop", "uid": "u1", "generation": 1}, "spec": spec}
    )


def endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(address=f"198.18.0.{i + 1}", ports={"http": 8080}) for i in range(count)]


def conditions(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def ready_flags(slices: list[dict[str, Any]]) -> dict[str, bool]:
    return {e["addresses"][0]: e["conditions"]["ready"] for s in slices for e in s["endpoints"]}


def outage() -> SelfPreservation[ProbeKey]:
    """Self-preservation switched on: 30 endpoints elsewhere fail their probes."""
    sp: SelfPreservation[ProbeKey] = SelfPreservation(SelfPreservationPolicy())
    for i in range(30):
        sp.observe(("other", "x", f"198.19.0.{i}"), ok=False, kind="http", now=NOW)
    assert sp.active(NOW)
    return sp


def test_without_policies_a_guard_changes_nothing() -> None:
    e, eps = entry(), endpoints(3)
    health = {eps[0].address: PASSING, eps[1].address: CRITICAL}
    plain = visible(e, eps, health, {}, now=NOW)
    guarded = visible(e, eps, health, {}, now=NOW, guard=Guard(published={eps[0].address: True}, check="http"))
    assert guarded == plain


def test_self_preservation_holds_what_was_published_ready_and_says_so() -> None:
    e, eps = entry(deregisterAfterSeconds=60), endpoints(4)
    health = {ep.address: CRITICAL for ep in eps}
    published = {eps[0].address: True, eps[1].address: True, eps[2].address: False}  # eps[3]: never published
    guard = Guard(published=published, check="http", self_preservation=outage())
    views = visible(e, eps, health, {}, now=NOW, guard=guard)
    # held ones are kept although they have been critical longer than deregisterAfterSeconds
    assert [v.endpoint.address for v in views] == [eps[0].address, eps[1].address]
    assert ready_flags(desired_slices(e, views)) == {eps[0].address: True, eps[1].address: True}
    status = desired_status(e, views, now=NOW)
    cond = conditions(status)
    assert cond["SelfPreservation"]["status"] == "True"
    assert cond["Ready"]["reason"] == "HeldBySelfPreservation"
    assert cond["Degraded"]["reason"] == "HeldBySelfPreservation"
    assert [item["state"] for item in status["endpoints"]] == ["Held", "Held"]
    assert [item["check"] for item in status["endpoints"]] == ["critical", "critical"]
    assert registry_record(e, views, tags={}).body["readyEndpoints"] == 2


def test_lease_checks_are_never_held() -> None:
    e = ServiceEntry.from_body(
        {
            "metadata": {"name": "api", "namespace": "shop", "uid": "u1", "generation": 1},
            "spec": {"ports": [{"name": "http", "port": 8080}], "healthCheck": {"lease": {}}},
        }
    )
    eps = endpoints(1)
    guard = Guard(published={eps[0].address: True}, check="lease", self_preservation=outage())
    views = visible(e, eps, {eps[0].address: CRITICAL}, {}, now=NOW, guard=guard)
    assert [v.ready for v in views] == [False]
    assert "SelfPreservation" not in conditions(desired_status(e, views, now=NOW))


def test_a_suppressed_endpoint_is_published_not_ready_as_flapping_with_nothing_that_changes_per_flap() -> None:
    e = entry(flapDamping={"halfLifeSeconds": 30, "maxSuppressSeconds": 120})
    policy = damping_policy(e)
    assert policy == DampingPolicy(half_life=30.0, max_suppress=120.0)
    damper: FlapDamper[ProbeKey] = FlapDamper(policy)
    eps = endpoints(2)
    steady, flappy = eps[0].address, eps[1].address
    statuses, slices, records = [], [], []
    for step in range(12):
        health = {steady: PASSING, flappy: PASSING if step % 2 == 0 else CRITICAL}
        guard = Guard(published={steady: True, flappy: True}, check="http", damper=damper)
        views = visible(e, eps, health, {}, now=NOW + 2 * step, guard=guard)
        statuses.append(desired_status(e, views, now=NOW + 2 * step))
        slices.append(ready_flags(desired_slices(e, views)))
        records.append(registry_record(e, views, tags={}).body)
    # down (1000), up (~1955), down (~2867 > 2000): suppressed from the third transition on
    assert [s[flappy] for s in slices[:4]] == [True, False, True, False]
    assert all(s[flappy] is False for s in slices[3:])
    assert all(not status_changed(statuses[3], s) for s in statuses[4:]), "no status write per flap"
    assert all(r == records[3] for r in records[4:]), "no registry write per flap"
    assert records[3]["flapping"] == [flappy]
    last = statuses[-1]
    assert conditions(last)["Ready"]["reason"] == "Flapping"
    assert conditions(last)["Degraded"]["reason"] == "Flapping"
    item = next(i for i in last["endpoints"] if i["address"] == flappy)
    assert item["state"] == "Flapping"
    assert set(item) == {"address", "state", "since"}


def test_damping_is_off_unless_asked_for() -> None:
    assert damping_policy(entry()) is None
    assert damping_policy(entry(flapDamping={"enabled": False})) is None
    assert damping_policy(entry(flapDamping={})) == DampingPolicy()


def test_below_the_floor_every_endpoint_is_published_and_the_real_count_is_reported() -> None:
    e, eps = entry(minHealthyPercent=50), endpoints(4)
    health = {eps[0].address: PASSING, **{ep.address: CRITICAL for ep in eps[1:]}}
    views = visible(e, eps, health, {}, now=NOW, guard=Guard(published={}, check="http"))
    assert all(v.ready for v in views)
    assert all(ready_flags(desired_slices(e, views)).values())
    assert not desired_endpoints(e, views)["subsets"][0].get("notReadyAddresses")
    status = desired_status(e, views, now=NOW)
    cond = conditions(status)
    assert cond["Panic"]["status"] == "True"
    assert "1 of 4" in cond["Panic"]["message"]
    assert cond["Ready"]["reason"] == "Panic"
    assert (status["readySummary"], status["healthyEndpoints"], status["readyEndpoints"]) == ("1/4", 1, 4)
    assert registry_record(e, views, tags={}).body["panic"] is True

    health[eps[1].address] = PASSING  # 2 of 4: at the floor, not below it
    views = visible(e, eps, health, {}, now=NOW, guard=Guard(published={}, check="http"))
    assert [v.ready for v in views] == [True, True, False, False]
    status = desired_status(e, views, now=NOW)
    assert conditions(status)["Panic"]["status"] == "False"
    assert status["readySummary"] == "2/4"
    assert "panic" not in registry_record(e, views, tags={}).body


def test_drained_endpoints_are_outside_the_floor_and_never_resurrected() -> None:
    eps = [*endpoints(3), Endpoint(address="198.18.0.9", ports={"http": 8080}, draining=True)]
    e = entry(minHealthyPercent=60)
    health = {eps[0].address: PASSING, eps[1].address: CRITICAL, eps[2].address: CRITICAL, "198.18.0.9": PASSING}
    views = visible(e, eps, health, {}, now=NOW, guard=Guard(published={}, check="http"))
    flags = {v.endpoint.address: v.ready for v in views}
    assert flags == {eps[0].address: True, eps[1].address: True, eps[2].address: True, "198.18.0.9": False}


def test_an_entry_without_a_check_publishes_every_endpoint() -> None:
    bare = ServiceEntry.from_body(
        {
            "metadata": {"name": "a", "namespace": "b", "uid": "u", "generation": 1},
            "spec": {"ports": [{"name": "p", "port": 1}]},
        }
    )
    views = visible(bare, endpoints(2), {}, {}, now=NOW, guard=Guard(published={}, check=None))
    assert [v.ready for v in views] == [True, True]
