"""The local control plane is real: pinned versions, RBAC, garbage collection, namespaces, and CoreDNS answering
from EndpointSlices. These are the facts every beacon feature stands on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dns.resolver
import pytest

from beacon_dev.devcluster import BinariesMissingError, ControlPlaneError, DevCluster, Ports

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _versions() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (REPO / "tools" / "k8s" / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def eventually(check: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} did not hold within {timeout}s")


def test_binaries_report_pinned_versions(cluster: DevCluster) -> None:
    pins = _versions()
    assert cluster.bin_dir is not None

    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    kube = pins["KUBERNETES_VERSION"]
    assert out(str(cluster.bin_dir / "kube-apiserver"), "--version").strip() == f"Kubernetes {kube}"
    assert out(str(cluster.bin_dir / "kube-controller-manager"), "--version").strip() == f"Kubernetes {kube}"
    client = json.loads(out(str(cluster.bin_dir / "kubectl"), "version", "--client", "-o", "json"))
    assert client["clientVersion"]["gitVersion"] == kube
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert server["serverVersion"]["gitVersion"] == kube
    assert f"etcd Version: {pins['ETCD_VERSION'].lstrip('v')}" in out(str(cluster.bin_dir / "etcd"), "--version")
    assert f"CoreDNS-{pins['COREDNS_VERSION'].lstrip('v')}" in out(str(cluster.bin_dir / "coredns"), "-version")


def test_rbac_is_enforced(cluster: DevCluster, namespace: str) -> None:
    """A user with no bindings is forbidden: the apiserver really runs with RBAC, not AlwaysAllow."""
    proc = cluster.kubectl("get", "pods", "-n", namespace, "--as=nobody", check=False)
    assert proc.returncode != 0
    assert 'User "nobody" cannot list resource "pods"' in proc.stderr


def test_garbage_collector_removes_owned_child(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(child))
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)

    def child_gone() -> bool:
        proc = cluster.kubectl("get", "configmap", "child", "-n", namespace, check=False)
        return proc.returncode != 0 and "NotFound" in proc.stderr

    eventually(child_gone, timeout=60, what="garbage collection of the owned ConfigMap")


def test_namespace_deletion_completes(cluster: DevCluster) -> None:
    cluster.kubectl("create", "namespace", "doomed")
    cluster.kubectl("create", "configmap", "inside", "-n", "doomed")
    cluster.kubectl("delete", "namespace", "doomed", "--wait=true", "--timeout=90s")
    proc = cluster.kubectl("get", "namespace", "doomed", check=False)
    assert "NotFound" in proc.stderr


def _slice(namespace: str, ready: dict[str, bool]) -> str:
    return json.dumps(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-1",
                "namespace": namespace,
                "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "test.beacon.dev",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [address], "conditions": {"ready": is_ready, "serving": is_ready}}
                for address, is_ready in ready.items()
            ],
        }
    )


def test_coredns_answers_with_ready_endpoints_only(cluster: DevCluster, namespace: str) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 8080}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(service))
    cluster.kubectl("apply", "-f", "-", input=_slice(namespace, {"198.18.0.10": True, "198.18.0.11": False}))

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [cluster.dns[0]]
    resolver.port = cluster.dns[1]
    name = f"web.{namespace}.svc.cluster.local"

    def answer() -> set[str]:
        try:
            return {rr.to_text() for rr in resolver.resolve(name, "A", lifetime=2)}
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.LifetimeTimeout):
            return set()

    eventually(lambda: answer() == {"198.18.0.10"}, what="DNS answer {198.18.0.10}")
    cluster.kubectl("apply", "-f", "-", input=_slice(namespace, {"198.18.0.10": False, "198.18.0.11": True}))
    eventually(lambda: answer() == {"198.18.0.11"}, what="DNS answer after the flip {198.18.0.11}")
    cluster.kubectl("apply", "-f", "-", input=_slice(namespace, {"198.18.0.10": True, "198.18.0.11": True}))
    eventually(lambda: answer() == {"198.18.0.10", "198.18.0.11"}, what="DNS answer with both")


def test_taken_port_gives_a_clear_error(tmp_path: Path, cluster: DevCluster) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = Ports.pick()
        ports.apiserver = taken
        with pytest.raises(ControlPlaneError, match=rf"port {taken}/TCP for apiserver is already taken"):
            DevCluster(workdir=tmp_path / "w", ports=ports, bin_dir=cluster.bin_dir, log=False).start()


def test_missing_binary_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BinariesMissingError, match="lacks etcd, kube-apiserver"):
        DevCluster(workdir=tmp_path / "w", bin_dir=tmp_path, log=False).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cli_up_then_ctrl_c_leaves_nothing_behind(tmp_path: Path, cluster: DevCluster) -> None:
    """`python -m beacon_dev up` starts a second control plane; Ctrl-C stops every process and removes its files."""
    workdir = tmp_path / "dev"
    env = {**os.environ, "BEACON_BIN_DIR": str(cluster.bin_dir)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beacon_dev",
            "up",
            "--random-ports",
            "--dir",
            str(workdir),
            "--crds",
            str(REPO / "crds"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops" in line:
            break
    else:
        pytest.fail("dev up never became ready:\n" + "".join(lines))
    state = json.loads((workdir / "state.json").read_text())
    assert set(state["pids"]) == {"etcd", "kube-apiserver", "kube-controller-manager", "coredns"}
    assert all(_alive(pid) for pid in state["pids"].values())
    assert any("kubectl get beacon -A" in line for line in lines)

    status = subprocess.run(
        [sys.executable, "-m", "beacon_dev", "status", "--dir", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert status.returncode == 0, status.stdout

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    for pid in state["pids"].values():
        eventually(lambda pid=pid: not _alive(pid), timeout=15, what=f"pid {pid} gone")
    assert not workdir.exists()


def test_failure_midway_tears_down_what_started(tmp_path: Path, cluster: DevCluster) -> None:
    """If kube-apiserver dies on start, the etcd that did start is stopped and the work directory removed."""
    assert cluster.bin_dir is not None
    bins = tmp_path / "bin"
    bins.mkdir()
    for name in ("etcd", "kube-controller-manager", "kubectl", "coredns"):
        (bins / name).symlink_to(cluster.bin_dir / name)
    broken = bins / "kube-apiserver"
    broken.write_text("#!/bin/sh\necho 'simulated apiserver crash' >&2\nexit 3\n")
    broken.chmod(0o755)
    dev = DevCluster(bin_dir=bins, log=False)
    with pytest.raises(ControlPlaneError, match=r"kube-apiserver exited with code 3[\s\S]*simulated apiserver crash"):
        dev.start()
    assert dev.pids == {}
    assert not dev.workdir.exists()


def test_cli_failure_after_start_stops_the_cluster(tmp_path: Path, cluster: DevCluster) -> None:
    """A failure after the control plane is up (here: a CRD directory that does not exist) still tears it down."""
    workdir = tmp_path / "dev"
    env = {**os.environ, "BEACON_BIN_DIR": str(cluster.bin_dir)}
    argv = [sys.executable, "-m", "beacon_dev", "up", "--random-ports", "--dir", str(workdir)]
    proc = subprocess.run([*argv, "--crds", str(tmp_path / "missing")], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "[beacon] error:" in proc.stderr
    assert not workdir.exists()
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
    assert leftovers == []
