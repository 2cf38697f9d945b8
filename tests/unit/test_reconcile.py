"""The pure core: spec + endpoints + health in, the Service, EndpointSlices, Endpoints, status and registry out."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from beacon.health import EndpointHealth, Status
from beacon.models import Endpoint, ServiceEntry
from beacon.reconcile import (
    View,
    desired_endpoints,
    desired_service,
    desired_slices,
    desired_status,
    registry_record,
    status_changed,
    visible,
)

PORTS = [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100, "appProtocol": "http"}]
PASSING = EndpointHealth(status=Status.PASSING)
CRITICAL = EndpointHealth(status=Status.CRITICAL)
UNKNOWN = EndpointHealth()
NOW = 1_700_000_000.0


def make_entry(spec: Mapping[str, Any] | None = None, **extra: Any) -> ServiceEntry:
    body_spec: dict[str, Any] = {"ports": PORTS, "healthCheck": {"tcp": {}}, **(spec or {}), **extra}
    return ServiceEntry.from_body(
        {"metadata": {"name": "payments", "namespace": "shop", "uid": "uid-1", "generation": 4}, "spec": body_spec}
    )


def ep(address: str, **kw: Any) -> Endpoint:
    ports = kw.pop("ports", {"http": 8080, "metrics": 9100})
    return Endpoint(address=address, ports=ports, **kw)


def views(health_by_address: Mapping[str, EndpointHealth], **refused: str) -> list[View]:
    return [
        View(endpoint=ep(address), health=health, refused=refused.get(address.replace(".", "_")))
        for address, health in health_by_address.items()
    ]


def ipv4(count: int, start: str = "198.18.0.1") -> list[str]:
    first = ipaddress.IPv4Address(start)
    return [str(first + i) for i in range(count)]


def slice_addresses(slices: Iterable[Mapping[str, Any]]) -> list[str]:
    return [a for s in slices for e in s["endpoints"] for a in e["addresses"]]


# ------------------------------------------------------------------------------------------------ Service
def test_service_is_headless_by_default_and_has_no_selector() -> None:
    entry = make_entry()
    svc = desired_service(entry)
    assert svc["kind"] == "Service"
    assert svc["metadata"]["name"] == "payments"
    assert svc["metadata"]["namespace"] == "shop"
    assert svc["spec"]["clusterIP"] == "None"
    assert "selector" not in svc["spec"]
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080},
        {"name": "metrics", "port": 9100, "protocol": "TCP", "targetPort": 9100, "appProtocol": "http"},
    ]
    (owner,) = svc["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ServiceEntry",
        "payments",
        "uid-1",
        True,
    )


def test_non_headless_service_gets_a_cluster_ip() -> None:
    svc = desired_service(make_entry(headless=False))
    assert "clusterIP" not in svc["spec"]  # the API server allocates one
    assert svc["spec"]["type"] == "ClusterIP"
    assert "selector" not in svc["spec"]


# ------------------------------------------------------------------------------------------------ slices
def test_slices_hold_at_most_100_endpoints() -> None:
    entry = make_entry()
    addresses = ipv4(250)
    slices = desired_slices(entry, views(dict.fromkeys(addresses, PASSING)))
    assert [len(s["endpoints"]) for s in slices] == [100, 100, 50]
    assert sorted(slice_addresses(slices)) == sorted(addresses)
    assert len({s["metadata"]["name"] for s in slices}) == 3
    assert {s["addressType"] for s in slices} == {"IPv4"}


def test_slice_names_are_stable_across_health_changes() -> None:
    entry = make_entry()
    addresses = ipv4(150)
    before = desired_slices(entry, views(dict.fromkeys(addresses, PASSING)))
    after = desired_slices(entry, views(dict.fromkeys(addresses, CRITICAL)))
    assert [s["metadata"]["name"] for s in before] == [s["metadata"]["name"] for s in after]


def by_name(slices: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {s["metadata"]["name"]: s for s in slices}


def rewritten(before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Names of slices the writer would have to write or delete to go from `before` to `after`."""
    return {name for name in set(before) | set(after) if before.get(name) != after.get(name)}


