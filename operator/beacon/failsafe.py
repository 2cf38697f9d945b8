"""Discovery that fails safe: the policies between the health state and the writer. Pure: no I/O, no clock.

Why it exists: a probe result is evidence about the endpoint only while the prober itself is healthy. When the
operator's own network breaks (a NetworkPolicy change, a partition, a DNS outage, an event loop so saturated that
every probe times out), every probe fails and a naive discovery withdraws every endpoint, though the backends are
fine: the outage of one pod becomes the outage of every service it publishes. Three policies guard against that
and against its smaller cousins, each small enough to test here without a cluster or an event loop:

- `SelfPreservation` (operator-wide, on by default; Eureka's self-preservation). It reads the raw probe results,
  not the health transitions: the first threshold crossings of a mass outage look like isolated failures, so by
  the time transitions look correlated, many withdrawals are written already. Each endpoint counts once (its
  latest result in a sliding window, so a fast prober does not outvote a slow one), and only network checks count
  (HTTP, TCP, gRPC, UDP): a Lease is renewed by the endpoint itself through the API server, so an expired Lease is
  evidence from the endpoint, not a symptom of the prober's path. The mode starts when more than `enter_share` of
  at least `min_endpoints` endpoints failed their latest probe in the window, and ends only when fewer than
  `exit_share` did (hysteresis). While it is on, no new not-ready caused by a probe is published: what was last
  published stays. After it ends, an endpoint held ready is withdrawn only once `unhealthyThreshold` probes that
  *started after the exit* failed in a row: the failures of the outage itself are never evidence.
- `FlapDamper` (per endpoint; RFC 2439 route-flap damping). Each transition of an endpoint's probe-driven state
  adds a penalty that halves every `half_life` seconds; above `suppress` the endpoint is held not ready (shown as
  Flapping) until the penalty decays to `reuse` and its probes pass. A ceiling on the penalty bounds the longest
  suppression (`max_suppress` seconds after the last flap), as BGP's max-suppress-time does.
- `panic` (per entry, off by default; Envoy's panic threshold). When the share of healthy endpoints is strictly
  below `minHealthyPercent`, health stops being a filter: every endpoint of the entry is published ready (reason
  Panic), and the real healthy count is reported, because sending traffic to a few overloaded survivors makes the
  outage total.

Precedence, as `decide` applies it per endpoint and then per entry (first match wins where a layer decides):

1. Spec, operator and cluster facts: an endpoint removed from the spec is gone (the caller passes only current
   endpoints and `forget`s the rest); a pod being deleted (Terminating), a drained endpoint (Draining), a Pod whose
   Ready condition is False (PodNotReady) and an address the probe policy refuses (ProbeRefused) are published
   not ready at once. No policy below can hold them ready, and they are outside the panic floor's count (as
   Envoy's excluded hosts): panic must never resurrect what someone took out on purpose.
2. Self-preservation: a probe-caused not-ready (CRITICAL) of an endpoint published ready is held ready
   (HeldBySelfPreservation) while the mode is on, and after it until failures started after the exit confirm it.
3. Flap damping: the state after step 2 is the damper's input, so a mass outage that self-preservation held
   charges no penalty to anyone (its down-and-up would otherwise damp every endpoint of the fleet right after the
   outage). A suppressed endpoint is published not ready (Flapping).
4. The panic floor, per entry, last: it counts the endpoints that steps 2-3 publish ready (held ones included, so
   a network outage that self-preservation absorbs does not also throw every entry into panic and re-add the
   endpoints withdrawn before the outage), and it overrides damping, because a flapping endpoint serves better
   than none.

Limits, on purpose: the mode is in memory (a restart starts outside it; restart safety comes from seeding health
from the published EndpointSlices), per replica (each shard's network can break on its own), and it protects what
is published when it starts, not what was withdrawn before it: with `unhealthyThreshold: 1`, endpoints whose
single failed probe lands before the share crosses the entry threshold are withdrawn (a threshold of 2 or more
gives the mode the time to start). Like Eureka's, the mode trades freshness for safety: a real outage of more than
`exit_share` of the fleet keeps it on, which the caller surfaces (a condition, a metric, an Event, a WARNING line).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar, assert_never

from beacon.health import Status
from beacon.targets import Check, GrpcCheck, HttpCheck, LeaseCheck, TcpCheck, UdpCheck

K = TypeVar("K", bound=Hashable)

CheckKind = Literal["http", "tcp", "grpc", "udp", "lease"]
# the checks whose results say something about the prober's own path (a Lease is renewed by the endpoint itself)
NETWORK_CHECKS: Final[frozenset[str]] = frozenset({"http", "tcp", "grpc", "udp"})


def check_kind(check: Check) -> CheckKind:
    """The kind of a probe target's check, as `SelfPreservation.observe` and `decide` take it."""
    if isinstance(check, HttpCheck):
        return "http"
    if isinstance(check, TcpCheck):
        return "tcp"
    if isinstance(check, GrpcCheck):
        return "grpc"
    if isinstance(check, UdpCheck):
        return "udp"
    if isinstance(check, LeaseCheck):
        return "lease"
    assert_never(check)


