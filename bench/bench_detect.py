"""Detection benchmark: SIGKILL a backend -> its endpoint not-ready in the EndpointSlice, with and without
connection-loss hints, among 10,000 probed endpoints.

Why it exists: connection-loss hints are there to find a crashed backend in well under a second instead of after
interval x unhealthyThreshold, and the issue that asked for them is done when that holds at scale. This measures it
on the local control plane and writes bench/results/detect.json and detect.md:

* 1,000 ServiceEntries x 10 endpoints (HTTP, intervalSeconds 10, unhealthyThreshold 3) on a loopback-mode test
  network (`TestNetwork(loopback=True)`: 10,000 addresses on the namespace's `lo`, one neighbour entry), all probed
  by one operator with its default hint limits;
* some endpoints (200 by default, one per entry: half in entries with hints on, half in entries with
  `connectionLossHints: false`, so both see the same load in the same run) are served by server processes of their
  own (`add_hosts(..., own_process=True)`), each holding one wave's worth of both kinds. The benchmark SIGKILLs
  them one wave at a time, a few seconds apart, so the global hint budget (200/s, burst 400) is not what is
  measured; the kernel closes the crashed process's sockets as it does for a real backend;
* one EndpointSlice watch times each killed endpoint from the kill to the event showing it not-ready.

The figures are set beside Kubernetes' default readiness budget (a readinessProbe with periodSeconds 10 and
failureThreshold 3: 30 s before a failing pod leaves its Service) and Consul's default check interval (10 s: its
check runs that often, so a crash waits up to that long to be seen), as ratios to beacon's p99 with hints. It also
reports detections by trigger, hint probes and drops, endpoints flipped that were not killed, and the steady
probe rate and operator CPU before the kills. Run small while developing: `bench/bench_detect.py --entries 50`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from bench_scale import Api, entries_path, metric_sum, proc_stats, scrape, summary
from benchlib import markdown_table, save, settle

from beacon_dev.devcluster import DevCluster
from beacon_dev.netguard import GuardRoute
from beacon_dev.testhosts import TestHost, TestNetwork
from beacon_dev.testing import OperatorProcess, SliceWatch, eventually, http_service_entry

BENCH_USER = "beacon-bench-operator"
NS = "detect"
K8S_READINESS_BUDGET = 10 * 3  # a readinessProbe's defaults: periodSeconds 10 x failureThreshold 3
CONSUL_INTERVAL = 10  # Consul's documented default check interval
TARGET_P99 = 1.0  # seconds, kill -> not-ready with hints on


def entry(name: str, hosts: list[TestHost], *, interval: int, threshold: int, hints: bool) -> dict[str, Any]:
    body = http_service_entry(name, NS, [h.address for h in hosts], interval=interval, threshold=threshold)
    if not hints:
        body["spec"]["healthCheck"]["connectionLossHints"] = False
    return body


def counters(port: int) -> dict[str, float]:
    text = scrape(port)
    return {
        "loss": metric_sum(text, 'beacon_detections_total{trigger="connection-loss"}'),
        "interval": metric_sum(text, 'beacon_detections_total{trigger="interval"}'),
        "hint_probes": metric_sum(text, "beacon_hint_probes_total"),
        "dropped_endpoint": metric_sum(text, 'beacon_hints_dropped_total{limit="endpoint"}'),
        "dropped_global": metric_sum(text, 'beacon_hints_dropped_total{limit="global"}'),
        "probes": metric_sum(text, 'beacon_probes_total{check="http"'),
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    waited = settle()
    entries, per, interval, threshold = args.entries, args.endpoints, args.interval, args.threshold
    victims = min(args.victims, entries)  # one per entry
    victims -= victims % 2
    wave_size = max(2, min(args.wave_size - args.wave_size % 2, victims))
    waves = victims // wave_size
    victims = waves * wave_size
    total = entries * per
    results: dict[str, Any] = {
        "entries": entries,
        "endpoints_per_entry": per,
        "endpoints": total,
        "interval_seconds": interval,
        "unhealthy_threshold": threshold,
        "killed": {"hints_on": victims // 2, "hints_off": victims // 2, "waves": waves, "wave_gap_s": args.wave_gap},
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "waited_for_load_to_settle_seconds": waited,
    }
    raw: dict[str, Any] = {}
    # exits in reverse: the operator stops before the test network goes, inside the guard route
    with GuardRoute(), DevCluster() as cluster, TestNetwork(loopback=True) as net, contextlib.ExitStack() as stack:
        cluster.kubectl("apply", "--server-side", "-k", str(Path(__file__).resolve().parents[1] / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/serviceentries.beacon.dev", "crd/configentries.beacon.dev"
        )
        api = Api(cluster)
        api.request("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        kubeconfig = cluster.client_kubeconfig(user=BENCH_USER, groups=("system:masters",))

        # the victims: one server process per wave, each serving half hinted and half opted-out endpoints
        t0 = time.monotonic()
        wave_hosts: list[list[TestHost]] = []
        hinted: list[TestHost] = []
        opted_out: list[TestHost] = []
        for _ in range(waves):
            hosts = net.add_hosts(wave_size, own_process=True)
            for host in hosts:
                host.http(port=8080, path="/healthz")
            wave_hosts.append(hosts)
            hinted += hosts[: wave_size // 2]
            opted_out += hosts[wave_size // 2 :]
        shared = net.add_hosts(total - victims)
        for host in shared:
            host.http(port=8080, path="/healthz")
        results["test_hosts_setup_seconds"] = round(time.monotonic() - t0, 1)
        print(
            f"{total} test hosts and servers ({waves} crashable processes) in {results['test_hosts_setup_seconds']} s"
        )

        bodies: list[dict[str, Any]] = []
        rest = iter(shared)
        for i in range(entries):
            first: list[TestHost] = []
            if i < len(hinted):
                first = [hinted[i]]
            elif i < len(hinted) + len(opted_out):
                first = [opted_out[i - len(hinted)]]
            hosts = first + [next(rest) for _ in range(per - len(first))]
            hints = not (len(hinted) <= i < len(hinted) + len(opted_out))
            bodies.append(entry(f"svc-{i:04d}", hosts, interval=interval, threshold=threshold, hints=hints))

        watch = stack.enter_context(SliceWatch(cluster))
        operator = OperatorProcess(cluster=cluster, kubeconfig=kubeconfig, log_dir=cluster.workdir)
        operator.start()
        stack.callback(operator.stop)
        assert operator.proc is not None

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as pool:
            for future in [pool.submit(api.request, "POST", entries_path(NS), body) for body in bodies]:
                future.result()
        addresses = [h.address for hosts in wave_hosts for h in hosts] + [h.address for h in shared]
        eventually(
            lambda: all(watch.ready(NS, a) for a in addresses),
            timeout=600,
            interval=0.5,
            what="every endpoint ready",
        )
        results["create_to_all_ready_s"] = round(time.monotonic() - t0, 1)
        print(f"{entries} entries created and every endpoint ready in {results['create_to_all_ready_s']} s")

        # steady state before the kills
        time.sleep(interval * 1.5)
        before, (cpu0, _) = counters(operator.metrics_port), proc_stats(operator.proc.pid)
        start = time.monotonic()
        time.sleep(args.steady_seconds)
        elapsed = time.monotonic() - start
        steady, (cpu1, rss) = counters(operator.metrics_port), proc_stats(operator.proc.pid)
        wanted = total / interval * elapsed
        results["steady_state"] = {
            "window_s": round(elapsed, 1),
            "probes_done": int(steady["probes"] - before["probes"]),
            "probes_wanted": round(wanted),
            "probes_done_ratio": round((steady["probes"] - before["probes"]) / wanted, 4),
            "operator_cores": round((cpu1 - cpu0) / elapsed, 3),
            "operator_rss_mib": round(rss, 1),
        }
        print(f"steady: {results['steady_state']}", flush=True)

        # the kills, one wave (one server process) at a time
        killed_at: dict[str, float] = {}
        load_at_kill: list[float] = []
        first_kill, (cpu_kill, _) = time.monotonic(), proc_stats(operator.proc.pid)
        for w, hosts in enumerate(wave_hosts):
            if w:
                time.sleep(args.wave_gap)
            load_at_kill.append(os.getloadavg()[0])
            at = hosts[0].crash()
            for host in hosts:
                killed_at[host.address] = at
        last_kill = time.monotonic()
        eventually(
            lambda: all(watch.first_not_ready(NS, a, after=t) for a, t in killed_at.items()),
            timeout=interval * threshold * 1.1 + 60,
            interval=0.5,
            what="every killed endpoint not-ready",
        )
        time.sleep(2)
        after = counters(operator.metrics_port)
        cpu2, _ = proc_stats(operator.proc.pid)

        def latencies(hosts: list[TestHost]) -> list[float]:
            out = []
            for host in hosts:
                seen = watch.first_not_ready(NS, host.address, after=killed_at[host.address])
                if seen is not None:
                    out.append(seen - killed_at[host.address])
            return out

        on, off = latencies(hinted), latencies(opted_out)
        hinted_set = set(hinted)
        raw["waves"] = [
            {
                "killed_after_first_s": round(killed_at[hosts[0].address] - first_kill, 2),
                "load_average_1m": round(load_at_kill[w], 2),
                "hints_on_s": sorted(round(x, 3) for x in latencies([h for h in hosts if h in hinted_set])),
            }
            for w, hosts in enumerate(wave_hosts)
        ]
        raw["kill_to_not_ready_hints_on_s"] = sorted(round(x, 4) for x in on)
        raw["kill_to_not_ready_hints_off_s"] = sorted(round(x, 4) for x in off)
        killed = set(killed_at)
        collateral = [a for a, _ in watch.flips(NS, since=first_kill) if a not in killed]
        on_summary, off_summary = summary(on), summary(off)
        on99 = on_summary["p99"]  # the ratios are those of the figures shown
        results["detection"] = {
            "kill_to_not_ready_hints_on_s": on_summary,
            "kill_to_not_ready_hints_off_s": off_summary,
            "target_p99_hints_on_s": TARGET_P99,
            "target_met": bool(on) and on99 <= TARGET_P99,
            "kubernetes_readiness_budget_s": K8S_READINESS_BUDGET,
            "consul_default_interval_s": CONSUL_INTERVAL,
            "ratio_p99_hints_off_to_on": round(off_summary["p99"] / on99, 1) if on99 > 0 else None,
            "ratio_kubernetes_budget_to_p99_on": round(K8S_READINESS_BUDGET / on99, 1) if on99 > 0 else None,
            "ratio_consul_interval_to_p99_on": round(CONSUL_INTERVAL / on99, 1) if on99 > 0 else None,
            "detections_connection_loss": int(after["loss"] - steady["loss"]),
            "detections_interval": int(after["interval"] - steady["interval"]),
            "hint_probes": int(after["hint_probes"] - steady["hint_probes"]),
            "hints_dropped_endpoint": int(after["dropped_endpoint"] - steady["dropped_endpoint"]),
            "hints_dropped_global": int(after["dropped_global"] - steady["dropped_global"]),
            "other_endpoints_flipped": len(collateral),
            "kill_phase_s": round(last_kill - first_kill, 1),
            "operator_cores_kill_phase": round((cpu2 - cpu_kill) / (time.monotonic() - first_kill), 3),
        }
        print(f"detection: {results['detection']}", flush=True)
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["watch_events"] = watch.events
    return results, raw


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def table(r: dict[str, Any]) -> str:
    d, s, k = r["detection"], r["steady_state"], r["killed"]
    on, off = d["kill_to_not_ready_hints_on_s"], d["kill_to_not_ready_hints_off_s"]
    rows = [
        (
            "entries x endpoints (interval, threshold)",
            f"{r['entries']} x {r['endpoints_per_entry']} ({r['interval_seconds']} s, {r['unhealthy_threshold']})",
        ),
        (
            "endpoints SIGKILLed: hints on / off (waves, gap)",
            f"{k['hints_on']} / {k['hints_off']} ({k['waves']} waves, {k['wave_gap_s']:g} s apart)",
        ),
        (
            "kill -> slice not-ready, hints on: p50 / p99 / max",
            f"{seconds(on['p50'])} / {seconds(on['p99'])} / {seconds(on['max'])} (n={on['n']})",
        ),
        (
            "kill -> slice not-ready, hints off: p50 / p99 / max",
            f"{seconds(off['p50'])} / {seconds(off['p99'])} / {seconds(off['max'])} (n={off['n']})",
        ),
        ("target: p99 with hints <= 1 s", "met" if d["target_met"] else "MISSED"),
        (
            "detections: connection-loss / interval",
            f"{d['detections_connection_loss']} / {d['detections_interval']}",
        ),
        (
            "hint probes; hints dropped (endpoint / global)",
            f"{d['hint_probes']}; {d['hints_dropped_endpoint']} / {d['hints_dropped_global']}",
        ),
        ("endpoints flipped that were not killed", f"{d['other_endpoints_flipped']}"),
        (
            "probes done / wanted (steady, before the kills)",
            f"{s['probes_done']} / {s['probes_wanted']} = {s['probes_done_ratio']}",
        ),
        (
            "operator cores: steady / during the kills; RSS",
            f"{s['operator_cores']} / {d['operator_cores_kill_phase']}; {s['operator_rss_mib']} MiB",
        ),
        ("load average at start / end", f"{r['load_average_at_start']} / {r['load_average_at_end']}"),
    ]
    p99 = on["p99"]

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}x"

    comparison = [
        "| crash -> out of the published endpoints | p50 | p99 | p99 / beacon's p99 with hints |",
        "| --------------------------------------- | --- | --- | ----------------------------- |",
        f"| beacon, connection-loss hints (default) | {seconds(on['p50'])} | {seconds(p99)} | 1.0x |",
        f"| beacon, `connectionLossHints: false` | {seconds(off['p50'])} | {seconds(off['p99'])} "
        f"| {ratio(d['ratio_p99_hints_off_to_on'])} |",
        f"| Kubernetes readinessProbe defaults (periodSeconds 10 x failureThreshold 3) | | "
        f"{K8S_READINESS_BUDGET} s (budget) | {ratio(d['ratio_kubernetes_budget_to_p99_on'])} |",
        f"| Consul check, default interval | | {CONSUL_INTERVAL} s (interval) "
        f"| {ratio(d['ratio_consul_interval_to_p99_on'])} |",
    ]
    return markdown_table(rows) + "\n\n" + "\n".join(comparison)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10, help="per entry")
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--threshold", type=int, default=3)
    parser.add_argument(
        "--victims", type=int, default=200, help="endpoints killed, half with hints, half without (one per entry)"
    )
    parser.add_argument("--wave-size", type=int, default=10, help="endpoints per server process, killed together")
    parser.add_argument("--wave-gap", type=float, default=3.0, help="seconds between waves")
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=8, help="parallel API clients for the creates")
    parser.add_argument("--name", default="detect", help="results go to bench/results/NAME.{json,md}")
    args = parser.parse_args()
    results, raw = run(args)
    save(args.name, {**results, "raw": raw}, table(results))


if __name__ == "__main__":
    main()
