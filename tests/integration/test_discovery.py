"""ServiceEntry discovery end to end: real operator process, real servers on test hosts, real apiserver and CoreDNS."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.netguard import EgressCounter, default_route_interface, guard_route_present
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import Audit, OperatorProcess, apply, create_pods, eventually, get_json

pytestmark = [pytest.mark.integration, pytest.mark.netns]

INTERVAL = 2
UNHEALTHY = 2
# the floor is INTERVAL x UNHEALTHY; the slack covers jitter, coalescing and a busy 2-core CI machine
DETECTION_BUDGET = INTERVAL * UNHEALTHY + 8


def entry(name: str, namespace: str, addresses: list[str], check: dict[str, Any] | None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 8080}], **spec},
    }
    if addresses:
        body["spec"]["endpoints"] = [{"address": a} for a in addresses]
    if check is not None:
        body["spec"]["healthCheck"] = {
            **check,
            "intervalSeconds": INTERVAL,
            "timeoutSeconds": 1,
            "unhealthyThreshold": UNHEALTHY,
        }
    return body


def slices(cluster: DevCluster, ns: str, name: str) -> list[dict[str, Any]]:
    data = get_json(cluster, "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={name}")
    return sorted((data or {}).get("items", []), key=lambda s: s["metadata"]["name"])


def slice_readiness(cluster: DevCluster, ns: str, name: str) -> dict[str, bool]:
    out = {}
    for item in slices(cluster, ns, name):
        for ep in item.get("endpoints") or []:
            for address in ep["addresses"]:
                out[address] = bool(ep["conditions"].get("ready"))
    return out


def endpoints_split(cluster: DevCluster, ns: str, name: str) -> tuple[set[str], set[str]]:
    data = get_json(cluster, "endpoints", "-n", ns, name) or {}
    ready, not_ready = set(), set()
    for subset in data.get("subsets") or []:
        ready |= {a["ip"] for a in subset.get("addresses") or []}
        not_ready |= {a["ip"] for a in subset.get("notReadyAddresses") or []}
    return ready, not_ready


def registry(cluster: DevCluster, ns: str) -> dict[str, Any] | None:
    data = get_json(cluster, "configmap", "-n", ns, "beacon-registry")
    if data is None:
        return None
    parsed: dict[str, Any] = json.loads(data["data"]["registry.json"])
    return parsed


def registry_healthy(cluster: DevCluster, ns: str, name: str) -> set[str] | None:
    reg = registry(cluster, ns)
    if reg is None or name not in reg["services"]:
        return None
    return {e["address"] for e in reg["services"][name]["endpoints"]}


def status(cluster: DevCluster, ns: str, name: str) -> dict[str, Any]:
    data = get_json(cluster, "serviceentry", "-n", ns, name) or {}
    result: dict[str, Any] = data.get("status") or {}
    return result


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def events(cluster: DevCluster, ns: str) -> list[dict[str, Any]]:
    data = get_json(cluster, "events", "-n", ns) or {}
    items: list[dict[str, Any]] = data.get("items", [])
    return items


HTTP_CHECK = {"http": {"path": "/healthz", "port": "http"}}


def test_http_entry_publishes_healthy_endpoints_everywhere(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    operator_running: OperatorProcess,
    resolve: Callable[[str], set[str]],
) -> None:
    hosts = net.add_hosts(3)
    servers = [h.http(port=8080, path="/healthz") for h in hosts]
    addresses = [h.address for h in hosts]
    # the interval path: a stopped server also closes the probe's keep-alive connection, and with connection-loss
    # hints it would be caught in well under an interval (tests/integration/test_hints.py proves that path)
    check = {**HTTP_CHECK, "connectionLossHints": False}
    apply(cluster, entry("payments", namespace, addresses, check))
    everyone = set(addresses)
    fqdn = f"payments.{namespace}.svc.cluster.local"

    eventually(lambda: status(cluster, namespace, "payments").get("readySummary") == "3/3", what="READY 3/3")
    assert slice_readiness(cluster, namespace, "payments") == dict.fromkeys(addresses, True)
    assert endpoints_split(cluster, namespace, "payments") == (everyone, set())
    eventually(lambda: registry_healthy(cluster, namespace, "payments") == everyone, what="registry lists all 3")
    st = status(cluster, namespace, "payments")
    assert condition(st, "Ready")["reason"] == "Healthy"
    assert st["observedGeneration"] == 1
    eventually(lambda: resolve(fqdn) == everyone, what="DNS answers all 3")
    table = cluster.kubectl("get", "serviceentries", "-n", namespace).stdout
    assert "3/3" in table
    assert "Healthy" in table
    svc = get_json(cluster, "service", "-n", namespace, "payments")
    assert svc["spec"]["clusterIP"] == "None"
    assert "selector" not in svc["spec"]
    item = slices(cluster, namespace, "payments")[0]
    assert item["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "operator.beacon.dev"
    assert item["metadata"]["ownerReferences"][0]["kind"] == "ServiceEntry"
    legacy = get_json(cluster, "endpoints", "-n", namespace, "payments")
    assert legacy["metadata"]["labels"]["endpointslice.kubernetes.io/skip-mirror"] == "true"
    # the mirroring controller must not have created a second slice for the Endpoints object
    assert len(slices(cluster, namespace, "payments")) == 1

    servers[0].stop()
    stopped_at = time.monotonic()
    healthy = everyone - {addresses[0]}
    eventually(
        lambda: slice_readiness(cluster, namespace, "payments").get(addresses[0]) is False,
        timeout=DETECTION_BUDGET,
        what="slice marks the stopped endpoint not-ready",
    )
    detected = time.monotonic() - stopped_at
    assert detected >= INTERVAL * (UNHEALTHY - 1), "flipped before the unhealthy threshold could be reached"
    eventually(lambda: endpoints_split(cluster, namespace, "payments") == (healthy, {addresses[0]}), timeout=5)
    eventually(lambda: registry_healthy(cluster, namespace, "payments") == healthy, timeout=5, what="registry drop")
    eventually(lambda: status(cluster, namespace, "payments").get("readySummary") == "2/3", timeout=5)
    st = status(cluster, namespace, "payments")
    assert condition(st, "Ready")["reason"] == "Degraded"
    assert condition(st, "Degraded")["status"] == "True"
    assert addresses[0] in condition(st, "Degraded")["message"]
    eventually(lambda: resolve(fqdn) == healthy, timeout=10, what="DNS answers exactly the 2 healthy")
    unhealthy_events = [
        e for e in events(cluster, namespace) if e["reason"] == "EndpointUnhealthy" and addresses[0] in e["message"]
    ]
    assert unhealthy_events, "an Event is posted on the transition"
    assert unhealthy_events[0]["involvedObject"]["name"] == "payments"

    servers[0].start()
    eventually(lambda: status(cluster, namespace, "payments").get("readySummary") == "3/3", timeout=DETECTION_BUDGET)
    eventually(lambda: slice_readiness(cluster, namespace, "payments") == dict.fromkeys(addresses, True), timeout=5)
    eventually(lambda: endpoints_split(cluster, namespace, "payments") == (everyone, set()), timeout=5)
    eventually(lambda: registry_healthy(cluster, namespace, "payments") == everyone, timeout=5)
    eventually(lambda: resolve(fqdn) == everyone, timeout=10, what="DNS answers all 3 again")


@pytest.mark.parametrize("kind", ["tcp", "grpc", "grpc-service", "http-status"])
def test_check_kinds_pass_and_fail(
    kind: str, cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    good, bad = net.add_hosts(2)
    if kind == "tcp":
        good.tcp(port=8080)
        bad.tcp(port=8080).stop()  # nothing listens: connection refused
        check: dict[str, Any] = {"tcp": {"port": "http"}}
    elif kind == "grpc":
        good.grpc(port=8080)
        bad.grpc(port=8080, status="NOT_SERVING")
        check = {"grpc": {"port": 8080}}
    elif kind == "grpc-service":
        g1, g2 = good.grpc(port=8080), bad.grpc(port=8080)
        g1.set_status("payments", "SERVING")
        g2.set_status("payments", "NOT_SERVING")
        check = {"grpc": {"port": 8080, "service": "payments"}}
    else:
        good.http(port=8080, path="/healthz")
        bad.http(port=8080, path="/healthz").set_status(500)
        check = {"http": {"path": "/healthz", "port": 8080, "expectedStatuses": [{"min": 200, "max": 299}]}}
    apply(cluster, entry("svc", namespace, [good.address, bad.address], check))
    eventually(
        lambda: (
            slice_readiness(cluster, namespace, "svc") == {good.address: True, bad.address: False}
            and status(cluster, namespace, "svc").get("readySummary") == "1/2"
        ),
        timeout=DETECTION_BUDGET + 5,
        what=f"{kind}: good ready, bad not ready",
    )


def _lease(namespace: str, name: str, *, renew: float, duration: int) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(renew)) + ".000000Z"
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": duration, "renewTime": stamp},
    }


def test_lease_check_follows_renewals(cluster: DevCluster, namespace: str, operator_running: OperatorProcess) -> None:
    a, b = "198.18.250.10", "198.18.250.11"
    now = time.time()
    apply(cluster, _lease(namespace, "beat-198.18.250.10", renew=now, duration=3600))
    apply(cluster, _lease(namespace, "beat-198.18.250.11", renew=now - 120, duration=10))  # expired long ago
    body = entry("beat", namespace, [a, b], {"lease": {}})
    apply(cluster, body)
    eventually(
        lambda: slice_readiness(cluster, namespace, "beat") == {a: True, b: False},
        timeout=DETECTION_BUDGET,
        what="renewed lease healthy, expired lease not",
    )
    # b renews; a's lease is deleted (the endpoint stopped heartbeating altogether)
    apply(cluster, _lease(namespace, "beat-198.18.250.11", renew=time.time(), duration=3600))
    cluster.kubectl("delete", "lease", "-n", namespace, "beat-198.18.250.10")
    eventually(
        lambda: slice_readiness(cluster, namespace, "beat") == {a: False, b: True},
        timeout=DETECTION_BUDGET,
        what="the lease states swap",
    )


def _pod(namespace: str, name: str, *, labels: dict[str, str], finalizer: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if finalizer:
        meta["finalizers"] = ["test.beacon.dev/hold"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }


def _set_pod_ip(cluster: DevCluster, namespace: str, name: str, ip: str) -> None:
    patch = {"status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}}
    cluster.kubectl(
        "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )


def test_selector_pods_are_probed_published_terminated_and_removed(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    h1, h2, h3 = net.add_hosts(3)
    for h in (h1, h2, h3):
        h.http(port=8080, path="/healthz")
    labels = {"app": "cart"}
    # pods need the namespace's default ServiceAccount, which the controller manager creates moments after the
    # namespace: retry the first create until it exists
    eventually(
        lambda: (
            cluster.kubectl(
                "apply", "-f", "-", input=json.dumps(_pod(namespace, "cart-1", labels=labels)), check=False
            ).returncode
            == 0
        ),
        timeout=30,
        what="first pod created",
    )
    apply(cluster, _pod(namespace, "cart-2", labels=labels, finalizer=True))
    apply(cluster, _pod(namespace, "other", labels={"app": "other"}))
    _set_pod_ip(cluster, namespace, "cart-1", h1.address)
    _set_pod_ip(cluster, namespace, "cart-2", h2.address)
    _set_pod_ip(cluster, namespace, "other", h3.address)
    body = entry("cart", namespace, [], HTTP_CHECK, selector={"matchLabels": labels})
    apply(cluster, body)
    eventually(
        lambda: slice_readiness(cluster, namespace, "cart") == {h1.address: True, h2.address: True},
        timeout=DETECTION_BUDGET,
        what="both selected pods ready, the other pod not selected",
    )
    refs = {
        ep["targetRef"]["name"]
        for s in slices(cluster, namespace, "cart")
        for ep in s["endpoints"]
        if "targetRef" in ep
    }
    assert refs == {"cart-1", "cart-2"}

    # cart-2 is deleted but held by a finalizer: terminating, no longer ready
    cluster.kubectl("delete", "pod", "cart-2", "-n", namespace, "--wait=false")

    def terminating() -> bool:
        for s in slices(cluster, namespace, "cart"):
            for ep in s["endpoints"]:
                if ep["addresses"] == [h2.address]:
                    c = ep["conditions"]
                    return c.get("terminating") is True and c.get("ready") is False
        return False

    eventually(terminating, timeout=15, what="terminating pod marked terminating and not ready")
    # the registry is written after the slices (at most once per 0.5 s), so it is awaited, not asserted at once
    eventually(
        lambda: registry_healthy(cluster, namespace, "cart") == {h1.address},
        timeout=10,
        what="the terminating pod out of the registry",
    )

    # cart-1 is deleted for good: it disappears
    cluster.kubectl("delete", "pod", "cart-1", "-n", namespace, "--wait=true", "--timeout=30s")
    eventually(
        lambda: h1.address not in slice_readiness(cluster, namespace, "cart"), timeout=15, what="deleted pod removed"
    )
    cluster.kubectl("patch", "pod", "cart-2", "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    eventually(lambda: slice_readiness(cluster, namespace, "cart") == {}, timeout=15, what="all pods gone")


def test_250_endpoints_make_three_slices(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    hosts = net.add_hosts(250)
    apply(cluster, entry("big", namespace, [h.address for h in hosts], None))
    got = eventually(
        lambda: (lambda s: s if len(s) == 3 else None)(slices(cluster, namespace, "big")),
        timeout=30,
        what="3 slices",
    )
    sizes = sorted(len(s["endpoints"]) for s in got)
    assert sizes == [50, 100, 100]
    assert {a for s in got for ep in s["endpoints"] for a in ep["addresses"]} == {h.address for h in hosts}
    eventually(lambda: status(cluster, namespace, "big").get("readySummary") == "250/250", timeout=15)
    st = status(cluster, namespace, "big")
    assert "endpoints" not in st, "the per-endpoint summary is left out of status above 16 endpoints"


def test_delete_removes_outputs_and_registry_entry(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    h1, h2 = net.add_hosts(2)
    apply(cluster, entry("keep", namespace, [h1.address], None))
    apply(cluster, entry("gone", namespace, [h2.address], None))
    eventually(
        lambda: (reg := registry(cluster, namespace)) is not None and set(reg["services"]) == {"keep", "gone"},
        timeout=20,
        what="both in the registry",
    )
    cluster.kubectl("delete", "serviceentry", "gone", "-n", namespace)
    eventually(lambda: set((registry(cluster, namespace) or {}).get("services", {})) == {"keep"}, timeout=15)
    eventually(lambda: get_json(cluster, "service", "-n", namespace, "gone") is None, timeout=30, what="Service GC")
    eventually(lambda: get_json(cluster, "endpoints", "-n", namespace, "gone") is None, timeout=30)
    eventually(lambda: slices(cluster, namespace, "gone") == [], timeout=30, what="slices GC")
    cluster.kubectl("delete", "serviceentry", "keep", "-n", namespace)
    eventually(lambda: registry(cluster, namespace) is None, timeout=15, what="registry removed with the last entry")


def test_entries_applied_together_are_each_published_with_one_write_per_output(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, audit: Audit
) -> None:
    """A burst of applies, with the shipped RBAC: the entries share their reads (one LIST of the namespace's slices,
    one of its Services), nothing is refused or retried, and each output is written once, with its verdicts."""
    hosts = net.add_hosts(20)
    for h in hosts:
        h.http(port=8080, path="/healthz")
    since = time.time()
    log_before = len(operator_running.logs())
    burst = {"apiVersion": "v1", "kind": "List", "items": []}
    for i, h in enumerate(hosts):
        burst["items"].append(entry(f"burst-{i:02d}", namespace, [h.address], HTTP_CHECK))
    apply(cluster, burst)
    for i in range(20):
        eventually(lambda i=i: status(cluster, namespace, f"burst-{i:02d}").get("readySummary") == "1/1", timeout=30)
    writes = [(w["verb"], w["objectRef"]["resource"]) for w in audit.writes(since=since, namespace=namespace)]
    for resource in ("services", "endpointslices", "endpoints"):
        assert sum(1 for _, r in writes if r == resource) == 20, (resource, writes)
    assert sum(1 for _, r in writes if r == "serviceentries") == 20  # one status patch each
    assert ("create", "events") not in writes  # passing the first checks is not news
    new_logs = operator_running.logs()[log_before:]
    assert "retrying" not in new_logs
    assert "Forbidden" not in new_logs


def test_outputs_deleted_or_edited_by_hand_are_written_back(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    """beacon watches what it owns: a deleted or edited Service, EndpointSlice, Endpoints or registry ConfigMap is
    written back within 2 s, by the watch (the session's operator runs with the periodic resync off)."""
    host = net.add_host()
    host.http(port=8080, path="/healthz")
    apply(cluster, entry("owned", namespace, [host.address], HTTP_CHECK))
    eventually(lambda: status(cluster, namespace, "owned").get("readySummary") == "1/1", what="READY 1/1")
    eventually(lambda: registry_healthy(cluster, namespace, "owned") == {host.address}, what="registry")

    def service_intact() -> bool:
        svc = get_json(cluster, "service", "-n", namespace, "owned")
        return svc is not None and svc["metadata"]["labels"].get("beacon.dev/service-entry") == "owned"

    outputs: list[tuple[str, str, Callable[[], bool]]] = [
        ("service", "owned", service_intact),
        ("endpointslice", "owned-ipv4-0", lambda: slice_readiness(cluster, namespace, "owned") == {host.address: True}),
        ("endpoints", "owned", lambda: endpoints_split(cluster, namespace, "owned") == ({host.address}, set())),
        ("configmap", "beacon-registry", lambda: registry_healthy(cluster, namespace, "owned") == {host.address}),
    ]
    for kind, name, intact in outputs:
        cluster.kubectl("delete", kind, name, "-n", namespace)
        eventually(intact, timeout=2, interval=0.05, what=f"{kind} {name} written back after a deletion")
    edits = [
        ("service", "owned", '{"metadata": {"labels": {"beacon.dev/service-entry": "someone-elses"}}}'),
        ("endpointslice", "owned-ipv4-0", '{"endpoints": [{"addresses": ["%s"], "conditions": {"ready": false}}]}'),
        ("endpoints", "owned", '{"subsets": null}'),
        ("configmap", "beacon-registry", '{"data": {"registry.json": "{\\"services\\": {}}"}}'),
    ]
    for (kind, name, patch), (_, _, intact) in zip(edits, outputs, strict=True):
        cluster.kubectl("patch", kind, name, "-n", namespace, "--type=merge", "-p", patch.replace("%s", host.address))
        eventually(intact, timeout=2, interval=0.05, what=f"{kind} {name} written back after an edit")


def test_a_field_beacon_stopped_setting_is_removed_after_a_restart(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    """An older beacon applied a label and a data key that this one does not set: the first reconcile after the
    restart compares with the fields beacon's field manager holds (managedFields) and applies again, removing them.
    Everything else stays as it was."""
    host = net.add_host()
    host.http(port=8080, path="/healthz")
    apply(cluster, entry("legacy", namespace, [host.address], HTTP_CHECK))
    eventually(lambda: registry_healthy(cluster, namespace, "legacy") == {host.address}, what="registry")
    operator_running.stop()
    current = get_json(cluster, "configmap", "-n", namespace, "beacon-registry")
    assert current is not None
    meta = current["metadata"]
    older = {  # what beacon applies to the registry, as an older beacon did, with one more label and data key
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": meta["name"],
            "namespace": namespace,
            "labels": {**meta.get("labels", {}), "beacon.dev/tier": "gold"},
            **{k: meta[k] for k in ("annotations", "ownerReferences") if k in meta},
        },
        "data": {**current["data"], "legacy.json": "{}"},
    }
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=beacon", "--force-conflicts", "-f", "-", input=json.dumps(older)
    )
    operator_running.start()

    def cleaned() -> bool:
        now = get_json(cluster, "configmap", "-n", namespace, "beacon-registry") or {}
        return "beacon.dev/tier" not in now["metadata"].get("labels", {}) and "legacy.json" not in now["data"]

    eventually(cleaned, timeout=30, interval=0.2, what="the stale label and data key removed after the restart")
    assert registry_healthy(cluster, namespace, "legacy") == {host.address}