class Reason(enum.StrEnum):
    """Why an endpoint is published as it is (CamelCase, for status and Events)."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"
    UNKNOWN = "Unknown"  # not probed to a verdict yet
    FLAPPING = "Flapping"
    HELD = "HeldBySelfPreservation"
    PANIC = "Panic"
    TERMINATING = "Terminating"
    DRAINING = "Draining"
    POD_NOT_READY = "PodNotReady"
    PROBE_REFUSED = "ProbeRefused"


FACT_REASONS: Final[frozenset[Reason]] = frozenset(
    {Reason.TERMINATING, Reason.DRAINING, Reason.POD_NOT_READY, Reason.PROBE_REFUSED}
)


# ------------------------------------------------------------------------------------------- self-preservation
@dataclass(frozen=True, slots=True)
class SelfPreservationPolicy:
    """When the operator stops trusting its own probes.

    Defaults: enter when more than 50% of at least 20 endpoints failed their latest probe in the last 10 s, leave
    when fewer than 30% did. 10 s covers one default probe interval, so every endpoint has a vote in the window;
    an entry has `window` >= its interval to count fully. 20 endpoints: below that, a few real failures are a
    large share and the evidence is too thin to overrule probes. 50%: a majority of a fleet failing at once is far
    more likely the prober's path than the world. 30%: the gap keeps a share hovering near 50% from toggling the
    mode, and it stays above the background of really dead endpoints of a healthy fleet, so the mode ends once
    the path heals.
    """

    enabled: bool = True
    window: float = 10.0
    min_endpoints: int = 20
    enter_share: float = 0.5  # strictly more than this share of failing endpoints enters the mode
    exit_share: float = 0.3  # strictly less than this share leaves it

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError("the window must be positive")
        if self.min_endpoints < 1:
            raise ValueError("min_endpoints must be >= 1")
        if not 0.0 <= self.exit_share < self.enter_share < 1.0:
            raise ValueError("need 0 <= exit_share < enter_share < 1 (hysteresis)")


@dataclass(frozen=True, slots=True)
class ModeChange:
    """The mode started (`entered`) or ended at `at`, with the window's count when it did. `since`: when the mode
    had started (for an exit: how long it lasted)."""

    entered: bool
    at: float
    failing: int
    population: int
    window: float
    since: float

    @property
    def share(self) -> float:
        return self.failing / self.population if self.population else 0.0

    def describe(self) -> str:
        """One line for the WARNING log, the Event and the condition's message."""
        counted = (
            f"{self.failing} of {self.population} endpoints ({self.share:.0%}) failed their latest probe "
            f"in the last {self.window:g} s"
        )
        if self.entered:
            return (
                f"self-preservation on: {counted}, more likely the operator's own network than the backends; "
                "probe failures no longer withdraw endpoints, what is published stays"
            )
        return (
            f"self-preservation off after {self.at - self.since:.0f} s: {counted}; an endpoint held ready is "
            "withdrawn once probes started after now confirm its failure"
        )


@dataclass(frozen=True, slots=True)
class ModeState:
    """The mode and the window's count at one instant (for a gauge and the condition)."""

    active: bool
    failing: int
    population: int
    tracked: int  # endpoints with a result that were not forgotten, in or out of the window
    since: float | None  # when the mode started, while it is on

    @property
    def share(self) -> float:
        return self.failing / self.population if self.population else 0.0


