"""Command line: `python -m beacon dev up|down|status` and `python -m beacon run`.

Why it exists: the README promises two commands, and `make run` must behave the same on a laptop with a kind
cluster (KUBECONFIG set) and on a bare machine (no cluster: start the local control plane). Keeping that choice
here, not in the Makefile, lets it be tested and typed like the rest of the code.
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

from beacon.devcluster import ControlPlaneError, DevCluster, Ports, find_bin_dir
from beacon.devcluster.cluster import State
from beacon.netguard import pid_alive


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
        print(f"[beacon] a dev cluster already runs from {workdir}; `python -m beacon dev down` stops it")
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
            print(f"[beacon] detached; stop with `python -m beacon dev down --dir {workdir}`")
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
    from beacon import demo

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
        print(f"[beacon] a dev cluster already runs from {workdir}; `python -m beacon dev down` stops it")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return demo.run_local(
        workdir=workdir,
        examples=args.examples,
        crds=args.crds,
        kubectl_crds=_install_crds,
        random_ports=args.random_ports,
    )


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the operator against the cluster in KUBECONFIG (or in-cluster credentials)."""

    import kopf

    from beacon.configs import ReloadPolicy
    from beacon.operator_runtime import Options, run

    kopf.configure(verbose=args.verbose, log_prefix=False)
    options = Options(
        metrics_address=args.metrics_address,
        metrics_port=args.metrics_port,
        liveness_port=args.liveness_port,
        allow_probe_cidrs=tuple(args.allow_probe_cidr),
        probe_concurrency=args.probe_concurrency,
        resync_seconds=args.resync_seconds,
        namespaces=tuple(args.namespace),
        reload_policy=ReloadPolicy(
            debounce=args.reload_debounce,
            max_delay=args.reload_max_delay,
            rate_count=args.reload_rate_limit[0],
            rate_period=args.reload_rate_limit[1],
        ),
        standalone=not args.peering,
        peering_name=args.peering_name,
        peering_lifetime=args.peering_lifetime,
        peering_priority=args.peering_priority,
        uvloop=not args.no_uvloop,
    )
    run(options)
    return 0


def _rate_limit(value: str) -> tuple[int, float]:
    from beacon.config_core import parse_rate_limit

    try:
        return parse_rate_limit(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beacon", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="use KUBECONFIG's cluster or start the local control plane; install CRDs")
    run.add_argument("--crds", type=Path, default=Path("crds"), help="CRD directory (default: crds)")
    run.add_argument("--dir", help="work directory for a local control plane")
    run.add_argument("--examples", type=Path, default=Path("examples"), help="examples to apply (default: examples)")
    run.add_argument("--random-ports", action="store_true", help="pick free ports instead of the defaults")
    run.set_defaults(func=cmd_run)

    op = sub.add_parser("operator", help="run the beacon operator (KUBECONFIG or in-cluster credentials)")
    op.add_argument("--metrics-address", default="0.0.0.0", help="address of /metrics (default: all)")  # noqa: S104
    op.add_argument("--metrics-port", type=int, default=9090, help="port of /metrics (0: off; default 9090)")
    op.add_argument("--liveness-port", type=int, default=8081, help="port of /healthz (0: off; default 8081)")
    op.add_argument(
        "--allow-probe-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="probe addresses in CIDR even if the probe policy refuses them (loopback, link-local, metadata); "
        "repeatable",
    )
    op.add_argument("--probe-concurrency", type=int, default=64, help="probes in flight at most (default 64)")
    op.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="compare memory with the API this often, reads only (0: off; default 60)",
    )
    op.add_argument("--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    op.add_argument(
        "--reload-debounce",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="roll out an opted-in workload once its configs stopped changing for this long (default 2)",
    )
    op.add_argument(
        "--reload-max-delay",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="but no later than this after the first change of a burst (default 30)",
    )
    op.add_argument(
        "--reload-rate-limit",
        type=_rate_limit,
        default=(3, 60.0),
        metavar="COUNT/SECONDS",
        help="at most COUNT rollouts of one workload per SECONDS; later changes wait and are combined (default 3/60)",
    )
    op.add_argument("--peering", action="store_true", help="use kopf peering (HA: one active replica)")
    op.add_argument("--peering-name", default="beacon", help="kopf peering object name (default beacon)")
    op.add_argument(
        "--peering-lifetime",
        type=int,
        default=15,
        metavar="SECONDS",
        help="how long a replica's peering keep-alive is valid: a standby takes over at most this long after the "
        "active replica died (default 15)",
    )
    op.add_argument(
        "--peering-priority",
        type=int,
        default=None,
        help="kopf peering priority (default: from the start time, so the oldest replica is the active one)",
    )
    op.add_argument(
        "--no-uvloop",
        action="store_true",
        default=os.environ.get("BEACON_UVLOOP", "1") == "0",
        help="run on asyncio's own event loop instead of uvloop (also BEACON_UVLOOP=0)",
    )
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=cmd_operator)

    dev = sub.add_parser("dev", help="the local control plane")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    up = dev_sub.add_parser("up", help="start etcd, kube-apiserver, kube-controller-manager and CoreDNS")
    up.add_argument("--detach", action="store_true", help="leave it running in the background")
    up.add_argument("--random-ports", action="store_true", help="pick free ports instead of the defaults")
    up.add_argument("--crds", type=Path, help="install the CRDs from this directory once ready")
    up.add_argument("--dir", help="work directory (default: $BEACON_DEV_DIR or ~/.cache/beacon/dev)")
    up.set_defaults(func=cmd_dev_up)
    down = dev_sub.add_parser("down", help="stop a detached control plane")
    down.add_argument("--dir")
    down.set_defaults(func=cmd_dev_down)
    status = dev_sub.add_parser("status", help="show a detached control plane's processes")
    status.add_argument("--dir")
    status.set_defaults(func=cmd_dev_status)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
