"""ConfigEntry benchmark: apply -> ConfigMap updated, and apply -> opted-in Deployment's template bumped.

Why it exists: issue 4's figures, measured on the local control plane with the real operator. N entries each
have an opted-in Deployment; every round updates all entries at once. Timestamps come from watches on
ConfigMaps and Deployments. The reload rate limit and the restart budget are raised for the run
(`--reload-rate-limit 1000/60 --restart-budget 1000/1`) so the figures show the pipeline, not the limiters; the
debounce window stays at its default and is reported beside the bump latency.

The scale scenario (`--scale-entries`, default 5,000) creates that many namespace-wide ConfigEntries in one
namespace before the operator starts (every entry layers on every other: all set one key at one priority, the
last name wins), starts the operator and measures (a) how long start-up holds the event loop: the synchronous
part of `Configs.start` (gauge beacon_config_start_hold_seconds) plus the layering and planning of every entry
until all are materialised (counter beacon_config_planning_seconds_total), the two parts that grow with the
namespace; the operator's whole CPU time is reported beside it; and (b) a namespace-wide edit (the entry that
wins the shared key changes it) until every entry's ConfigMap holds the new content. Targets: <= 1 s, <= 10 s.
Results: bench/results/config.json and config.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS, markdown_table, pct, save
from kubernetes import client, config, watch

from beacon.config_core import ANNOTATION_HASH, ANNOTATION_TEMPLATE_HASHES, config_map_data, content_hash
from beacon.kube import Kube
from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import OperatorProcess, config_entry, opted_in_deployment

NS = "bench-config"
SCALE_NS = "bench-config-scale"
DEBOUNCE = 2.0
START_HOLD_TARGET = 1.0  # seconds of event loop held by start-up with 5,000 entries in one namespace
EDIT_TARGET = 10.0  # seconds from a namespace-wide edit to every ConfigMap updated
CREATE_THREADS = 8


class Seen:
    """First time each (object name, hash) was observed, from a watch stream."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()

    def record(self, name: str, hashes: list[str]) -> None:
        now = time.monotonic()
        for digest in hashes:
            self.at.setdefault((name, digest), now)


def _watch(seen: Seen, list_fn: Any, extract: Any, namespace: str = NS) -> None:
    w = watch.Watch()
    try:
        for event in w.stream(list_fn, namespace, timeout_seconds=0):
            name, hashes = extract(event["object"])
            seen.record(name, hashes)
            if seen.stop.is_set():
                w.stop()
                return
    except Exception:
        if not seen.stop.is_set():
            raise


