"""The health state machine of one endpoint: probe results in, status transitions out. Pure, no I/O, no clock.

Why it exists: thresholds are what keep a flapping endpoint from causing a write storm and what keep a restart
from deregistering healthy endpoints. Keeping the rules in one pure function makes them easy to test and the
same for every kind of check.

Rules (Consul's and Kubernetes' readiness semantics combined):
- A new endpoint starts UNKNOWN, which is published as not ready. `healthy_threshold` consecutive successes make
  it PASSING; `unhealthy_threshold` consecutive failures make it CRITICAL.
- PASSING needs `unhealthy_threshold` consecutive failures to become CRITICAL; CRITICAL needs
  `healthy_threshold` consecutive successes to become PASSING. A single result never flips a settled status
  unless its threshold is 1.
- After an operator restart, an endpoint is seeded with the status it was last published with (read back from
  its EndpointSlice), so a healthy endpoint stays ready while its first probes run.
- With `deregister_after`, an endpoint CRITICAL for that long is dropped from the outputs until it passes again.
- A transition remembers the probe that made it (`Decision`: its detail, latency and the consecutive count that
  reached the threshold). It changes only at a transition, so the status can show it without a write per probe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Status(enum.StrEnum):
    UNKNOWN = "unknown"
    PASSING = "passing"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Thresholds:
    healthy: int = 1
    unhealthy: int = 3
    deregister_after: float | None = None

    def __post_init__(self) -> None:
        if self.healthy < 1 or self.unhealthy < 1:
            raise ValueError("thresholds must be >= 1")


@dataclass(frozen=True, slots=True)
class Decision:
    """The probe that moved an endpoint into its current status: its detail, its latency in seconds (None when
    unknown) and the consecutive results of its kind, counting it (the threshold that was reached)."""

    detail: str
    latency: float | None
    consecutive: int


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """What beacon knows about one endpoint's health; `since` is when `status` last changed (seconds, any epoch).
    `decision`: the probe that made that change (None before the first transition, and for a seeded status)."""

    status: Status = Status.UNKNOWN
    successes: int = 0
    failures: int = 0
    since: float = 0.0
    detail: str = "not probed yet"
    decision: Decision | None = None

    @property
    def ready(self) -> bool:
        return self.status is Status.PASSING

    def deregistered(self, *, now: float, thresholds: Thresholds) -> bool:
        """True when the endpoint has been CRITICAL for at least `deregister_after` seconds."""
        return (
            thresholds.deregister_after is not None
            and self.status is Status.CRITICAL
            and now - self.since >= thresholds.deregister_after
        )


def seeded(*, ready: bool | None, now: float) -> EndpointHealth:
    """The starting health of an endpoint: from its last published readiness when known, else UNKNOWN."""
    if ready is None:
        return EndpointHealth(since=now)
    if ready:
        return EndpointHealth(status=Status.PASSING, since=now, detail="restored from the published EndpointSlice")
    return EndpointHealth(status=Status.CRITICAL, since=now, detail="restored from the published EndpointSlice")


def settled(health: EndpointHealth, *, ok: bool, detail: str) -> bool:
    """Whether `observe` would change nothing that matters: the result confirms a settled status (PASSING with no
    failure counted, or CRITICAL with no success counted) with the same detail. Only the counter past its
    threshold would grow, and that counter is never read again before the opposite result resets it. A caller
    may then skip the bookkeeping (deregistration still depends on time: see `EndpointHealth.deregistered`)."""
    if detail != health.detail:
        return False
    if ok:
        return health.status is Status.PASSING and health.failures == 0
    return health.status is Status.CRITICAL and health.successes == 0


def observe(
    health: EndpointHealth,
    *,
    ok: bool,
    detail: str,
    now: float,
    thresholds: Thresholds,
    latency: float | None = None,
) -> tuple[EndpointHealth, bool]:
    """Apply one probe result (`latency`: how long the probe took, in seconds). Returns the new health and whether
    `status` changed (a transition); a transition records its `Decision`."""
    if ok:
        successes, failures = health.successes + 1, 0
        target = Status.PASSING if successes >= thresholds.healthy else health.status
    else:
        successes, failures = 0, health.failures + 1
        target = Status.CRITICAL if failures >= thresholds.unhealthy else health.status
    changed = target is not health.status
    return (
        replace(
            health,
            status=target,
            successes=successes,
            failures=failures,
            since=now if changed else health.since,
            detail=detail,
            decision=Decision(detail, latency, successes or failures) if changed else health.decision,
        ),
        changed,
    )
