"""Scale benchmark: 1,000 ServiceEntries x 10 endpoints @ 5 s, side by side with kube-controller-manager.

Why it exists: issue 8 asks whether beacon keeps 10,000 endpoints on time, on a fraction of a core, and publishes a
health change as quickly as Kubernetes' own EndpointSlice controller publishes a Pod's readiness. This measures
both in one run on the local control plane and writes bench/results/scale.json, scale.md and scale.png:

* beacon: real HTTP servers on a loopback-mode test network (`TestNetwork(loopback=True)`: 10,000+ addresses, one
  neighbour entry). The servers log when each probe arrives, so "decisive probe -> slice" runs from the moment a
  server answered the unhealthyThreshold-th failing probe to the EndpointSlice watch event showing it not-ready.
* kube-controller-manager: a Node, selector Services and Pods bound to the Node (no kubelet: podIP and the Ready
  condition are set through the status subresource); "Pod flip -> slice" runs from sending the status write that
  flips Ready to the same watch's event from kcm's EndpointSlice controller. The flips happen in the same window
  as beacon's failures, under the same load.

Phases: idle applies (entries created one at a time, each waited for), a burst (every entry created as fast as the
API takes them), a steady window (probes done / wanted, probe lateness from the operator's
beacon_probe_lateness_seconds histogram, CPU, RSS, API writes from the audit log), failures and Pod flips, and a
SIGKILL + restart (first full probe round, endpoints flipped). Run small while developing:
`bench/bench_scale.py --entries 50`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import math
import os
import signal
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchlib import RESULTS, markdown_table, pct, save, settle

from beacon_dev.devcluster import DevCluster
from beacon_dev.netguard import GuardRoute
from beacon_dev.testhosts import TestHost, TestNetwork
from beacon_dev.testing import Audit, OperatorProcess, eventually, http_service_entry

BENCH_USER = "beacon-bench-operator"
NS = "bench"  # the burst's entries
IDLE_NS = "bench-idle"  # the idle applies' entries, deleted before the burst
KCM_NS = "bench-kcm"  # kube-controller-manager's Services and Pods
NODE = "bench-node"
LATENESS_METRIC = "beacon_probe_lateness_seconds"


# --------------------------------------------------------------------------------------------------------------
# the operator process and its metrics


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return cpu, rss


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def metric_sum(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of an unlabelled histogram: upper bound -> count."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f'{name}_bucket{{le="'):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if le == "+Inf" else float(le)] = float(line.split()[-1])
    return buckets


def histogram_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in sorted(after)}


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the q-quantile."""
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in sorted(buckets.items()):
        if count >= rank:
            if le == math.inf:
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


# --------------------------------------------------------------------------------------------------------------
# the API, as the cluster admin, over kept-alive connections (cheap enough to create 1,000s of objects quickly)


class Api:
    def __init__(self, cluster: DevCluster) -> None:
        self.host, self.port = "127.0.0.1", int(cluster.server.rsplit(":", 1)[1])
        self.context: ssl.SSLContext = cluster.admin_ssl_context()
        self._local = threading.local()

    def connect(self, timeout: float | None = 60) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body)
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self.connect()
            try:
                conn.request(method, path, body=data, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):  # the apiserver closes connections idle for long
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        ok = resp.status < 300 or (method == "DELETE" and resp.status == 404)
        if not ok and not (attempt and method == "POST" and resp.status == 409):  # the first try got through
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:300]!r}")
        return json.loads(raw) if raw and ok else None

    def exists(self, path: str) -> bool:
        try:
            return self.request("GET", path) is not None
        except RuntimeError:
            return False