def test_someone_elses_slice_and_endpoints_of_the_same_names_are_never_overwritten(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    """A new entry's EndpointSlice and Endpoints are created without being read first (a POST, which fails when the
    name is taken); objects of those names that are not beacon's stay as they are, and the entry says why."""
    host, theirs = net.add_hosts(2)
    their_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "clash-ipv4-0", "namespace": namespace, "labels": {"owner": "them"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [theirs.address]}],
        "ports": [{"name": "web", "port": 9999, "protocol": "TCP"}],
    }
    their_endpoints = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": "other", "namespace": namespace, "labels": {"owner": "them"}},
        "subsets": [{"addresses": [{"ip": theirs.address}], "ports": [{"name": "web", "port": 9999}]}],
    }
    apply(cluster, their_slice)
    apply(cluster, their_endpoints)
    apply(cluster, entry("clash", namespace, [host.address], None))
    apply(cluster, entry("other", namespace, [host.address], None))
    for name, kind in (("clash", "EndpointSlice"), ("other", "Endpoints")):

        def conflict(name: str = name) -> dict[str, Any] | None:
            ready = condition(status(cluster, namespace, name), "Ready")
            return ready if ready.get("reason") == "OutputConflict" else None

        message = eventually(conflict, timeout=30, what=f"{name}: OutputConflict")["message"]
        assert kind in message
        assert "not managed by beacon" in message
    kept_slice = get_json(cluster, "endpointslice", "-n", namespace, "clash-ipv4-0")
    assert [e["addresses"] for e in kept_slice["endpoints"]] == [[theirs.address]]
    assert kept_slice["ports"][0]["port"] == 9999
    assert "ownerReferences" not in kept_slice["metadata"]
    kept_endpoints = get_json(cluster, "endpoints", "-n", namespace, "other")
    assert kept_endpoints["subsets"][0]["addresses"] == [{"ip": theirs.address}]
    assert "ownerReferences" not in kept_endpoints["metadata"]