@dataclass(frozen=True, slots=True)
class _Latest:
    seq: int
    ok: bool


class SelfPreservation(Generic[K]):
    """The operator-wide mode that keeps what is published when the prober's own path looks broken.

    Feed it every raw probe result (`observe`, before any "nothing changed" shortcut of the caller; never a result
    the probe policy refused, which sent nothing), ask `active(now)` or `may_publish_not_ready(...)`, and
    `take_changes()` after each batch: every call that is given a time re-evaluates the mode at that time and
    queues a `ModeChange` when it starts or ends. `forget` an endpoint that goes. Time is the caller's monotonic
    clock, in seconds; a time older than one seen before counts as the newest seen.

    Work per result is O(1) amortised: results sit in a queue in arrival order until they leave the window, and the
    window's counts (endpoints whose latest result is in it, and those of them that failed) move incrementally.
    Memory: one small record per endpoint not forgotten, plus the results of the last `window` seconds.
    """

    _MAX_CHANGES: Final = 64  # unread changes kept (older ones are dropped if the caller never reads them)

    def __init__(self, policy: SelfPreservationPolicy | None = None) -> None:
        self.policy = policy or SelfPreservationPolicy()
        self._now = -math.inf
        self._seq = 0
        self._events: deque[tuple[float, int, K]] = deque()  # (arrival, seq, key), in seq order
        self._evicted = 0  # seq of the newest result that left the window: older latest results are out of it
        self._latest: dict[K, _Latest] = {}
        self._population = 0  # endpoints whose latest result is in the window
        self._failing = 0  # ... and failed
        self._active = False
        self._since: float | None = None
        self._exited_at: float | None = None
        self._confirmed: dict[K, int] = {}  # consecutive failures of probes started after the last exit
        self._changes: deque[ModeChange] = deque(maxlen=self._MAX_CHANGES)

    def __len__(self) -> int:
        """Endpoints remembered (each until it is forgotten)."""
        return len(self._latest)

    @property
    def buffered(self) -> int:
        """Results held in the window's queue (superseded ones included, until they leave the window)."""
        return len(self._events)

    def observe(
        self, key: K, *, ok: bool, kind: str, now: float, started: float | None = None, threshold: int | None = None
    ) -> bool:
        """One raw probe result of endpoint `key` that arrived at `now`; `started`: when the probe started (default
        `now`; from a ProbeResult, `now - result.seconds`). Lease results (and any kind not in NETWORK_CHECKS) are
        ignored: they are the endpoint's own evidence, not the prober's.

        Returns True when this result is the `threshold`-th (the entry's unhealthyThreshold) consecutive failure
        of probes started after the last exit: the moment an endpoint held ready may be withdrawn, though its
        health did not change, so the caller reconciles its entry then."""
        if not self.policy.enabled or kind not in NETWORK_CHECKS:
            return False
        confirmed = False
        now = self._advance(now)
        self._seq += 1
        self._uncount(key)
        self._latest[key] = _Latest(self._seq, ok)
        self._events.append((now, self._seq, key))
        self._population += 1
        self._failing += not ok
        if self._exited_at is not None and not self._active:
            if ok:
                self._confirmed.pop(key, None)
            elif (now if started is None else started) > self._exited_at:
                count = self._confirmed[key] = self._confirmed.get(key, 0) + 1
                confirmed = count == threshold
        self._evaluate(now)
        return confirmed and not self._active

    def forget(self, key: K) -> None:
        """The endpoint is gone (removed from its entry, or its entry deleted): drop everything about it."""
        self._uncount(key)
        self._latest.pop(key, None)
        self._confirmed.pop(key, None)

    def active(self, now: float) -> bool:
        """Whether the mode is on at `now` (re-evaluated: results that left the window no longer count)."""
        if not self.policy.enabled:
            return False
        self._evaluate(self._advance(now))
        return self._active

    def may_publish_not_ready(self, key: K, *, threshold: int, now: float) -> bool:
        """Whether a probe-caused not-ready of `key` may be published: never while the mode is on; after it has
        ended, only once `threshold` (the entry's unhealthyThreshold) consecutive probes started after the exit
        failed. Before the mode was ever on, always."""
        if not self.active(now):
            return self._exited_at is None or self._confirmed.get(key, 0) >= threshold
        return False

    def state(self, now: float) -> ModeState:
        active = self.active(now)
        return ModeState(active, self._failing, self._population, len(self._latest), self._since if active else None)

    @property
    def pending_changes(self) -> bool:
        """Whether `take_changes` has something to give (cheap: for a caller that checks after every result)."""
        return bool(self._changes)

    def take_changes(self) -> list[ModeChange]:
        """The mode's starts and ends since the last call, oldest first."""
        changes = list(self._changes)
        self._changes.clear()
        return changes

    # ---------------------------------------------------------------- internals
    def _advance(self, now: float) -> float:
        """Move the clock (never back) and let the results older than the window leave it."""
        self._now = now = max(self._now, now)
        horizon = now - self.policy.window
        events, latest = self._events, self._latest
        while events and events[0][0] < horizon:
            _, seq, key = events.popleft()
            self._evicted = seq
            last = latest.get(key)
            if last is not None and last.seq == seq:  # the endpoint's latest result leaves the window
                self._population -= 1
                self._failing -= not last.ok
        return now

    def _uncount(self, key: K) -> None:
        last = self._latest.get(key)
        if last is not None and last.seq > self._evicted:
            self._population -= 1
            self._failing -= not last.ok

    def _evaluate(self, now: float) -> None:
        policy, population, failing = self.policy, self._population, self._failing
        if not self._active:
            if population >= policy.min_endpoints and failing > policy.enter_share * population:
                self._active, self._since = True, now
                self._confirmed.clear()
                self._changes.append(ModeChange(True, now, failing, population, policy.window, now))
            return
        # Leaving needs evidence: enough endpoints answered in the window, and few of them failed. No results at
        # all (a stalled loop) is no evidence. A fleet that shrank below the minimum is judged on what is left.
        tracked = len(self._latest)
        enough = population > 0 and population >= min(policy.min_endpoints, tracked)
        if tracked == 0 or (enough and failing < policy.exit_share * population):
            since = self._since if self._since is not None else now
            self._active, self._since, self._exited_at = False, None, now
            self._confirmed.clear()
            self._changes.append(ModeChange(False, now, failing, population, policy.window, since))


