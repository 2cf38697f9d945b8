"""Per-port checks on the real control plane: a two-port backend whose exporter fails is published on its
database port only, in the EndpointSlices, the Endpoints, the registry and CoreDNS's SRV records, and a restart
with one port down writes nothing.

Why it exists: the unit tests (tests/unit/test_port_checks.py) prove the pure core; this proves what clients see.
Each backend is a test host with a real TCP server (mysql, 3306, gated by the entry-level tcp check) and a real HTTP
server (exporter, 9104, with its own http check); a failing port is an HTTP 500 from the exporter.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import dns.rdatatype
import dns.resolver
import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import Audit, OperatorProcess, apply, eventually, get_json

pytestmark = [pytest.mark.integration, pytest.mark.netns]

INTERVAL = 2
BUDGET = 30


def backend_entry(name: str, namespace: str, addresses: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ports": [
                {"name": "mysql", "port": 3306},
                {"name": "exporter", "port": 9104, "healthCheck": {"http": {"path": "/metrics"}}},
            ],
            "endpoints": [{"address": a} for a in addresses],
            "healthCheck": {
                "tcp": {"port": "mysql"},
                "intervalSeconds": INTERVAL,
                "timeoutSeconds": 1,
                "unhealthyThreshold": 2,
            },
        },
    }


def slice_ports(cluster: DevCluster, ns: str, name: str) -> dict[str, tuple[tuple[str, ...], bool]]:
    """address -> (the ports of its slice, its ready condition)."""
    items = get_json(cluster, "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={name}")["items"]
    return {
        address: (tuple(p["name"] for p in item.get("ports") or []), bool(ep["conditions"].get("ready")))
        for item in items
        for ep in item.get("endpoints") or []
        for address in ep["addresses"]
    }


def endpoints_ports(cluster: DevCluster, ns: str, name: str) -> dict[str, tuple[str, ...]]:
    """ready address -> the ports of its Endpoints subset."""
    obj = get_json(cluster, "endpoints", "-n", ns, name) or {}
    return {
        a["ip"]: tuple(sorted(p["name"] for p in subset.get("ports") or []))
        for subset in obj.get("subsets") or []
        for a in subset.get("addresses") or []
    }


def registry_entry(cluster: DevCluster, ns: str, name: str) -> dict[str, Any]:
    cm = get_json(cluster, "configmap", "-n", ns, "beacon-registry") or {}
    for value in (cm.get("data") or {}).values():
        services = json.loads(value).get("services", {})
        if name in services:
            return dict(services[name])
    return {}


def srv_hosts(cluster: DevCluster, ns: str, name: str, port: str) -> set[tuple[str, int]]:
    """The (target's address, port) of each SRV record of `_port._tcp.name.ns.svc.cluster.local`."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [cluster.dns[0]]
    resolver.port = cluster.dns[1]
    try:
        answer = resolver.resolve(f"_{port}._tcp.{name}.{ns}.svc.cluster.local", "SRV", lifetime=2)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.LifetimeTimeout):
        return set()
    out = set()
    for rr in answer:
        target = rr.target.to_text()
        addresses = {
            a.to_text()
            for section in answer.response.additional
            if section.name.to_text() == target and section.rdtype == dns.rdatatype.A
            for a in section
        }
        out |= {(a, int(rr.port)) for a in addresses}
    return out


