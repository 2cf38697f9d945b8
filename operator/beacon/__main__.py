"""Command line of the operator: `python -m beacon operator` (the image's entrypoint).

Why it exists: every flag of the operator is parsed and documented in one place, and `--help` lists them all.
The development tooling (local control plane, `make run`) has its own command line: `python -m beacon_dev`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the operator against the cluster in KUBECONFIG (or in-cluster credentials)."""

    import kopf

    from beacon.app import run
    from beacon.configs import ReloadPolicy
    from beacon.operator_runtime import Options, ShardOptions

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
        shard=ShardOptions(
            identity=args.shard_identity,
            namespace=args.shard_namespace,
            group=args.shard_group,
            lease_seconds=args.shard_lease_seconds,
            renew_seconds=args.shard_renew_seconds,
        )
        if args.shard
        else None,
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
    mode = op.add_mutually_exclusive_group()
    mode.add_argument("--peering", action="store_true", help="use kopf peering (HA: one active replica)")
    mode.add_argument(
        "--shard",
        action="store_true",
        help="sharded, active-active: each replica serves the namespaces rendezvous hashing gives it, coordinated "
        "by one Lease per replica (see --shard-*)",
    )
    op.add_argument(
        "--shard-identity",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="this replica's name in the shard group (default: $POD_NAME, else the host name)",
    )
    op.add_argument(
        "--shard-namespace",
        default=os.environ.get("POD_NAMESPACE", "beacon-system"),
        help="where the group's Leases live (default: $POD_NAMESPACE, else beacon-system)",
    )
    op.add_argument("--shard-group", default="beacon", help="the shard group's name (default beacon)")
    op.add_argument(
        "--shard-lease-seconds",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a replica's Lease stays valid: a crashed replica's namespaces move this long after its "
        "last renewal (default 10)",
    )
    op.add_argument(
        "--shard-renew-seconds", type=float, default=2.0, metavar="SECONDS", help="Lease renewal period (default 2)"
    )
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

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
