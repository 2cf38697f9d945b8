"""Command line of the development tooling: `python -m beacon_dev up|down|status` and `python -m beacon_dev run`.

Why it exists: the README promises two commands, and `make run` must behave the same on a laptop with a kind
cluster (KUBECONFIG set) and on a bare machine (no cluster: start the local control plane). Keeping that choice
here, not in the Makefile, lets it be tested and typed like the rest of the code. It lives beside the operator,
not in it: the operator image never installs the local control plane.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from beacon_dev.devcluster import ControlPlaneError, DevCluster, Ports, find_bin_dir
from beacon_dev.devcluster.cluster import State
from beacon_dev.netguard import pid_alive


def _dev_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("BEACON_DEV_DIR", cache / "beacon" / "dev"))


def _load_state(workdir: Path) -> State | None:
    path = workdir / "state.json"
    if not path.exists():
        return None
    return State(**json.loads(path.read_text()))


CRD_NAMES = ("crd/serviceentries.beacon.dev", "crd/configentries.beacon.dev")


def _install_crds(*, kubectl: Sequence[str], crds: Path) -> None:
    print(f"[beacon] installing CRDs from {crds}", flush=True)
    subprocess.run([*kubectl, "apply", "--server-side", "--force-conflicts", "-k", str(crds)], check=True)
    subprocess.run(
        [*kubectl, "wait", "--for=condition=Established", "--timeout=60s", *CRD_NAMES],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _print_usage_line(kubeconfig: str | None) -> None:
    prefix = f"KUBECONFIG={kubeconfig} " if kubeconfig else ""
    print("\n[beacon] ready. In another terminal:\n", flush=True)
    print(f"    {prefix}kubectl get beacon -A\n", flush=True)


def cmd_dev_up(args: argparse.Namespace) -> int:
    workdir = _dev_dir(args.dir)
    state = _load_state(workdir)
    if state and any(pid_alive(pid) for pid in state.pids.values()):
        print(f"[beacon] a dev cluster already runs from {workdir}; `python -m beacon_dev down` stops it")
        return 1
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    ports = Ports.pick() if args.random_ports else Ports.defaults()
    cluster = DevCluster(workdir=workdir, ports=ports, keep_workdir=args.detach)
    # SIGINT may arrive ignored (a parent started us in the background); Ctrl-C must still stop the cluster.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    detached = False
    try:
        cluster.start()
        (workdir / "state.json").write_text(json.dumps(cluster.state().__dict__, indent=2))
        if args.crds:
            _install_crds(kubectl=[cluster.kubectl_path, f"--kubeconfig={cluster.kubeconfig}"], crds=args.crds)
        _print_usage_line(str(cluster.kubeconfig))
        if args.detach:
            print(f"[beacon] detached; stop with `python -m beacon_dev down --dir {workdir}`")
            detached = True
            return 0
        print("[beacon] Ctrl-C stops the control plane and removes its files.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[beacon] stopping", flush=True)
        return 0
    except (ControlPlaneError, subprocess.CalledProcessError) as exc:
        print(f"[beacon] error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not detached:
            cluster.stop()
            shutil.rmtree(cluster.workdir, ignore_errors=True)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_dev_down(args: argparse.Namespace) -> int:
    workdir = _dev_dir(args.dir)
    state = _load_state(workdir)
    if state is None:
        print(f"[beacon] no dev cluster state in {workdir}")
        return 0
    for name, pid in reversed(list(state.pids.items())):
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            print(f"[beacon] stopped {name} (pid {pid})")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def cmd_dev_status(args: argparse.Namespace) -> int:
    workdir = _dev_dir(args.dir)
    state = _load_state(workdir)
    if state is None:
        print(f"[beacon] no dev cluster in {workdir}")
        return 1
    up = True
    for name, pid in state.pids.items():
        alive = pid_alive(pid)
        up = up and alive
        print(f"{name:<26} pid {pid:<8} {'running' if alive else 'gone'}")
    print(f"kubeconfig                 {state.kubeconfig}")
    return 0 if up else 1


def _current_cluster_reachable(kubectl: str) -> bool:
    proc = subprocess.run(
        [kubectl, "version", "--request-timeout=5s", "-o", "json"], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0


def cmd_run(args: argparse.Namespace) -> int:
    """`make run`: the operator on KUBECONFIG's cluster, or on the local control plane with the examples live."""
    from beacon_dev import demo

    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig:
        kubectl = shutil.which("kubectl") or str(find_bin_dir() / "kubectl")
        if not _current_cluster_reachable(kubectl):
            print(f"[beacon] error: KUBECONFIG={kubeconfig} is set but its cluster does not answer", file=sys.stderr)
            return 1
        return demo.run_external(kubeconfig=kubeconfig, kubectl=kubectl, crds=args.crds, kubectl_crds=_install_crds)
    workdir = _dev_dir(args.dir)
    state = _load_state(workdir)
    if state and any(pid_alive(pid) for pid in state.pids.values()):
        print(f"[beacon] a dev cluster already runs from {workdir}; `python -m beacon_dev down` stops it")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return demo.run_local(
        workdir=workdir,
        examples=args.examples,
        crds=args.crds,
        kubectl_crds=_install_crds,
        random_ports=args.random_ports,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beacon_dev", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="use KUBECONFIG's cluster or start the local control plane; install CRDs")
    run.add_argument("--crds", type=Path, default=Path("crds"), help="CRD directory (default: crds)")
    run.add_argument("--dir", help="work directory for a local control plane")
    run.add_argument("--examples", type=Path, default=Path("examples"), help="examples to apply (default: examples)")
    run.add_argument("--random-ports", action="store_true", help="pick free ports instead of the defaults")
    run.set_defaults(func=cmd_run)

    up = sub.add_parser("up", help="start etcd, kube-apiserver, kube-controller-manager and CoreDNS")
    up.add_argument("--detach", action="store_true", help="leave it running in the background")
    up.add_argument("--random-ports", action="store_true", help="pick free ports instead of the defaults")
    up.add_argument("--crds", type=Path, help="install the CRDs from this directory once ready")
    up.add_argument("--dir", help="work directory (default: $BEACON_DEV_DIR or ~/.cache/beacon/dev)")
    up.set_defaults(func=cmd_dev_up)
    down = sub.add_parser("down", help="stop a detached control plane")
    down.add_argument("--dir")
    down.set_defaults(func=cmd_dev_down)
    status = sub.add_parser("status", help="show a detached control plane's processes")
    status.add_argument("--dir")
    status.set_defaults(func=cmd_dev_status)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
