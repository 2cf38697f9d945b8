"""Discovery benchmark: N ServiceEntries x M endpoints on the local control plane, real servers on a test host.

Why it exists: speed is measured, never asserted. This prints and saves (bench/results/discovery.json and .md)
the figures the README quotes: apply -> outputs written (p50/p99), failure -> EndpointSlice not-ready beyond the
floor of interval x unhealthyThreshold (p50/p99), probes per second, the operator's CPU seconds and RSS, and API
writes per minute in steady state (from the apiserver's audit log).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchlib import markdown_table, pct, save
from kubernetes import client, config, watch

from beacon_dev.devcluster import DevCluster
from beacon_dev.netguard import GuardRoute
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import Audit, OperatorProcess, http_service_entry

BENCH_USER = "beacon-bench-operator"
NS = "bench"


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return cpu, rss


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


class SliceWatch:
    """Records, from a watch on EndpointSlices, when each entry first had all endpoints ready and when each
    address was first seen not ready."""

    def __init__(self, api: client.DiscoveryV1Api, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.all_ready_at: dict[str, float] = {}
        self.not_ready_seen: list[tuple[str, float]] = []
        self.expected: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def first_not_ready(self, address: str, *, after: float) -> float | None:
        return next((t for a, t in list(self.not_ready_seen) if a == address and t >= after), None)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:
            if not self._stop.is_set():
                raise

    def _watch(self) -> None:
        w = watch.Watch()
        for event in w.stream(self.api.list_namespaced_endpoint_slice, self.namespace, timeout_seconds=0):
            now = time.monotonic()
            item = event["object"]
            name = (item.metadata.labels or {}).get("kubernetes.io/service-name")
            ready = 0
            for ep in item.endpoints or []:
                if ep.conditions and ep.conditions.ready:
                    ready += 1
                else:
                    self.not_ready_seen.extend((address, now) for address in ep.addresses)
            if name and name not in self.all_ready_at and ready >= self.expected.get(name, 1 << 30):
                self.all_ready_at[name] = now
            if self._stop.is_set():
                w.stop()
                return


def run(*, entries: int, per_entry: int, interval: int, threshold: int, failures: int, steady: float) -> dict[str, Any]:
    results: dict[str, Any] = {
        "entries": entries,
        "endpoints_per_entry": per_entry,
        "interval_seconds": interval,
        "unhealthy_threshold": threshold,
    }
    # exits in reverse: the operator stops before the test network goes, inside the guard route
    with GuardRoute(), DevCluster() as cluster, TestNetwork() as net, contextlib.ExitStack() as stack:
        cluster.kubectl("apply", "--server-side", "-k", str(Path(__file__).resolve().parents[1] / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/serviceentries.beacon.dev", "crd/configentries.beacon.dev"
        )
        cluster.kubectl("create", "namespace", NS)
        kubeconfig = cluster.client_kubeconfig(user=BENCH_USER, groups=("system:masters",))
        api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        custom = client.CustomObjectsApi(api_client)
        t0 = time.monotonic()
        hosts = net.add_hosts(entries * per_entry)
        servers = [h.http(port=8080, path="/healthz") for h in hosts]
        results["test_hosts_setup_seconds"] = round(time.monotonic() - t0, 2)

        operator = OperatorProcess(cluster=cluster, kubeconfig=kubeconfig, log_dir=cluster.workdir)
        operator.start()
        stack.callback(operator.stop)
        assert operator.proc is not None
        sw = SliceWatch(client.DiscoveryV1Api(api_client), NS)
        sw.start()
        time.sleep(1)

        applied_at: dict[str, float] = {}
        for i in range(entries):
            name = f"svc-{i:04d}"
            block = hosts[i * per_entry : (i + 1) * per_entry]
            body = http_service_entry(name, NS, [h.address for h in block], interval=interval, threshold=threshold)
            sw.expected[name] = per_entry
            custom.create_namespaced_custom_object("beacon.dev", "v1alpha1", NS, "serviceentries", body)
            applied_at[name] = time.monotonic()
        deadline = time.monotonic() + 300
        while len(sw.all_ready_at) < entries and time.monotonic() < deadline:
            time.sleep(0.2)
        latencies = [sw.all_ready_at[n] - applied_at[n] for n in applied_at if n in sw.all_ready_at]
        results["apply_to_outputs_ready"] = {
            "n": len(latencies),
            "p50_s": round(pct(latencies, 0.5), 3),
            "p99_s": round(pct(latencies, 0.99), 3),
            "note": "ServiceEntry created -> its EndpointSlice shows every endpoint ready (first probe within 1 s)",
        }

        # failures: one endpoint in each of `failures` entries goes down
        time.sleep(interval * 2)
        victims = [servers[i * per_entry] for i in range(min(failures, entries))]
        stopped_at: dict[str, float] = {}
        for server in victims:
            server.stop()
            stopped_at[server.address] = time.monotonic()
        floor = interval * threshold
        deadline = time.monotonic() + floor * 3 + 30
        seen: dict[str, float] = {}
        while len(seen) < len(stopped_at) and time.monotonic() < deadline:
            for address, at in stopped_at.items():
                when = sw.first_not_ready(address, after=at)
                if when is not None:
                    seen[address] = when
            time.sleep(0.2)
        beyond = [seen[a] - stopped_at[a] - floor for a in seen]
        results["failure_to_not_ready_beyond_floor"] = {
            "n": len(beyond),
            "floor_s": floor,
            "p50_s": round(pct(beyond, 0.5), 3),
            "p99_s": round(pct(beyond, 0.99), 3),
            "note": "server stopped -> slice not-ready, minus interval x unhealthyThreshold; "
            "negative: the first failing probe came before a full interval elapsed",
        }

        # steady state
        time.sleep(interval * (threshold + 1))
        audit = Audit(cluster, BENCH_USER)
        probes0 = metric(operator.metrics_port, 'beacon_probes_total{check="http"')
        cpu0, _ = proc_stats(operator.proc.pid)
        start_wall, start = time.time(), time.monotonic()
        time.sleep(steady)
        elapsed = time.monotonic() - start
        probes1 = metric(operator.metrics_port, 'beacon_probes_total{check="http"')
        cpu1, rss = proc_stats(operator.proc.pid)
        writes = audit.writes(since=start_wall)
        results["steady_state"] = {
            "window_s": round(elapsed, 1),
            "probes_per_second": round((probes1 - probes0) / elapsed, 1),
            "operator_cpu_seconds_per_minute": round((cpu1 - cpu0) / elapsed * 60, 2),
            "operator_rss_mib": round(rss, 1),
            "api_writes_per_minute": round(len(writes) / elapsed * 60, 2),
        }
        results["operator_cpu_seconds_total"] = round(cpu1, 2)
        sw.stop()
        operator.stop()
    return results


def table(results: dict[str, Any]) -> str:
    a = results["apply_to_outputs_ready"]
    f = results["failure_to_not_ready_beyond_floor"]
    s = results["steady_state"]
    rows = [
        ("entries x endpoints", f"{results['entries']} x {results['endpoints_per_entry']}"),
        ("apply -> outputs ready p50 / p99", f"{a['p50_s']} s / {a['p99_s']} s (n={a['n']})"),
        (
            f"failure -> not-ready beyond the {f['floor_s']} s floor p50 / p99",
            f"{f['p50_s']} s / {f['p99_s']} s (n={f['n']})",
        ),
        ("probes per second (steady)", f"{s['probes_per_second']}"),
        ("operator CPU seconds per minute (steady)", f"{s['operator_cpu_seconds_per_minute']}"),
        ("operator RSS", f"{s['operator_rss_mib']} MiB"),
        ("API writes per minute (steady)", f"{s['api_writes_per_minute']}"),
    ]
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--failures", type=int, default=50)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    args = parser.parse_args()
    results = run(
        entries=args.entries,
        per_entry=args.endpoints,
        interval=args.interval,
        threshold=args.threshold,
        failures=args.failures,
        steady=args.steady_seconds,
    )
    save("discovery", results, table(results))


if __name__ == "__main__":
    main()
