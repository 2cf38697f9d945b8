"""Endpoint drain: the pure decisions (beacon.reconcile), the annotations (beacon.models) and the engine's wiring
(beacon.discovery against an in-memory API). A drained endpoint leaves DNS and the registry at once, is published
ready=false, serving=<its health>, terminating=true, stays probed, and comes back without a probe when healthy."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from beacon.discovery import Discovery
from beacon.health import Decision, EndpointHealth, Status
from beacon.models import ANNOTATION_DRAIN, Endpoint, ServiceEntry, drained_addresses, pod_drained
from beacon.reconcile import (
    View,
    desired_endpoints,
    desired_slices,
    desired_status,
    registry_record,
    status_changed,
)
from beacon.targets import ProbeResult, Target
from beacon_dev import fakekube

NOW = 1_700_000_000.0
PASSING = EndpointHealth(status=Status.PASSING, since=NOW - 600, decision=Decision("TCP connect ok", 0.0012, 1))
CRITICAL = EndpointHealth(status=Status.CRITICAL, since=NOW - 60, decision=Decision("connection refused", 0.0004, 3))
A, B, C = "198.18.0.1", "198.18.0.2", "198.18.0.3"


def make_entry(drain: str | None = None, addresses: tuple[str, ...] = (A, B)) -> ServiceEntry:
    meta: dict[str, Any] = {"name": "payments", "namespace": "shop", "uid": "uid-1", "generation": 2}
    if drain is not None:
        meta["annotations"] = {ANNOTATION_DRAIN: drain}
    spec = {
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"address": a, "zone": "a"} for a in addresses],
        "healthCheck": {"tcp": {}},
    }
    return ServiceEntry.from_body({"metadata": meta, "spec": spec})


def views_of(entry: ServiceEntry, health: Mapping[str, EndpointHealth]) -> list[View]:
    return [View(endpoint=ep, health=health[ep.address]) for ep in entry.static_endpoints()]


def conditions(entry: ServiceEntry, views: list[View]) -> dict[str, dict[str, bool]]:
    (slice_,) = desired_slices(entry, views)
    return {e["addresses"][0]: e["conditions"] for e in slice_["endpoints"]}


def condition(status: Mapping[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


# ------------------------------------------------------------------------------------------------ the annotations
def test_the_entry_annotation_lists_addresses_and_the_pod_annotation_is_true() -> None:
    assert drained_addresses({ANNOTATION_DRAIN: "198.18.0.1, 198.18.0.2,2001:db8::1 "}) == {
        "198.18.0.1",
        "198.18.0.2",
        "2001:db8::1",
    }
    assert drained_addresses({ANNOTATION_DRAIN: ""}) == frozenset()
    assert drained_addresses(None) == frozenset()
    assert pod_drained({ANNOTATION_DRAIN: "true"})
    assert pod_drained({ANNOTATION_DRAIN: " True "})
    assert not pod_drained({ANNOTATION_DRAIN: "false"})
    assert not pod_drained({"other": "true"})
    assert not pod_drained(None)


def test_static_endpoints_named_by_the_annotation_are_draining_and_the_entry_differs() -> None:
    plain, drained = make_entry(), make_entry(drain=f"{A},198.18.9.9")  # an address not in spec is ignored
    assert [e.draining for e in drained.static_endpoints()] == [True, False]
    assert [e.draining for e in plain.static_endpoints()] == [False, False]
    assert plain != drained, "a drain must reach discovery as a change of the entry"
    assert plain.generation == drained.generation, "a drain is no spec change"


# ------------------------------------------------------------------------------------------------ the decisions
def test_a_drained_healthy_endpoint_leaves_dns_and_the_registry_but_keeps_serving() -> None:
    entry = make_entry(drain=A)
    views = views_of(entry, {A: PASSING, B: PASSING})
    assert conditions(entry, views) == {
        A: {"ready": False, "serving": True, "terminating": True},
        B: {"ready": True, "serving": True, "terminating": False},
    }
    (subset,) = desired_endpoints(entry, views)["subsets"]
    assert [a["ip"] for a in subset["addresses"]] == [B]
    assert [a["ip"] for a in subset["notReadyAddresses"]] == [A]
    record = registry_record(entry, views, tags={})
    assert [e["address"] for e in record.body["endpoints"]] == [B]
    status = desired_status(entry, views, now=NOW)
    assert (status["readyEndpoints"], status["readySummary"]) == (1, "1/2")
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert (ready["status"], ready["reason"]) == ("True", "Draining")
    assert ready["message"] == f"1 of 2 endpoints are healthy; draining: {A}"
    assert (degraded["status"], degraded["reason"]) == ("False", "Draining")  # on purpose: no alert
    drained = status["endpoints"][0]
    assert (drained["address"], drained["state"], drained["check"]) == (A, "Draining", "passing")
    assert drained["since"] == "2023-11-14T22:13:20Z"  # the drain happened now, not when it last passed


def test_a_drained_unhealthy_endpoint_is_terminating_and_not_serving() -> None:
    entry = make_entry(drain=A)
    views = views_of(entry, {A: CRITICAL, B: PASSING})
    assert conditions(entry, views)[A] == {"ready": False, "serving": False, "terminating": True}
    status = desired_status(entry, views, now=NOW)
    assert status["endpoints"][0]["state"] == "Draining"
    assert status["endpoints"][0]["check"] == "critical"
    assert condition(status, "Degraded")["reason"] == "Draining", "a drained endpoint is out on purpose"


def test_undrain_publishes_a_healthy_endpoint_ready_from_the_health_it_already_has() -> None:
    drained_entry, entry = make_entry(drain=A), make_entry()
    health = {A: PASSING, B: PASSING}  # the very same health objects: no probe in between
    before = desired_status(drained_entry, views_of(drained_entry, health), now=NOW)
    after = desired_status(
        entry,
        views_of(entry, health),
        previous_conditions=before["conditions"],
        previous_endpoints=before["endpoints"],
        now=NOW + 30,
    )
    assert conditions(entry, views_of(entry, health))[A] == {"ready": True, "serving": True, "terminating": False}
    assert (after["readySummary"], condition(after, "Ready")["reason"]) == ("2/2", "Healthy")
    assert after["endpoints"][0]["state"] == "Healthy"
    assert after["endpoints"][0]["since"] == "2023-11-14T22:13:50Z"  # back in rotation now
    assert status_changed(before, after)


def test_an_undrained_unhealthy_endpoint_stays_out() -> None:
    entry = make_entry()
    views = views_of(entry, {A: CRITICAL, B: PASSING})
    assert conditions(entry, views)[A] == {"ready": False, "serving": False, "terminating": False}
    assert desired_status(entry, views, now=NOW)["endpoints"][0]["state"] == "Unhealthy"


def test_every_endpoint_drained_is_not_ready_for_that_reason() -> None:
    entry = make_entry(drain=f"{A} {B}")
    status = desired_status(entry, views_of(entry, {A: PASSING, B: PASSING}), now=NOW)
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Draining")
    assert ready["message"] == f"every endpoint is draining: {A}, {B}"


def test_drained_and_unhealthy_together_is_degraded_and_names_only_the_unhealthy() -> None:
    entry = make_entry(drain=A, addresses=(A, B, C))
    status = desired_status(entry, views_of(entry, {A: PASSING, B: CRITICAL, C: PASSING}), now=NOW)
    ready, degraded = condition(status, "Ready"), condition(status, "Degraded")
    assert (ready["reason"], ready["message"]) == ("Degraded", f"1 of 3 endpoints are healthy; draining: {A}")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "EndpointsUnhealthy",
        f"unhealthy: {B}",
    )


def test_a_drained_pod_is_terminating_like_a_deleted_one() -> None:
    entry = make_entry()
    pod = Endpoint(address="198.18.0.9", ports={"http": 8080}, pod="web-1", draining=True)
    (slice_,) = desired_slices(entry, [View(endpoint=pod, health=PASSING)])
    assert slice_["endpoints"][0]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert slice_["endpoints"][0]["targetRef"]["name"] == "web-1"


# ------------------------------------------------------------------------------------------------ the engine
class FakeKube(fakekube.FakeKube):
    """The shared fake, with what these tests read back: slice conditions and the registry by entry."""

    def conditions(self, name: str) -> dict[str, dict[str, bool]]:
        return {
            address: ep["conditions"]
            for (kind, _, _), obj in self.objects.items()
            if kind == "EndpointSlice" and obj["metadata"]["labels"]["kubernetes.io/service-name"] == name
            for ep in obj["endpoints"]
            for address in ep["addresses"]
        }

    def registry(self, name: str) -> list[str]:
        cm = self.objects[("ConfigMap", "ns", "beacon-registry")]
        return [e["address"] for e in json.loads(cm["data"]["registry.json"])["services"][name]["endpoints"]]


class Probes:
    """The probe function: counts its calls, always passes."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, target: Target) -> ProbeResult:
        self.calls += 1
        return ProbeResult(ok=True, detail="TCP connect ok", seconds=0.0007)