def test_steady_state_makes_zero_writes(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, audit: Audit
) -> None:
    hosts = net.add_hosts(3)
    for h in hosts:
        h.http(port=8080, path="/healthz")
    bad = net.add_host()  # never answers: a steadily critical endpoint must not cause writes either
    body = entry("idle", namespace, [h.address for h in hosts] + [bad.address], HTTP_CHECK)
    # generous timeout and threshold: on a loaded 2-core CI machine a slow probe is not what this test is about
    interval = 3
    body["spec"]["healthCheck"].update({"intervalSeconds": interval, "timeoutSeconds": 2, "unhealthyThreshold": 3})
    apply(cluster, body)
    # settled: the three good endpoints healthy AND the silent one already judged unhealthy (UNKNOWN -> CRITICAL
    # after 3 failures is a transition, with its writes, that belongs before the idle window, not in it)
    eventually(
        lambda: (
            {e["address"]: e["state"] for e in status(cluster, namespace, "idle").get("endpoints", [])}
            == {**{h.address: "Healthy" for h in hosts}, bad.address: "Unhealthy"}
        ),
        timeout=DETECTION_BUDGET + 12,
        what="3 healthy endpoints and the silent one unhealthy",
    )
    time.sleep(2)  # let coalesced writes (registry) land
    start = time.time()
    before = operator_running.metrics()
    time.sleep(interval * 4)
    # this namespace only: earlier tests' namespaces may still be terminating, which rightly costs writes
    writes = audit.writes(since=start, namespace=namespace)
    assert writes == [], f"{len(writes)} writes in steady state: {[w['objectRef'] for w in writes][:5]}"
    after = operator_running.metrics()
    assert _metric(after, 'beacon_probes_total{check="http",result="ok"}') > _metric(
        before, 'beacon_probes_total{check="http",result="ok"}'
    ), "probes kept running during the idle window"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_never_publishes_healthy_endpoints_not_ready(
    sig: int, cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, audit: Audit
) -> None:
    hosts = net.add_hosts(5)
    for h in hosts:
        h.http(port=8080, path="/healthz")
    addresses = [h.address for h in hosts]
    # a slow health check and a high healthy threshold: a fresh start would take ~6 s to mark anything ready
    body = entry("steady", namespace, addresses, HTTP_CHECK)
    body["spec"]["healthCheck"]["healthyThreshold"] = 3
    apply(cluster, body)
    # more entries, so that the restarted operator reads their outputs in batches (LISTs) as well as one by one
    for i in range(3):
        apply(cluster, entry(f"also-{i}", namespace, addresses[i : i + 2], HTTP_CHECK))
    eventually(
        lambda: slice_readiness(cluster, namespace, "steady") == dict.fromkeys(addresses, True),
        timeout=DETECTION_BUDGET + INTERVAL * 3,
    )
    for i in range(3):
        eventually(lambda i=i: status(cluster, namespace, f"also-{i}").get("readySummary") == "2/2", timeout=30)
    time.sleep(1)

    flips: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen = slice_readiness(cluster, namespace, "steady")
            flips.extend(a for a in addresses if seen.get(a) is not True)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        restart_at = time.time()
        operator_running.restart(sig)
        time.sleep(INTERVAL * 4)  # well past the first probes of every endpoint
    finally:
        stop.set()
        watcher.join()
    assert flips == [], f"healthy endpoints were published not-ready after {signal.Signals(sig).name}: {flips[:5]}"
    writes = [(w["verb"], w["objectRef"]["resource"]) for w in audit.writes(since=restart_at, namespace=namespace)]
    assert writes == [], "a restart with unchanged health writes nothing (no slice, Service, Endpoints or status)"