def endpoint_status(cluster: DevCluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    st = (get_json(cluster, "serviceentry", "-n", ns, name) or {}).get("status") or {}
    return {e["address"]: e for e in st.get("endpoints") or []}


def test_a_failing_port_is_withdrawn_from_that_port_only_everywhere(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, audit: Audit
) -> None:
    hosts = net.add_hosts(2)
    exporters = []
    for h in hosts:
        h.tcp(port=3306)
        exporters.append(h.http(port=9104, path="/metrics"))
    a, b = (h.address for h in hosts)
    apply(cluster, backend_entry("db", namespace, [a, b]))

    both = ("mysql", "exporter")
    eventually(lambda: slice_ports(cluster, namespace, "db") == {a: (both, True), b: (both, True)}, timeout=BUDGET)
    assert srv_hosts(cluster, namespace, "db", "exporter") == {(a, 9104), (b, 9104)}
    assert srv_hosts(cluster, namespace, "db", "mysql") == {(a, 3306), (b, 3306)}

    exporters[1].set_status(500)
    eventually(
        lambda: slice_ports(cluster, namespace, "db") == {a: (both, True), b: (("mysql",), True)},
        timeout=BUDGET,
        what="b published on mysql only",
    )
    assert endpoints_ports(cluster, namespace, "db") == {a: ("exporter", "mysql"), b: ("mysql",)}

    def registry_by_address() -> dict[str, Any]:
        return {e["address"]: e for e in registry_entry(cluster, namespace, "db").get("endpoints", [])}

    eventually(lambda: registry_by_address().get(b, {}).get("ports") == {"mysql": 3306}, timeout=10, what="registry")
    by_address = registry_by_address()
    assert by_address[b]["ports"] == {"mysql": 3306}
    assert by_address[b]["portHealth"] == {"mysql": "passing", "exporter": "critical"}
    assert by_address[a]["ports"] == {"exporter": 9104, "mysql": 3306}
    eventually(lambda: srv_hosts(cluster, namespace, "db", "exporter") == {(a, 9104)}, timeout=10, what="SRV")
    assert srv_hosts(cluster, namespace, "db", "mysql") == {(a, 3306), (b, 3306)}
    item = endpoint_status(cluster, namespace, "db")[b]
    assert item["state"] == "Degraded"
    assert item["ports"] == {"mysql": "passing", "exporter": "critical"}
    assert item["probe"].startswith("exporter: HTTP 500")
    conditions = {
        c["type"]: c for c in get_json(cluster, "serviceentry", "-n", namespace, "db")["status"]["conditions"]
    }
    assert conditions["Degraded"]["reason"] == "PortsUnhealthy"
    assert f"{b} (exporter)" in conditions["Degraded"]["message"]

    # a restart with the exporter still failing restores both slots from the slices: nothing is written
    time.sleep(1)
    restart_at = time.time()
    operator_running.restart(signal.SIGTERM)
    time.sleep(INTERVAL * 4)
    assert slice_ports(cluster, namespace, "db") == {a: (both, True), b: (("mysql",), True)}
    writes = [(w["verb"], w["objectRef"]["resource"]) for w in audit.writes(since=restart_at, namespace=namespace)]
    assert writes == [], "a restart with one port down writes nothing"

    exporters[1].set_status(200)
    eventually(
        lambda: slice_ports(cluster, namespace, "db") == {a: (both, True), b: (both, True)},
        timeout=BUDGET,
        what="b back on both ports",
    )
    eventually(lambda: srv_hosts(cluster, namespace, "db", "exporter") == {(a, 9104), (b, 9104)}, timeout=10)
    assert endpoint_status(cluster, namespace, "db")[b]["state"] == "Healthy"


def test_a_backend_down_on_every_port_is_not_ready(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    host = net.add_host()
    mysql = host.tcp(port=3306)
    exporter = host.http(port=9104, path="/metrics")
    apply(cluster, backend_entry("gone", namespace, [host.address]))
    both = ("mysql", "exporter")
    eventually(lambda: slice_ports(cluster, namespace, "gone") == {host.address: (both, True)}, timeout=BUDGET)
    mysql.stop()
    exporter.set_status(503)
    eventually(
        lambda: slice_ports(cluster, namespace, "gone") == {host.address: (both, False)},
        timeout=BUDGET,
        what="not ready under every port",
    )
    # the registry follows the slices (a namespace's catalog is written at most once per 500 ms)
    eventually(lambda: registry_entry(cluster, namespace, "gone")["endpoints"] == [], timeout=10, what="registry")
    assert endpoint_status(cluster, namespace, "gone")[host.address]["state"] == "Unhealthy"
