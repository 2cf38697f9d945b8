"""Probe-path micro-benchmark: the Checker and the Prober against N real HTTP servers, CPU microseconds per probe.

Why it exists: the probe path is the operator's hot path (10,000 endpoints every 5 s are 2,000 probes a second on
one event loop), and its cost per probe is what decides whether a core is enough. This runs only that path, with
no control plane: N test hosts (beacon_dev.testhosts, network namespaces on 198.18.0.0/16) each serve GET /healthz,
and a fresh child process per variant probes all of them every `--interval` seconds for `--seconds` (after a
warm-up that opens the connections), counting the process's CPU time (user + system, every thread) per probe:

* `aiohttp`        plain HTTP through aiohttp, on asyncio's own loop (the probe path before httpprobe.py);
* `native`         plain HTTP through beacon's keep-alive client (httpprobe.py), on asyncio's loop;
* `native+uvloop`  the same on uvloop: what `python -m beacon operator` runs by default.

`--check https` probes HTTPS servers, each with its own certificate (its address as the name) from one test CA
(beacon_dev.devcluster.pki), through aiohttp as the operator does, in these variants:

* `unverified`        scheme HTTPS without `tls`: no verification (kubelet's way, and beacon's default);
* `verified`          `tls` with the test CA as the bundle: chain and name verified, one SSLContext for all;
* `verified+uvloop`   the same on uvloop: what the operator runs.

Connections are kept alive and reused (one per endpoint, aiohttp's pool keyed by SSLContext and server name), so
a steady-state probe costs no handshake; the table counts the connections the servers accepted while measuring
(`new conns`) to show it, and gives probes per second per core (probes/s done / cores used).
`--check tcp` probes TCP echo servers instead, `--check udp` UDP echo servers (a datagram out, its echo back and
matched against a prefix) and `--check dns` one-name DNS servers (a dnspython query with a fresh id, the reply parsed
and its rcode checked); the variants then differ only in their event loop. Besides CPU per probe, the table gives
its inverse, probes per second per core: what one core's worth of the operator's loop could sustain.
`--baseline-src DIR` adds a `before` variant: the same measurement with the `beacon` package (checker *and*
scheduler) imported from DIR/operator, e.g. a `git worktree` of an older commit. The result callback records the
probe metrics as the operator does. Speed is measured here, never asserted by a test. Results are printed and
saved as bench/results/probe.json and .md (probe-tcp.*, probe-udp.*, probe-dns.* for the others). Needs root
(network namespaces).

    sudo .venv/bin/python bench/bench_probe.py --targets 1000 --interval 0.5 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import save

VARIANTS = ("aiohttp", "native", "native+uvloop")
HTTPS_VARIANTS = ("unverified", "verified", "verified+uvloop")
PORTS = {"http": 8080, "tcp": 9000, "https": 8443, "udp": 9053, "dns": 5353}
PATH = "/healthz"
DNS_NAME = "db.beacon.test"  # the name every test host's DNS server answers (an A record: its own address)


# ------------------------------------------------------------------------------------------------ child
def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(args: argparse.Namespace, addresses: list[str]) -> dict[str, Any]:
    from beacon import metrics
    from beacon.checks import Checker
    from beacon.policy import ProbePolicy
    from beacon.prober import Prober
    from beacon.targets import ProbeResult, Target

    record = getattr(metrics, "record_probe", None)
    outcomes = {"ok": 0, "fail": 0}
    details: dict[str, int] = {}

    def on_result(key: object, target: Target, result: ProbeResult) -> None:
        if record is not None:
            record(target.check, ok=result.ok, seconds=result.seconds)
        else:  # an older beacon: the label lookups its discovery engine made per probe
            kind = type(target.check).__name__.removesuffix("Check").lower()
            metrics.PROBES.labels(check=kind, result="ok" if result.ok else "fail").inc()
            metrics.PROBE_SECONDS.labels(check=kind).observe(result.seconds)
        outcomes["ok" if result.ok else "fail"] += 1
        if not result.ok:
            details[result.detail] = details.get(result.detail, 0) + 1

    options: dict[str, Any] = {"policy": ProbePolicy(), "leases": lambda ns, name: None}
    if "native_http" in inspect.signature(Checker).parameters:
        options["native_http"] = args.variant.startswith("native")
    async with Checker(**options) as checker:
        prober = Prober(probe=checker.run, on_result=on_result, concurrency=args.concurrency)
        check = _check(args.check)
        if args.check == "https" and args.variant.startswith("verified"):
            from beacon.targets import Tls

            check = dataclasses.replace(check, tls=Tls(verify=True, ca=args.ca_pem, source="bench CA"))
        for i, address in enumerate(addresses):
            prober.upsert(i, Target(address=address, check=check, interval=args.interval, timeout=2.0))
        task = asyncio.create_task(prober.run())
        await asyncio.sleep(args.warmup)
        cpu0, wall0, probes0, fails0 = _cpu_seconds(), time.monotonic(), prober.probes_run, outcomes["fail"]
        await asyncio.sleep(args.seconds)
        cpu1, wall1, probes1, fails1 = _cpu_seconds(), time.monotonic(), prober.probes_run, outcomes["fail"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    probes = probes1 - probes0
    wall = wall1 - wall0
    return {
        "variant": args.variant,
        "check": args.check,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "targets": len(addresses),
        "interval_s": args.interval,
        "wanted_probes_per_s": round(len(addresses) / args.interval, 1),
        "probes_per_s": round(probes / wall, 1),
        "failed_probes": fails1 - fails0,
        "failure_details": dict(sorted(details.items(), key=lambda kv: -kv[1])[:3]),
        "cpu_cores": round((cpu1 - cpu0) / wall, 3),
        "cpu_us_per_probe": round((cpu1 - cpu0) / probes * 1e6, 1) if probes else None,
        "probes_per_s_per_core": round(probes / (cpu1 - cpu0)) if probes and cpu1 > cpu0 else None,
    }


def _check(kind: str) -> Any:
    """The check every target of this run gets (the UDP kinds are imported only when asked for: an older source
    tree measured with --baseline-src has none)."""
    from beacon.targets import HttpCheck, TcpCheck

    if kind == "http":
        return HttpCheck(port=PORTS["http"], path=PATH)
    if kind == "tcp":
        return TcpCheck(PORTS["tcp"])
    if kind == "https":  # without tls: the caller adds it for the verified variants
        return HttpCheck(port=PORTS["https"], path=PATH, scheme="HTTPS")
    from beacon.targets import DnsQuery, UdpCheck

    if kind == "udp":
        return UdpCheck(port=PORTS["udp"], payload=b"ping", prefix=b"ping")
    return UdpCheck(port=PORTS["dns"], dns=DnsQuery(name=DNS_NAME))


def child(args: argparse.Namespace) -> None:
    addresses = json.loads(Path(args.addresses).read_text())
    args.ca_pem = Path(args.ca_file).read_text() if args.ca_file else None
    if args.variant.endswith("+uvloop"):
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(_measure(args, addresses))
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ parent
def _run_variant(
    args: argparse.Namespace, variant: str, addresses_file: str, src: Path | None, servers: list[Any] | None = None
) -> dict[str, Any]:
    """Run one variant in a child process; `servers` (HTTPS): count the connections they accept meanwhile."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src / "operator")
    argv = [sys.executable, __file__, "--child", "--variant", variant, "--addresses", addresses_file]
    argv += ["--interval", str(args.interval), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    argv += ["--concurrency", str(args.concurrency), "--check", args.check]
    if args.ca_file:
        argv += ["--ca-file", args.ca_file]
    print(f"[bench] {variant}: {args.warmup:g} s warm-up + {args.seconds:g} s ...", flush=True)
    before = sum(server.counters()["connections"] for server in servers or ())
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=args.seconds + 300)
    if out.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if servers:  # warm-up included: the connections opened once per endpoint, then none while reused
        result["connections_accepted"] = sum(server.counters()["connections"] for server in servers) - before
    if src is not None:
        result["variant"] = "before"
    print(f"[bench] {variant}: {json.dumps(result)}", flush=True)
    return result