class SliceWatch:
    """One watch on every EndpointSlice: per (namespace, address) when it went not-ready / ready, and per
    (namespace, service) when all its expected endpoints were first ready. Times are `time.monotonic()` at read."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.state: dict[tuple[str, str], bool] = {}
        self.not_ready_at: dict[tuple[str, str], list[float]] = {}
        self.ready_count: dict[tuple[str, str], dict[str, int]] = {}  # (ns, service) -> slice name -> ready
        self.expected: dict[tuple[str, str], int] = {}
        self.all_ready_at: dict[tuple[str, str], float] = {}
        self.events = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching: shut the socket down (closing it would wait for the reader's buffer lock, forever)."""
        self._stop.set()
        sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def expect(self, namespace: str, service: str, count: int) -> None:
        with self._lock:
            self.expected[(namespace, service)] = count
            self.all_ready_at.pop((namespace, service), None)
            self._check(namespace, service, time.monotonic())

    def flips_since(self, namespace: str, since: float) -> int:
        with self._lock:
            return sum(
                1 for (ns, _), times in self.not_ready_at.items() if ns == namespace for t in times if t >= since
            )

    def first_not_ready(self, namespace: str, address: str, *, after: float) -> float | None:
        with self._lock:
            return next((t for t in self.not_ready_at.get((namespace, address), []) if t >= after), None)

    def all_ready(self, namespace: str) -> bool:
        with self._lock:
            return all(
                sum(self.ready_count.get(key, {}).values()) >= n
                for key, n in self.expected.items()
                if key[0] == namespace
            )

    def _check(self, namespace: str, service: str, now: float) -> None:
        key = (namespace, service)
        want = self.expected.get(key)
        if want is not None and key not in self.all_ready_at and sum(self.ready_count.get(key, {}).values()) >= want:
            self.all_ready_at[key] = now

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch()
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.2)

    def _watch(self) -> None:
        self._conn = self.api.connect(timeout=None)
        self._conn.request("GET", "/apis/discovery.k8s.io/v1/endpointslices?watch=1")
        resp = self._conn.getresponse()
        while not self._stop.is_set():
            line = resp.readline()
            if not line:
                return
            now = time.monotonic()
            event = json.loads(line)
            obj = event.get("object") or {}
            meta = obj.get("metadata") or {}
            ns, name = meta.get("namespace", ""), meta.get("name", "")
            service = (meta.get("labels") or {}).get("kubernetes.io/service-name", "")
            with self._lock:
                self.events += 1
                counts = self.ready_count.setdefault((ns, service), {})
                if event.get("type") == "DELETED":
                    counts.pop(name, None)
                    continue
                ready_here = 0
                for ep in obj.get("endpoints") or []:
                    ready = bool((ep.get("conditions") or {}).get("ready"))
                    ready_here += ready
                    for address in ep.get("addresses") or []:
                        key = (ns, address)
                        if not ready and self.state.get(key, True):
                            self.not_ready_at.setdefault(key, []).append(now)
                        self.state[key] = ready
                counts[name] = ready_here
                self._check(ns, service, now)


# --------------------------------------------------------------------------------------------------------------
# objects


def service_entry(name: str, namespace: str, hosts: list[TestHost], *, interval: int, threshold: int) -> dict[str, Any]:
    return http_service_entry(name, namespace, [h.address for h in hosts], interval=interval, threshold=threshold)


def entries_path(namespace: str) -> str:
    return f"/apis/beacon.dev/v1alpha1/namespaces/{namespace}/serviceentries"


def pod_status(ip: str, *, ready: bool) -> dict[str, Any]:
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    return {"status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running", "conditions": [condition]}}


