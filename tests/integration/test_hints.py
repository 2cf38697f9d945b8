"""Connection-loss hints on the real control plane: a crashed server leaves DNS within a second, a server that
closes idle connections on purpose never flips, a silent host is still caught by the interval, and a mass restart
stays within the global hint budget.

Why it exists: the unit tests (tests/unit/test_hints.py) prove the prober's and the checker's rules on loopback;
these prove what a user sees. Every endpoint is a real server on a test host, probed by the operator process over
its keep-alive connections; a crash is a SIGKILL of the server process (the kernel closes its sockets, as it does
for a real backend), a silent host is a DROP rule inside the test host's namespace (no FIN, no RST), and readiness
is read where clients read it: CoreDNS's answer and the EndpointSlice watch. The health check is the one the issue
names: interval 10 s, unhealthyThreshold 3. Timings are printed (`pytest -s`); only the stated bounds are asserted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import (
    OperatorProcess,
    SliceWatch,
    apply,
    eventually,
    get_json,
    http_service_entry,
    metric_value,
)

pytestmark = [pytest.mark.integration, pytest.mark.netns]

INTERVAL = 10
THRESHOLD = 3
TIMEOUT = 1
JITTER = 0.1  # the prober spreads each interval by +-10%


def entry(name: str, namespace: str, addresses: list[str], **check: Any) -> dict[str, Any]:
    body = http_service_entry(name, namespace, addresses, interval=INTERVAL, threshold=THRESHOLD, timeout=TIMEOUT)
    body["spec"]["healthCheck"].update(check)
    return body


def counters(op: OperatorProcess) -> dict[str, float]:
    """The operator's hint and health counters, read at once."""
    text = op.metrics()
    return {
        "loss": metric_value(text, "beacon_detections_total", {"trigger": "connection-loss"}),
        "interval": metric_value(text, "beacon_detections_total", {"trigger": "interval"}),
        "hint_probes": metric_value(text, "beacon_hint_probes_total"),
        "dropped_global": metric_value(text, "beacon_hints_dropped_total", {"limit": "global"}),
        "dropped_endpoint": metric_value(text, "beacon_hints_dropped_total", {"limit": "endpoint"}),
        "transitions": metric_value(text, "beacon_health_transitions_total"),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def event_messages(cluster: DevCluster, namespace: str, reason: str) -> list[str]:
    items = (get_json(cluster, "events", "-n", namespace) or {}).get("items", [])
    return [str(e.get("message", "")) for e in items if e.get("reason") == reason]


def test_crashed_server_leaves_the_dns_answer_within_a_second(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    operator_running: OperatorProcess,
    resolve: Callable[[str], set[str]],
) -> None:
    stable = net.add_host()
    (crashing,) = net.add_hosts(1, own_process=True)
    stable.http(port=8080, path="/healthz")
    crashing.http(port=8080, path="/healthz")
    apply(cluster, entry("web", namespace, [stable.address, crashing.address]))
    fqdn = f"web.{namespace}.svc.cluster.local"
    both = {stable.address, crashing.address}
    eventually(lambda: resolve(fqdn) == both, timeout=30, what="DNS answering both endpoints")
    time.sleep(0.5)  # the first probes' connections are back in the prober's pool, idle
    before = counters(operator_running)

    killed_at = crashing.crash()
    left_at = math.nan
    while time.monotonic() - killed_at < INTERVAL * THRESHOLD * 2:
        answer = resolve(fqdn)  # an empty answer is a failed query, not the crashed endpoint leaving
        if answer == {stable.address}:
            left_at = time.monotonic()
            break
        time.sleep(0.01)
    took = left_at - killed_at
    print(f"\n[hints] SIGKILL -> out of CoreDNS's answer in {took:.3f} s")
    assert took <= 1.0, f"the crashed endpoint left the DNS answer after {took:.3f} s (bound 1 s)"
    moved = delta(counters(operator_running), before)
    assert moved["loss"] == 1, moved
    assert moved["interval"] == 0, moved
    eventually(
        lambda: any(
            "after the connection was lost" in m for m in event_messages(cluster, namespace, "EndpointUnhealthy")
        ),
        timeout=10,
        what="an EndpointUnhealthy Event naming the connection loss",
    )


def test_server_closing_idle_connections_stays_ready_without_flips(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    host = net.add_host()
    server = host.http(port=8080, path="/healthz", keepalive=1.0)
    apply(cluster, entry("closer", namespace, [host.address]))
    window = 60.0
    with SliceWatch(cluster) as watch:
        eventually(lambda: watch.ready(namespace, host.address), timeout=30, what="the endpoint ready")
        start, served, before = time.monotonic(), server.counters(), counters(operator_running)
        time.sleep(window)
        elapsed = time.monotonic() - start
        served_after, after = server.counters(), counters(operator_running)
        changes = watch.changes(namespace, host.address, since=start)
        ready_now = watch.ready(namespace, host.address)
    moved = delta(after, before)
    closes = served_after["closes"] - served["closes"]
    probes = served_after["requests"] - served["requests"]
    # without hints: one probe per interval, the shortest interval being INTERVAL * (1 - JITTER)
    interval_probes = math.ceil(elapsed / (INTERVAL * (1 - JITTER))) + 1
    print(
        f"\n[hints] {elapsed:.0f} s of a server closing idle connections after 1 s: {closes} closes, {probes} probes"
        f" at the server, {moved['hint_probes']:.0f} hint probes, {moved['dropped_endpoint']:.0f} hints dropped"
        " by the per-endpoint gap"
    )
    assert closes >= elapsed / (INTERVAL * (1 + JITTER)) - 1, "the server closed idle connections all along"
    assert moved["hint_probes"] >= 1, "the closes were seen as hints and answered with probes"
    assert changes == [], f"the EndpointSlice moved: {changes}"
    assert ready_now is True
    assert moved["transitions"] == 0, moved
    assert moved["loss"] == 0, moved
    assert moved["interval"] == 0, moved
    assert event_messages(cluster, namespace, "EndpointUnhealthy") == []
    assert event_messages(cluster, namespace, "EndpointHealthy") == []
    # at most one extra probe per close, counted by the operator and at the server
    assert moved["hint_probes"] <= closes, moved
    assert probes <= interval_probes + closes, (probes, interval_probes, closes)


def test_silent_host_is_still_caught_by_the_interval(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    silent, stable = net.add_hosts(2)
    silent.http(port=8080, path="/healthz")
    stable.http(port=8080, path="/healthz")
    apply(cluster, entry("quiet", namespace, [silent.address, stable.address]))
    with SliceWatch(cluster) as watch:
        eventually(
            lambda: watch.ready(namespace, silent.address) and watch.ready(namespace, stable.address),
            timeout=30,
            what="both endpoints ready",
        )
        time.sleep(0.5)
        before = counters(operator_running)
        silenced_at = time.monotonic()
        silent.block()  # every packet to it dropped inside its namespace: no FIN, no RST, the link stays up
        caught_at = eventually(
            lambda: watch.first_not_ready(namespace, silent.address, after=silenced_at),
            timeout=INTERVAL * THRESHOLD * (1 + JITTER) + TIMEOUT + 30,
            interval=0.05,
            what="the silent endpoint not-ready",
        )
        moved = delta(counters(operator_running), before)
        stable_changes = watch.changes(namespace, stable.address, since=silenced_at)
    took = caught_at - silenced_at
    # THRESHOLD failing probes, each started at least INTERVAL * (1 - JITTER) after the one before, the first
    # after the silence began; the last fails only at its timeout. Anything earlier was not the interval
    floor = (THRESHOLD - 1) * INTERVAL * (1 - JITTER) + TIMEOUT
    ceiling = THRESHOLD * INTERVAL * (1 + JITTER) + TIMEOUT + 5  # + the write and the watch, on a busy machine
    print(f"\n[hints] silent host not-ready after {took:.1f} s (floor {floor:.1f} s, ceiling {ceiling:.1f} s)")
    assert moved["hint_probes"] == 0, f"a silent host gives no hint: {moved}"
    assert moved["loss"] == 0, moved
    assert moved["interval"] == 1, moved
    assert floor - 0.1 <= took <= ceiling
    assert stable_changes == [], "the other endpoint stayed ready"


def test_restart_of_200_servers_stays_within_the_global_hint_budget(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    beacon_operator: OperatorProcess,
    operator_kubeconfig: Path,
    tmp_path: Path,
) -> None:
    burst, rate, count, per_entry = 20, 5.0, 200, 10
    beacon_operator.stop()  # the next test that needs it starts it again (operator_running)
    op = OperatorProcess(
        cluster=cluster,
        kubeconfig=operator_kubeconfig,
        log_dir=tmp_path,
        extra_args=("--resync-seconds=0", f"--hint-burst={burst}", f"--hint-rate={rate:g}"),
    )
    op.start()
    try:
        hosts = net.add_hosts(count, own_process=True)  # one server process for all 200: it crashes as one
        for host in hosts:
            host.http(port=8080, path="/healthz")
        addresses = [h.address for h in hosts]
        for i in range(0, count, per_entry):
            apply(cluster, entry(f"fleet-{i // per_entry:02d}", namespace, addresses[i : i + per_entry]))
        with SliceWatch(cluster) as watch:
            eventually(
                lambda: all(watch.ready(namespace, a) for a in addresses),
                timeout=60,
                what="all 200 endpoints ready",
            )
            time.sleep(1.0)
            last_probe = {a: t for t, a, _ in net.probe_log()}  # each endpoint's last probe before the crash
            before = counters(op)
            killed_at = hosts[0].crash()  # 200 servers at once: 200 idle probe connections closed at once
            time.sleep(1.0)  # down long enough for every hint sequence to end at its threshold (3 x 0.1 s apart)
            after = counters(op)
            elapsed = time.monotonic() - killed_at
            hosts[0].revive()
            revived_at = time.monotonic()
            eventually(
                lambda: all(watch.ready(namespace, a) for a in addresses),
                timeout=INTERVAL * (1 + JITTER) + 30,
                what="all 200 endpoints ready again",
            )
            flipped = {a for a, _ in watch.flips(namespace, since=killed_at)}
            first_probe = {a: t for t, a, _ in net.probe_log(since=revived_at, first_only=True)}
    finally:
        op.stop()  # before the test network goes (the net fixture closes it after this)
    moved = delta(after, before)
    budget = burst + rate * elapsed
    hinted = moved["loss"]  # a hint answered: its sequence met a dead server THRESHOLD times, a detection each
    answered_or_dropped = hinted + moved["dropped_global"] + moved["dropped_endpoint"]
    print(
        f"\n[hints] 200 servers crashed: {hinted:.0f} hints answered ({moved['hint_probes']:.0f} probes),"
        f" {moved['dropped_global']:.0f} dropped by the global bucket, budget {budget:.1f} over {elapsed:.2f} s;"
        f" {len(flipped)} endpoints flipped"
    )
    assert 1 <= hinted <= budget, moved
    assert moved["hint_probes"] <= THRESHOLD * budget, moved
    assert moved["interval"] == 0, moved
    # every close was a hint (but for a connection with a probe on it at the crash: a rare one or two)
    assert count - 2 <= answered_or_dropped <= count, moved
    assert moved["dropped_global"] >= count - budget - 2, "the hints beyond the budget were dropped, and counted"
    assert len(flipped) == hinted, "exactly the answered hints turned their endpoints not-ready"
    # the others stayed on their interval: no probe of them before an interval after their last one
    early = {
        a: round(first_probe[a] - last_probe[a], 2)
        for a in addresses
        if a not in flipped and a in first_probe and first_probe[a] < last_probe[a] + INTERVAL * (1 - JITTER) - 0.05
    }
    assert early == {}, f"endpoints whose hint was dropped probed before their interval: {early}"