def test_one_change_of_a_10000_endpoint_entry_rewrites_one_slice() -> None:
    entry = make_entry()
    addresses = ipv4(10_000)
    health = dict.fromkeys(addresses, PASSING)
    current = by_name(desired_slices(entry, views(health)))
    assert len(current) == 100

    added = by_name(desired_slices(entry, views({**health, "198.18.0.0": PASSING}), current))
    assert len(rewritten(current, added)) == 1, "adding one endpoint (sorted first) writes one slice"
    assert sorted(slice_addresses(added.values())) == sorted([*addresses, "198.18.0.0"])

    flipped = by_name(desired_slices(entry, views({**health, addresses[5000]: CRITICAL}), current))
    (name,) = rewritten(current, flipped)
    assert addresses[5000] in slice_addresses([flipped[name]])

    removed = by_name(desired_slices(entry, views({a: h for a, h in health.items() if a != addresses[42]}), current))
    assert len(rewritten(current, removed)) == 1
    assert addresses[42] not in slice_addresses(removed.values())

    # the new endpoint then leaves the same way it came: one slice
    back = by_name(desired_slices(entry, views(health), added))
    assert len(rewritten(added, back)) == 1


def test_published_slices_keep_their_membership() -> None:
    """Slices as the API holds them (e.g. after a restart, or written by an older beacon) are kept as they are."""
    entry = make_entry()
    addresses = ipv4(150)
    published = by_name(desired_slices(entry, views(dict.fromkeys(addresses, PASSING))))
    assert desired_slices(entry, views(dict.fromkeys(addresses, PASSING)), published) == list(published.values())
    # the emptier second slice takes a new endpoint, even one sorted before every other
    grown = by_name(desired_slices(entry, views(dict.fromkeys(["198.18.0.0", *addresses], PASSING)), published))
    assert rewritten(published, grown) == {"payments-ipv4-1"}


def test_slices_split_by_address_type() -> None:
    entry = make_entry()
    slices = desired_slices(
        entry, views({"198.18.0.1": PASSING, "2001:db8::1": PASSING, "api.example.com": PASSING, "198.18.0.2": PASSING})
    )
    by_type = {s["addressType"]: sorted(slice_addresses([s])) for s in slices}
    assert by_type == {
        "IPv4": ["198.18.0.1", "198.18.0.2"],
        "IPv6": ["2001:db8::1"],
        "FQDN": ["api.example.com"],
    }


def test_slice_labels_and_ports() -> None:
    (slice_,) = desired_slices(make_entry(), views({"198.18.0.1": PASSING}))
    labels = slice_["metadata"]["labels"]
    assert labels["kubernetes.io/service-name"] == "payments"
    assert labels["endpointslice.kubernetes.io/managed-by"] == "operator.beacon.dev"
    assert slice_["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert slice_["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "metrics", "port": 9100, "protocol": "TCP", "appProtocol": "http"},
    ]


def test_per_endpoint_port_overrides_get_their_own_slice_group() -> None:
    entry = make_entry()
    overridden = {"http": 18080, "metrics": 9100}
    vs = [
        View(endpoint=ep("198.18.0.1"), health=PASSING),
        View(endpoint=ep("198.18.0.2", ports=overridden), health=PASSING),
        View(endpoint=ep("198.18.0.3"), health=PASSING),
    ]
    slices = desired_slices(entry, vs)
    assert len(slices) == 2
    by_http_port = {
        next(p["port"] for p in s["ports"] if p["name"] == "http"): sorted(slice_addresses([s])) for s in slices
    }
    assert by_http_port == {8080: ["198.18.0.1", "198.18.0.3"], 18080: ["198.18.0.2"]}
    assert len({s["metadata"]["name"] for s in slices}) == 2