def setup_kcm(api: Api, sw: SliceWatch, *, services: int, per_service: int, ips: list[str], threads: int) -> None:
    """A Node, `services` selector Services with `per_service` ready Pods each, bound to the Node."""
    api.request("POST", "/api/v1/namespaces", {"metadata": {"name": KCM_NS}})
    api.request("POST", "/api/v1/nodes", {"metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "a"}}})
    eventually(lambda: api.exists(f"/api/v1/namespaces/{KCM_NS}/serviceaccounts/default"), what="a ServiceAccount")
    for s in range(services):
        svc = f"kcm-{s:04d}"
        sw.expect(KCM_NS, svc, per_service)
        body = {
            "metadata": {"name": svc},
            "spec": {"selector": {"app": svc}, "ports": [{"name": "http", "port": 8080}], "clusterIP": "None"},
        }
        api.request("POST", f"/api/v1/namespaces/{KCM_NS}/services", body)

    def one(i: int) -> None:
        name, svc = f"pod-{i:05d}", f"kcm-{i // per_service:04d}"
        pod = {
            "metadata": {"name": name, "labels": {"app": svc}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
        }
        api.request("POST", f"/api/v1/namespaces/{KCM_NS}/pods", pod)
        api.request(
            "PATCH",
            f"/api/v1/namespaces/{KCM_NS}/pods/{name}/status",
            pod_status(ips[i], ready=True),
            "application/merge-patch+json",
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(one, i) for i in range(services * per_service)]:
            future.result()


# --------------------------------------------------------------------------------------------------------------
# the run


def summary(values: list[float], unit: float = 1.0, digits: int = 3) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": round(pct(values, 0.5) * unit, digits),
        "p99": round(pct(values, 0.99) * unit, digits),
        "max": round(max(values) * unit, digits) if values else float("nan"),
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    waited = settle()
    entries, per, interval, threshold = args.entries, args.endpoints, args.interval, args.threshold
    total = entries * per
    results: dict[str, Any] = {
        "entries": entries,
        "endpoints_per_entry": per,
        "endpoints": total,
        "interval_seconds": interval,
        "unhealthy_threshold": threshold,
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
        for ns in (NS, IDLE_NS):
            api.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
        kubeconfig = cluster.client_kubeconfig(user=BENCH_USER, groups=("system:masters",))

        t0 = time.monotonic()
        hosts = net.add_hosts(total)
        servers = [h.http(port=8080, path="/healthz") for h in hosts]
        results["test_hosts_setup_seconds"] = round(time.monotonic() - t0, 1)
        print(f"{total} test hosts and servers in {results['test_hosts_setup_seconds']} s", flush=True)

        sw = SliceWatch(api)
        sw.start()
        stack.callback(sw.stop)
        t0 = time.monotonic()
        kcm_services = args.kcm_services if args.kcm_services is not None else entries
        setup_kcm(api, sw, services=kcm_services, per_service=per, ips=[h.address for h in hosts], threads=args.threads)
        eventually(lambda: sw.all_ready(KCM_NS), timeout=600, what="kcm's slices showing every Pod ready")
        results["kcm_setup_seconds"] = round(time.monotonic() - t0, 1)
        print(f"kcm: {kcm_services} Services x {per} Pods ready in {results['kcm_setup_seconds']} s", flush=True)

        operator = OperatorProcess(cluster=cluster, kubeconfig=kubeconfig, log_dir=cluster.workdir)
        operator.start()
        stack.callback(operator.stop)
        assert operator.proc is not None

        # idle applies: one at a time, each waited for, on an otherwise idle operator. The first one (not counted)
        # warms up: it waits for the operator's watches to start, which the restart figure measures
        idle: list[float] = []
        for i in range(min(args.idle + 1, entries)):
            name = f"idle-{i:04d}"
            sw.expect(IDLE_NS, name, per)
            body = service_entry(name, IDLE_NS, hosts[i * per : (i + 1) * per], interval=interval, threshold=threshold)
            start = time.monotonic()
            api.request("POST", entries_path(IDLE_NS), body)
            with contextlib.suppress(AssertionError):
                eventually(lambda n=name: (IDLE_NS, n) in sw.all_ready_at, timeout=30, interval=0.01, what=name)
            if (IDLE_NS, name) in sw.all_ready_at and i > 0:
                idle.append(sw.all_ready_at[(IDLE_NS, name)] - start)
        results["idle_apply_to_all_ready_s"] = summary(idle)
        for i in range(min(args.idle + 1, entries)):
            api.request("DELETE", f"{entries_path(IDLE_NS)}/idle-{i:04d}")
        eventually(lambda: operator.probe_targets() == 0, timeout=60, what="idle entries gone")
        print(f"idle apply -> all ready: {results['idle_apply_to_all_ready_s']}", flush=True)

        # burst: every entry created as fast as the API takes them
        created: dict[str, float] = {}
        names = [f"svc-{i:04d}" for i in range(entries)]
        for name in names:
            sw.expect(NS, name, per)

        def create(i: int) -> None:
            body = service_entry(names[i], NS, hosts[i * per : (i + 1) * per], interval=interval, threshold=threshold)
            api.request("POST", entries_path(NS), body)
            created[names[i]] = time.monotonic()

        burst_start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as pool:
            for future in [pool.submit(create, i) for i in range(entries)]:
                future.result()
        last_create = max(created.values())
        with contextlib.suppress(AssertionError):
            eventually(lambda: sw.all_ready(NS), timeout=600, interval=0.1, what="every burst entry ready")
        ready_at = [sw.all_ready_at[(NS, n)] for n in names if (NS, n) in sw.all_ready_at]
        per_entry = [sw.all_ready_at[(NS, n)] - created[n] for n in names if (NS, n) in sw.all_ready_at]
        results["burst"] = {
            "entries": entries,
            "create_seconds": round(last_create - burst_start, 2),
            "ready": len(ready_at),
            "last_ready_after_last_create_s": round(max(ready_at) - last_create, 2) if ready_at else None,
            "create_to_all_ready_s": summary(per_entry, digits=2),
        }
        print(f"burst: {results['burst']}", flush=True)

        # steady state
        time.sleep(interval * (threshold + 1))
        audit = Audit(cluster, BENCH_USER)
        text0 = scrape(operator.metrics_port)
        cpu0, _ = proc_stats(operator.proc.pid)
        start_wall, start = time.time(), time.monotonic()
        time.sleep(args.steady_seconds)
        elapsed = time.monotonic() - start
        text1 = scrape(operator.metrics_port)
        cpu1, rss = proc_stats(operator.proc.pid)
        writes = audit.writes(since=start_wall)
        probes = metric_sum(text1, 'beacon_probes_total{check="http"') - metric_sum(
            text0, 'beacon_probes_total{check="http"'
        )
        wanted = total / interval * elapsed
        lateness = histogram_delta(histogram(text1, LATENESS_METRIC), histogram(text0, LATENESS_METRIC))
        raw["lateness_buckets"] = {str(k): v for k, v in lateness.items()}
        cpu = cpu1 - cpu0
        results["steady_state"] = {
            "window_s": round(elapsed, 1),
            "probes_done": int(probes),
            "probes_wanted": round(wanted),
            "probes_done_ratio": round(probes / wanted, 4) if wanted else None,
            "probe_lateness_p50_ms": round(histogram_quantile(lateness, 0.5) * 1000, 2),
            "probe_lateness_p99_ms": round(histogram_quantile(lateness, 0.99) * 1000, 2),
            "operator_cores": round(cpu / elapsed, 3),
            "operator_us_per_probe": round(cpu / probes * 1e6, 1) if probes else None,
            "operator_rss_mib": round(rss, 1),
            "api_writes_per_minute": round(len(writes) / elapsed * 60, 2),
        }
        print(f"steady: {results['steady_state']}", flush=True)

        # failures (beacon) and Pod flips (kcm), in the same window
        n_fail = min(args.failures, entries)
        victims = [servers[i * per] for i in range(n_fail)]
        n_flip = min(args.failures, kcm_services)
        flip_pods = [(f"pod-{s * per:05d}", hosts[s * per].address) for s in range(n_flip)]
        flipped_at: dict[str, float] = {}

        def flip_all() -> None:
            gap = interval / max(1, n_flip)
            for name, ip in flip_pods:
                flipped_at[ip] = time.monotonic()
                api.request(
                    "PATCH",
                    f"/api/v1/namespaces/{KCM_NS}/pods/{name}/status",
                    pod_status(ip, ready=False),
                    "application/merge-patch+json",
                )
                time.sleep(gap)

        fail_start = time.monotonic()
        flipper = threading.Thread(target=flip_all)
        flipper.start()
        for server in victims:
            server.set_healthy(False)
        flipper.join()
        victim_addresses = {s.address for s in victims}
        eventually(
            lambda: all(sw.first_not_ready(NS, a, after=fail_start) for a in victim_addresses),
            timeout=interval * (threshold + 2) + 60,
            what="every failed endpoint not-ready in beacon's slices",
        )
        eventually(
            lambda: all(sw.first_not_ready(KCM_NS, ip, after=flipped_at[ip]) for ip in flipped_at),
            timeout=60,
            what="every flipped Pod not-ready in kcm's slices",
        )
        failing: dict[str, list[float]] = {}
        for t, address, _status in net.probe_log(since=fail_start, not_status=200):
            if address in victim_addresses:
                failing.setdefault(address, []).append(t)
        beacon_lat: list[float] = []
        for address in victim_addresses:
            times = sorted(failing.get(address, []))
            seen = sw.first_not_ready(NS, address, after=fail_start)
            if len(times) >= threshold and seen is not None:
                beacon_lat.append(seen - times[threshold - 1])
        kcm_lat: list[float] = []
        for ip, at in flipped_at.items():
            seen = sw.first_not_ready(KCM_NS, ip, after=at)
            if seen is not None:
                kcm_lat.append(seen - at)
        raw["beacon_decisive_probe_to_slice_ms"] = sorted(x * 1000 for x in beacon_lat)
        raw["kcm_pod_flip_to_slice_ms"] = sorted(x * 1000 for x in kcm_lat)
        b50, k50 = pct(beacon_lat, 0.5), pct(kcm_lat, 0.5)
        results["publish"] = {
            "beacon_decisive_probe_to_slice_ms": summary(beacon_lat, 1000, 1),
            "kcm_pod_flip_to_slice_ms": summary(kcm_lat, 1000, 1),
            "p50_ratio_beacon_to_kcm": round(b50 / k50, 2) if k50 > 0 else None,
            "p99_ratio_beacon_to_kcm": round(pct(beacon_lat, 0.99) / pct(kcm_lat, 0.99), 2) if kcm_lat else None,
        }
        print(f"publish: {results['publish']}", flush=True)

        # everything healthy again, then SIGKILL at full scale and restart
        for server in victims:
            server.set_healthy(True)
        eventually(
            lambda: all(sw.state.get((NS, a)) for a in victim_addresses),
            timeout=interval * 4 + 60,
            what="the failed endpoints ready again",
        )
        time.sleep(interval)
        killed_at = time.monotonic()
        operator.stop(signal.SIGKILL)
        restart_wall, restart_at = time.time(), time.monotonic()
        operator.start()
        live_after = time.monotonic() - restart_at
        addresses = {h.address for h in hosts}

        def first_round() -> list[float] | None:
            firsts = [t for t, a, _ in net.probe_log(since=restart_at, first_only=True) if a in addresses]
            return firsts if len(firsts) >= len(addresses) else None

        with contextlib.suppress(AssertionError):
            eventually(first_round, timeout=interval * 4 + 120, interval=0.5, what="a full probe round")
        firsts = first_round()
        time.sleep(interval * (threshold + 1))
        restart_writes = Audit(cluster, BENCH_USER).writes(since=restart_wall)
        results["restart"] = {
            "first_full_probe_round_s": round(max(firsts) - restart_at, 2) if firsts else None,
            "first_full_probe_round_note": "process start (SIGKILL of the old one) -> every endpoint probed once",
            "liveness_endpoint_answering_s": round(live_after, 2),
            "endpoints_flipped": sw.flips_since(NS, killed_at),
            "api_writes_after_restart": len(restart_writes),
        }
        print(f"restart: {results['restart']}", flush=True)
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["watch_events"] = sw.events
        sw.stop()
        operator.stop()
    return results, raw


# --------------------------------------------------------------------------------------------------------------
# report


def table(r: dict[str, Any]) -> str:
    s, p, b, rs, i = r["steady_state"], r["publish"], r["burst"], r["restart"], r["idle_apply_to_all_ready_s"]
    bl, kl = p["beacon_decisive_probe_to_slice_ms"], p["kcm_pod_flip_to_slice_ms"]
    rows = [
        (
            "entries x endpoints (interval, threshold)",
            f"{r['entries']} x {r['endpoints_per_entry']} ({r['interval_seconds']} s, {r['unhealthy_threshold']})",
        ),
        ("probes done / wanted (steady)", f"{s['probes_done']} / {s['probes_wanted']} = {s['probes_done_ratio']}"),
        (
            "probe lateness (due -> started) p50 / p99",
            f"{s['probe_lateness_p50_ms']} ms / {s['probe_lateness_p99_ms']} ms",
        ),
        ("operator cores; CPU per probe", f"{s['operator_cores']}; {s['operator_us_per_probe']} µs"),
        ("operator RSS", f"{s['operator_rss_mib']} MiB"),
        ("idle apply -> all ready p50 / p99", f"{i['p50']} s / {i['p99']} s (n={i['n']})"),
        (
            f"burst of {b['entries']}: created in; last ready after last create",
            f"{b['create_seconds']} s; {b['last_ready_after_last_create_s']} s",
        ),
        ("decisive probe -> slice p50 / p99 (beacon)", f"{bl['p50']} ms / {bl['p99']} ms (n={bl['n']})"),
        ("Pod flip -> slice p50 / p99 (kcm)", f"{kl['p50']} ms / {kl['p99']} ms (n={kl['n']})"),
        ("beacon / kcm, p50; p99", f"{p['p50_ratio_beacon_to_kcm']}; {p['p99_ratio_beacon_to_kcm']}"),
        (
            "SIGKILL + restart -> full probe round; flips",
            f"{rs['first_full_probe_round_s']} s; {rs['endpoints_flipped']}",
        ),
        ("API writes per minute (steady)", f"{s['api_writes_per_minute']}"),
        ("load average at start / end", f"{r['load_average_at_start']} / {r['load_average_at_end']}"),
    ]
    return markdown_table(rows)


def plot(raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, values in (
        ("beacon: decisive probe -> slice", raw["beacon_decisive_probe_to_slice_ms"]),
        ("kcm: Pod flip -> slice", raw["kcm_pod_flip_to_slice_ms"]),
    ):
        if values:
            left.step(values, [(k + 1) / len(values) for k in range(len(values))], where="post", label=label)
    left.set(xlabel="publish latency (ms)", ylabel="fraction", title="Publish latency (CDF)")
    left.legend(loc="lower right")
    left.grid(alpha=0.3)
    buckets = {float(k): v for k, v in raw["lateness_buckets"].items()}
    total = buckets.get(math.inf, 0.0)
    finite = sorted(k for k in buckets if k != math.inf)
    if total > 0:
        right.step([le * 1000 for le in finite], [buckets[le] / total for le in finite], where="post")
    right.set(xscale="log", xlabel="probe lateness, due -> started (ms, bucket bounds)", ylabel="fraction")
    right.set(title="Probe lateness (CDF, steady state)", ylim=(0, 1.02))
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10, help="per entry (and Pods per kcm Service)")
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--idle", type=int, default=20, help="entries created one at a time on an idle operator")
    parser.add_argument("--failures", type=int, default=100, help="failed endpoints, and flipped Pods")
    parser.add_argument("--kcm-services", type=int, default=None, help="default: as many as entries")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=8, help="parallel API clients for bulk creates")
    parser.add_argument("--name", default="scale", help="results go to bench/results/NAME.{json,md,png}")
    args = parser.parse_args()
    results, raw = run(args)
    save(args.name, {**results, "raw": raw}, table(results))
    plot(raw, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