def body(name: str, addresses: list[str], *, drain: str | None = None, selector: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": 1}
    if drain is not None:
        meta["annotations"] = {ANNOTATION_DRAIN: drain}
    spec: dict[str, Any] = {
        "ports": [{"name": "http", "port": 80}],
        "healthCheck": {"tcp": {"port": 80}, "intervalSeconds": 60, "timeoutSeconds": 1},
    }
    if addresses:
        spec["endpoints"] = [{"address": a} for a in addresses]
    if selector:
        spec["selector"] = {"matchLabels": {"app": name}}
    return {"apiVersion": "beacon.dev/v1alpha1", "kind": "ServiceEntry", "metadata": meta, "spec": spec}


def pod(name: str, ip: str, *, drain: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "labels": {"app": "web"}}
    if drain is not None:
        meta["annotations"] = {ANNOTATION_DRAIN: drain}
    return {"kind": "Pod", "metadata": meta, "spec": {"nodeName": "n1"}, "status": {"podIP": ip}}


async def settle(d: Discovery, seconds: float = 0.3) -> None:
    runner = asyncio.create_task(d.prober.run())
    await asyncio.sleep(seconds)
    runner.cancel()


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_draining_a_static_endpoint_publishes_at_once_and_undrain_needs_no_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="beacon.discovery")
    kube, probes = FakeKube(), Probes()
    d = Discovery(kube=kube, probe=probes, registry_interval_seconds=0.0)  # type: ignore[arg-type]
    await d.entry_changed(body("web", [A, B]))
    await settle(d)
    fine = {"ready": True, "serving": True, "terminating": False}
    assert kube.conditions("web") == {A: fine, B: fine}
    probed = probes.calls
    assert probed == 2

    # drain: the prober does not run from here on, so whatever is published comes from the health beacon has
    await d.entry_changed(body("web", [A, B], drain=A))
    await turns()
    await asyncio.sleep(0.05)  # the registry's own work queue
    assert kube.conditions("web")[A] == {"ready": False, "serving": True, "terminating": True}
    assert kube.registry("web") == [B]
    status = kube.statuses[("ns", "web")]
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["reason"] == "Draining"
    assert [(e["address"], e["state"], e["check"]) for e in status["endpoints"]] == [
        (A, "Draining", "passing"),
        (B, "Healthy", "passing"),
    ]
    assert set(d.prober.keys()) == {("ns", "web", A), ("ns", "web", B)}, "a drained endpoint stays probed"
    drained = [r for r in caplog.records if getattr(r, "event", None) == "drain"]
    assert [(r.namespace, r.entry, r.endpoint, r.draining) for r in drained] == [("ns", "web", A, True)]  # type: ignore[attr-defined]

    await d.entry_changed(body("web", [A, B]))
    await turns()
    await asyncio.sleep(0.05)
    assert kube.conditions("web")[A] == {"ready": True, "serving": True, "terminating": False}
    assert sorted(kube.registry("web")) == [A, B]
    assert probes.calls == probed, "undrain published a healthy endpoint without a new probe"
    undrained = [r for r in caplog.records if getattr(r, "event", None) == "drain"][1:]
    assert [(r.endpoint, r.draining) for r in undrained] == [(A, False)]  # type: ignore[attr-defined]
    await d.close()


