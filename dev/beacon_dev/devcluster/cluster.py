"""The local control plane: etcd, kube-apiserver, kube-controller-manager and CoreDNS as child processes.

Why it exists: beacon is proven against a real API server, and this machine (like many CI hosts) runs no Docker,
so kind is out. This module starts the real binaries (built from Go modules by tools/k8s/build.sh) with RBAC on,
a fresh PKI, an audit log of write requests, and CoreDNS serving cluster.local from the API, and tears all of it
down on exit, on failure and on Ctrl-C. The pytest fixtures and `python -m beacon_dev` both use it.

Flags follow controller-runtime's envtest where they overlap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from beacon_dev.devcluster.binaries import REQUIRED, BinariesMissingError, find_bin_dir
from beacon_dev.devcluster.pki import KeyPair, Pki

CLUSTER_DOMAIN = "cluster.local"
# Inside 198.18.0.0/15 like every address beacon's tests use, clear of the test hosts (198.18.0.0/16) and of the
# kind/Docker networks (hack/kind/lib.sh): nothing on this machine routes it, so the guard route keeps it here.
SERVICE_CIDR = "198.19.64.0/20"
KUBERNETES_SERVICE_IP = "198.19.64.1"

# kube-controller-manager controllers the tests and `make run` rely on: garbage collection of owned objects,
# namespace deletion, workload rollouts (ConfigEntry reloads), EndpointSlice mirroring, and the default
# ServiceAccount every namespace needs before pods can be created.
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "endpointslice-mirroring-controller",
    "endpointslice-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
)

# Audit only writes, at Metadata level: enough to count the operator's API writes, small enough to keep. Patches
# and updates of workloads also keep their request body (a few hundred bytes): what a test needs to tell a restart
# (a new pod-template annotation) from any other write to a Deployment.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {
            "level": "Request",
            "verbs": ["update", "patch"],
            "resources": [{"group": "apps", "resources": ["deployments", "statefulsets", "daemonsets"]}],
        },
        {"level": "Metadata", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
        {"level": "None"},
    ],
}


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or reached."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_free(port: int, what: str) -> None:
    for family, kind in ((socket.SOCK_STREAM, "TCP"), (socket.SOCK_DGRAM, "UDP")):
        with socket.socket(socket.AF_INET, family) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise ControlPlaneError(
                    f"port {port}/{kind} for {what} is already taken on 127.0.0.1 ({exc.strerror}); "
                    "stop whatever holds it, or choose other ports"
                ) from exc


@dataclass
class Ports:
    """Every loopback port the control plane listens on."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    dns: int
    dns_health: int
    dns_ready: int

    @classmethod
    def pick(cls) -> Ports:
        """Fresh free ports (for tests, where several clusters may run side by side)."""
        picked: list[int] = []
        while len(picked) < 6:
            port = free_port()
            if port not in picked:
                picked.append(port)
        return cls(*picked)

    @classmethod
    def defaults(cls) -> Ports:
        """Fixed, documented ports for `python -m beacon_dev up` (so the printed kubectl line is stable)."""
        return cls(etcd_client=23790, etcd_peer=23800, apiserver=16443, dns=10053, dns_health=18080, dns_ready=18181)

    def check_free(self) -> None:
        for name, port in asdict(self).items():
            _ensure_free(port, name.replace("_", "-"))


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class State:
    """What `python -m beacon_dev status|down` needs to find a detached cluster again."""

    workdir: str
    kubeconfig: str
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)


