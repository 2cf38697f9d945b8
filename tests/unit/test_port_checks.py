"""Per-port checks: a port's own check gates that port only, in the targets, slices, Endpoints, registry and
status; the CRD's copy of the check kinds stays equal to healthCheck's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from beacon.health import Decision, EndpointHealth, Status
from beacon.models import Endpoint, ServiceEntry
from beacon.reconcile import (
    desired_endpoints,
    desired_slices,
    desired_status,
    registry_record,
    slot_address,
    slot_key,
    slot_label,
    visible,
)
from beacon.targets import HttpCheck, TcpCheck

CRD = Path(__file__).resolve().parents[2] / "crds" / "beacon.dev_serviceentries.yaml"
PASSING = EndpointHealth(status=Status.PASSING, detail="TCP connect ok")
CRITICAL = EndpointHealth(
    status=Status.CRITICAL,
    detail="HTTP 500 b''",
    decision=Decision(detail="HTTP 500 b''", latency=0.002, consecutive=3),
)
NOW = 1_700_000_000.0


def make_entry(*, entry_check: dict[str, Any] | None = None, all_own: bool = False) -> ServiceEntry:
    """MySQL on 3306 (gated by the entry-level tcp check, or its own) and an exporter on 9104 with its own check."""
    mysql: dict[str, Any] = {"name": "mysql", "port": 3306}
    if all_own:
        mysql["healthCheck"] = {"tcp": {}}
    spec: dict[str, Any] = {
        "ports": [mysql, {"name": "exporter", "port": 9104, "healthCheck": {"http": {"path": "/metrics"}}}],
        "endpoints": [{"address": "198.18.0.1"}, {"address": "198.18.0.2"}],
        "healthCheck": entry_check if entry_check is not None else {"tcp": {"port": "mysql"}, "intervalSeconds": 5},
    }
    return ServiceEntry.from_body({"metadata": {"name": "db", "namespace": "shop", "uid": "u1"}, "spec": spec})


def endpoints(entry: ServiceEntry) -> list[Endpoint]:
    return entry.static_endpoints()


def test_each_port_with_its_own_check_gets_its_own_target_with_the_entrys_timing() -> None:
    entry = make_entry()
    targets = entry.targets(endpoints(entry)[0])
    assert set(targets) == {"", "exporter"}
    assert targets[""].check == TcpCheck(port=3306)
    assert targets["exporter"].check == HttpCheck(port=9104, path="/metrics")
    assert targets["exporter"].interval == targets[""].interval == 5.0
    only_own = make_entry(entry_check={"intervalSeconds": 7}, all_own=True)
    targets = only_own.targets(endpoints(only_own)[0])
    assert set(targets) == {"mysql", "exporter"}
    assert {t.interval for t in targets.values()} == {7.0}
    assert only_own.probed
    assert not ServiceEntry.from_body(
        {"metadata": {"name": "x", "namespace": "n", "uid": "u"}, "spec": {"ports": [{"name": "a", "port": 1}]}}
    ).probed


def test_slot_keys_name_the_port_and_give_back_the_address() -> None:
    assert slot_key("198.18.0.1") == "198.18.0.1"
    assert slot_key("198.18.0.1", "exporter") == "198.18.0.1#exporter"
    assert slot_address("198.18.0.1#exporter") == slot_address("198.18.0.1") == "198.18.0.1"
    assert slot_label("198.18.0.1#exporter") == "198.18.0.1 port exporter"


def _views(entry: ServiceEntry, health: dict[str, EndpointHealth]) -> Any:
    return visible(entry, endpoints(entry), health, {}, now=NOW)


def test_an_endpoint_failing_one_port_is_published_on_the_other_only() -> None:
    entry = make_entry()
    health = {
        "198.18.0.1": PASSING,
        "198.18.0.1#exporter": PASSING,
        "198.18.0.2": PASSING,
        "198.18.0.2#exporter": CRITICAL,
    }
    views = _views(entry, health)
    assert [v.healthy_ports for v in views] == [("mysql", "exporter"), ("mysql",)]
    assert all(v.ready for v in views)

    slices = desired_slices(entry, views)
    by_ports = {
        tuple(p["name"] for p in s["ports"]): [(e["addresses"][0], e["conditions"]["ready"]) for e in s["endpoints"]]
        for s in slices
    }
    assert by_ports == {("mysql", "exporter"): [("198.18.0.1", True)], ("mysql",): [("198.18.0.2", True)]}

    subsets = desired_endpoints(entry, views)["subsets"]
    assert [([p["name"] for p in s["ports"]], [a["ip"] for a in s["addresses"]]) for s in subsets] == [
        (["mysql", "exporter"], ["198.18.0.1"]),
        (["mysql"], ["198.18.0.2"]),
    ]

    record = registry_record(entry, views, tags={}).body
    assert [(e["address"], e["ports"], e["portHealth"]) for e in record["endpoints"]] == [
        ("198.18.0.1", {"exporter": 9104, "mysql": 3306}, {"mysql": "passing", "exporter": "passing"}),
        ("198.18.0.2", {"mysql": 3306}, {"mysql": "passing", "exporter": "critical"}),
    ]

    status = desired_status(entry, views, now=NOW)
    items = {e["address"]: e for e in status["endpoints"]}
    assert items["198.18.0.1"]["state"] == "Healthy"
    assert items["198.18.0.2"]["state"] == "Degraded"
    assert items["198.18.0.2"]["ports"] == {"mysql": "passing", "exporter": "critical"}
    assert items["198.18.0.2"]["probe"].startswith("exporter: HTTP 500")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PortsUnhealthy")
    assert "198.18.0.2 (exporter)" in degraded["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Degraded")


def test_an_endpoint_failing_every_port_is_not_ready_under_all_ports() -> None:
    entry = make_entry()
    health = {"198.18.0.1": CRITICAL, "198.18.0.1#exporter": CRITICAL, "198.18.0.2": PASSING}
    views = _views(entry, health)  # 198.18.0.2's exporter has no verdict yet: unknown, so not published on it
    assert [v.healthy_ports for v in views] == [(), ("mysql",)]
    assert not views[0].ready
    assert views[0].published_ports == ("mysql", "exporter")
    slices = desired_slices(entry, views)
    not_ready = [(tuple(p["name"] for p in s["ports"]), e) for s in slices for e in s["endpoints"]]
    assert (("mysql", "exporter"), "198.18.0.1", False) in [
        (p, e["addresses"][0], e["conditions"]["ready"]) for p, e in not_ready
    ]
    subsets = desired_endpoints(entry, views)["subsets"]
    full = next(s for s in subsets if len(s["ports"]) == 2)
    assert [a["ip"] for a in full["notReadyAddresses"]] == ["198.18.0.1"]
    assert "addresses" not in full
    assert [e["address"] for e in registry_record(entry, views, tags={}).body["endpoints"]] == ["198.18.0.2"]
    status = desired_status(entry, views, now=NOW)
    assert {e["address"]: e["state"] for e in status["endpoints"]} == {
        "198.18.0.1": "Unhealthy",
        "198.18.0.2": "Degraded",
    }


def test_without_an_entry_level_check_the_ports_without_their_own_count_healthy() -> None:
    entry = make_entry(entry_check={"intervalSeconds": 5})
    health = {"198.18.0.1#exporter": CRITICAL, "198.18.0.2#exporter": PASSING}
    views = _views(entry, health)
    assert [v.healthy_ports for v in views] == [("mysql",), ("mysql", "exporter")]
    status = desired_status(entry, views, now=NOW)
    assert [e["state"] for e in status["endpoints"]] == ["Degraded", "Healthy"]


def test_an_entry_without_port_checks_publishes_as_before() -> None:
    entry = ServiceEntry.from_body(
        {
            "metadata": {"name": "web", "namespace": "shop", "uid": "u2"},
            "spec": {
                "ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 81}],
                "endpoints": [{"address": "198.18.0.1"}],
                "healthCheck": {"tcp": {}},
            },
        }
    )
    views = visible(entry, entry.static_endpoints(), {"198.18.0.1": CRITICAL}, {}, now=NOW)
    assert not views[0].ready
    assert views[0].unhealthy_ports == ()
    (one,) = desired_slices(entry, views)
    assert [p["name"] for p in one["ports"]] == ["http", "admin"]
    assert "ports" not in desired_status(entry, views, now=NOW)["endpoints"][0]


def _schema() -> dict[str, Any]:
    doc = yaml.safe_load(CRD.read_text())
    spec: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def test_the_port_check_kinds_are_the_entry_level_ones_minus_the_port() -> None:
    spec = _schema()
    entry_level = spec["properties"]["healthCheck"]["properties"]
    own = spec["properties"]["ports"]["items"]["properties"]["healthCheck"]["properties"]
    kinds = {kind for kind, schema in entry_level.items() if "port" in schema.get("properties", {})}
    assert set(own) == kinds
    for kind, schema in own.items():
        expected = copy.deepcopy(entry_level[kind])
        expected["properties"].pop("port", None)
        assert schema == expected, kind


def test_a_ports_own_https_check_trusts_its_own_ca_bundle() -> None:
    body = {
        "metadata": {"name": "api", "namespace": "shop", "uid": "u3"},
        "spec": {
            "ports": [
                {"name": "grpc", "port": 9000},
                {
                    "name": "https",
                    "port": 8443,
                    "healthCheck": {
                        "http": {"scheme": "HTTPS", "tls": {"caBundle": {"configMapName": "edge-ca", "key": "ca.crt"}}}
                    },
                },
            ],
            "endpoints": [{"address": "198.18.0.1"}],
            "healthCheck": {"grpc": {"port": "grpc", "tls": {"caBundle": {"configMapName": "mesh-ca", "key": "ca"}}}},
        },
    }
    entry = ServiceEntry.from_body(body)
    assert entry.ca_bundles == {"edge-ca", "mesh-ca"}
    targets = entry.targets(endpoints(entry)[0], ca_bundles={"edge-ca": {"ca.crt": "EDGE"}, "mesh-ca": None})
    own, shared = targets["https"].check, targets[""].check
    assert isinstance(own, HttpCheck)
    assert own.tls is not None
    assert (own.tls.verify, own.tls.ca, own.tls.problem) == (True, "EDGE", None)
    assert shared.tls is not None  # type: ignore[union-attr]
    assert shared.tls.problem == "TLS: CA ConfigMap mesh-ca not found"  # type: ignore[union-attr]