def test_slice_conditions_follow_health_and_termination() -> None:
    entry = make_entry()
    vs = [
        View(endpoint=ep("198.18.0.1"), health=PASSING),
        View(endpoint=ep("198.18.0.2"), health=CRITICAL),
        View(endpoint=ep("198.18.0.3"), health=UNKNOWN),
        View(endpoint=ep("198.18.0.4", terminating=True, pod="web-1", node="n1"), health=PASSING),
        View(endpoint=ep("198.18.0.5"), health=PASSING, refused="not allowed"),
    ]
    (slice_,) = desired_slices(entry, vs)
    conditions = {e["addresses"][0]: e["conditions"] for e in slice_["endpoints"]}
    assert conditions == {
        "198.18.0.1": {"ready": True, "serving": True, "terminating": False},
        "198.18.0.2": {"ready": False, "serving": False, "terminating": False},
        "198.18.0.3": {"ready": False, "serving": False, "terminating": False},
        "198.18.0.4": {"ready": False, "serving": True, "terminating": True},
        "198.18.0.5": {"ready": False, "serving": False, "terminating": False},
    }
    pod_endpoint = next(e for e in slice_["endpoints"] if e["addresses"] == ["198.18.0.4"])
    assert pod_endpoint["targetRef"] == {"kind": "Pod", "namespace": "shop", "name": "web-1"}
    assert pod_endpoint["nodeName"] == "n1"


def test_zone_and_hostname_are_published() -> None:
    vs = [View(endpoint=ep("198.18.0.1", zone="a", hostname="db-0"), health=PASSING)]
    (slice_,) = desired_slices(make_entry(), vs)
    (endpoint,) = slice_["endpoints"]
    assert (endpoint["zone"], endpoint["hostname"]) == ("a", "db-0")


@pytest.mark.parametrize("bad", ["169.254.169.254", "127.0.0.1", "fe80::1", "::1"])
def test_addresses_kubernetes_rejects_are_never_published(bad: str) -> None:
    entry = make_entry()
    vs = views({bad: PASSING, "198.18.0.1": PASSING, "2001:db8::1": PASSING})
    slices = desired_slices(entry, vs)
    assert bad not in slice_addresses(slices)
    endpoints = desired_endpoints(entry, vs)
    published = [a["ip"] for s in endpoints["subsets"] for a in s.get("addresses", []) + s.get("notReadyAddresses", [])]
    assert bad not in published
    assert "198.18.0.1" in published
    # ...but they still count in status, where users can see them
    assert desired_status(entry, vs, now=NOW)["totalEndpoints"] == 3


def test_no_endpoints_gives_no_slices() -> None:
    assert desired_slices(make_entry(), []) == []


# ------------------------------------------------------------------------------------------------ Endpoints
def test_endpoints_put_unhealthy_addresses_in_not_ready() -> None:
    entry = make_entry()
    obj = desired_endpoints(entry, views({"198.18.0.1": PASSING, "198.18.0.2": CRITICAL, "198.18.0.3": UNKNOWN}))
    assert obj["kind"] == "Endpoints"
    assert obj["metadata"]["name"] == "payments"
    assert obj["metadata"]["labels"]["endpointslice.kubernetes.io/skip-mirror"] == "true"
    (subset,) = obj["subsets"]
    assert [a["ip"] for a in subset["addresses"]] == ["198.18.0.1"]
    assert sorted(a["ip"] for a in subset["notReadyAddresses"]) == ["198.18.0.2", "198.18.0.3"]
    assert {p["name"]: p["port"] for p in subset["ports"]} == {"http": 8080, "metrics": 9100}


def test_endpoints_exclude_fqdn_and_split_subsets_by_ports() -> None:
    entry = make_entry()
    vs = [
        View(endpoint=ep("198.18.0.1"), health=PASSING),
        View(endpoint=ep("api.example.com"), health=PASSING),
        View(endpoint=ep("198.18.0.2", ports={"http": 18080, "metrics": 9100}), health=PASSING),
    ]
    obj = desired_endpoints(entry, vs)
    ips = sorted(a["ip"] for s in obj["subsets"] for a in s.get("addresses", []))
    assert ips == ["198.18.0.1", "198.18.0.2"]
    assert len(obj["subsets"]) == 2


def test_endpoints_with_only_unhealthy_addresses_have_no_ready_list() -> None:
    obj = desired_endpoints(make_entry(), views({"198.18.0.1": CRITICAL}))
    (subset,) = obj["subsets"]
    assert "addresses" not in subset
    assert [a["ip"] for a in subset["notReadyAddresses"]] == ["198.18.0.1"]


