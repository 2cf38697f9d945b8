"""Helpers for proving beacon on a real control plane: the operator as a process, audit-log write counts, DNS.

Why it exists: the integration tests and the benchmarks (`make bench`) need the same machinery: start
`python -m beacon operator` under its own identity (so it can be SIGTERMed or SIGKILLed and its API writes
attributed to it in the apiserver's audit log), wait for conditions, and ask CoreDNS. kopf ships
`kopf.testing` for the same reason.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.resolver
import yaml

from beacon_dev.devcluster import DevCluster
from beacon_dev.devcluster.cluster import free_port

# The operator runs as the ServiceAccount the shipped manifests create (manifests/rbac), with a token of it: its
# rights are exactly the ClusterRole's, and the audit log attributes its writes to this name.
OPERATOR_NAMESPACE = "beacon-system"
OPERATOR_SERVICE_ACCOUNT = "beacon-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
# What the operator's identity needs from manifests/default: its namespace and RBAC, and kopf's peering CRDs and
# object (the workload itself is not deployed: the tests run the operator as a local process).
IDENTITY_KINDS = frozenset(
    {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "ClusterKopfPeering",
    }
)


def eventually(check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.2, what: str = "it") -> Any:
    """Poll `check` until it returns a truthy value; return that value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout}s (last: {last!r})")