def _kube(kubeconfig: Path) -> Kube:
    """beacon's own API client for `kubeconfig`."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return Kube(client.ApiClient(configuration))


def _watch_metadata(seen: Seen, kubeconfig: Path, namespace: str) -> None:
    """ConfigMap hashes as they change, from a metadata-only watch on beacon's own aiohttp client, in a thread
    with its own event loop. The scale scenario's observer: a typed watch (`_watch`) builds model objects for
    every event, and at 5,000 events that work, not the operator, set the pace of what it saw."""

    async def follow() -> None:
        kube = _kube(kubeconfig)
        try:
            async for _, obj in kube.watch("ConfigMap", namespace, metadata_only=True):
                meta = obj.get("metadata") or {}
                digest = (meta.get("annotations") or {}).get(ANNOTATION_HASH)
                if digest:
                    seen.record(meta["name"], [digest])
                if seen.stop.is_set():
                    return
        finally:
            await kube.aclose()

    with contextlib.suppress(Exception):
        asyncio.run(follow())


def _cm_hash(obj: Any) -> tuple[str, list[str]]:
    digest = (obj.metadata.annotations or {}).get(ANNOTATION_HASH)
    return obj.metadata.name, [digest] if digest else []


def _template_hashes(obj: Any) -> tuple[str, list[str]]:
    value = (obj.spec.template.metadata.annotations or {}).get(ANNOTATION_TEMPLATE_HASHES, "")
    return obj.metadata.name, [part.split("=", 1)[1] for part in value.split(",") if "=" in part]


def run(*, entries: int, rounds: int) -> dict[str, Any]:
    with DevCluster() as cluster:
        cluster.kubectl("apply", "--server-side", "-k", str(Path(__file__).resolve().parents[1] / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/configentries.beacon.dev")
        cluster.kubectl("create", "namespace", NS)
        api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        custom, core, apps = (
            client.CustomObjectsApi(api_client),
            client.CoreV1Api(api_client),
            client.AppsV1Api(api_client),
        )
        kubeconfig = cluster.client_kubeconfig(user="beacon-bench-operator", groups=("system:masters",))
        operator = OperatorProcess(
            cluster=cluster,
            kubeconfig=kubeconfig,
            log_dir=cluster.workdir,
            extra_args=(f"--reload-debounce={DEBOUNCE}", "--reload-rate-limit=1000/60", "--restart-budget=1000/1"),
        )
        operator.start()
        cms, deploys = Seen(), Seen()
        threads = [
            threading.Thread(target=_watch, args=(cms, core.list_namespaced_config_map, _cm_hash), daemon=True),
            threading.Thread(
                target=_watch, args=(deploys, apps.list_namespaced_deployment, _template_hashes), daemon=True
            ),
        ]
        for t in threads:
            t.start()
        names = [f"cfg-{i:03d}" for i in range(entries)]
        for name in names:
            custom.create_namespaced_custom_object(
                "beacon.dev", "v1alpha1", NS, "configentries", config_entry(name, NS, {"round": "0"})
            )
            apps.create_namespaced_deployment(NS, opted_in_deployment(f"app-{name}", NS, configs=[name]))
        first = content_hash(config_map_data({"round": "0"}))
        deadline = time.monotonic() + 120
        while any((n, first) not in cms.at for n in names) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(DEBOUNCE + 3)  # baselines recorded, nothing pending

        to_cm: list[float] = []
        to_bump: list[float] = []
        for r in range(1, rounds + 1):
            data = {"round": str(r), "payload": "x" * 64}
            digest = content_hash(config_map_data(data))
            started: dict[str, float] = {}
            for name in names:
                custom.patch_namespaced_custom_object(
                    "beacon.dev", "v1alpha1", NS, "configentries", name, {"spec": {"data": data}}
                )
                started[name] = time.monotonic()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any((f"app-{n}", digest) not in deploys.at for n in names):
                time.sleep(0.2)
            to_cm += [cms.at[(n, digest)] - started[n] for n in names if (n, digest) in cms.at]
            to_bump += [
                deploys.at[(f"app-{n}", digest)] - started[n] for n in names if (f"app-{n}", digest) in deploys.at
            ]
            time.sleep(1)
        for s in (cms, deploys):
            s.stop.set()
        operator.stop()
    return {
        "entries": entries,
        "rounds": rounds,
        "debounce_seconds": DEBOUNCE,
        "apply_to_configmap": {
            "n": len(to_cm),
            "p50_s": round(pct(to_cm, 0.5), 3),
            "p99_s": round(pct(to_cm, 0.99), 3),
        },
        "apply_to_template_bump": {
            "n": len(to_bump),
            "p50_s": round(pct(to_bump, 0.5), 3),
            "p99_s": round(pct(to_bump, 0.99), 3),
            "p50_beyond_debounce_s": round(pct(to_bump, 0.5) - DEBOUNCE, 3),
            "p99_beyond_debounce_s": round(pct(to_bump, 0.99) - DEBOUNCE, 3),
        },
    }


def _metric(operator: OperatorProcess, name: str) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writes(operator: OperatorProcess) -> float:
    """The operator's API writes so far (beacon_api_writes_total, every verb and kind)."""
    return sum(
        float(line.split()[1])
        for line in operator.metrics().splitlines()
        if line.startswith("beacon_api_writes_total{")
    )


def _settle(operator: OperatorProcess, *, quiet: float = 2.0, limit: float = 300.0) -> float:
    """Wait until the operator has made no API write and had no request pending for `quiet` seconds (at most
    `limit`); returns when (the monotonic clock) the last one was seen, within 0.25 s. A write is counted when
    it is made, so the counter alone stops while a backlog of writes is still being sent. Start-up writes every
    ConfigMap first and the bookkeeping (revisions, then status patches) after them: an edit made before that
    backlog drained would queue behind it and measure start-up, not the edit."""
    started = time.monotonic()
    last, since = _writes(operator), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() - started < limit:
        time.sleep(0.25)
        now = _writes(operator)
        if now != last or _metric(operator, "beacon_api_requests_pending") > 0:
            last, since = now, time.monotonic()
    return since


