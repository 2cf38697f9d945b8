"""Failing-safe benchmark: a partition of the operator's path to every endpoint, with self-preservation on and off,
and a flapping endpoint with flap damping on and off.

Why it exists: the issue that asked for self-preservation, the panic floor and flap damping is done when the
failure scenarios are measured, not only asserted. This runs them on the local control plane and writes
bench/results/failsafe.json and failsafe.md:

* **Partition.** 100 ServiceEntries x 10 endpoints (HTTP, intervalSeconds 5, unhealthyThreshold 2, timeout 2), all
  probed by one operator; every packet to the test network is dropped inside its namespace for 90 s (one nftables
  rule: links and routes stay). One EndpointSlice watch records every readiness change. Measured with the
  operator's defaults (self-preservation on): the time until the mode starts, endpoints published not ready during
  the outage, DNS answers at its end, the time until the mode ends and until every entry's SelfPreservation
  condition is cleared after the drop ends, and flips after it. Then the same partition again with the operator
  restarted with `--self-preservation=off` (what beacon did before): the time until the first and the last
  endpoint is withdrawn, DNS answers at the end, and the time until every endpoint is ready again after the drop.
* **Flapping.** Two entries, each with a steady endpoint and one that answers fail, pass, fail... one per request
  (intervalSeconds 2, healthyThreshold 1, unhealthyThreshold 1: a transition at every probe), one with
  `flapDamping` (halfLifeSeconds 30, maxSuppressSeconds 120) and one without, in namespaces of their own, for
  `--flap-seconds`. The operator's writes in each namespace are counted in the apiserver's audit log and given per
  hour; then the damped one turns stable and the time until it is released is measured.

Run small while developing: `bench/bench_failsafe.py --entries 30 --outage 30 --flap-seconds 60`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from bench_scale import Api, entries_path
from benchlib import markdown_table, save, settle

from beacon_dev.devcluster import DevCluster
from beacon_dev.netguard import GuardRoute
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import (
    Audit,
    OperatorProcess,
    SliceWatch,
    eventually,
    http_service_entry,
    metric_value,
    resolver_for,
)

BENCH_USER = "beacon-bench-operator"
NS, FLAP_ON, FLAP_OFF = "failsafe", "flap-damped", "flap-plain"
HALF_LIFE, MAX_SUPPRESS = 30, 120


def _conditions(api: Api, namespace: str) -> dict[str, set[str]]:
    listed = api.request("GET", entries_path(namespace)) or {}
    return {
        item["metadata"]["name"]: {c["type"] for c in (item.get("status") or {}).get("conditions") or []}
        for item in listed.get("items", [])
    }


def _partition(
    net: TestNetwork,
    watch: SliceWatch,
    operator: OperatorProcess,
    api: Api,
    answers: dict[str, set[str]],
    resolve: Any,
    *,
    outage: float,
    interval: int,
    guarded: bool,
) -> dict[str, Any]:
    """One partition of `outage` seconds; what clients saw and how long the operator took, from the drop."""
    addresses = sorted(a for group in answers.values() for a in group)
    out: dict[str, Any] = {}
    cut = time.monotonic()
    net.partition()
    entered = None
    try:
        while time.monotonic() - cut < outage:
            if entered is None and metric_value(operator.metrics(), "beacon_self_preservation_active") == 1:
                entered = time.monotonic() - cut
            time.sleep(0.25)
        withdrawn = [t for a in addresses if (t := watch.first_not_ready(NS, a, after=cut)) is not None]
        out["endpoints_withdrawn_during_outage"] = len(withdrawn)
        if withdrawn:
            out["first_withdrawn_after_s"] = round(min(withdrawn) - cut, 1)
            out["last_withdrawn_after_s"] = round(max(withdrawn) - cut, 1)
        sample = sorted(answers)[:20]
        out["dns_answers_at_end_of_outage"] = sum(len(resolve(f"{name}.{NS}.svc.cluster.local")) for name in sample)
        out["dns_answers_wanted"] = sum(len(answers[name]) for name in sample)
    finally:
        net.heal()
    healed = time.monotonic()
    out["outage_s"] = round(healed - cut, 1)
    if guarded:
        out["self_preservation_on_after_s"] = round(entered, 1) if entered is not None else None
        eventually(
            lambda: metric_value(operator.metrics(), "beacon_self_preservation_active") == 0,
            timeout=120,
            interval=0.25,
            what="self-preservation off",
        )
        out["self_preservation_off_after_heal_s"] = round(time.monotonic() - healed, 1)
        eventually(
            lambda: not any("SelfPreservation" in c for c in _conditions(api, NS).values()),
            timeout=180,
            interval=0.5,
            what="every SelfPreservation condition cleared",
        )
        out["conditions_cleared_after_heal_s"] = round(time.monotonic() - healed, 1)
    eventually(
        lambda: all(watch.ready(NS, a) for a in addresses), timeout=180, interval=0.25, what="every endpoint ready"
    )
    out["all_ready_after_heal_s"] = round(time.monotonic() - healed, 1)
    time.sleep(interval * 2)
    out["flips_after_heal"] = len(watch.flips(NS, since=healed))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    waited = settle()
    entries, per, interval, threshold, timeout = args.entries, args.endpoints, args.interval, args.threshold, 2
    results: dict[str, Any] = {
        "entries": entries,
        "endpoints_per_entry": per,
        "interval_seconds": interval,
        "unhealthy_threshold": threshold,
        "timeout_seconds": timeout,
        "outage_seconds": args.outage,
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "waited_for_load_to_settle_seconds": waited,
    }
    with GuardRoute(), DevCluster() as cluster, TestNetwork() as net, contextlib.ExitStack() as stack:
        cluster.kubectl("apply", "--server-side", "-k", str(Path(__file__).resolve().parents[1] / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/serviceentries.beacon.dev", "crd/configentries.beacon.dev"
        )
        api = Api(cluster)
        for namespace in (NS, FLAP_ON, FLAP_OFF):
            api.request("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
        kubeconfig = cluster.client_kubeconfig(user=BENCH_USER, groups=("system:masters",))
        resolve = resolver_for(cluster)

        hosts = net.add_hosts(entries * per)
        for host in hosts:
            host.http(port=8080, path="/healthz")
        answers = {f"svc-{i:03d}": {h.address for h in hosts[i * per : (i + 1) * per]} for i in range(entries)}
        watch = stack.enter_context(SliceWatch(cluster))
        operator = OperatorProcess(cluster=cluster, kubeconfig=kubeconfig, log_dir=cluster.workdir)
        operator.start()
        stack.callback(operator.stop)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            bodies = [
                http_service_entry(name, NS, sorted(group), interval=interval, threshold=threshold, timeout=timeout)
                for name, group in answers.items()
            ]
            for future in [pool.submit(api.request, "POST", entries_path(NS), body) for body in bodies]:
                future.result()
        every = [h.address for h in hosts]
        eventually(lambda: all(watch.ready(NS, a) for a in every), timeout=300, interval=0.5, what="all ready")
        time.sleep(interval * 2)

        results["self_preservation_on"] = on = _partition(
            net, watch, operator, api, answers, resolve, outage=args.outage, interval=interval, guarded=True
        )
        print(f"self-preservation on: {on}", flush=True)

        operator.stop()
        operator.extra_args = (*operator.extra_args, "--self-preservation=off")
        operator.start()
        time.sleep(interval * 3)
        results["self_preservation_off"] = off = _partition(
            net, watch, operator, api, answers, resolve, outage=args.outage, interval=interval, guarded=False
        )
        print(f"self-preservation off: {off}", flush=True)

        # flapping, damped and not, side by side
        steady_on, flappy_on, steady_off, flappy_off = net.add_hosts(4)
        for host in (steady_on, steady_off):
            host.http(port=8080, path="/healthz")
        damped = flappy_on.http(port=8080, path="/healthz")
        plain = flappy_off.http(port=8080, path="/healthz")
        for namespace, steady, flappy, damping in (
            (FLAP_ON, steady_on, flappy_on, True),
            (FLAP_OFF, steady_off, flappy_off, False),
        ):
            body = http_service_entry("flappy", namespace, [steady.address, flappy.address], interval=2, threshold=1)
            check = body["spec"]["healthCheck"]
            check.update({"healthyThreshold": 1, "connectionLossHints": False})
            if damping:
                check["flapDamping"] = {"halfLifeSeconds": HALF_LIFE, "maxSuppressSeconds": MAX_SUPPRESS}
            api.request("POST", entries_path(namespace), body)
        eventually(
            lambda: all(watch.ready(ns, h.address) for ns, h in ((FLAP_ON, flappy_on), (FLAP_OFF, flappy_off))),
            timeout=60,
            what="the flapping endpoints ready",
        )
        time.sleep(4)
        start = time.time()
        damped.set_cycle([503, 200])
        plain.set_cycle([503, 200])
        time.sleep(args.flap_seconds)
        hour = 3600 / args.flap_seconds
        audit = Audit(cluster, BENCH_USER)
        writes_on = len(audit.writes(since=start, namespace=FLAP_ON))
        writes_off = len(audit.writes(since=start, namespace=FLAP_OFF))
        damped.set_cycle([])
        plain.set_cycle([])
        stable = time.monotonic()
        eventually(lambda: watch.ready(FLAP_ON, flappy_on.address), timeout=MAX_SUPPRESS + 60, what="released")
        results["flapping"] = {
            "window_s": args.flap_seconds,
            "writes_damped": writes_on,
            "writes_undamped": writes_off,
            "writes_per_hour_damped": round(writes_on * hour),
            "writes_per_hour_undamped": round(writes_off * hour),
            "half_life_s": HALF_LIFE,
            "max_suppress_s": MAX_SUPPRESS,
            "released_after_stable_s": round(time.monotonic() - stable, 1),
        }
        print(f"flapping: {results['flapping']}", flush=True)
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def table(r: dict[str, Any]) -> str:
    on, off, flap = r["self_preservation_on"], r["self_preservation_off"], r["flapping"]
    total = r["entries"] * r["endpoints_per_entry"]
    rows = [
        ("endpoints", f"{total} ({r['entries']} entries x {r['endpoints_per_entry']})"),
        (
            "check",
            f"HTTP, interval {r['interval_seconds']} s, unhealthyThreshold {r['unhealthy_threshold']}, timeout 2 s",
        ),
        ("partition", f"every packet dropped for {on['outage_s']} s"),
        ("**self-preservation on**: on after", f"{on['self_preservation_on_after_s']} s"),
        ("  endpoints withdrawn during the outage", f"{on['endpoints_withdrawn_during_outage']} of {total}"),
        (
            "  DNS answers at its end (20 entries)",
            f"{on['dns_answers_at_end_of_outage']} of {on['dns_answers_wanted']}",
        ),
        ("  off after the drop ends", f"{on['self_preservation_off_after_heal_s']} s"),
        ("  conditions cleared after the drop ends", f"{on['conditions_cleared_after_heal_s']} s"),
        ("  every endpoint ready after the drop ends", f"{on['all_ready_after_heal_s']} s (none left)"),
        ("  flips after the drop ends", str(on["flips_after_heal"])),
        ("**self-preservation off**: endpoints withdrawn", f"{off['endpoints_withdrawn_during_outage']} of {total}"),
        (
            "  first / last withdrawn after",
            f"{off.get('first_withdrawn_after_s')} s / {off.get('last_withdrawn_after_s')} s",
        ),
        (
            "  DNS answers at its end (20 entries)",
            f"{off['dns_answers_at_end_of_outage']} of {off['dns_answers_wanted']}",
        ),
        ("  every endpoint ready after the drop ends", f"{off['all_ready_after_heal_s']} s"),
        (
            f"flapping endpoint, a transition per probe ({flap['window_s']:.0f} s)",
            f"writes: {flap['writes_damped']} damped (the first flaps, before it is suppressed) vs "
            f"{flap['writes_undamped']} undamped ({flap['writes_per_hour_undamped']} an hour)",
        ),
        (
            "  released after it turns stable",
            f"{flap['released_after_stable_s']} s (bound: maxSuppressSeconds {flap['max_suppress_s']} + one interval)",
        ),
    ]
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=10, help="per entry")
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--outage", type=float, default=90.0, help="seconds every packet is dropped")
    parser.add_argument("--flap-seconds", type=float, default=300.0)
    parser.add_argument("--name", default="failsafe", help="results go to bench/results/NAME.{json,md}")
    args = parser.parse_args()
    results = run(args)
    save(args.name, results, table(results))


if __name__ == "__main__":
    main()
