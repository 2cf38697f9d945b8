"""One scheduler for every endpoint's probes: jittered, bounded in concurrency, never overlapping per target.

Why it exists: a kopf timer per object does not scale to 10,000 endpoints and puts API traffic on every tick.
Here a single heap of plain tuples `(due, seq, key, token)` orders all targets by due time, and one
`loop.call_later` timer is armed for the earliest: no task wakes up unless a probe is due. A new or changed target
is probed at once; only when many arrive together (start-up, a burst of applies) are the later ones' first probes
spread over at most `first_probe_within` seconds. "Many" is a token bucket: `first_probe_burst` tokens, refilled
at ten times that per second, one per immediate first probe; so entries applied one after another (a few
endpoints each, even several per second) are never delayed, and 10,000 targets at start-up are spread. Later
probes come every `interval` seconds with +-10% jitter, so thousands of targets do not fire in lockstep. At most
`concurrency` probes run at once; due probes beyond that wait in a FIFO, counted by `queue_depth`; how late each
probe starts (due -> started) goes to the `beacon_probe_lateness_seconds` histogram, one observation per probe.
A target's next probe is scheduled only after its current one finished.
Results go to a callback; this module never calls the API. When the last target that connects to an endpoint
(address, port) is removed or changed to another endpoint, the `forget` callback (the checker's) is told, so the
connection and gRPC channel kept for it are closed; targets sharing an endpoint keep it until the last one goes.

Connection-loss hints. Polling finds a dead backend only after interval x unhealthyThreshold, but the checker keeps
an idle connection per endpoint (the HTTP keep-alive connection, the gRPC channel, a held TCP connection), and when
the backend process exits the kernel closes it within milliseconds. The checker reports such a close of an IDLE
connection by the peer (never its own closes, never one during a probe) to `hint(address, port)`. The prober
then probes, at once, every target of that endpoint that wants hints (`Target.hints`), and after a failing hint
probe re-probes it every `HintPolicy.reprobe_seconds` until it has failed `Target.unhealthy_threshold` times in a
row or passes; then the target is back on its interval (the next probe an interval after the last one). Only
results count: a close followed by a passing probe costs exactly that one probe and changes no health. The hint
probe replaces the target's scheduled slot: the target gets a new token, as a changed target does, so its old
heap slot is skipped when it comes due (no second timer, no task per target). It goes through the same
concurrency bound and never overlaps a probe of the same target: a hint that finds the target's probe in flight
keeps the token and runs its probe right after that one. Results of hint probes carry
`trigger="connection-loss"`.

Hints are rate-limited so that a rolling restart of 1,000 backends is not a probe storm: per endpoint, one hint
sequence at a time and a gap of `gap_seconds` after the last one ended, doubled after each sequence that only
met passing probes (a server closing idle connections on purpose: keep-alive timeouts, gRPC max connection age),
up to the target's interval, so such a server costs at most about one extra probe per interval; and globally, a
token bucket of `rate` hints per second with `burst` tokens. A dropped hint is counted
(`beacon_hints_dropped_total{limit}`) and its endpoint simply stays on its interval schedule.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from typing import Literal

from beacon.metrics import HINT_PROBES, HINTS_DROPPED, PROBE_LATENESS
from beacon.targets import CONNECTION_LOSS, LeaseCheck, ProbeResult, Target

Key = Hashable
Endpoint = tuple[str, int]  # (address, port) a probe connects to
ResultCallback = Callable[[Key, Target, ProbeResult], None]
ProbeFn = Callable[[Target], Awaitable[ProbeResult]]
ForgetFn = Callable[[str, int], None]
_observe_lateness = PROBE_LATENESS.observe  # bound once: one call per probe, no attribute lookups
_EARLY = 0.001  # a timer that fires this much before a slot's due time runs it (timers have 1 ms resolution)
_MAX_STREAK = 16  # doublings of an endpoint's hint gap at most (the interval caps it long before)
Limit = Literal["endpoint", "global"]


@dataclass(frozen=True, slots=True)
class HintPolicy:
    """How the prober answers connection-loss hints (see the module docstring); the operator's --hint-* flags."""

    reprobe_seconds: float = 0.1  # spacing of the re-probes after a failing hint probe
    gap_seconds: float = 1.0  # an endpoint's next hint sequence starts at least this long after its last one ended
    rate: float = 200.0  # hints per second, all endpoints together (token bucket refill)
    burst: int = 400  # and at most this many at once (token bucket size)