class OperatorProcess:
    """`python -m beacon operator` against the test cluster, restartable with any signal."""

    def __init__(
        self, *, cluster: DevCluster, kubeconfig: Path, log_dir: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> None:
        self.launch()
        self.wait_live()

    def launch(self) -> None:
        """Start the process without waiting for it (several replicas started together: launch each, then
        `wait_live` each)."""
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        argv = [
            sys.executable,
            "-m",
            "beacon",
            "operator",
            f"--metrics-port={self.metrics_port}",
            f"--liveness-port={self.liveness_port}",
            "--metrics-address=127.0.0.1",
            *self.extra_args,
        ]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_live(self) -> None:
        eventually(self._live, timeout=60, what="operator liveness endpoint answering")

    def _live(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def probe_targets(self) -> int:
        """How many endpoints the operator probes now (its beacon_probe_targets gauge; 0 before the first)."""
        for line in self.metrics().splitlines():
            if line.startswith("beacon_probe_targets "):
                return int(float(line.split()[1]))
        return 0

    def logs(self) -> str:
        # in the order of the starts (operator-10.log comes after operator-9.log), so a test can slice off what
        # came before it by length
        files = sorted(self.log_dir.glob("operator-*.log"), key=lambda p: int(p.stem.rpartition("-")[2] or 0))
        return "\n".join(p.read_text(errors="replace") for p in files)


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples of metric `name` in Prometheus text `text` whose labels include `labels` (0 when
    there are none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        have = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
        if all(have.get(k) == json.dumps(v) for k, v in (labels or {}).items()):
            total += float(value)
    return total


class SliceWatch:
    """One watch on beacon's EndpointSlices (every namespace), recording for each published (namespace, address)
    every change of its `ready` condition with the `time.monotonic()` at which the event was read: what a test or
    benchmark needs to say when an endpoint left (or joined) what clients are given, and that nothing else moved.
    Use as a context manager. A watch that ends is started again (its replay of the current slices records only
    what changed meanwhile)."""

    LABEL_SELECTOR = "endpointslice.kubernetes.io/managed-by=operator.beacon.dev"

    def __init__(self, cluster: DevCluster) -> None:
        self._host, self._port = "127.0.0.1", int(cluster.server.rsplit(":", 1)[1])
        self._context = cluster.admin_ssl_context()
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str], bool] = {}
        self._changes: dict[tuple[str, str], list[tuple[float, bool]]] = {}
        self.events = 0
        self._stop = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="slice-watch")

    def __enter__(self) -> SliceWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop watching: the socket is shut down (closing it would wait for the reader's buffer lock)."""
        self._stop.set()
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def ready(self, namespace: str, address: str) -> bool | None:
        """Whether the address is published ready now (None: not seen in any slice)."""
        with self._lock:
            return self._state.get((namespace, address))

    def changes(self, namespace: str, address: str, *, since: float = -math.inf) -> list[tuple[float, bool]]:
        """(time, ready) for each change of the address's readiness at or after `since`, its first sighting
        included, oldest first."""
        with self._lock:
            return [c for c in self._changes.get((namespace, address), []) if c[0] >= since]

    def first_not_ready(self, namespace: str, address: str, *, after: float) -> float | None:
        return next((t for t, ready in self.changes(namespace, address, since=after) if not ready), None)

    def flips(self, namespace: str, *, since: float) -> list[tuple[str, float]]:
        """(address, time) of every turn from ready to not-ready in `namespace` at or after `since`."""
        out = []
        with self._lock:
            for (ns, address), changes in self._changes.items():
                if ns != namespace:
                    continue
                out += [
                    (address, t)
                    for (t, ready), (_, was) in zip(changes[1:], changes, strict=False)
                    if was and not ready and t >= since
                ]
        return sorted(out, key=lambda item: item[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch()
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.2)

    def _watch(self) -> None:
        conn = self._conn = http.client.HTTPSConnection(self._host, self._port, context=self._context, timeout=None)
        try:
            query = urllib.parse.urlencode({"watch": "1", "labelSelector": self.LABEL_SELECTOR})
            conn.request("GET", f"/apis/discovery.k8s.io/v1/endpointslices?{query}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"EndpointSlice watch: {resp.status} {resp.read()[:300]!r}")
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    return
                now = time.monotonic()
                event = json.loads(line)
                if event.get("type") not in ("ADDED", "MODIFIED"):
                    continue
                obj = event.get("object") or {}
                namespace = (obj.get("metadata") or {}).get("namespace", "")
                with self._lock:
                    self.events += 1
                    for endpoint in obj.get("endpoints") or []:
                        ready = bool((endpoint.get("conditions") or {}).get("ready"))
                        for address in endpoint.get("addresses") or []:
                            key = (namespace, address)
                            if self._state.get(key) is not ready:
                                self._state[key] = ready
                                self._changes.setdefault(key, []).append((now, ready))
        finally:
            conn.close()


def stop_probing(cluster: DevCluster, operator: OperatorProcess, *, namespace_prefix: str = "t-") -> None:
    """Delete every ServiceEntry in the test namespaces and wait until `operator` probes nothing: what a test does
    before it removes the test hosts that the operator probes (so no probe is left in flight towards them)."""
    if operator.proc is None or operator.proc.poll() is not None:
        return
    for name in cluster.kubectl("get", "namespaces", "-o", "name").stdout.split():
        ns = name.removeprefix("namespace/")
        if ns.startswith(namespace_prefix):
            cluster.kubectl("delete", "serviceentries", "--all", "-n", ns, "--wait=true", check=False)
    eventually(lambda: operator.probe_targets() == 0, timeout=30, what="the operator probing no endpoint")


def install_operator_identity(cluster: DevCluster, *, manifests: Path) -> Path:
    """Install the operator's namespace, ServiceAccount, ClusterRole(Binding) and kopf's peering CRDs and object
    from the kustomization `manifests` (as `make deploy` builds it; beacon's own CRDs are left to the caller), and
    return a kubeconfig with a 24 h token of that ServiceAccount: the operator's rights are then exactly the
    shipped ones."""
    built = cluster.kubectl("kustomize", str(manifests)).stdout
    docs = [d for d in yaml.safe_load_all(built) if d and d["kind"] in IDENTITY_KINDS]
    docs = [d for d in docs if not str(d["metadata"]["name"]).endswith(".beacon.dev")]
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    apply_args = ("apply", "--server-side", "--force-conflicts", "--field-manager=beacon-tests", "-f", "-")
    cluster.kubectl(*apply_args, input=yaml.safe_dump_all(crds))
    names = [f"crd/{d['metadata']['name']}" for d in crds]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    cluster.kubectl(*apply_args, input=yaml.safe_dump_all(rest))
    token = cluster.kubectl(
        "create", "token", OPERATOR_SERVICE_ACCOUNT, "-n", OPERATOR_NAMESPACE, "--duration=24h"
    ).stdout.strip()
    path = cluster.workdir / f"{OPERATOR_SERVICE_ACCOUNT}-token.kubeconfig"
    cluster.write_kubeconfig(path, user=OPERATOR_USER, token=token)
    # the RBAC authorizer learns new roles from a watch: wait until the token's rights are in force
    can_i = [cluster.kubectl_path, f"--kubeconfig={path}", "auth", "can-i", "watch", "serviceentries.beacon.dev", "-A"]
    eventually(
        lambda: subprocess.run(can_i, capture_output=True, text=True, check=False).stdout.strip() == "yes",
        timeout=30,
        what="the operator's ClusterRole in force",
    )
    return path


def create_pods(
    cluster: DevCluster,
    namespace: str,
    ips: Mapping[str, str],
    *,
    labels: Mapping[str, str],
    finalizers: Collection[str] = (),
    threads: int = 8,
) -> None:
    """Create one Pod per name in `ips` and give it that IP through the status subresource, as a kubelet would
    (the local control plane has no kubelet: the pods are never scheduled and run nothing). Parallel and over
    kept-alive connections, as the cluster admin, so that thousands of pods take seconds, not minutes."""
    local = threading.local()
    opened: list[http.client.HTTPSConnection] = []
    host, port = "127.0.0.1", int(cluster.server.rsplit(":", 1)[1])
    base = f"/api/v1/namespaces/{namespace}/pods"

    def request(method: str, path: str, body: dict[str, Any], content_type: str) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPSConnection(host, port, context=cluster.admin_ssl_context(), timeout=60)
            opened.append(conn)
        conn.request(method, path, body=json.dumps(body), headers={"Content-Type": content_type})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status >= 300:
            raise AssertionError(f"{method} {path}: {resp.status} {raw[:300]!r}")

    def one(name: str) -> None:
        meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
        if finalizers:
            meta["finalizers"] = list(finalizers)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta}
        pod["spec"] = {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
        request("POST", base, pod, "application/json")
        ip = ips[name]
        status = {"status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}}
        request("PATCH", f"{base}/{name}/status", status, "application/merge-patch+json")

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            for future in [pool.submit(one, name) for name in ips]:
                future.result()
    finally:
        for conn in opened:
            conn.close()


class Audit:
    """Counts write requests made by one user, from the apiserver's audit log."""

    def __init__(self, cluster: DevCluster, user: str) -> None:
        self.cluster = cluster
        self.user = user

    def writes(self, *, since: float = 0.0, namespace: str | None = None) -> list[dict[str, Any]]:
        """This user's completed write requests since `since` (epoch seconds), optionally in one namespace."""
        out = []
        for event in self.cluster.audit_events():
            if event.get("stage") != "ResponseComplete":
                continue
            if (event.get("user") or {}).get("username") != self.user:
                continue
            stamp = str(event.get("requestReceivedTimestamp", ""))
            if since and _epoch(stamp) < since:
                continue
            if namespace is not None and (event.get("objectRef") or {}).get("namespace") != namespace:
                continue
            out.append(event)
        return out


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def get_json(cluster: DevCluster, *args: str) -> Any:
    proc = cluster.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


def apply(cluster: DevCluster, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "--server-side", "--field-manager=tests", "-f", "-", input=json.dumps(obj))


def resolver_for(cluster: DevCluster) -> Callable[[str], set[str]]:
    """A function answering the A records of a name from the cluster's CoreDNS (empty set when none)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [cluster.dns[0]]
    resolver.port = cluster.dns[1]

    def answer(name: str) -> set[str]:
        try:
            return {rr.to_text() for rr in resolver.resolve(name, "A", lifetime=2)}
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.LifetimeTimeout, dns.resolver.NoNameservers):
            return set()

    return answer


def http_service_entry(
    name: str, namespace: str, addresses: Sequence[str], *, interval: int, threshold: int, timeout: int = 1
) -> dict[str, Any]:
    """A ServiceEntry body: one `http` port 8080, these static endpoints, an HTTP /healthz check."""
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"address": a} for a in addresses],
            "healthCheck": {
                "http": {"path": "/healthz", "port": "http"},
                "intervalSeconds": interval,
                "timeoutSeconds": timeout,
                "unhealthyThreshold": threshold,
            },
        },
    }


def config_entry(name: str, namespace: str, data: dict[str, str], **spec: Any) -> dict[str, Any]:
    """A ConfigEntry body (spec fields such as service, priority, target, rollbackTo as keyword arguments)."""
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ConfigEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"data": data, **spec},
    }


def opted_in_deployment(name: str, namespace: str, *, configs: Sequence[str], replicas: int = 1) -> dict[str, Any]:
    """A Deployment that opts in to reloads of `configs` (ConfigMap names). Its image is never pulled: the local
    control plane has no kubelet, so its pods stay Pending while the deployment controller still makes one
    ReplicaSet per pod-template change, which is what a rollout is."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "annotations": {"beacon.dev/reload": ",".join(configs)}},
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 50,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        },
    }