def test_endpoints_are_truncated_above_1000_addresses() -> None:
    entry = make_entry()
    obj = desired_endpoints(entry, views(dict.fromkeys(ipv4(1200), PASSING)))
    count = sum(len(s.get("addresses", [])) + len(s.get("notReadyAddresses", [])) for s in obj["subsets"])
    assert count == 1000
    assert obj["metadata"]["annotations"]["endpoints.kubernetes.io/over-capacity"] == "truncated"
    small = desired_endpoints(entry, views(dict.fromkeys(ipv4(1000), PASSING)))
    assert "annotations" not in small["metadata"]


def test_truncation_keeps_ready_addresses_first() -> None:
    """Like Kubernetes' own endpoints controller: when truncating, ready addresses are kept over not-ready ones,
    so an over-capacity Endpoints object never hides a healthy endpoint behind unhealthy ones."""
    addresses = ipv4(1100)
    health = {a: (PASSING if i >= 1050 else CRITICAL) for i, a in enumerate(addresses)}  # the healthy sort last
    obj = desired_endpoints(make_entry(), views(health))
    ready = [a["ip"] for s in obj["subsets"] for a in s.get("addresses", [])]
    assert sorted(ready) == sorted(addresses[1050:])


# ------------------------------------------------------------------------------------------------ status
def ready_condition(status: Mapping[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def degraded_condition(status: Mapping[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Degraded")


@pytest.mark.parametrize(
    ("health", "refused", "expected"),
    [
        ({"198.18.0.1": PASSING, "198.18.0.2": PASSING}, {}, ("True", "Healthy")),
        ({"198.18.0.1": PASSING, "198.18.0.2": CRITICAL}, {}, ("True", "Degraded")),
        ({"198.18.0.1": CRITICAL, "198.18.0.2": CRITICAL}, {}, ("False", "Unhealthy")),
        ({"198.18.0.1": CRITICAL, "198.18.0.2": UNKNOWN}, {}, ("False", "Unhealthy")),
        ({"198.18.0.1": UNKNOWN, "198.18.0.2": UNKNOWN}, {}, ("Unknown", "Pending")),
        ({}, {}, ("False", "NoEndpoints")),
        ({"169.254.169.254": UNKNOWN}, {"169_254_169_254": "169.254.169.254 is link-local"}, ("False", "ProbeRefused")),
    ],
)
def test_ready_condition_reasons(
    health: dict[str, EndpointHealth], refused: dict[str, str], expected: tuple[str, str]
) -> None:
    status = desired_status(make_entry(), views(health, **refused), now=NOW)
    cond = ready_condition(status)
    assert (cond["status"], cond["reason"]) == expected
    assert cond["observedGeneration"] == 4
    assert status["observedGeneration"] == 4
    assert cond["message"]


def test_probe_refused_message_carries_the_reason() -> None:
    status = desired_status(
        make_entry(), views({"169.254.169.254": UNKNOWN}, **{"169_254_169_254": "it is link-local"}), now=NOW
    )
    assert ready_condition(status)["message"] == "it is link-local"
    degraded = degraded_condition(status)
    assert (degraded["status"], degraded["reason"]) == ("True", "ProbeRefused")


def test_degraded_condition_names_unhealthy_endpoints() -> None:
    status = desired_status(make_entry(), views({"198.18.0.1": PASSING, "198.18.0.2": CRITICAL}), now=NOW)
    degraded = degraded_condition(status)
    assert (degraded["status"], degraded["reason"]) == ("True", "EndpointsUnhealthy")
    assert "198.18.0.2" in degraded["message"]
    healthy = desired_status(make_entry(), views({"198.18.0.1": PASSING}), now=NOW)
    assert degraded_condition(healthy)["status"] == "False"


def test_status_counts_and_summary() -> None:
    status = desired_status(
        make_entry(), views({"198.18.0.1": PASSING, "198.18.0.2": CRITICAL, "198.18.0.3": UNKNOWN}), now=NOW
    )
    assert (status["readyEndpoints"], status["totalEndpoints"], status["readySummary"]) == (1, 3, "1/3")
    since = "2023-11-14T22:13:20Z"  # NOW: these healths carry no time of their own
    assert status["endpoints"] == [
        {"address": "198.18.0.1", "state": "Healthy", "check": "passing", "since": since},
        {"address": "198.18.0.2", "state": "Unhealthy", "check": "critical", "since": since},
        {"address": "198.18.0.3", "state": "Unknown", "check": "unknown", "since": since},
    ]


def test_endpoint_summary_only_while_small() -> None:
    entry = make_entry()
    assert len(desired_status(entry, views(dict.fromkeys(ipv4(16), PASSING)), now=NOW)["endpoints"]) == 16
    big = desired_status(entry, views(dict.fromkeys(ipv4(17), PASSING)), now=NOW)
    assert "endpoints" not in big
    assert big["totalEndpoints"] == 17


def test_last_transition_time_is_kept_while_status_is_unchanged() -> None:
    entry = make_entry()
    first = desired_status(entry, views({"198.18.0.1": PASSING, "198.18.0.2": PASSING}), now=NOW)
    # Healthy -> Degraded keeps Ready=True (same status) but Degraded flips False -> True
    later = desired_status(
        entry,
        views({"198.18.0.1": PASSING, "198.18.0.2": CRITICAL}),
        previous_conditions=first["conditions"],
        now=NOW + 600,
    )
    assert ready_condition(later)["lastTransitionTime"] == ready_condition(first)["lastTransitionTime"]
    assert ready_condition(later)["reason"] == "Degraded"
    assert degraded_condition(later)["lastTransitionTime"] != degraded_condition(first)["lastTransitionTime"]
    assert degraded_condition(later)["lastTransitionTime"] == "2023-11-14T22:23:20Z"


def test_status_changed_ignores_last_transition_time_only() -> None:
    entry = make_entry()
    vs = views({"198.18.0.1": PASSING})
    a = desired_status(entry, vs, now=NOW)
    b = desired_status(entry, vs, now=NOW + 3600)
    assert a != b  # the timestamps differ...
    assert not status_changed(a, b)  # ...which is not a change worth a write
    c = desired_status(entry, views({"198.18.0.1": CRITICAL}), now=NOW)
    assert status_changed(a, c)
    assert status_changed(None, a)
    assert status_changed({}, a)


# ------------------------------------------------------------------------------------------------ visible
def test_visible_sorts_defaults_health_and_drops_deregistered() -> None:
    entry = make_entry(healthCheck={"tcp": {}, "deregisterAfterSeconds": 60})
    endpoints = [ep("198.18.0.3"), ep("198.18.0.1"), ep("198.18.0.2")]
    health = {
        "198.18.0.1": PASSING,
        "198.18.0.2": EndpointHealth(status=Status.CRITICAL, since=NOW - 61),
    }
    vs = visible(entry, endpoints, health, {"198.18.0.3": "refused"}, now=NOW)
    assert [v.endpoint.address for v in vs] == ["198.18.0.1", "198.18.0.3"]
    assert vs[1].health.status is Status.UNKNOWN
    assert vs[1].refused == "refused"


def test_visible_without_health_check_counts_everything_healthy() -> None:
    entry = make_entry(healthCheck=None)
    vs = visible(entry, [ep("198.18.0.1")], {"198.18.0.1": CRITICAL}, {}, now=NOW)
    assert [v.ready for v in vs] == [True]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_record_lists_only_ready_endpoints() -> None:
    entry = make_entry()
    vs = [
        View(endpoint=ep("198.18.0.1", zone="a", labels={"v": "2"}), health=PASSING),
        View(endpoint=ep("198.18.0.2"), health=CRITICAL),
        View(endpoint=ep("198.18.0.3", terminating=True), health=PASSING),
    ]
    record = registry_record(entry, vs, tags={"team": "pay"})
    assert record.name == "payments"
    assert record.body["endpoints"] == [
        {"address": "198.18.0.1", "ports": {"http": 8080, "metrics": 9100}, "zone": "a", "labels": {"v": "2"}}
    ]
    assert (record.body["readyEndpoints"], record.body["totalEndpoints"]) == (1, 3)
    assert record.body["tags"] == {"team": "pay"}
    assert record.body["dns"] == "payments.shop.svc"
    assert [p["name"] for p in record.body["ports"]] == ["http", "metrics"]
