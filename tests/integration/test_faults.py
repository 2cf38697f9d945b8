"""Fault tests: what real clusters do to operators. SIGKILL at random moments, the apiserver and etcd restarting
underneath, watches ending in 410 Gone, and a flapping endpoint. Convergence times and write counts are printed
(`pytest -s`) for the record; the assertions are about behaviour only."""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from typing import Any

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestHost, TestNetwork
from beacon_dev.testing import Audit, OperatorProcess, apply, eventually, get_json, http_service_entry

pytestmark = [pytest.mark.integration, pytest.mark.netns, pytest.mark.faults]

INTERVAL = 2


def _entry(name: str, namespace: str, addresses: list[str], **check: Any) -> dict[str, Any]:
    body = http_service_entry(name, namespace, addresses, interval=INTERVAL, threshold=2)
    body["spec"]["healthCheck"].update({"healthyThreshold": 1, **check})
    return body


def _published(cluster: DevCluster, namespace: str) -> dict[tuple[str, str], dict[str, bool]]:
    """(entry name, owner uid) -> {address: ready} from every beacon EndpointSlice in the namespace."""
    data = get_json(cluster, "endpointslices", "-n", namespace, "-l", "endpointslice.kubernetes.io/managed-by") or {}
    out: dict[tuple[str, str], dict[str, bool]] = {}
    for item in data.get("items", []):
        owner = (item["metadata"].get("ownerReferences") or [{}])[0].get("uid", "")
        key = (item["metadata"]["labels"]["kubernetes.io/service-name"], owner)
        for ep in item.get("endpoints") or []:
            for address in ep["addresses"]:
                out.setdefault(key, {})[address] = bool(ep["conditions"].get("ready"))
    return out