# ------------------------------------------------------------------------------------------------ flap damping
@dataclass(frozen=True, slots=True)
class DampingPolicy:
    """RFC 2439's parameters, with BGP's customary values (Cisco's: penalty 1000, suppress 2000, reuse 750,
    half-life 15 min, max-suppress 60 min) scaled from minutes to seconds: the health thresholds already filter
    noise, so what reaches the damper is a published transition, and three of them within about a minute (down,
    up, down: 1000 + ~900 + ~850 > 2000) make a flapper. Once suppressed, an endpoint waits about two half-lives
    (~2 min) after its last flap before its penalty is back at 750; `max_suppress` (four half-lives, BGP's ratio)
    caps the penalty at reuse x 2^(240/60) = 12000, so no endpoint is held more than 4 min after its last flap.
    """

    enabled: bool = True
    penalty: float = 1000.0  # added per transition of the damper's input
    suppress: float = 2000.0  # strictly above: suppressed
    reuse: float = 750.0  # decayed to this (and passing): released
    half_life: float = 60.0  # seconds
    max_suppress: float = 240.0  # seconds: the longest hold after the last transition

    def __post_init__(self) -> None:
        if self.penalty <= 0 or self.half_life <= 0 or self.max_suppress <= 0:
            raise ValueError("penalty, half_life and max_suppress must be positive")
        if not 0 < self.reuse < self.suppress:
            raise ValueError("need 0 < reuse < suppress")
        if self.ceiling <= self.suppress:
            raise ValueError("max_suppress is too short to ever suppress: reuse * 2^(max_suppress/half_life)")

    @property
    def ceiling(self) -> float:
        """The highest penalty: it decays to `reuse` in exactly `max_suppress` seconds."""
        return self.reuse * math.exp2(self.max_suppress / self.half_life)