def test_metadata_address_is_refused_with_a_clear_reason(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess
) -> None:
    apply(cluster, entry("meta", namespace, ["169.254.169.254"], HTTP_CHECK))

    def refused() -> dict[str, Any] | None:
        st = status(cluster, namespace, "meta")
        ready = condition(st, "Ready")
        return ready if ready.get("reason") == "ProbeRefused" else None

    ready = eventually(refused, timeout=DETECTION_BUDGET, what="Ready=False ProbeRefused")
    assert ready["status"] == "False"
    assert "169.254.169.254 is link-local" in ready["message"]
    assert "--allow-probe-cidr" in ready["message"]
    assert condition(status(cluster, namespace, "meta"), "Degraded")["reason"] == "ProbeRefused"
    # Kubernetes itself rejects link-local addresses in EndpointSlices, so the endpoint is not published at all
    assert slice_readiness(cluster, namespace, "meta") == {}
    assert "ProbeRefused" in cluster.kubectl("get", "serviceentries", "-n", namespace).stdout


def test_metrics_and_liveness(operator_running: OperatorProcess) -> None:
    text = operator_running.metrics()
    for name in (
        "beacon_probe_duration_seconds_bucket",
        "beacon_api_writes_total",
        "beacon_health_transitions_total",
        "beacon_probe_queue_depth",
    ):
        assert name in text, name


