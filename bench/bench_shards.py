"""Sharded benchmark: three `--shard` replicas serving 3,000 ServiceEntries x 10 endpoints (30,000) @ 10 s.

Why it exists: issue 10 asks whether the work spreads over replicas and whether a replica's death is survived
quickly and without flapping endpoints. On the local control plane, with real HTTP servers on a loopback-mode test
network, this measures:

* balance: each replica's CPU over a steady window (max / min), and how many namespaces each serves;
* steady state: probes done / wanted, API writes per minute (Lease renewals counted apart);
* SIGKILL one replica: the time until the survivors probe everything again (their probe targets cover all
  30,000 endpoints), and endpoints flipped to not-ready meanwhile (every backend stays healthy: any flip is
  beacon's fault).

On two cores the test servers (and the apiserver) compete with the three operators: the figures say what the
machine did, not what a replica needs alone. Results: bench/results/shards.json and shards.md. Run small while
developing: `bench/bench_shards.py --entries 300`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from bench_scale import Api, SliceWatch, entries_path, metric_sum, proc_stats, scrape, service_entry
from benchlib import markdown_table, save, settle

from beacon_dev.devcluster import DevCluster
from beacon_dev.netguard import GuardRoute
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import OperatorProcess, eventually

SHARD_NS = "beacon-system"
REPLICAS = ("shard-0", "shard-1", "shard-2")


def _writes(text: str) -> tuple[float, float]:
    """(API writes other than Lease renewals, Lease renewals) from one replica's /metrics."""
    leases = sum(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("beacon_api_writes_total{") and 'kind="Lease"' in line
    )
    return metric_sum(text, "beacon_api_writes_total{") - leases, leases


def run(args: argparse.Namespace) -> dict[str, Any]:
    waited = settle()
    entries, per, interval, namespaces = args.entries, args.endpoints, args.interval, args.namespaces
    total = entries * per
    results: dict[str, Any] = {
        "replicas": len(REPLICAS),
        "entries": entries,
        "namespaces": namespaces,
        "endpoints": total,
        "interval_seconds": interval,
        "lease_seconds": args.lease_seconds,
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "waited_for_load_to_settle_seconds": waited,
    }
    with GuardRoute(), DevCluster() as cluster, contextlib.ExitStack() as stack:
        # a /17 in loopback mode: 30,000 addresses (a /18 holds 16,373)
        net = stack.enter_context(TestNetwork(loopback=True, prefixlen=17))
        cluster.kubectl("apply", "--server-side", "-k", str(Path(__file__).resolve().parents[1] / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/serviceentries.beacon.dev")
        api = Api(cluster)
        names = [f"team-{i:03d}" for i in range(namespaces)]
        for ns in [SHARD_NS, *names]:
            api.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})

        t0 = time.monotonic()
        hosts = net.add_hosts(total)
        for h in hosts:
            h.http(port=8080, path="/healthz")
        results["test_hosts_setup_seconds"] = round(time.monotonic() - t0, 1)
        print(f"{total} test hosts and servers in {results['test_hosts_setup_seconds']} s", flush=True)

        sw = SliceWatch(api)
        sw.start()
        stack.callback(sw.stop)
        placed = [(names[i % namespaces], f"svc-{i:04d}", hosts[i * per : (i + 1) * per]) for i in range(entries)]
        for ns, name, _ in placed:
            sw.expect(ns, name, per)

        def create(item: tuple[str, str, Any]) -> None:
            ns, name, its_hosts = item
            body = service_entry(name, ns, its_hosts, interval=interval, threshold=2)
            api.request("POST", entries_path(ns), body)

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(create, placed))

        operators = {}
        for name in REPLICAS:
            kubeconfig = cluster.client_kubeconfig(user=f"beacon-bench-{name}", groups=("system:masters",))
            (cluster.workdir / name).mkdir()
            operators[name] = OperatorProcess(
                cluster=cluster,
                kubeconfig=kubeconfig,
                log_dir=cluster.workdir / name,
                extra_args=(
                    "--shard",
                    f"--shard-identity={name}",
                    f"--shard-namespace={SHARD_NS}",
                    f"--shard-lease-seconds={args.lease_seconds}",
                    "--shard-renew-seconds=2",
                ),
            )
        t0 = time.monotonic()
        for op in operators.values():
            op.start()
            stack.callback(op.stop)
        eventually(lambda: all(sw.all_ready(ns) for ns in names), timeout=900, interval=1, what="every entry ready")
        results["start_to_all_ready_seconds"] = round(time.monotonic() - t0, 1)
        print(f"three replicas: all {total} endpoints ready in {results['start_to_all_ready_seconds']} s", flush=True)
        time.sleep(interval * 2)  # past the first rounds and the first handovers

        # steady window: CPU per replica, probes, writes
        def snapshot() -> dict[str, Any]:
            out = {}
            for name, op in operators.items():
                assert op.proc is not None
                text = scrape(op.metrics_port)
                cpu, rss = proc_stats(op.proc.pid)
                writes, leases = _writes(text)
                out[name] = {
                    "cpu": cpu,
                    "rss": rss,
                    "probes": metric_sum(text, "beacon_probes_total{"),
                    "writes": writes,
                    "leases": leases,
                    "namespaces": metric_sum(text, "beacon_shard_namespaces"),
                    "targets": metric_sum(text, "beacon_probe_targets"),
                }
            return out

        before, t0 = snapshot(), time.monotonic()
        time.sleep(args.steady_seconds)
        after, elapsed = snapshot(), time.monotonic() - t0
        cores = {n: (after[n]["cpu"] - before[n]["cpu"]) / elapsed for n in REPLICAS}
        probes = sum(after[n]["probes"] - before[n]["probes"] for n in REPLICAS)
        results["steady"] = {
            "seconds": round(elapsed, 1),
            "cores_per_replica": {n: round(c, 3) for n, c in cores.items()},
            "cpu_balance_max_over_min": round(max(cores.values()) / max(min(cores.values()), 1e-9), 2),
            "namespaces_per_replica": {n: int(after[n]["namespaces"]) for n in REPLICAS},
            "targets_per_replica": {n: int(after[n]["targets"]) for n in REPLICAS},
            "rss_mib_per_replica": {n: round(after[n]["rss"], 1) for n in REPLICAS},
            "probes_done_over_wanted": round(probes / (total * elapsed / interval), 4),
            "writes_per_minute": round(
                sum(after[n]["writes"] - before[n]["writes"] for n in REPLICAS) / elapsed * 60, 1
            ),
            "lease_renewals_per_minute": round(
                sum(after[n]["leases"] - before[n]["leases"] for n in REPLICAS) / elapsed * 60, 1
            ),
        }
        print(f"steady: {results['steady']}", flush=True)

        # SIGKILL one replica: the survivors probe everything again, and nothing flips
        victim = REPLICAS[1]
        survivors = [n for n in REPLICAS if n != victim]
        killed = time.monotonic()
        operators[victim].stop(signal.SIGKILL)

        def survivors_probe_all() -> bool:
            return (
                sum(metric_sum(scrape(operators[n].metrics_port), "beacon_probe_targets") for n in survivors) >= total
            )

        eventually(survivors_probe_all, timeout=300, interval=0.2, what="the survivors probing every endpoint")
        takeover = time.monotonic() - killed
        time.sleep(interval * 2)
        flips = sum(sw.flips_since(ns, killed) for ns in names)
        results["sigkill"] = {
            "victim_namespaces": int(after[victim]["namespaces"]),
            "victim_endpoints": int(after[victim]["targets"]),
            "takeover_seconds": round(takeover, 2),
            "bound_seconds": args.lease_seconds + interval,
            "endpoints_flipped": flips,
        }
        print(f"sigkill: {results['sigkill']}", flush=True)
    return results