def _write_ceiling(kubeconfig: Path, namespace: str, n: int = 2500) -> float:
    """Writes per second this apiserver takes from beacon's own client with nothing else running: n ConfigMaps
    created, then each server-side applied with new data (what materialising does), 64 requests in flight."""

    async def measure() -> float:
        kube = _kube(kubeconfig)
        gate = asyncio.Semaphore(64)

        def body(i: int, value: str) -> dict[str, Any]:
            meta = {"name": f"ceiling-{i:05d}", "namespace": namespace, "labels": {"bench": "ceiling"}}
            return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": value}}

        async def write(i: int) -> None:
            async with gate:
                await kube.request("POST", kube.path("ConfigMap", namespace), body=body(i, "1"), kind="ConfigMap")
                await kube.apply(body(i, "2"))

        started = time.monotonic()
        await asyncio.gather(*(write(i) for i in range(n)))
        elapsed = time.monotonic() - started
        await kube.aclose()
        return 2 * n / elapsed

    return asyncio.run(measure())


def run_scale(*, entries: int, threads: int = CREATE_THREADS) -> dict[str, Any]:
    """5,000 namespace-wide entries in one namespace: start-up's event-loop hold, then a namespace-wide edit."""
    with DevCluster() as cluster:
        cluster.kubectl("apply", "--server-side", "-k", str(Path(__file__).resolve().parents[1] / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/configentries.beacon.dev")
        cluster.kubectl("create", "namespace", SCALE_NS)
        api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        custom = client.CustomObjectsApi(api_client)
        names = [f"cfg-{i:05d}" for i in range(entries)]
        winner = names[-1]  # the last name wins the shared key: its edit changes every entry's content

        def create(name: str) -> None:
            body = config_entry(name, SCALE_NS, {"shared/round": "0", f"own/{name}": "1"} if name == winner else {})
            if name != winner:
                body["spec"]["data"] = {"shared/round": "0"}
            custom.create_namespaced_custom_object("beacon.dev", "v1alpha1", SCALE_NS, "configentries", body)

        created = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            for future in [pool.submit(create, n) for n in names]:
                future.result()
        create_seconds = time.monotonic() - created

        kubeconfig = cluster.client_kubeconfig(user="beacon-bench-operator", groups=("system:masters",))
        cms = Seen()
        watcher = threading.Thread(target=_watch_metadata, args=(cms, kubeconfig, SCALE_NS), daemon=True)
        watcher.start()
        operator = OperatorProcess(cluster=cluster, kubeconfig=kubeconfig, log_dir=cluster.workdir)
        started = time.monotonic()
        operator.start()
        assert operator.proc is not None
        first = content_hash(config_map_data({"shared/round": "0", f"own/{winner}": "1"}))
        deadline = time.monotonic() + 900
        while sum((n, first) in cms.at for n in names) < entries and time.monotonic() < deadline:
            time.sleep(0.5)
        materialised = sum((n, first) in cms.at for n in names)
        start_all = max((cms.at[(n, first)] for n in names if (n, first) in cms.at), default=float("nan")) - started
        start_settled = _settle(operator) - started  # the revisions and status patches follow the ConfigMaps
        start_hold = _metric(operator, "beacon_config_start_hold_seconds")
        start_planning = _metric(operator, "beacon_config_planning_seconds_total")
        start_cpu = _cpu_seconds(operator.proc.pid)

        data = {"shared/round": "1", f"own/{winner}": "1"}
        digest = content_hash(config_map_data(data))
        writes_before = _writes(operator)
        edited = time.monotonic()
        custom.patch_namespaced_custom_object(
            "beacon.dev", "v1alpha1", SCALE_NS, "configentries", winner, {"spec": {"data": data}}
        )
        deadline = time.monotonic() + 600
        while sum((n, digest) in cms.at for n in names) < entries and time.monotonic() < deadline:
            time.sleep(0.2)
        updated = [cms.at[(n, digest)] - edited for n in names if (n, digest) in cms.at]
        edit_settled = _settle(operator) - edited
        edit_planning = _metric(operator, "beacon_config_planning_seconds_total") - start_planning
        edit_cpu = _cpu_seconds(operator.proc.pid) - start_cpu
        edit_writes = _writes(operator) - writes_before
        cms.stop.set()
        operator.stop()
        cluster.kubectl("create", "namespace", "bench-write-ceiling")  # nothing watches it
        ceiling = _write_ceiling(kubeconfig, "bench-write-ceiling")
    return {
        "entries": entries,
        "namespaces": 1,
        "create_seconds": round(create_seconds, 1),
        "start_up": {
            "materialised": materialised,
            "all_materialised_after_s": round(start_all, 2),
            "all_written_after_s": round(start_settled, 2),
            "event_loop_hold_s": round(start_hold + start_planning, 3),
            "start_hold_s": round(start_hold, 3),
            "layering_and_planning_s": round(start_planning, 3),
            "operator_cpu_s": round(start_cpu, 1),
            "target_s": START_HOLD_TARGET,
        },
        "namespace_wide_edit": {
            "updated": len(updated),
            "all_updated_after_s": round(max(updated, default=float("nan")), 2),
            "p50_s": round(pct(updated, 0.5), 2),
            "first_s": round(min(updated, default=float("nan")), 2),
            "all_written_after_s": round(edit_settled, 2),
            "layering_and_planning_s": round(edit_planning, 3),
            "operator_cpu_s": round(edit_cpu, 1),
            "api_writes": int(edit_writes),
            "target_s": EDIT_TARGET,
        },
        # the same client against the same apiserver, nothing else running: the floor for that many writes
        "write_ceiling_per_s": round(ceiling),
        "edit_floor_s": round(edit_writes / ceiling, 2) if ceiling else float("nan"),
    }


def scale_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    s, e = results["start_up"], results["namespace_wide_edit"]
    n = results["entries"]
    return [
        (f"scale: ConfigEntries in one namespace (namespace-wide, created in {results['create_seconds']} s)", f"{n}"),
        (
            "start-up: event loop held (start + layering/planning of every entry)",
            f"{s['event_loop_hold_s']} s (target <= {s['target_s']:g} s; start {s['start_hold_s']} s, "
            f"layering {s['layering_and_planning_s']} s)",
        ),
        (
            "start-up: every ConfigMap materialised after / every revision and status written after / operator CPU",
            f"{s['all_materialised_after_s']} s ({s['materialised']}/{n}) / {s.get('all_written_after_s', '-')} s / "
            f"{s['operator_cpu_s']} s",
        ),
        (
            "namespace-wide edit (start-up settled first) -> every ConfigMap updated",
            f"{e['all_updated_after_s']} s (target <= {e['target_s']:g} s; first {e.get('first_s', '-')} s, "
            f"p50 {e['p50_s']} s; {e['updated']}/{n})",
        ),
        (
            "namespace-wide edit -> every revision recorded and status written (the bookkeeping after the ConfigMaps)",
            f"{e.get('all_written_after_s', '-')} s",
        ),
        (
            "namespace-wide edit: layering/planning / operator CPU",
            f"{e['layering_and_planning_s']} s / {e['operator_cpu_s']} s",
        ),
        (
            "namespace-wide edit: API writes / the apiserver's write ceiling (beacon's client, nothing else running)",
            f"{e['api_writes']} / {results['write_ceiling_per_s']} per s: no operator makes them under "
            f"{results['edit_floor_s']} s here (all written / floor "
            f"{e.get('all_written_after_s', e['all_updated_after_s']) / results['edit_floor_s']:.2f})",
        ),
    ]


def table(results: dict[str, Any]) -> str:
    rows = pipeline_rows(results) if "apply_to_configmap" in results else []
    if "scale" in results:
        rows += scale_rows(results["scale"])
    return markdown_table(rows)


def pipeline_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    c, b = results["apply_to_configmap"], results["apply_to_template_bump"]
    return [
        ("entries x rounds (all entries updated at once per round)", f"{results['entries']} x {results['rounds']}"),
        ("ConfigEntry apply -> ConfigMap updated p50 / p99", f"{c['p50_s']} s / {c['p99_s']} s (n={c['n']})"),
        ("apply -> Deployment template bumped p50 / p99", f"{b['p50_s']} s / {b['p99_s']} s (n={b['n']})"),
        (
            f"... of which beyond the {results['debounce_seconds']:g} s debounce window p50 / p99",
            f"{b['p50_beyond_debounce_s']} s / {b['p99_beyond_debounce_s']} s",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--scale-entries", type=int, default=5000, help="ConfigEntries of the scale scenario (one namespace)"
    )
    parser.add_argument(
        "--scenario", choices=("all", "pipeline", "scale"), default="all", help="which scenarios to run"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    previous = RESULTS / "config.json"
    if args.scenario != "all" and previous.exists():  # one scenario run: keep the other's last figures
        results = json.loads(previous.read_text())
    if args.scenario in ("all", "pipeline"):
        results.update(run(entries=args.entries, rounds=args.rounds))
    if args.scenario in ("all", "scale"):
        results["scale"] = run_scale(entries=args.scale_entries)
    save("config", results, table(results))


if __name__ == "__main__":
    main()
