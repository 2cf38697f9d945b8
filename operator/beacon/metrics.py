"""Prometheus metrics of the operator, in one registry, served on /metrics.

Why it exists: "zero writes in steady state" and "probes keep up" are claims operators should be able to watch
in production, not only in our tests: API writes by verb and kind, probe latency, health transitions and the
probe queue depth are exported here and nowhere else.

Connection-loss hints (prober.py) added three: detections (transitions to unhealthy) by what triggered the
decisive probe, so the gain over polling can be watched; the probes hints ran; and the hints the rate limits
dropped (those endpoints fell back to their interval).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

API_WRITES = Counter(
    "beacon_api_writes_total", "Kubernetes API write requests made by beacon", ["verb", "kind"], registry=REGISTRY
)
API_PENDING = Gauge(
    "beacon_api_requests_pending",
    "Kubernetes API requests made by beacon and not answered yet (waiting for a client thread or under way)",
    registry=REGISTRY,
)
PROBES = Counter("beacon_probes_total", "Probes run, by check kind and result", ["check", "result"], registry=REGISTRY)
PROBE_SECONDS = Histogram(
    "beacon_probe_duration_seconds",
    "Probe latency by check kind",
    ["check"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
TRANSITIONS = Counter(
    "beacon_health_transitions_total", "Endpoint health transitions, by new status", ["to"], registry=REGISTRY
)
DETECTIONS = Counter(
    "beacon_detections_total",
    "Endpoint health transitions to unhealthy, by what triggered the decisive probe: its interval, or a connection "
    "to it that the peer closed (connection-loss)",
    ["trigger"],
    registry=REGISTRY,
)
HINT_PROBES = Counter(
    "beacon_hint_probes_total",
    "Probes run because the peer closed an idle probe connection (connection-loss hints), re-probes included",
    registry=REGISTRY,
)
HINTS_DROPPED = Counter(
    "beacon_hints_dropped_total",
    "Connection-loss hints dropped by a rate limit (endpoint: its last hint sequence is running or ended too "
    "recently; global: the token bucket was empty); their endpoints stay on their interval",
    ["limit"],
    registry=REGISTRY,
)
for _trigger in ("interval", "connection-loss"):
    DETECTIONS.labels(trigger=_trigger)  # both series exist from the start, at 0
PROBE_LATENESS = Histogram(
    "beacon_probe_lateness_seconds",
    "How late probes start: from the time a probe was due to the time it started (scheduler and event-loop lag)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("beacon_probe_queue_depth", "Probes due but not yet started", registry=REGISTRY)
TARGETS = Gauge("beacon_probe_targets", "Endpoints being probed", registry=REGISTRY)
RECONCILES = Counter(
    "beacon_reconciles_total", "Reconciles by kind and outcome", ["kind", "outcome"], registry=REGISTRY
)
CONFIG_REVISIONS = Counter(
    "beacon_config_revisions_total", "ConfigEntry revisions recorded (ControllerRevisions created)", registry=REGISTRY
)
CONFIG_REVISION_REPAIRS = Counter(
    "beacon_config_revision_repairs_total",
    "ControllerRevisions deleted or edited by hand: written back (recreated) or dropped from the history "
    "(unrecoverable: their data was nowhere left)",
    ["outcome"],
    registry=REGISTRY,
)
CONFIG_ROLLOUTS = Counter(
    "beacon_config_rollouts_total",
    "Tracked ConfigEntry rollouts (spec.rollout or spec.canary) that ended: complete, rolled_back (a step failed "
    "and the previous content is served again), failed (a step failed with nothing to roll back to, or a canary "
    "with autoRollback false), superseded (a newer revision arrived first)",
    ["outcome"],
    registry=REGISTRY,
)
CONFIG_START_HOLD = Gauge(
    "beacon_config_start_hold_seconds",
    "How long the last ConfigEntry start-up held the event loop (its synchronous part, after the listings)",
    registry=REGISTRY,
)
CONFIG_PLANNING = Counter(
    "beacon_config_planning_seconds_total",
    "Event-loop time spent layering and planning ConfigEntries (the part that grows with a namespace's entries)",
    registry=REGISTRY,
)
RELOADS = Counter(
    "beacon_config_reloads_total",
    "Workload reloads by kind and outcome (rolled_out: pod template bumped; deferred: held by the rate limit; "
    "budget_wait: waited for the cluster-wide restart budget)",
    ["kind", "outcome"],
    registry=REGISTRY,
)
CONFIG_WORKLOAD_PODS = Gauge(
    "beacon_config_workload_pods",
    "Live pods of an opted-in workload by the revision of a ConfigEntry they run (baseline: started before the "
    "workload opted in; unknown: cannot be told; older: a revision outside the entry's status window)",
    ["namespace", "entry", "workload", "revision"],
    registry=REGISTRY,
)
CONFIG_WORKLOAD_ADOPTED = Gauge(
    "beacon_config_workload_adopted",
    "1 while an opted-in workload is fully on its ConfigEntry's current revision (every live pod runs it and is "
    "ready), else 0",
    ["namespace", "entry", "workload"],
    registry=REGISTRY,
)
SELF_PRESERVATION = Gauge(
    "beacon_self_preservation_active",
    "1 while self-preservation is on: most probes fail at once, so probe failures withdraw nothing",
    registry=REGISTRY,
)
SELF_PRESERVATION_FAILING = Gauge(
    "beacon_self_preservation_failing_ratio",
    "Share of endpoints (network checks) whose latest probe in the window failed: what self-preservation judges",
    registry=REGISTRY,
)
SELF_PRESERVATION_CHANGES = Counter(
    "beacon_self_preservation_transitions_total", "Self-preservation turned on or off", ["to"], registry=REGISTRY
)
ENDPOINTS_HELD = Gauge("beacon_endpoints_held", "Failing endpoints held ready by self-preservation", registry=REGISTRY)
ENDPOINTS_FLAPPING = Gauge("beacon_endpoints_flapping", "Endpoints held not ready by flap damping", registry=REGISTRY)
ENTRIES_IN_PANIC = Gauge(
    "beacon_entries_in_panic", "Entries below their panic floor, publishing every endpoint", registry=REGISTRY
)
PANIC_CHANGES = Counter(
    "beacon_panic_transitions_total", "Entries entering or leaving panic", ["to"], registry=REGISTRY
)
SHARD_MEMBERS = Gauge(
    "beacon_shard_members", "Live members of this replica's shard group (sharded mode)", registry=REGISTRY
)
SHARD_NAMESPACES = Gauge(
    "beacon_shard_namespaces", "Namespaces this replica serves now (sharded mode: its units)", registry=REGISTRY
)
SHARD_HANDOVERS = Counter(
    "beacon_shard_handovers_total",
    "Namespaces this replica released to another member or acquired from one (sharded mode)",
    ["direction"],
    registry=REGISTRY,
)

# (check type, ok) -> (PROBES child, PROBE_SECONDS child): every probe result is counted, and looking the label
# values up again each time (a lock and a dict per call) is work the probe path need not do
_PROBE_CHILDREN: dict[tuple[type, bool], tuple[Any, Any]] = {}


def record_probe(check: object, *, ok: bool, seconds: float) -> None:
    """Count one probe of `check` (an HttpCheck, TcpCheck, ...) and observe its duration."""
    children = _PROBE_CHILDREN.get((type(check), ok))
    if children is None:
        kind = type(check).__name__.removesuffix("Check").lower()
        children = (PROBES.labels(check=kind, result="ok" if ok else "fail"), PROBE_SECONDS.labels(check=kind))
        _PROBE_CHILDREN[(type(check), ok)] = children
    children[0].inc()
    children[1].observe(seconds)
