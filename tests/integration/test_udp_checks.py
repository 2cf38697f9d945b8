"""UDP checks end to end: the real operator process probes UDP echo and DNS servers on test hosts and publishes
what it finds through the real apiserver.

Why it exists: the checker's unit tests prove the probe against loopback sockets; this proves the whole path on
real addresses, where an ICMP port unreachable comes from another network namespace's kernel, a silent port is a
DROP rule in front of a live host (never a downed link), and the verdicts land in the EndpointSlices and in the
status's per-endpoint probe detail. Every DNS query goes to a server the test starts on a test host.
"""

from __future__ import annotations

from typing import Any

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import OperatorProcess, apply, eventually, get_json

pytestmark = [pytest.mark.integration, pytest.mark.netns]

INTERVAL = 2
TIMEOUT = 1
UNHEALTHY = 2
# the floor is INTERVAL x UNHEALTHY (+ the timeout for a silent port); the slack covers jitter and a busy 2-core machine
DETECTION_BUDGET = INTERVAL * UNHEALTHY + TIMEOUT + 10


def entry(name: str, namespace: str, addresses: list[str], udp: dict[str, Any], ports: list[dict[str, Any]]) -> Any:
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ports": ports,
            "endpoints": [{"address": a} for a in addresses],
            "healthCheck": {
                "udp": udp,
                "intervalSeconds": INTERVAL,
                "timeoutSeconds": TIMEOUT,
                "unhealthyThreshold": UNHEALTHY,
            },
        },
    }


def slice_readiness(cluster: DevCluster, ns: str, name: str) -> dict[str, bool]:
    data = get_json(cluster, "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={name}") or {}
    return {
        address: bool(ep["conditions"].get("ready"))
        for item in data.get("items", [])
        for ep in item.get("endpoints") or []
        for address in ep["addresses"]
    }


def probes(cluster: DevCluster, ns: str, name: str) -> dict[str, tuple[str, str]]:
    """address -> (state, the detail of the probe that decided it), from the entry's status."""
    status = (get_json(cluster, "serviceentry", "-n", ns, name) or {}).get("status") or {}
    return {e["address"]: (e["state"], e.get("probe", "")) for e in status.get("endpoints") or []}


def settles(cluster: DevCluster, ns: str, name: str, want: dict[str, tuple[str, str]], *, what: str) -> None:
    """Wait until the status shows `want` and the EndpointSlices publish the Healthy ones ready, the rest not."""
    ready = {address: state == "Healthy" for address, (state, _) in want.items()}

    def seen() -> bool:
        return probes(cluster, ns, name) == want and slice_readiness(cluster, ns, name) == ready

    try:
        eventually(seen, timeout=DETECTION_BUDGET, what=what)
    except AssertionError:
        shown = f"status {probes(cluster, ns, name)}, slices {slice_readiness(cluster, ns, name)}"
        raise AssertionError(f"{what}: {shown}") from None


def test_udp_echo_passes_then_fails_on_port_unreachable_and_on_silence(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    stopped, silenced = net.add_hosts(2)
    servers = [stopped.udp(port=9053), silenced.udp(port=9053)]
    ports = [{"name": "echo", "port": 9053, "protocol": "UDP"}]
    udp = {"port": "echo", "send": "ping", "expect": {"prefix": "pi"}}
    apply(cluster, entry("echo", namespace, [stopped.address, silenced.address], udp, ports))
    passing = ("Healthy", "UDP reply, 4 bytes")
    settles(cluster, namespace, "echo", {stopped.address: passing, silenced.address: passing}, what="both echo")
    assert all(server.datagrams > 0 for server in servers)

    servers[0].stop()  # the host stays: its kernel answers ICMP port unreachable
    silenced.block()  # a DROP rule inside the namespace: nothing comes back at all
    try:
        settles(
            cluster,
            namespace,
            "echo",
            {
                stopped.address: ("Unhealthy", "UDP port unreachable (ICMP)"),
                silenced.address: ("Unhealthy", f"no UDP reply within {TIMEOUT}s"),
            },
            what="the stopped one unreachable, the blocked one silent",
        )
    finally:
        silenced.unblock()
    servers[0].start()
    settles(cluster, namespace, "echo", {stopped.address: passing, silenced.address: passing}, what="both back")


def test_dns_check_passes_and_fails_on_a_stopped_server(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    host = net.add_host()
    server = host.dns(port=5353, name="db.beacon.test", answer="198.18.0.53")
    ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    apply(cluster, entry("names", namespace, [host.address], {"port": "dns", "dns": {"name": "db.beacon.test"}}, ports))
    settles(cluster, namespace, "names", {host.address: ("Healthy", "DNS NOERROR, 1 answer")}, what="DNS answers")

    server.stop()
    settles(
        cluster,
        namespace,
        "names",
        {host.address: ("Unhealthy", "UDP port unreachable (ICMP)")},
        what="the stopped DNS server is unreachable",
    )


def test_dns_check_wants_its_rcode(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    """A server that must answer SERVFAIL for a name (a resolver whose upstream is meant to be down, say) and
    answers NXDOMAIN fails with the rcode detail; once it answers SERVFAIL it passes."""
    host = net.add_host()
    server = host.dns(port=5353, name="db.beacon.test", rcode="NXDOMAIN")
    ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    udp = {"port": 5353, "dns": {"name": "missing.beacon.test", "type": "AAAA", "rcode": "SERVFAIL"}}
    apply(cluster, entry("rcode", namespace, [host.address], udp, ports))
    settles(
        cluster,
        namespace,
        "rcode",
        {host.address: ("Unhealthy", "DNS rcode NXDOMAIN, wanted SERVFAIL")},
        what="NXDOMAIN where SERVFAIL is wanted fails",
    )

    server.set_rcode("SERVFAIL")
    settles(cluster, namespace, "rcode", {host.address: ("Healthy", "DNS SERVFAIL, 0 answers")}, what="SERVFAIL")