class _Hinted:
    """A target in a hint sequence."""

    __slots__ = ("endpoint", "failures", "pending", "token")

    def __init__(self, token: int, endpoint: Endpoint, *, pending: bool) -> None:
        self.token = token  # the target's token while in the sequence: any live slot of it is the sequence's
        self.endpoint = endpoint
        self.failures = 0  # consecutive failing hint probes so far
        self.pending = pending  # its probe was in flight when the hint came: the hint probe follows that one


class _EndpointHints:
    """An endpoint's hint sequences: the one running (its targets still probing) and when the last one ended."""

    __slots__ = ("active", "benign", "ended", "streak")

    def __init__(self) -> None:
        self.active: set[Key] = set()
        self.ended = -math.inf
        self.benign = True  # the running sequence met only passing probes so far
        self.streak = 0  # consecutive benign sequences: each one doubles the gap before the next


_DROPPED = {limit: HINTS_DROPPED.labels(limit=limit) for limit in ("endpoint", "global")}


class Prober:
    """Schedules probes for a changing set of targets. Run `run()` as a task; `upsert`/`remove` at any time."""

    def __init__(
        self,
        *,
        probe: ProbeFn,
        on_result: ResultCallback,
        concurrency: int = 64,
        jitter: float = 0.1,
        first_probe_within: float = 1.0,
        first_probe_burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        forget: ForgetFn | None = None,
        hints: HintPolicy | None = None,
    ) -> None:
        """`forget(address, port)` is called once no target connects to that endpoint any more (and again when
        a probe of it that was in flight then finishes, as the probe may have opened something on the way).
        `hints`: how `hint(address, port)` is answered (default `HintPolicy()`)."""
        self._probe = probe
        self._on_result = on_result
        self._forget = forget
        self._users: dict[Endpoint, set[Key]] = {}  # endpoint -> the targets that connect to it
        self._policy = hints or HintPolicy()
        self._hints: dict[Key, _Hinted] = {}  # targets in a hint sequence (empty but for a few at any time)
        self._endpoint_hints: dict[Endpoint, _EndpointHints] = {}  # endpoints hinted at (while they are probed)
        self._hint_bucket = float(self._policy.burst)
        self._hint_bucket_at = -math.inf
        self._probing: dict[Key, int] = {}  # target -> the token of its probe in flight
        self._limit = concurrency
        self._jitter = jitter
        self._first = first_probe_within
        self._burst = concurrency if first_probe_burst is None else first_probe_burst
        self._refill = self._burst * 10.0  # tokens per second
        self._bucket = float(self._burst)
        self._bucket_at = -math.inf
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._targets: dict[Key, tuple[Target, int]] = {}
        self._heap: list[tuple[float, int, Key, int]] = []
        self._waiting: collections.deque[tuple[Key, int, float]] = collections.deque()  # due, no concurrency slot yet
        self._running = 0
        self._seq = 0
        self._tokens = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._inflight: set[asyncio.Task[None]] = set()
        self.probes_run = 0
        self.hints_taken = 0  # hints answered with probes
        self.hint_probes_run = 0  # probes a hint triggered (re-probes included)
        self.hints_dropped: collections.Counter[Limit] = collections.Counter()  # by the limit that dropped them

    # ------------------------------------------------------------------ target set
    def upsert(self, key: Key, target: Target) -> None:
        """Add or change a target. An unchanged target keeps its place in the schedule."""
        current = self._targets.get(key)
        if current is not None and current[0] == target:
            return
        self._tokens += 1
        self._targets[key] = (target, self._tokens)
        if self._hints:
            self._end_hint(key, benign=True)  # a changed target is probed at once anyway: its sequence is over
        old = None if current is None else _endpoint(current[0])
        new = _endpoint(target)
        if old != new:
            if new is not None:
                self._users.setdefault(new, set()).add(key)
            if old is not None:
                self._release(key, old)
        now = self._clock()
        self._bucket = min(float(self._burst), self._bucket + (now - self._bucket_at) * self._refill)
        self._bucket_at = now
        due = now
        if self._bucket >= 1.0:
            self._bucket -= 1.0
        else:  # many at once: spread their first probes
            due += self._rng.uniform(0, min(self._first, target.interval))
        self._push(key, self._tokens, due)

    def remove(self, key: Key) -> None:
        current = self._targets.pop(key, None)  # its heap slot is skipped when it comes due (token mismatch)
        if current is None:
            return
        if self._hints:
            self._end_hint(key, benign=True)
        endpoint = _endpoint(current[0])
        if endpoint is not None:
            self._release(key, endpoint)

    def _release(self, key: Key, endpoint: Endpoint) -> None:
        """`key` no longer connects to `endpoint`: forget the endpoint when it was the last target that did."""
        users = self._users[endpoint]
        users.discard(key)
        if users:
            return
        del self._users[endpoint]
        self._endpoint_hints.pop(endpoint, None)
        if self._forget is not None:
            self._forget(*endpoint)

    # ------------------------------------------------------------------ connection-loss hints
    def hint(self, address: str, port: int) -> None:
        """The peer closed or reset an idle probe connection to (address, port): probe that endpoint's targets
        that want hints now, unless a rate limit drops the hint (then they stay on their interval)."""
        endpoint = (address, port)
        keys = self._users.get(endpoint)
        if not keys:
            return  # nobody probes it (any more)
        targets = self._targets
        wanted = [key for key in keys if targets[key][0].hints]
        if not wanted:
            return  # the entries opted out
        now = self._clock()
        record = self._endpoint_hints.get(endpoint)
        if record is not None and (record.active or now - record.ended < self._gap(record, wanted)):
            self._drop("endpoint")
            return
        policy = self._policy
        self._hint_bucket = min(float(policy.burst), self._hint_bucket + (now - self._hint_bucket_at) * policy.rate)
        self._hint_bucket_at = now
        if self._hint_bucket < 1.0:
            self._drop("global")
            return
        self._hint_bucket -= 1.0
        self.hints_taken += 1
        if record is None:
            record = self._endpoint_hints[endpoint] = _EndpointHints()
        record.benign = True
        for key in wanted:
            target, token = targets[key]
            if self._probing.get(key) == token:  # never two probes of one target: the hint's follows this one
                self._hints[key] = _Hinted(token, endpoint, pending=True)
            else:  # a new token: the slot it had is skipped when it comes due, this one replaces it
                self._tokens += 1
                targets[key] = (target, self._tokens)
                self._hints[key] = _Hinted(self._tokens, endpoint, pending=False)
                self._push(key, self._tokens, now)
            record.active.add(key)

    def _gap(self, record: _EndpointHints, keys: list[Key]) -> float:
        """How long after its last sequence ended an endpoint takes another hint: `gap_seconds`, doubled for each
        benign sequence in a row, but never more than the longest interval of its targets (nor less than
        `gap_seconds`)."""
        gap = self._policy.gap_seconds
        if not record.streak:
            return gap
        longest = max(self._targets[key][0].interval for key in keys)
        return max(gap, min(gap * (1 << record.streak), longest))

    def _drop(self, limit: Limit) -> None:
        self.hints_dropped[limit] += 1
        _DROPPED[limit].inc()

    def _end_hint(self, key: Key, *, benign: bool) -> None:
        """`key`'s hint sequence is over (passed, reached its threshold, or the target changed or went)."""
        hinted = self._hints.pop(key, None)
        if hinted is None:
            return
        record = self._endpoint_hints.get(hinted.endpoint)
        if record is None:
            return
        record.active.discard(key)
        record.benign = record.benign and benign
        if not record.active:
            record.ended = self._clock()
            record.streak = min(record.streak + 1, _MAX_STREAK) if record.benign else 0

    def keys(self) -> list[Key]:
        return list(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def queue_depth(self) -> int:
        """Probes that are due now but not started (waiting for a concurrency slot or the loop)."""
        now = self._clock()
        targets = self._targets
        waiting = sum(1 for key, token, _ in self._waiting if targets.get(key, (None, -1))[1] == token)
        return waiting + sum(
            1 for due, _, key, token in self._heap if due <= now and targets.get(key, (None, -1))[1] == token
        )

    def _push(self, key: Key, token: int, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key, token))
        if due < self._timer_due:
            self._arm()

    def _arm(self) -> None:
        """Set the one timer to the earliest due time (no timer while nothing is scheduled or not running)."""
        loop = self._loop
        if loop is None:
            return
        due = self._heap[0][0] if self._heap else math.inf
        if due == self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_due = due
        if due != math.inf:
            self._timer = loop.call_later(max(0.0, due - self._clock()), self._fire)

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        """Probe until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._timer_due = math.inf
        self._arm()
        try:
            await self._loop.create_future()  # everything happens in timer and task callbacks
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._loop, self._timer, self._timer_due = None, None, math.inf
            for task in list(self._inflight):
                task.cancel()

    def _fire(self) -> None:
        self._timer, self._timer_due = None, math.inf
        heap, targets = self._heap, self._targets
        horizon = self._clock() + _EARLY
        while heap and heap[0][0] <= horizon:
            due, _, key, token = heapq.heappop(heap)
            current = targets.get(key)
            if current is None or current[1] != token:
                continue  # removed or changed since (or a hint replaced the slot)
            if self._running < self._limit:
                self._start(key, current[0], token, due)
            else:
                self._waiting.append((key, token, due))  # backpressure: counted by queue_depth
        self._arm()

    def _start(self, key: Key, target: Target, token: int, due: float) -> None:
        assert self._loop is not None
        self._running += 1
        self._probing[key] = token
        hints = self._hints  # empty but while hint sequences run: one truth test per probe otherwise
        sequence = hints.get(key) if hints else None
        # a live slot of a target in a hint sequence is the sequence's (the hint gave the target a token of its own)
        hinted = sequence is not None and sequence.token == token and not sequence.pending
        task = self._loop.create_task(self._one(key, target, token, due, hinted))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _next(self) -> None:
        """A concurrency slot came free: start the longest-waiting due probe, if any."""
        targets = self._targets
        while self._waiting and self._loop is not None:
            key, token, due = self._waiting.popleft()
            current = targets.get(key)
            if current is not None and current[1] == token:
                self._start(key, current[0], token, due)
                return

    async def _one(self, key: Key, target: Target, token: int, due: float, hinted: bool) -> None:
        started = self._clock()
        _observe_lateness(started - due if started > due else 0.0)
        try:
            result = await self._probe(target)
        except Exception as exc:  # a probe function that raises must not drop the target from the schedule
            result = ProbeResult(ok=False, detail=f"probe error: {type(exc).__name__}: {exc}"[:200], seconds=0.0)
        finally:
            self._running -= 1
            if self._probing.get(key) == token:
                del self._probing[key]
            self._next()
        self.probes_run += 1
        if hinted:
            self.hint_probes_run += 1
            HINT_PROBES.inc()
            result = replace(result, trigger=CONNECTION_LOSS)
        current = self._targets.get(key)
        if current is None or current[1] != token:
            forget, endpoint = self._forget, _endpoint(target)
            if forget is not None and endpoint is not None and endpoint not in self._users:
                forget(*endpoint)  # forgotten while this probe ran, which may have opened a connection since
            return  # removed or changed while probing: the result is stale
        sequence = self._hints.get(key) if self._hints else None
        if sequence is None or sequence.token != token:
            spread = target.interval * self._jitter
            self._push(key, token, started + target.interval + self._rng.uniform(-spread, spread))
        elif hinted:
            if not result.ok:
                sequence.failures += 1
            if result.ok or sequence.failures >= target.unhealthy_threshold:
                self._end_hint(key, benign=result.ok and not sequence.failures)
                spread = target.interval * self._jitter  # back on the interval schedule
                self._push(key, token, started + target.interval + self._rng.uniform(-spread, spread))
            else:
                self._push(key, token, self._clock() + self._policy.reprobe_seconds)
        else:  # the probe that was in flight when the hint came; the hint's own probe goes now
            sequence.pending = False
            self._push(key, token, self._clock())
        self._on_result(key, target, result)  # after rescheduling: a raising callback cannot stop the probes


def _endpoint(target: Target) -> Endpoint | None:
    """The (address, port) a target's probe connects to; None for a Lease check, which reads a cache."""
    check = target.check
    return None if isinstance(check, LeaseCheck) else (target.address, check.port)
