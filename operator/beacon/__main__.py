"""Command line of the operator: `python -m beacon operator` (the image's entrypoint).

Why it exists: every flag of the operator is parsed and documented in one place, and `--help` lists them all.
The development tooling (local control plane, `make run`) has its own command line: `python -m beacon_dev`.
The connection-loss hint flags (--no-hints, --hint-reprobe-seconds, --hint-gap-seconds, --hint-rate,
--hint-burst) became `Options.connection_loss_hints` and `Options.hint_policy` (a `beacon.prober.HintPolicy`).
The self-preservation flags (--self-preservation, --self-preservation-window, -min-endpoints, -enter, -exit)
became `Options.self_preservation` (a `beacon.failsafe.SelfPreservationPolicy`, validated there: a bad combination
is a usage error at start-up).
`--log-format json` makes every log line one JSON object (kopf's JSON formatter, with beacon's `beacon.logfields`
extras as keys); `plain`, the default, keeps the human format.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from collections.abc import Sequence


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the operator against the cluster in KUBECONFIG (or in-cluster credentials)."""

    from beacon.app import run
    from beacon.configs import ReloadPolicy
    from beacon.failsafe import SelfPreservationPolicy
    from beacon.operator_runtime import Options, ShardOptions
    from beacon.prober import HintPolicy

    configure_logging(verbose=args.verbose, log_format=args.log_format)
    try:
        self_preservation = SelfPreservationPolicy(
            enabled=args.self_preservation == "on",
            window=args.self_preservation_window,
            min_endpoints=args.self_preservation_min_endpoints,
            enter_share=args.self_preservation_enter / 100,
            exit_share=args.self_preservation_exit / 100,
        )
    except ValueError as exc:
        print(f"beacon operator: error: self-preservation: {exc}", file=sys.stderr)
        return 2
    options = Options(
        self_preservation=self_preservation,
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
            budget_count=args.restart_budget[0],
            budget_period=args.restart_budget[1],
        ),
        standalone=not args.peering,
        peering_name=args.peering_name,
        peering_lifetime=args.peering_lifetime,
        peering_priority=args.peering_priority,
        uvloop=not args.no_uvloop,
        connection_loss_hints=not args.no_hints,
        hint_policy=HintPolicy(
            reprobe_seconds=args.hint_reprobe_seconds,
            gap_seconds=args.hint_gap_seconds,
            rate=args.hint_rate,
            burst=args.hint_burst,
        ),
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


def configure_logging(*, verbose: bool, log_format: str) -> None:
    """kopf's logging set-up in either format. JSON: one object per line with `timestamp`, `severity`, `logger`,
    `message` and the record's extras (`event`, `namespace`, `entry`, `endpoint`, ...); Python warnings go through
    logging too, so nothing else reaches stderr as plain text."""
    import logging

    import kopf

    if log_format == "json":
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON, log_prefix=False, log_refkey="object")
        for handler in logging.getLogger().handlers:
            handler.addFilter(_json_fields)
        logging.captureWarnings(True)
    else:
        kopf.configure(verbose=verbose, log_prefix=False)


BEACON_KINDS = ("ServiceEntry", "ConfigEntry")


def _json_fields(record: object) -> bool:
    """Name the logger in JSON lines (`logger`: beacon.discovery, kopf.objects, ...), as the plain format does,
    and give kopf's per-object lines (a handler's failure, say) beacon's `namespace`, `entry` and `endpoint`
    fields from kopf's object reference, so one query finds every line about an entry."""
    fields = record.__dict__
    fields.setdefault("logger", getattr(record, "name", ""))
    ref = fields.get("k8s_ref")
    if isinstance(ref, dict) and "namespace" not in fields:
        fields["namespace"] = ref.get("namespace")
        fields["entry"] = ref.get("name") if ref.get("kind") in BEACON_KINDS else None
        fields["endpoint"] = None
    return True


def _rate_limit(value: str) -> tuple[int, float]:
    from beacon.config_core import parse_rate_limit

    try:
        return parse_rate_limit(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _finite(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"not a finite number: {value!r}")
    return number


def _positive(value: str) -> float:
    number = _finite(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {value!r}")
    return number


def _not_negative(value: str) -> float:
    number = _finite(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return number


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {value!r}")
    return int(value)


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
        "--no-hints",
        action="store_true",
        help="never probe an endpoint because its idle probe connection was closed (connection-loss hints); "
        "each ServiceEntry can opt out with spec.healthCheck.connectionLossHints: false",
    )
    op.add_argument(
        "--self-preservation",
        choices=("on", "off"),
        default="on",
        help="stop withdrawing endpoints on failed probes while most probes fail at once, which is more likely "
        "this operator's own network than the backends (default on)",
    )
    op.add_argument(
        "--self-preservation-window",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="each endpoint counts by its latest probe in this window (default 10, one default interval)",
    )
    op.add_argument(
        "--self-preservation-min-endpoints",
        type=_count,
        default=20,
        metavar="COUNT",
        help="fewer endpoints than this in the window never start the mode (default 20)",
    )
    op.add_argument(
        "--self-preservation-enter",
        type=float,
        default=50.0,
        metavar="PERCENT",
        help="the mode starts when more than this share of endpoints failed their latest probe (default 50)",
    )
    op.add_argument(
        "--self-preservation-exit",
        type=float,
        default=30.0,
        metavar="PERCENT",
        help="the mode ends when fewer than this share did, below --self-preservation-enter (default 30)",
    )
    op.add_argument(
        "--hint-reprobe-seconds",
        type=_positive,
        default=0.1,
        metavar="SECONDS",
        help="after a connection-loss hint's probe fails, re-probe this often until unhealthyThreshold failures "
        "or a pass (default 0.1)",
    )
    op.add_argument(
        "--hint-gap-seconds",
        type=_not_negative,
        default=1.0,
        metavar="SECONDS",
        help="an endpoint takes its next connection-loss hint at least this long after its last one was answered, "
        "doubled after each one that found it healthy, up to its interval (default 1)",
    )
    op.add_argument(
        "--hint-rate",
        type=_positive,
        default=200.0,
        metavar="PER_SECOND",
        help="connection-loss hints answered per second at most, all endpoints together; the rest are dropped "
        "(counted) and those endpoints stay on their interval (default 200)",
    )
    op.add_argument(
        "--hint-burst",
        type=_count,
        default=400,
        metavar="COUNT",
        help="connection-loss hints answered at once at most, before --hint-rate applies (default 400)",
    )
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
    op.add_argument(
        "--restart-budget",
        type=_rate_limit,
        default=(20, 10.0),
        metavar="COUNT/SECONDS",
        help="cluster-wide budget of workload restarts, shared by every ConfigEntry: a token bucket of COUNT "
        "tokens refilled at COUNT per SECONDS (default 20/10)",
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
    op.add_argument(
        "--log-format",
        choices=("plain", "json"),
        default=os.environ.get("BEACON_LOG_FORMAT", "plain"),
        help="plain: human-readable lines (default); json: one JSON object per line, with the fields event, "
        "namespace, entry and endpoint on transition, drain, write and error lines (also BEACON_LOG_FORMAT)",
    )
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=cmd_operator)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