def _metric_sum(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


class ReadyWatch:
    """Polls the published slices; flags any endpoint seen ready and later not-ready under the same owner."""

    def __init__(self, cluster: DevCluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.seen_ready: set[tuple[str, str]] = set()
        self.violations: list[tuple[str, str]] = []
        self.exempt: set[tuple[str, str]] = set()  # (owner uid, address) legitimately going not-ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for (_, uid), endpoints in _published(self.cluster, self.namespace).items():
                for address, ready in endpoints.items():
                    key = (uid, address)
                    if ready:
                        self.seen_ready.add(key)
                    elif key in self.seen_ready and key not in self.exempt:
                        self.violations.append(key)
            time.sleep(0.1)


def test_sigkill_during_100_operations_converges_without_loss(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    rng = random.Random(20261121)
    pool: list[TestHost] = net.add_hosts(400)
    for host in pool:
        host.http(port=8080, path="/healthz")
    fresh = iter(pool)
    spec: dict[str, list[str]] = {}  # the intended state: entry -> addresses
    kills = 0
    t0 = time.monotonic()
    with ReadyWatch(cluster, namespace) as watch:
        for op in range(100):
            choice = rng.random()
            if not spec or choice < 0.4:
                name = f"e{op:03d}"
                spec[name] = [next(fresh).address for _ in range(rng.randint(1, 4))]
            elif choice < 0.8:
                name = rng.choice(sorted(spec))
                if len(spec[name]) > 1 and rng.random() < 0.5:
                    spec[name] = spec[name][1:]  # drop the oldest; addresses are never reused
                else:
                    spec[name] = [*spec[name], next(fresh).address]
            else:
                name = rng.choice(sorted(spec))
                del spec[name]
                cluster.kubectl("delete", "serviceentry", name, "-n", namespace, "--wait=false")
                name = ""
            if name:
                apply(cluster, _entry(name, namespace, spec[name]))
            if rng.random() < 0.12:
                time.sleep(rng.uniform(0, 1.5))
                operator_running.restart(signal.SIGKILL)
                kills += 1
        converge_start = time.monotonic()

        def converged() -> bool:
            published = _published(cluster, namespace)
            by_name = {name: eps for (name, _), eps in published.items()}
            if set(by_name) != set(spec) or len(published) != len(spec):
                return False
            return all(by_name[n] == dict.fromkeys(spec[n], True) for n in spec)

        eventually(converged, timeout=120, interval=0.5, what="slices converge to the intended entries")
        converge_seconds = time.monotonic() - converge_start

    assert kills >= 5, "the sequence should kill the operator several times"
    assert watch.violations == [], f"healthy endpoints published not-ready: {watch.violations[:5]}"
    # nothing duplicated: exactly one Service, one Endpoints, one slice per entry (all < 100 endpoints)
    services = get_json(cluster, "services", "-n", namespace)["items"]
    assert sorted(s["metadata"]["name"] for s in services) == sorted(spec)
    slices = get_json(cluster, "endpointslices", "-n", namespace, "-l", "endpointslice.kubernetes.io/managed-by")
    assert len(slices["items"]) == len(spec)

    def registry_ok() -> bool:
        cm = get_json(cluster, "configmap", "-n", namespace, "beacon-registry")
        if cm is None:
            return False
        import json

        services = json.loads(cm["data"]["registry.json"])["services"]
        return set(services) == set(spec) and all(
            {e["address"] for e in services[n]["endpoints"]} == set(spec[n]) for n in spec
        )

    eventually(registry_ok, timeout=30, what="registry lists exactly the intended entries and endpoints")
    for name, addresses in spec.items():
        st = get_json(cluster, "serviceentry", "-n", namespace, name)["status"]
        assert st["readySummary"] == f"{len(addresses)}/{len(addresses)}"
    print(
        f"\n[faults] 100 operations, {kills} SIGKILLs, {time.monotonic() - t0:.1f}s;"
        f" converged {converge_seconds:.1f}s after the last"
    )


def test_apiserver_and_etcd_restart_under_the_operator(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess
) -> None:
    hosts = net.add_hosts(3)
    servers = [h.http(port=8080, path="/healthz") for h in hosts]
    apply(cluster, _entry("before", namespace, [h.address for h in hosts[:2]]))
    eventually(
        lambda: (
            _published(cluster, namespace) and all(all(v.values()) for v in _published(cluster, namespace).values())
        ),
        timeout=20,
        what="first entry ready",
    )

    t0 = time.monotonic()
    cluster.restart("etcd")
    cluster.restart("kube-apiserver")
    restarted = time.monotonic() - t0
    # changes after the restart must be seen through the resumed watches and the probe results published
    servers[0].stop()
    apply(cluster, _entry("after", namespace, [hosts[2].address]))
    t1 = time.monotonic()

    def converged() -> bool:
        by_name = {name: eps for (name, _), eps in _published(cluster, namespace).items()}
        return by_name.get("before") == {hosts[0].address: False, hosts[1].address: True} and by_name.get("after") == {
            hosts[2].address: True
        }

    eventually(converged, timeout=60, what="operator converges after etcd + apiserver restarts")
    print(f"\n[faults] etcd+apiserver restart took {restarted:.1f}s; converged {time.monotonic() - t1:.1f}s later")
    assert servers  # keep the servers referenced until the end


def test_watch_gap_with_410_gone_is_repaired(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    beacon_operator: OperatorProcess,
    operator_kubeconfig: Any,
    tmp_path: Any,
) -> None:
    """The operator is frozen while entries are deleted and created, the apiserver restarts (its watch cache starts
    afresh, so the old resourceVersions are gone), then the operator resumes: kopf's watches get 410 Gone and
    relist, and beacon's resync drops what was deleted during the gap."""
    beacon_operator.stop()
    op = OperatorProcess(
        cluster=cluster, kubeconfig=operator_kubeconfig, log_dir=tmp_path, extra_args=("-v", "--resync-seconds=5")
    )
    op.start()
    try:
        a, b = net.add_hosts(2)
        a.http(port=8080, path="/healthz")
        b.http(port=8080, path="/healthz")
        apply(cluster, _entry("doomed", namespace, [a.address]))
        eventually(lambda: get_json(cluster, "configmap", "-n", namespace, "beacon-registry"), timeout=20)
        assert op.proc is not None
        op.proc.send_signal(signal.SIGSTOP)
        try:
            cluster.kubectl("delete", "serviceentry", "doomed", "-n", namespace)
            apply(cluster, _entry("newborn", namespace, [b.address]))
            for i in range(30):  # move resourceVersions well past what the operator saw
                cluster.kubectl("create", "configmap", f"churn-{i}", "-n", namespace)
            cluster.restart("kube-apiserver")
        finally:
            op.proc.send_signal(signal.SIGCONT)

        def repaired() -> bool:
            cm = get_json(cluster, "configmap", "-n", namespace, "beacon-registry")
            if cm is None:
                return False
            import json

            services = json.loads(cm["data"]["registry.json"])["services"]
            return set(services) == {"newborn"} and [e["address"] for e in services["newborn"]["endpoints"]] == [
                b.address
            ]

        eventually(repaired, timeout=60, what="registry without the entry deleted during the gap")
        logs = op.logs()
        print(
            "\n[faults] 410 Gone seen:", "Restarting the watch-stream" in logs, "| resync repaired:", "resync: " in logs
        )
        assert "Restarting the watch-stream" in logs or "resync: " in logs
    finally:
        op.stop()


def test_flapping_endpoint_causes_bounded_writes(
    cluster: DevCluster, namespace: str, net: TestNetwork, operator_running: OperatorProcess, audit: Audit
) -> None:
    steady, flappy = net.add_hosts(2)
    steady.http(port=8080, path="/healthz")
    server = flappy.http(port=8080, path="/healthz")
    healthy_threshold, unhealthy_threshold = 2, 2
    body = _entry("flap", namespace, [steady.address, flappy.address], healthyThreshold=healthy_threshold)
    body["spec"]["healthCheck"]["unhealthyThreshold"] = unhealthy_threshold
    apply(cluster, body)
    eventually(
        lambda: (
            {k[0]: v for k, v in _published(cluster, namespace).items()}.get("flap")
            == {steady.address: True, flappy.address: True}
        ),
        timeout=20,
    )
    time.sleep(2)
    before = operator_running.metrics()
    start = time.time()
    window = 30.0
    deadline = time.monotonic() + window
    up = True
    while time.monotonic() < deadline:
        time.sleep(0.5)
        up = not up
        (server.start if up else server.stop)()
    server.start()
    writes = audit.writes(since=start, namespace=namespace)
    after = operator_running.metrics()
    transitions = _metric_sum(after, "beacon_health_transitions_total") - _metric_sum(
        before, "beacon_health_transitions_total"
    )
    # each probe of the flapping endpoint sees up or down at random; with thresholds of 2, a transition needs
    # 2 agreeing probes in a row, so at most one transition per 2 probes; probes come every interval - 10%
    max_probes = math.ceil(window / (INTERVAL * 0.9)) + 1
    max_transitions = math.ceil(max_probes / min(healthy_threshold, unhealthy_threshold))
    # per transition at most: EndpointSlice, Endpoints, status, registry, Event
    bound = 5 * max_transitions
    print(f"\n[faults] flapping 30s: {len(writes)} writes, {transitions:.0f} transitions (bound {bound} writes)")
    assert transitions <= max_transitions
    assert len(writes) <= bound, [w["objectRef"] for w in writes]