def table(results: dict[str, Any]) -> str:
    base = results["runs"][0]
    lines = [
        f"{results['check'].upper()} checks on {results['targets']} test hosts, every {results['interval_s']:g} s "
        f"({results['targets'] / results['interval_s']:g} probes/s wanted), {results['seconds']:g} s measured",
        "",
    ]
    https = results["check"] == "https"
    if https:
        lines += [
            "| variant | event loop | CPU us / probe | probes/s per core | cores | probes/s done | new conns | failed "
            "| CPU vs first row |",
            "| ------- | ---------- | -------------- | ----------------- | ----- | ------------- | --------- | ------ "
            "| ---------------- |",
        ]
    else:
        lines += [
            "| variant | event loop | CPU us / probe | probes/s per core | cores | probes/s done | failed "
            "| CPU vs first row |",
            "| ------- | ---------- | -------------- | ----------------- | ----- | ------------- | ------ "
            "| ---------------- |",
        ]
    for run in results["runs"]:
        ratio = run["cpu_us_per_probe"] / base["cpu_us_per_probe"] if run["cpu_us_per_probe"] else float("nan")
        if https:
            lines.append(
                f"| {run['variant']} | {run['loop']} | {run['cpu_us_per_probe']} | {run['probes_per_s_per_core']} | "
                f"{run['cpu_cores']} | {run['probes_per_s']} | {run.get('connections_accepted')} | "
                f"{run['failed_probes']} | {ratio:.2f}x |"
            )
            continue
        per_core = run.get("probes_per_s_per_core") or run.get("probes_per_core_s")  # absent from older runs
        if per_core is None and run["cpu_us_per_probe"]:
            per_core = round(1e6 / run["cpu_us_per_probe"])
        lines.append(
            f"| {run['variant']} | {run['loop']} | {run['cpu_us_per_probe']} | {per_core} | {run['cpu_cores']} | "
            f"{run['probes_per_s']} | {run['failed_probes']} | {ratio:.2f}x |"
        )
    if https:
        lines += [
            "",
            "new conns: connections the servers accepted during warm-up and measurement together; one per endpoint "
            "means every later probe reused its keep-alive connection (no handshake per probe).",
        ]
        return "\n".join(lines)
    old = next((r for r in results["runs"] if r["variant"] in ("before", "aiohttp")), base)
    new = results["runs"][-1]
    if old is not new and old["cpu_us_per_probe"] and new["cpu_us_per_probe"]:
        lines += [
            "",
            f"{new['variant']} vs {old['variant']}: {new['cpu_us_per_probe']} vs {old['cpu_us_per_probe']} us CPU "
            f"per probe, {old['cpu_us_per_probe'] / new['cpu_us_per_probe']:.2f}x less",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--targets", type=int, default=1000, help="test hosts, one HTTP server each (max 1013)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between probes of one target")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per variant")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds probed before measuring")
    parser.add_argument("--concurrency", type=int, default=64, help="probes in flight at most (the default)")
    parser.add_argument("--check", choices=sorted(PORTS), default="http", help="what to probe (default http)")
    parser.add_argument(
        "--variants",
        help=f"comma-separated, of {', '.join(VARIANTS)} (--check https: {', '.join(HTTPS_VARIANTS)}); default all",
    )
    parser.add_argument("--baseline-src", type=Path, help="also measure the beacon package of this source tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    parser.add_argument("--ca-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from beacon_dev.testhosts import TestNetwork, unavailable_reason

    why = unavailable_reason()
    if why is not None:
        raise SystemExit(f"needs test hosts: {why}")
    known = HTTPS_VARIANTS if args.check == "https" else VARIANTS
    variants = [v for v in (args.variants or ",".join(known)).split(",") if v]
    unknown = set(variants) - set(known)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
    with (
        TestNetwork() as net,
        tempfile.NamedTemporaryFile("w", suffix=".json") as addresses_file,
        tempfile.TemporaryDirectory() as pki_dir,
    ):
        print(f"[bench] starting {args.targets} {args.check.upper()} servers on test hosts", flush=True)
        hosts = net.add_hosts(args.targets)
        servers: list[Any] = []
        pki = None
        if args.check == "https":
            from beacon_dev.devcluster.pki import Pki

            pki = Pki(directory=Path(pki_dir), name="beacon-bench-ca")
            args.ca_file = str(pki.ca.cert)
        for i, host in enumerate(hosts):
            if pki is not None:
                pair = pki.issue(name=f"host-{i}", common_name=host.address, server_hosts=(host.address,))
                servers.append(host.http(port=PORTS["https"], path=PATH, tls=pair))
            elif args.check == "http":
                host.http(port=PORTS["http"], path=PATH)
            elif args.check == "tcp":
                host.tcp(port=PORTS["tcp"])
            elif args.check == "udp":
                host.udp(port=PORTS["udp"])
            else:
                host.dns(port=PORTS["dns"], name=DNS_NAME)
        json.dump([h.address for h in hosts], addresses_file)
        addresses_file.flush()
        runs = []
        if args.baseline_src is not None:
            if args.check not in ("http", "tcp"):
                raise SystemExit("--baseline-src measures HTTP and TCP checks only (older trees have no UDP checks)")
            runs.append(_run_variant(args, "aiohttp", addresses_file.name, args.baseline_src.resolve()))
        runs += [_run_variant(args, v, addresses_file.name, None, servers) for v in variants]
    results = {
        "check": args.check,
        "targets": args.targets,
        "interval_s": args.interval,
        "seconds": args.seconds,
        "runs": runs,
    }
    save("probe" if args.check == "http" else f"probe-{args.check}", results, table(results))


if __name__ == "__main__":
    main()