async def test_a_pod_annotation_drains_the_pod_in_the_entries_that_select_it() -> None:
    kube, probes = FakeKube(), Probes()
    d = Discovery(kube=kube, probe=probes, registry_interval_seconds=0.0)  # type: ignore[arg-type]
    web = body("web", [], selector=True)
    await d.entry_changed(web)
    await turns()
    d.pod_changed("ns", pod("web-1", "198.18.0.21"))
    d.pod_changed("ns", pod("web-2", "198.18.0.22"))
    await settle(d)
    fine = {"ready": True, "serving": True, "terminating": False}
    assert kube.conditions("web") == {"198.18.0.21": fine, "198.18.0.22": fine}
    probed = probes.calls
    d.pod_changed("ns", pod("web-1", "198.18.0.21", drain="true"))
    await turns()
    assert kube.conditions("web")["198.18.0.21"] == {"ready": False, "serving": True, "terminating": True}
    assert kube.conditions("web")["198.18.0.22"]["ready"] is True
    d.pod_changed("ns", pod("web-1", "198.18.0.21"))
    await turns()
    assert kube.conditions("web")["198.18.0.21"] == {"ready": True, "serving": True, "terminating": False}
    assert probes.calls == probed
    await d.close()


async def test_a_drain_costs_one_write_per_changed_output_and_repeating_it_none() -> None:
    kube, probes = FakeKube(), Probes()
    d = Discovery(kube=kube, probe=probes, registry_interval_seconds=0.0)  # type: ignore[arg-type]
    await d.entry_changed(body("web", [A, B]))
    await settle(d)
    before = len(kube.writes)
    await d.entry_changed(body("web", [A, B], drain=A))
    await turns()
    await asyncio.sleep(0.05)
    assert sorted(w[1] for w in kube.writes[before:]) == ["ConfigMap", "EndpointSlice", "Endpoints", "ServiceEntry"]
    before = len(kube.writes)
    await d.entry_changed(body("web", [A, B], drain=f" {A} "))  # the same drain, spelled differently
    await turns()
    await asyncio.sleep(0.05)
    assert kube.writes[before:] == []
    await d.close()
