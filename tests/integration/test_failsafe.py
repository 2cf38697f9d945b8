"""Discovery that fails safe, on the real control plane with endpoint servers on test hosts: self-preservation
through a partition of the operator's path to 1,000 endpoints, isolated failures that stay real around it, the
panic floor, and flap damping.

A partition is one nftables DROP rule inside the test network's namespace (`TestNetwork.partition`): links and
routes stay, so no probe leaves by another way. Durations and times are printed (`pytest -s`) for the record;
the assertions are about behaviour, with deadlines that leave margin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import (
    Audit,
    OperatorProcess,
    SliceWatch,
    apply,
    create_pods,
    eventually,
    get_json,
    http_service_entry,
    metric_value,
)

pytestmark = [pytest.mark.integration, pytest.mark.netns]

ENTRIES, PER_ENTRY = 100, 10
INTERVAL, THRESHOLD, TIMEOUT = 5, 2, 2
OUTAGE = 90.0


def _entry(name: str, namespace: str, addresses: list[str], **check: Any) -> dict[str, Any]:
    body = http_service_entry(name, namespace, addresses, interval=INTERVAL, threshold=THRESHOLD, timeout=TIMEOUT)
    body["spec"]["healthCheck"].update(check)
    return body


def _conditions(cluster: DevCluster, namespace: str) -> dict[str, dict[str, dict[str, Any]]]:
    """entry name -> condition type -> condition, for every ServiceEntry of `namespace`, in one request."""
    listed = get_json(cluster, "serviceentries", "-n", namespace) or {}
    return {
        item["metadata"]["name"]: {c["type"]: c for c in (item.get("status") or {}).get("conditions") or []}
        for item in listed.get("items", [])
    }


def _status(cluster: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    return dict((get_json(cluster, "serviceentry", "-n", namespace, name) or {}).get("status") or {})


def _active(operator: OperatorProcess) -> bool:
    return metric_value(operator.metrics(), "beacon_self_preservation_active") == 1


def test_a_partition_of_the_operators_path_withdraws_nothing_and_isolated_failures_stay_real(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    operator_running: OperatorProcess,
    resolve: Callable[[str], set[str]],
) -> None:
    hosts = net.add_hosts(ENTRIES * PER_ENTRY + 2)
    for host in hosts:
        host.http(port=8080, path="/healthz")
    static, pod_hosts = hosts[: ENTRIES * PER_ENTRY], hosts[ENTRIES * PER_ENTRY :]
    groups = {f"svc-{i:03d}": [h.address for h in static[i * PER_ENTRY : (i + 1) * PER_ENTRY]] for i in range(ENTRIES)}
    pods = {f"web-{i}": h.address for i, h in enumerate(pod_hosts)}
    eventually(
        lambda: get_json(cluster, "serviceaccount", "-n", namespace, "default") is not None,
        timeout=30,
        what="the namespace's default ServiceAccount (pods need it)",
    )
    create_pods(cluster, namespace, pods, labels={"app": "web"})
    selected = _entry("web", namespace, [])
    del selected["spec"]["endpoints"]
    selected["spec"]["selector"] = {"matchLabels": {"app": "web"}}
    with SliceWatch(cluster) as watch:
        bodies = [_entry(name, namespace, addresses) for name, addresses in groups.items()] + [selected]
        apply(cluster, {"apiVersion": "v1", "kind": "List", "items": bodies})
        every = [h.address for h in hosts]
        eventually(lambda: all(watch.ready(namespace, a) for a in every), timeout=120, what="all 1,002 endpoints ready")

        # outside self-preservation, one failing endpoint among 1,000 healthy ones is withdrawn as before
        lone = static[0]
        blocked_at = time.monotonic()
        lone.block()
        eventually(lambda: watch.ready(namespace, lone.address) is False, timeout=60, what="the lone failure out")
        took = (watch.first_not_ready(namespace, lone.address, after=blocked_at) or time.monotonic()) - blocked_at
        print(f"\n[failsafe] one failing endpoint among 1,000: withdrawn after {took:.1f} s")
        assert took <= INTERVAL * (THRESHOLD + 1) + TIMEOUT, took
        assert not _active(operator_running)
        lone.unblock()
        eventually(lambda: watch.ready(namespace, lone.address), timeout=30, what="the lone endpoint back")
        time.sleep(2)

        # the operator's path to every endpoint breaks for 90 s
        cut = time.monotonic()
        net.partition()
        try:
            eventually(lambda: _active(operator_running), timeout=30, what="self-preservation on")
            entered = time.monotonic() - cut
            print(f"[failsafe] partition of 1,002 endpoints: self-preservation on after {entered:.1f} s")
            # every entry ends up holding its endpoints, and says so (as soon as the first of its endpoints has
            # failed its threshold: the prober, whose probes now all wait out their timeout, takes a while)
            eventually(
                lambda: all(
                    c.get("SelfPreservation", {}).get("status") == "True"
                    for c in _conditions(cluster, namespace).values()
                ),
                timeout=OUTAGE - 15 - (time.monotonic() - cut),
                interval=1.0,
                what="every entry showing the SelfPreservation condition",
            )
            # what the spec and the cluster say is still published at once: an endpoint removed from the spec,
            # a deleted pod
            shrunk = groups["svc-001"][:-1]
            removed = groups["svc-001"][-1]
            apply(cluster, _entry("svc-001", namespace, shrunk))
            cluster.kubectl("delete", "pod", "web-0", "-n", namespace, "--wait=false")
            changed_at = time.monotonic()

            def gone() -> bool:
                slices = get_json(cluster, "endpointslices", "-n", namespace, "-l", "beacon.dev/service-entry")
                published = {
                    (item["metadata"]["labels"]["beacon.dev/service-entry"], a)
                    for item in (slices or {}).get("items", [])
                    for ep in item.get("endpoints") or []
                    for a in ep["addresses"]
                }
                return ("svc-001", removed) not in published and ("web", pods["web-0"]) not in published

            eventually(gone, timeout=10, what="the removed endpoint and the deleted pod out of the slices")
            took = time.monotonic() - changed_at
            print(f"[failsafe] in the mode, a spec removal and a pod deletion published in {took:.1f} s")
            # CoreDNS answers with every endpoint of every entry
            for name, addresses in groups.items():
                want = set(shrunk) if name == "svc-001" else set(addresses)
                assert resolve(f"{name}.{namespace}.svc.cluster.local") == want, name
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - cut)))
            for name, addresses in list(groups.items())[:10]:
                want = set(shrunk) if name == "svc-001" else set(addresses)
                assert resolve(f"{name}.{namespace}.svc.cluster.local") == want, name
        finally:
            net.heal()
        healed = time.monotonic()
        eventually(lambda: not _active(operator_running), timeout=60, what="self-preservation off")
        left = time.monotonic() - healed
        eventually(
            lambda: not any("SelfPreservation" in c for c in _conditions(cluster, namespace).values()),
            timeout=INTERVAL * 4 + TIMEOUT * 8,
            what="the SelfPreservation condition cleared everywhere",
        )
        cleared = time.monotonic() - healed
        time.sleep(INTERVAL * 2)
        # the deleted pod may first be published terminating (not ready): that is the fact, published at once
        flips = [f for f in watch.flips(namespace, since=cut) if f[0] != pods["web-0"]]
    print(
        f"[failsafe] healed: self-preservation off after {left:.1f} s, every entry's condition cleared after "
        f"{cleared:.1f} s"
    )
    assert flips == [], f"endpoints published not ready during or after the partition: {flips[:10]}"
    assert all(watch.ready(namespace, a) for a in every if a not in (removed, pods["web-0"]))


def test_panic_floor_publishes_every_endpoint_below_it_and_only_the_healthy_above(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    operator_running: OperatorProcess,
    resolve: Callable[[str], set[str]],
) -> None:
    hosts = net.add_hosts(4)
    servers = [h.http(port=8080, path="/healthz") for h in hosts]
    addresses = {h.address for h in hosts}
    apply(
        cluster,
        _entry("floor", namespace, sorted(addresses), minHealthyPercent=50, intervalSeconds=2, timeoutSeconds=1),
    )
    fqdn = f"floor.{namespace}.svc.cluster.local"
    eventually(lambda: resolve(fqdn) == addresses, timeout=30, what="all 4 in DNS")
    for server in servers[1:]:
        server.set_healthy(False)

    def in_panic() -> bool:
        status = _status(cluster, namespace, "floor")
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        return (
            conditions.get("Panic", {}).get("status") == "True"
            and status.get("readySummary") == "1/4"
            and status.get("healthyEndpoints") == 1
        )

    eventually(in_panic, timeout=30, what="Panic=True with 1/4 healthy")
    status = _status(cluster, namespace, "floor")
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["reason"] == "Panic", ready
    assert resolve(fqdn) == addresses, "in panic, DNS answers with all 4"
    eventually(
        lambda: any(
            '"panic":true' in value
            for value in (
                (get_json(cluster, "configmap", "-n", namespace, "beacon-registry") or {}).get("data") or {}
            ).values()
        ),
        timeout=10,
        what="the registry marking the entry in panic",
    )

    servers[1].set_healthy(True)
    back = {hosts[0].address, hosts[1].address}
    eventually(lambda: resolve(fqdn) == back, timeout=30, what="out of panic: only the 2 healthy in DNS")
    conditions = {c["type"]: c for c in _status(cluster, namespace, "floor")["conditions"]}
    assert conditions["Panic"]["status"] == "False", conditions["Panic"]


DAMPING_HALF_LIFE, DAMPING_MAX_SUPPRESS = 30, 120
FLAP_WINDOW = 600.0


@pytest.mark.timeout(FLAP_WINDOW + DAMPING_MAX_SUPPRESS + 240)
def test_a_flapping_endpoint_is_suppressed_and_costs_a_bounded_number_of_writes(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, audit: Audit
) -> None:
    steady, flappy = net.add_hosts(2)
    steady.http(port=8080, path="/healthz")
    server = flappy.http(port=8080, path="/healthz")
    body = _entry(
        "flappy",
        namespace,
        [steady.address, flappy.address],
        intervalSeconds=2,
        timeoutSeconds=1,
        healthyThreshold=1,
        unhealthyThreshold=1,
        connectionLossHints=False,
        flapDamping={"halfLifeSeconds": DAMPING_HALF_LIFE, "maxSuppressSeconds": DAMPING_MAX_SUPPRESS},
    )
    with SliceWatch(cluster) as watch:
        apply(cluster, body)
        eventually(
            lambda: watch.ready(namespace, steady.address) and watch.ready(namespace, flappy.address),
            timeout=30,
            what="both endpoints ready",
        )
        time.sleep(3)
        start = time.time()
        server.set_cycle([503, 200])  # fail, pass, fail, ...: a transition at every probe
        time.sleep(FLAP_WINDOW)
        writes = audit.writes(since=start, namespace=namespace)
        status = _status(cluster, namespace, "flappy")
        states = {e["address"]: e["state"] for e in status.get("endpoints") or []}
        server.set_cycle([])  # stable (passing) from now on
        stable_at = time.monotonic()
        eventually(
            lambda: watch.ready(namespace, flappy.address),
            timeout=DAMPING_MAX_SUPPRESS + 2 * 2 + 15,
            what="the endpoint released once its penalty decayed",
        )
        released = time.monotonic() - stable_at
    kinds: dict[str, int] = {}
    for w in writes:
        ref = w.get("objectRef") or {}
        kind = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
        kinds[kind] = kinds.get(kind, 0) + 1
    print(
        f"\n[failsafe] flapping for {FLAP_WINDOW:.0f} s at every probe: {len(writes)} writes {kinds}; released "
        f"{released:.0f} s after it turned stable (bound {DAMPING_MAX_SUPPRESS} s + one interval)"
    )
    assert states.get(flappy.address) == "Flapping", states
    assert len(writes) <= 15, kinds
    assert released <= DAMPING_MAX_SUPPRESS + 2 * 2 + 15