def table(r: dict[str, Any]) -> str:
    s, k = r["steady"], r["sigkill"]
    per = ", ".join(f"{n} {c}" for n, c in s["cores_per_replica"].items())
    return markdown_table(
        [
            (
                "replicas x entries x endpoints (namespaces), interval",
                f"{r['replicas']} x {r['entries']} x {r['endpoints'] // r['entries']} ({r['namespaces']}), "
                f"{r['interval_seconds']} s",
            ),
            ("start -> every endpoint ready", f"{r['start_to_all_ready_seconds']} s"),
            ("CPU per replica (cores), steady", per),
            ("CPU balance max / min", f"{s['cpu_balance_max_over_min']}"),
            ("namespaces per replica", ", ".join(f"{n} {c}" for n, c in s["namespaces_per_replica"].items())),
            ("probes done / wanted, steady", f"{s['probes_done_over_wanted']}"),
            (
                "API writes per minute, steady (Lease renewals apart)",
                f"{s['writes_per_minute']} ({s['lease_renewals_per_minute']} renewals)",
            ),
            (
                "SIGKILL one replica -> survivors probe everything",
                f"{k['takeover_seconds']} s (Lease {r['lease_seconds']} s + interval {r['interval_seconds']} s = "
                f"{k['bound_seconds']} s; {k['victim_namespaces']} namespaces, {k['victim_endpoints']} endpoints)",
            ),
            ("endpoints flipped not-ready by the takeover", f"{k['endpoints_flipped']}"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=3000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=60, help="the unit of sharding")
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--lease-seconds", type=float, default=10.0)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--name", default="shards", help="results go to bench/results/NAME.{json,md}")
    args = parser.parse_args()
    results = run(args)
    save(args.name, results, table(results))


if __name__ == "__main__":
    main()