def test_removing_a_probed_test_host_sends_nothing_off_the_machine(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    """The hazard of issue "No packet leaves the machine", on purpose: a test host vanishes (its namespace and veth
    deleted, so its routes too) while the operator is still probing it. The guard route keeps every later probe on
    this machine: the endpoint turns not-ready, and a counting DROP rule of this test's own on the way off the
    machine counts 0 packets. (The suite's own egress counter, under CI, checks every other test the same way.)"""
    counter = EgressCounter(table=f"beacon_egress_test_{os.getpid()}")  # parallel runs do not share it
    if default_route_interface() is None:
        pytest.skip("no default route: nothing could leave this machine anyway")
    counter.install()
    try:
        stays = net.add_host()
        stays.http(port=8080, path="/healthz")
        doomed_net = TestNetwork()
        doomed_net.open()
        try:
            doomed = doomed_net.add_host()
            doomed.http(port=8080, path="/healthz")
            apply(cluster, entry("vanish", namespace, [stays.address, doomed.address], HTTP_CHECK))
            want = {stays.address: True, doomed.address: True}
            eventually(lambda: slice_readiness(cluster, namespace, "vanish") == want, what="both endpoints ready")
        finally:
            doomed_net.close()  # while the operator probes it
        failed_before = failed_http_probes(operator_running)
        want = {stays.address: True, doomed.address: False}
        eventually(
            lambda: slice_readiness(cluster, namespace, "vanish") == want,
            timeout=DETECTION_BUDGET,
            what="the vanished host published not-ready",
        )
        time.sleep(INTERVAL * 2)  # a few more probes towards the vanished address
        assert failed_http_probes(operator_running) >= failed_before + UNHEALTHY  # it really kept probing it
        assert guard_route_present()
        assert counter.count() == 0
    finally:
        counter.remove()


def failed_http_probes(operator: OperatorProcess) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith("beacon_probes_total{") and 'check="http"' in line and 'result="fail"' in line:
            return float(line.split()[-1])
    return 0.0


def test_one_endpoint_of_a_10000_endpoint_entry_costs_one_slice_write(
    cluster: DevCluster, namespace: str, operator_running: OperatorProcess, audit: Audit
) -> None:
    """Issue 8, item 4. Static endpoints stop at 1,000 per entry (the CRD's bound, which keeps its CEL cost in
    budget), so the 10,000 endpoints are selected pods. No health check: every endpoint counts healthy and
    nothing is probed, so the addresses (in the session's blackholed 198.18.0.0/16) are data only."""
    labels = {"app": "big"}
    base = ipaddress.IPv4Address("198.18.64.0")
    ips = {f"big-{i}": str(base + i) for i in range(10_000)}
    eventually(lambda: get_json(cluster, "serviceaccount", "-n", namespace, "default"), timeout=30, what="default SA")
    held = "big-5000"  # held by a finalizer once deleted: terminating (a flip), then gone (a removal)
    create_pods(cluster, namespace, {n: ip for n, ip in ips.items() if n != held}, labels=labels)
    create_pods(cluster, namespace, {held: ips[held]}, labels=labels, finalizers=["test.beacon.dev/hold"])
    apply(cluster, entry("big", namespace, [], None, selector={"matchLabels": labels}))

    def published() -> dict[str, bool] | None:
        readiness = slice_readiness(cluster, namespace, "big")
        return readiness if len(readiness) >= 10_000 else None

    readiness = eventually(published, timeout=120, interval=1, what="10,000 endpoints published")
    assert readiness == dict.fromkeys(ips.values(), True)
    assert len(slices(cluster, namespace, "big")) == 100
    time.sleep(2)  # the registry and status writes after the last slice

    def slice_writes_for(change: Callable[[], None], done: Callable[[dict[str, bool]], bool], what: str) -> list[str]:
        start = time.time()
        change()
        eventually(lambda: done(slice_readiness(cluster, namespace, "big")), timeout=30, interval=0.5, what=what)
        time.sleep(2)  # anything else the change would cause (a follow-up write, the registry)
        writes = audit.writes(since=start, namespace=namespace)
        return [
            f"{w['verb']} {w['objectRef'].get('name')}"
            for w in writes
            if w["objectRef"]["resource"] == "endpointslices"
        ]

    extra = str(base + 10_000)
    added = slice_writes_for(
        lambda: create_pods(cluster, namespace, {"big-extra": extra}, labels=labels),
        lambda seen: seen.get(extra) is True,
        "the new endpoint published",
    )
    assert len(added) == 1, f"adding one endpoint wrote {added}"

    flipped = slice_writes_for(
        lambda: cluster.kubectl("delete", "pod", held, "-n", namespace, "--wait=false"),
        lambda seen: seen.get(ips[held]) is False,
        "the terminating pod published not-ready",
    )
    assert len(flipped) == 1, f"flipping one endpoint wrote {flipped}"

    unhold = '{"metadata":{"finalizers":null}}'
    removed = slice_writes_for(
        lambda: cluster.kubectl("patch", "pod", held, "-n", namespace, "--type=merge", "-p", unhold),
        lambda seen: ips[held] not in seen,
        "the deleted pod gone from the slices",
    )
    assert len(removed) == 1, f"removing one endpoint wrote {removed}"
    assert len(slice_readiness(cluster, namespace, "big")) == 10_000

    # quiet logs (issue 8, item 5): some 20,000 pod events, and not one "Handler '...' succeeded." line
    log = operator_running.log_path.read_text(errors="replace").splitlines()
    assert [line for line in log if "Handler '" in line and "succeeded." in line] == []
    # the entry goes first, so that the namespace's 10,000 pods leave without a reconcile each
    cluster.kubectl("delete", "serviceentry", "big", "-n", namespace, "--wait=true", "--timeout=60s")
