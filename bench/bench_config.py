"""ConfigEntry benchmark: apply -> ConfigMap updated, and apply -> opted-in Deployment's template bumped.

Why it exists: issue 4's figures, measured on the local control plane with the real operator. N entries each
have an opted-in Deployment; every round updates all entries at once. Timestamps come from watches on
ConfigMaps and Deployments. The reload rate limit is raised for the run (`--reload-rate-limit 1000/60`) so the
figures show the pipeline, not the limiter; the debounce window stays at its default and is reported beside the
bump latency. Results: bench/results/config.json and config.md.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import markdown_table, pct, save
from kubernetes import client, config, watch

from beacon.config_core import ANNOTATION_HASH, ANNOTATION_TEMPLATE_HASHES, config_map_data, content_hash
from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import OperatorProcess, config_entry, opted_in_deployment

NS = "bench-config"
DEBOUNCE = 2.0


class Seen:
    """First time each (object name, hash) was observed, from a watch stream."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()

    def record(self, name: str, hashes: list[str]) -> None:
        now = time.monotonic()
        for digest in hashes:
            self.at.setdefault((name, digest), now)


def _watch(seen: Seen, list_fn: Any, extract: Any) -> None:
    w = watch.Watch()
    try:
        for event in w.stream(list_fn, NS, timeout_seconds=0):
            name, hashes = extract(event["object"])
            seen.record(name, hashes)
            if seen.stop.is_set():
                w.stop()
                return
    except Exception:
        if not seen.stop.is_set():
            raise


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
            extra_args=(f"--reload-debounce={DEBOUNCE}", "--reload-rate-limit=1000/60"),
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


def table(results: dict[str, Any]) -> str:
    c, b = results["apply_to_configmap"], results["apply_to_template_bump"]
    rows = [
        ("entries x rounds (all entries updated at once per round)", f"{results['entries']} x {results['rounds']}"),
        ("ConfigEntry apply -> ConfigMap updated p50 / p99", f"{c['p50_s']} s / {c['p99_s']} s (n={c['n']})"),
        ("apply -> Deployment template bumped p50 / p99", f"{b['p50_s']} s / {b['p99_s']} s (n={b['n']})"),
        (
            f"... of which beyond the {results['debounce_seconds']:g} s debounce window p50 / p99",
            f"{b['p50_beyond_debounce_s']} s / {b['p99_beyond_debounce_s']} s",
        ),
    ]
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = run(entries=args.entries, rounds=args.rounds)
    save("config", results, table(results))


if __name__ == "__main__":
    main()