class DevCluster:
    """A real, throwaway Kubernetes control plane on loopback.

    Use it as a context manager. `start()` returns once /readyz answers ok and CoreDNS is ready; `stop()` (and
    leaving the `with` block, Ctrl-C included) terminates every child process and removes the work directory
    unless `keep_workdir` is set.
    """

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        bin_dir: Path | None = None,
        ports: Ports | None = None,
        keep_workdir: bool = False,
        log: bool = True,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="beacon-dev-"))
        self.bin_dir = bin_dir
        self.ports = ports or Ports.pick()
        self.keep_workdir = keep_workdir
        self._log = log
        self._procs: dict[str, _Proc] = {}
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.audit_log = self.workdir / "audit.log"
        self._pki: Pki | None = None
        self._admin: KeyPair | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd, kube-apiserver, kube-controller-manager and CoreDNS, waiting for each to be ready."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _say(self, message: str) -> None:
        if self._log:
            print(f"[devcluster] {message}", flush=True)

    def _start(self) -> None:
        t0 = time.monotonic()
        self.ports.check_free()
        self.bin_dir = self.bin_dir or find_bin_dir()
        missing = [name for name in REQUIRED if not os.access(self.bin_dir / name, os.X_OK)]
        if missing:
            raise BinariesMissingError(f"{self.bin_dir} lacks {', '.join(missing)}; run `make control-plane`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        self.start_etcd()
        self.start_apiserver()
        self.start_controller_manager()
        self.start_coredns()
        self._say(f"control plane ready in {time.monotonic() - t0:.1f}s (kubeconfig {self.kubeconfig})")

    def stop(self) -> None:
        """Terminate every child (SIGTERM, then SIGKILL after 10 s) and remove the work directory."""
        for name in reversed(list(self._procs)):
            self._terminate(name)
        if self._own_workdir and not self.keep_workdir:
            _rmtree(self.workdir)

    def _terminate(self, name: str, *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, sig)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.popen.pid for name, proc in self._procs.items()}

    def state(self) -> State:
        return State(
            workdir=str(self.workdir), kubeconfig=str(self.kubeconfig), ports=asdict(self.ports), pids=self.pids
        )

    # ------------------------------------------------------------------ components
    @property
    def kubectl_path(self) -> str:
        return self._bin("kubectl")

    def _bin(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._procs[name] = _Proc(name=name, popen=popen, log=log)

    def _wait(self, name: str, what: str, probe: Iterator[bool] | None = None, *, timeout: float = 60.0) -> None:
        """Poll `probe` until it yields True; fail fast, with the log's tail, if the process died."""
        deadline = time.monotonic() + timeout
        proc = self._procs[name]
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.popen.returncode} before {what}:\n{_tail(proc.log)}"
                )
            if probe is not None and next(probe):
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} did not become {what} within {timeout:.0f}s:\n{_tail(proc.log)}")

    def _write_pki(self) -> None:
        pki = Pki(directory=self.workdir / "pki")
        self._pki = pki
        self._serving = pki.issue(
            name="apiserver",
            common_name="kube-apiserver",
            server_hosts=(
                "127.0.0.1",
                "localhost",
                KUBERNETES_SERVICE_IP,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
            ),
        )
        self._admin = pki.issue(
            name="admin", common_name="beacon-admin", organizations=("system:masters",), client=True
        )
        self._kcm = pki.issue(name="kcm", common_name="system:kube-controller-manager", client=True)
        self._sa = pki.service_account_keys()
        audit_policy = self.workdir / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self._audit_policy = audit_policy
        self.write_kubeconfig(self.kubeconfig, user="beacon-admin", keypair=self._admin)
        self._kcm_kubeconfig = self.write_kubeconfig(
            self.workdir / "kcm.kubeconfig", user="system:kube-controller-manager", keypair=self._kcm
        )

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def ca_file(self) -> Path:
        assert self._pki is not None
        return self._pki.ca.cert

    def write_kubeconfig(
        self, path: Path, *, user: str, keypair: KeyPair | None = None, token: str | None = None
    ) -> Path:
        """Write a kubeconfig for this cluster that authenticates with a client certificate or a bearer token."""
        credentials: dict[str, str] = {}
        if keypair is not None:
            credentials = {"client-certificate": str(keypair.cert), "client-key": str(keypair.key)}
        if token is not None:
            credentials = {"token": token}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "beacon-dev", "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)}}
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "beacon-dev", "context": {"cluster": "beacon-dev", "user": user}}],
            "current-context": "beacon-dev",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def client_kubeconfig(self, *, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig authenticating as `user` (in `groups`) with a fresh client certificate from this CA."""
        assert self._pki is not None
        safe = user.replace(":", "-")
        pair = self._pki.issue(name=f"user-{safe}", common_name=user, organizations=groups, client=True)
        return self.write_kubeconfig(self.workdir / f"{safe}.kubeconfig", user=user, keypair=pair)

    def start_etcd(self) -> None:
        p = self.ports
        data = self.workdir / "etcd"
        self._spawn(
            "etcd",
            [
                self._bin("etcd"),
                "--name=default",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{p.etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{p.etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{p.etcd_peer}",
                "--unsafe-no-fsync",  # throwaway data: fsync only slows the tests
                "--log-level=warn",
            ],
        )
        self._wait("etcd", "healthy", _poll(lambda: _http_ok(f"http://127.0.0.1:{p.etcd_client}/health")))

    def start_apiserver(self) -> None:
        p = self.ports
        assert self._pki is not None
        self._spawn(
            "kube-apiserver",
            [
                self._bin("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p.apiserver}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={self._serving.cert}",
                f"--tls-private-key-file={self._serving.key}",
                f"--client-ca-file={self._pki.ca.cert}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={self._sa.cert}",
                f"--service-account-signing-key-file={self._sa.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--endpoint-reconciler-type=none",  # a loopback address is not a valid Endpoints address
                "--allow-privileged=true",
                f"--audit-policy-file={self._audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking",  # every write is on disk when its response returns
                "--audit-log-maxsize=500",
                "--v=1",
            ],
        )
        self._wait("kube-apiserver", "ready (/readyz)", _poll(self._readyz), timeout=120)

    def admin_ssl_context(self) -> ssl.SSLContext:
        """A TLS context that trusts this cluster's CA and authenticates as its admin (for tests' bulk requests)."""
        return self._ssl_context()

    def _ssl_context(self) -> ssl.SSLContext:
        assert self._admin is not None
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self._admin.cert), str(self._admin.key))
        return ctx

    def _readyz(self) -> bool:
        return _http_ok(f"{self.server}/readyz", context=self._ssl_context())

    def start_controller_manager(self) -> None:
        assert self._pki is not None
        self._spawn(
            "kube-controller-manager",
            [
                self._bin("kube-controller-manager"),
                f"--kubeconfig={self._kcm_kubeconfig}",
                f"--authentication-kubeconfig={self._kcm_kubeconfig}",
                f"--authorization-kubeconfig={self._kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                f"--controllers={','.join(CONTROLLERS)}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",  # each controller under its own RBAC role, as in clusters
                f"--service-account-private-key-file={self._sa.key}",
                f"--root-ca-file={self._pki.ca.cert}",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        # The controller manager has no readiness endpoint of its own here; the namespace controller's work is
        # the observable sign, so callers that need GC wait on the effects. Give it a moment to crash visibly.
        self._wait("kube-controller-manager", "settled", _poll_after(seconds=1.0), timeout=10)

    def start_coredns(self) -> None:
        p = self.ports
        corefile = self.workdir / "Corefile"
        corefile.write_text(
            f""".:{p.dns} {{
    bind 127.0.0.1
    errors
    health 127.0.0.1:{p.dns_health}
    ready 127.0.0.1:{p.dns_ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.kubeconfig} beacon-dev
        pods insecure
        ttl 1
    }}
}}
"""
        )
        self._spawn("coredns", [self._bin("coredns"), "-conf", str(corefile)])
        self._wait("coredns", "ready", _poll(lambda: _http_ok(f"http://127.0.0.1:{p.dns_ready}/ready")), timeout=60)

    @property
    def dns(self) -> tuple[str, int]:
        """The (address, port) where CoreDNS answers for cluster.local."""
        return ("127.0.0.1", self.ports.dns)

    # ------------------------------------------------------------------ conveniences for tests and the CLI
    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster as the admin user; raise with stderr on failure when `check`."""
        argv = [self._bin("kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def restart(self, name: str, *, sig: int = signal.SIGTERM) -> None:
        """Stop one component (SIGTERM or SIGKILL) and start it again with the same flags and data."""
        self._terminate(name, sig=sig)
        {
            "etcd": self.start_etcd,
            "kube-apiserver": self.start_apiserver,
            "kube-controller-manager": self.start_controller_manager,
            "coredns": self.start_coredns,
        }[name]()

    def logs(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def audit_events(self) -> list[dict[str, Any]]:
        """Every audit event written so far (write requests only; see AUDIT_POLICY)."""
        if not self.audit_log.exists():
            return []
        events = []
        for line in self.audit_log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events


def _http_ok(url: str, *, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310 - our own loopback URL
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _poll(check: Callable[[], bool]) -> Iterator[bool]:
    while True:
        yield bool(check())


def _poll_after(*, seconds: float) -> Iterator[bool]:
    deadline = time.monotonic() + seconds
    while True:
        yield time.monotonic() >= deadline


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
