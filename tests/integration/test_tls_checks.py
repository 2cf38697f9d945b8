"""Verified TLS probes end to end: the real operator process probes HTTPS and gRPC-over-TLS servers on test hosts,
trusting a CA bundle held in a ConfigMap of the entry's namespace.

Why it exists: what the unit tests prove on loopback (handshakes, details, one context per bundle), this proves
through the API: the CA is read from a ConfigMap under the operator's own RBAC, each certificate failure shows its
own detail in the entry's status (the endpoint's `probe`), a ConfigMap created late or rotated takes effect through
the operator's watch of it, without a restart, and `serverName` gives an IP endpoint the name its certificate has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.devcluster.pki import Pki
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import OperatorProcess, apply, eventually, get_json

pytestmark = [pytest.mark.integration, pytest.mark.netns]

INTERVAL = 2
UNHEALTHY = 2
BUDGET = INTERVAL * UNHEALTHY + 20  # detection floor, plus a busy 2-core machine
NAME = "payments.example"
PORT = 8443


def _configmap(namespace: str, name: str, pem: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"ca.crt": pem},
    }


def _entry(name: str, namespace: str, addresses: list[str], check: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ports": [{"name": "https", "port": PORT}],
            "endpoints": [{"address": a} for a in addresses],
            "healthCheck": {**check, "intervalSeconds": INTERVAL, "timeoutSeconds": 1, "unhealthyThreshold": UNHEALTHY},
        },
    }


def _https(ca: str | None, **tls: Any) -> dict[str, Any]:
    if ca is not None:
        tls["caBundle"] = {"configMapName": ca, "key": "ca.crt"}
    return {"http": {"path": "/healthz", "port": "https", "scheme": "HTTPS", "tls": tls}}


def _endpoints(cluster: DevCluster, namespace: str, name: str) -> dict[str, tuple[str, str]]:
    """address -> (state, probe detail) as the entry's status shows them."""
    body = get_json(cluster, "serviceentry", "-n", namespace, name) or {}
    return {e["address"]: (e["state"], e.get("probe", "")) for e in (body.get("status") or {}).get("endpoints") or []}


def _shows(cluster: DevCluster, namespace: str, name: str, wanted: dict[str, tuple[str, str]]) -> bool:
    shown = _endpoints(cluster, namespace, name)
    return all(shown.get(address) == state for address, state in wanted.items())


def _wait(cluster: DevCluster, namespace: str, name: str, wanted: dict[str, tuple[str, str]], what: str) -> None:
    try:
        eventually(lambda: _shows(cluster, namespace, name, wanted), timeout=BUDGET, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; status shows {_endpoints(cluster, namespace, name)}") from None


def test_https_verified_against_a_configmap_ca_and_each_failure_has_its_detail(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, tmp_path: Path
) -> None:
    ca = Pki(directory=tmp_path / "ca", name="beacon-test-ca")
    other = Pki(directory=tmp_path / "other", name="beacon-other-ca")
    good, expired, foreign, mismatch, sni = net.add_hosts(5)
    good.http(port=PORT, tls=ca.issue(name="good", common_name=NAME, server_hosts=(good.address,)))
    expired.http(
        port=PORT, tls=ca.issue(name="expired", common_name=NAME, server_hosts=(expired.address,), expired=True)
    )
    foreign.http(port=PORT, tls=other.issue(name="foreign", common_name=NAME, server_hosts=(foreign.address,)))
    mismatch.http(port=PORT, tls=ca.issue(name="mismatch", common_name=NAME, server_hosts=("elsewhere.example",)))
    sni.http(port=PORT, tls=ca.issue(name="sni", common_name=NAME, server_hosts=(NAME,)))  # a name, no address
    apply(cluster, _configmap(namespace, "payments-ca", ca.ca.cert.read_text()))
    addresses = [good.address, expired.address, foreign.address, mismatch.address]
    apply(cluster, _entry("verified", namespace, addresses, _https("payments-ca", insecureSkipVerify=False)))
    apply(cluster, _entry("sni", namespace, [sni.address], _https("payments-ca", serverName=NAME)))
    apply(cluster, _entry("unverified", namespace, addresses, _https(None)))  # tls: {} verifies nothing

    _wait(
        cluster,
        namespace,
        "verified",
        {
            good.address: ("Healthy", "HTTP 200"),
            expired.address: ("Unhealthy", "TLS: certificate expired"),
            foreign.address: ("Unhealthy", "TLS: unknown certificate authority"),
            mismatch.address: ("Unhealthy", f"TLS: certificate name mismatch (wanted {mismatch.address})"),
        },
        "each TLS failure with its own detail",
    )
    _wait(cluster, namespace, "sni", {sni.address: ("Healthy", "HTTP 200")}, "serverName verifies an IP endpoint")
    _wait(cluster, namespace, "unverified", dict.fromkeys(addresses, ("Healthy", "HTTP 200")), "kubelet's way")


def test_a_late_or_rotated_ca_configmap_applies_without_a_restart(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, tmp_path: Path
) -> None:
    assert operator_running.proc is not None
    pid = operator_running.proc.pid
    old_ca = Pki(directory=tmp_path / "old", name="beacon-old-ca")
    new_ca = Pki(directory=tmp_path / "new", name="beacon-new-ca")
    host, grpc_host = net.add_hosts(2)
    server = host.http(port=PORT, tls=old_ca.issue(name="old", common_name=NAME, server_hosts=(host.address,)))
    grpc_host.grpc(port=PORT, tls=new_ca.issue(name="grpc", common_name=NAME, server_hosts=(NAME,)))
    grpc_check = {
        "grpc": {
            "port": PORT,
            "tls": {"serverName": NAME, "caBundle": {"configMapName": "rotating-ca", "key": "ca.crt"}},
        }
    }

    # the ConfigMap does not exist yet: a clear detail, and its creation is seen by the watch
    apply(cluster, _entry("rotating", namespace, [host.address], _https("rotating-ca")))
    _wait(
        cluster,
        namespace,
        "rotating",
        {host.address: ("Unhealthy", "TLS: CA ConfigMap rotating-ca not found")},
        "a missing CA ConfigMap",
    )
    apply(cluster, _configmap(namespace, "rotating-ca", old_ca.ca.cert.read_text()))
    _wait(cluster, namespace, "rotating", {host.address: ("Healthy", "HTTP 200")}, "ready once the CA is there")

    # the server's certificate is re-signed by a new CA; the ConfigMap still holds the old one
    server.set_certificate(new_ca.issue(name="new", common_name=NAME, server_hosts=(host.address,)))
    _wait(
        cluster,
        namespace,
        "rotating",
        {host.address: ("Unhealthy", "TLS: unknown certificate authority")},
        "unknown authority until the CA rotates",
    )
    apply(cluster, _entry("grpc", namespace, [grpc_host.address], grpc_check))  # trusts the old CA too, for now
    _wait(
        cluster,
        namespace,
        "grpc",
        {grpc_host.address: ("Unhealthy", "TLS: unknown certificate authority")},
        "gRPC over TLS refused",
    )

    apply(cluster, _configmap(namespace, "rotating-ca", new_ca.ca.cert.read_text()))
    _wait(cluster, namespace, "rotating", {host.address: ("Healthy", "HTTP 200")}, "ready again after the rotation")
    _wait(cluster, namespace, "grpc", {grpc_host.address: ("Healthy", "gRPC SERVING")}, "gRPC over TLS verified")
    assert operator_running.proc.pid == pid  # the same process: no restart
    assert operator_running.proc.poll() is None
