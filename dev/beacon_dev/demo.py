"""`make run`: the operator on a cluster, with the examples live on the local control plane.

Why it exists: the README promises that one command shows beacon working. Without a cluster, that means the
local control plane, the operator as its own process, and the examples' endpoints as real HTTP servers on a
test host, with one of them going down and up again so `kubectl get serviceentries` shows READY counts moving.
With KUBECONFIG set, it installs the CRDs and runs the operator against that cluster in the foreground.
Ctrl-C (or SIGTERM) stops everything this command started and removes its files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from beacon_dev.devcluster import DevCluster, Ports
from beacon_dev.netguard import GuardRoute
from beacon_dev.testhosts import HttpServer, TestNetwork

FLAP_SECONDS = 30.0


def _load(paths: list[Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _operator_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "beacon", "operator", *extra]


@contextlib.contextmanager
def _operator(kubeconfig: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with log.open("ab") as out:
        proc = subprocess.Popen(_operator_argv(), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _with_demo_addresses(docs: list[dict[str, Any]], net: TestNetwork) -> tuple[list[dict[str, Any]], list[HttpServer]]:
    """Give every static endpoint of the examples a test host with an HTTP /healthz server. The first network
    slot is 198.18.0.0/22, so the examples' own addresses are used as they are whenever that slot is free."""
    servers: list[HttpServer] = []
    for doc in docs:
        if doc.get("kind") != "ServiceEntry":
            continue
        port = doc["spec"]["ports"][0]["port"]
        for endpoint in doc["spec"].get("endpoints") or []:
            host = net.add_host()
            endpoint["address"] = host.address
            servers.append(host.http(port=port, path="/healthz"))
    return docs, servers


def run_local(*, workdir: Path, examples: Path, crds: Path, kubectl_crds: Any, random_ports: bool = False) -> int:
    """The local control plane + operator + examples with live endpoints, until Ctrl-C."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = DevCluster(workdir=workdir, ports=Ports.pick() if random_ports else Ports.defaults())
    try:
        cluster.start()
        kubectl_crds(kubectl=[cluster.kubectl_path, f"--kubeconfig={cluster.kubeconfig}"], crds=crds)
        # exits in reverse: the operator stops (and is waited for) before the test network goes, and the guard
        # route outlives both, so no probe can follow the default route off the machine
        with (
            GuardRoute(),
            TestNetwork() as net,
            _operator(cluster.kubeconfig, workdir / "operator.log") as operator,
        ):
            docs, servers = _with_demo_addresses(_load(sorted(examples.glob("*.yaml"))), net)
            namespaces = [d for d in docs if d.get("kind") == "Namespace"]
            for doc in namespaces + [d for d in docs if d.get("kind") != "Namespace"]:
                cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
            print(
                "\n[beacon] demo running: the operator probes the examples' endpoints on a test host "
                f"({', '.join(s.address for s in servers)}).\n[beacon] In another terminal:\n\n"
                f"    export KUBECONFIG={cluster.kubeconfig}\n"
                f"    kubectl get beacon -A          # or: watch kubectl get serviceentries -n shop\n"
                f"\n[beacon] every {FLAP_SECONDS:.0f}s the last endpoint goes down or up, so READY moves. "
                "Ctrl-C stops everything.",
                flush=True,
            )
            flapper = servers[-1] if servers else None
            up = True
            while True:
                time.sleep(FLAP_SECONDS)
                if operator.poll() is not None:
                    print(f"[beacon] the operator exited ({operator.returncode}); see {workdir / 'operator.log'}")
                    return 1
                if flapper is not None:
                    up = not up
                    (flapper.start if up else flapper.stop)()
                    print(f"[beacon] demo: {flapper.address} is now {'up' if up else 'down'}", flush=True)
    except KeyboardInterrupt:
        print("\n[beacon] stopping", flush=True)
        return 0
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run_external(*, kubeconfig: str, kubectl: str, crds: Path, kubectl_crds: Any) -> int:
    """KUBECONFIG's cluster: install the CRDs, then run the operator in the foreground."""
    kubectl_crds(kubectl=[kubectl], crds=crds)
    print(f"\n[beacon] running the operator against KUBECONFIG={kubeconfig}. In another terminal:\n")
    print("    kubectl apply -f examples/ && kubectl get beacon -A\n", flush=True)
    return subprocess.call(_operator_argv())


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