_REUSE_TOLERANCE: Final = 1e-9  # relative: at `release_at` the decayed penalty is `reuse` up to float rounding


class _Flap:
    __slots__ = ("at", "penalty", "ready", "suppressed")

    def __init__(self, *, ready: bool, at: float) -> None:
        self.penalty = 0.0
        self.at = at  # when `penalty` was last brought up to date
        self.ready = ready  # the damper's last input
        self.suppressed = False


class FlapDamper(Generic[K]):
    """Per-endpoint route-flap damping (RFC 2439). Plain state, time passed in.

    `update(key, ready=..., now=...)` is called with the endpoint's probe-driven state (after self-preservation)
    at each reconcile; a change of that state is a transition and adds `penalty`. The same input again adds
    nothing, so a retried reconcile is not a second flap. The first input seen for a key is its starting point,
    not a flap. `forget` an endpoint that goes.
    """

    def __init__(self, policy: DampingPolicy | None = None) -> None:
        self.policy = policy or DampingPolicy()
        self._records: dict[K, _Flap] = {}

    def __len__(self) -> int:
        return len(self._records)

    def update(self, key: K, *, ready: bool, now: float) -> bool:
        """Record the input of `key` at `now`; returns whether the endpoint is suppressed (publish it not ready)."""
        if not self.policy.enabled:
            return False
        record = self._records.get(key)
        if record is None:
            self._records[key] = _Flap(ready=ready, at=now)
            return False
        penalty = self._decayed(record, now)
        record.penalty, record.at = penalty, max(record.at, now)
        if record.suppressed and self._reusable(penalty):  # released before this input counts (see below)
            record.suppressed = False
        if ready != record.ready:
            record.ready = ready
            record.penalty = min(penalty + self.policy.penalty, self.policy.ceiling)
            record.suppressed = record.suppressed or record.penalty > self.policy.suppress
        # Release is checked before the new transition is charged: an endpoint whose penalty decayed to `reuse`
        # while down is released by the success that brings it back (a real "below reuse AND passing"), instead
        # of being suppressed again by its own recovery.
        return record.suppressed

    def suppressed(self, key: K, *, now: float) -> bool:
        """Whether `key` is suppressed at `now` (a query: changes nothing)."""
        record = self._records.get(key)
        return record is not None and record.suppressed and not self._reusable(self._decayed(record, now))

    def penalty(self, key: K, *, now: float) -> float:
        record = self._records.get(key)
        return 0.0 if record is None else self._decayed(record, now)

    def release_at(self, key: K) -> float | None:
        """When a suppressed endpoint's penalty will have decayed to `reuse` (schedule a reconcile then); None when
        it is not suppressed."""
        record = self._records.get(key)
        if record is None or not record.suppressed:
            return None
        excess = record.penalty / self.policy.reuse
        return record.at + (self.policy.half_life * math.log2(excess) if excess > 1.0 else 0.0)

    def forget(self, key: K) -> None:
        self._records.pop(key, None)

    def _decayed(self, record: _Flap, now: float) -> float:
        elapsed = max(0.0, now - record.at)
        return record.penalty * math.exp2(-elapsed / self.policy.half_life)

    def _reusable(self, penalty: float) -> bool:
        return penalty <= self.policy.reuse * (1.0 + _REUSE_TOLERANCE)


# ------------------------------------------------------------------------------------------------- panic floor
def panic(*, healthy: int, total: int, min_healthy_percent: float | None) -> bool:
    """Envoy's panic threshold: True when `min_healthy_percent` is set (above 0) and the healthy share of `total`
    endpoints is strictly below it. Exact for whole percentages (no float division). No endpoints: no panic."""
    if min_healthy_percent is not None and not 0 <= min_healthy_percent <= 100:
        raise ValueError("min_healthy_percent must be within 0..100")
    if not min_healthy_percent or total <= 0:
        return False
    return healthy * 100 < min_healthy_percent * total


# ------------------------------------------------------------------------------------------------ the precedence
@dataclass(frozen=True, slots=True)
class EndpointInput(Generic[K]):
    """One endpoint of an entry as `decide` sees it. `key`: its key in SelfPreservation and FlapDamper (the
    prober's key); `health`: the health state machine's verdict; `published_ready`: what was last published
    (None: never published). The rest are facts from the spec, the operator and the cluster."""

    key: K
    health: Status
    published_ready: bool | None = None
    terminating: bool = False  # its pod is being deleted
    draining: bool = False  # drained by annotation
    pod_ready: bool | None = None  # its Pod's Ready condition (None: not a pod, or not known)
    refused: bool = False  # the probe policy refuses to probe it


@dataclass(frozen=True, slots=True)
class Publish:
    """What to publish for one endpoint: EndpointSlice conditions (serving is readiness regardless of terminating,
    as Kubernetes defines it) and why."""

    ready: bool
    serving: bool
    terminating: bool
    reason: Reason


@dataclass(frozen=True, slots=True)
class EntryDecision(Generic[K]):
    """`decide`'s answer for one entry. `healthy`: endpoints published ready before the panic floor (the real
    count a status reports in panic); `eligible`: endpoints no fact excludes (the panic floor's total)."""

    endpoints: Mapping[K, Publish]
    panic: bool
    healthy: int
    eligible: int

    def count(self, reason: Reason) -> int:
        return sum(1 for p in self.endpoints.values() if p.reason is reason)


def _fact(item: EndpointInput[K]) -> Publish | None:
    """Step 1: what the spec, the operator and the cluster say, if they say anything."""
    serving = item.health is Status.PASSING and not item.refused and item.pod_ready is not False
    if item.terminating:
        return Publish(ready=False, serving=serving, terminating=True, reason=Reason.TERMINATING)
    if item.draining:
        return Publish(ready=False, serving=serving, terminating=True, reason=Reason.DRAINING)
    if item.pod_ready is False:
        return Publish(ready=False, serving=False, terminating=False, reason=Reason.POD_NOT_READY)
    if item.refused:
        return Publish(ready=False, serving=False, terminating=False, reason=Reason.PROBE_REFUSED)
    return None


def decide(
    endpoints: Iterable[EndpointInput[K]],
    *,
    now: float,
    check: str | None,
    unhealthy_threshold: int,
    self_preservation: SelfPreservation[K] | None = None,
    damper: FlapDamper[K] | None = None,
    min_healthy_percent: float | None = None,
) -> EntryDecision[K]:
    """What to publish for each endpoint of one entry, by the precedence in this module's docstring.

    `check`: the entry's check kind (None without a health check; self-preservation guards network checks only);
    `unhealthy_threshold`: the entry's, for the failures after an exit. Without the optional policies (no
    self-preservation, no damper, no floor) the answer is the health verdict under the facts, as before them.
    The damper's state moves (an input that changed is a transition); nothing else does.
    """
    guarded = self_preservation is not None and check in NETWORK_CHECKS
    out: dict[K, Publish] = {}
    eligible: list[K] = []
    for item in endpoints:
        fact = _fact(item)
        if fact is not None:
            out[item.key] = fact
            continue
        eligible.append(item.key)
        if item.health is Status.PASSING:
            ready, reason = True, Reason.HEALTHY
        elif item.health is Status.UNKNOWN:
            ready, reason = False, Reason.UNKNOWN
        else:
            ready, reason = False, Reason.UNHEALTHY
            if (
                guarded
                and item.published_ready
                and self_preservation is not None
                and not self_preservation.may_publish_not_ready(item.key, threshold=unhealthy_threshold, now=now)
            ):
                ready, reason = True, Reason.HELD
        # an endpoint not probed to a verdict yet has no state to flap between
        if damper is not None and item.health is not Status.UNKNOWN and damper.update(item.key, ready=ready, now=now):
            ready, reason = False, Reason.FLAPPING
        out[item.key] = Publish(ready=ready, serving=ready, terminating=False, reason=reason)
    healthy = sum(1 for key in eligible if out[key].ready)
    floor = panic(healthy=healthy, total=len(eligible), min_healthy_percent=min_healthy_percent)
    if floor:
        for key in eligible:
            if not out[key].ready:
                out[key] = Publish(ready=True, serving=True, terminating=False, reason=Reason.PANIC)
    return EntryDecision(endpoints=out, panic=floor, healthy=healthy, eligible=len(eligible))
