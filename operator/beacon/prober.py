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
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable

from beacon.metrics import PROBE_LATENESS
from beacon.targets import LeaseCheck, ProbeResult, Target

Key = Hashable
Endpoint = tuple[str, int]  # (address, port) a probe connects to
ResultCallback = Callable[[Key, Target, ProbeResult], None]
ProbeFn = Callable[[Target], Awaitable[ProbeResult]]
ForgetFn = Callable[[str, int], None]
_observe_lateness = PROBE_LATENESS.observe  # bound once: one call per probe, no attribute lookups
_EARLY = 0.001  # a timer that fires this much before a slot's due time runs it (timers have 1 ms resolution)


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
    ) -> None:
        """`forget(address, port)` is called once no target connects to that endpoint any more (and again when
        a probe of it that was in flight then finishes, as the probe may have opened something on the way)."""
        self._probe = probe
        self._on_result = on_result
        self._forget = forget
        self._users: dict[Endpoint, int] = {}  # endpoint -> how many targets connect to it (kept only with `forget`)
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

    # ------------------------------------------------------------------ target set
    def upsert(self, key: Key, target: Target) -> None:
        """Add or change a target. An unchanged target keeps its place in the schedule."""
        current = self._targets.get(key)
        if current is not None and current[0] == target:
            return
        self._tokens += 1
        self._targets[key] = (target, self._tokens)
        if self._forget is not None:
            self._use(target)
            if current is not None:
                self._release(current[0])
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
        if current is not None and self._forget is not None:
            self._release(current[0])

    def _use(self, target: Target) -> None:
        endpoint = _endpoint(target)
        if endpoint is not None:
            self._users[endpoint] = self._users.get(endpoint, 0) + 1

    def _release(self, target: Target) -> None:
        """One target fewer connects to `target`'s endpoint: forget the endpoint when it was the last one."""
        endpoint = _endpoint(target)
        if endpoint is None:
            return
        left = self._users[endpoint] - 1
        if left:
            self._users[endpoint] = left
            return
        del self._users[endpoint]
        assert self._forget is not None
        self._forget(*endpoint)

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
                continue  # removed or changed since
            if self._running < self._limit:
                self._start(key, current[0], token, due)
            else:
                self._waiting.append((key, token, due))  # backpressure: counted by queue_depth
        self._arm()

    def _start(self, key: Key, target: Target, token: int, due: float) -> None:
        assert self._loop is not None
        self._running += 1
        task = self._loop.create_task(self._one(key, target, token, due))
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

    async def _one(self, key: Key, target: Target, token: int, due: float) -> None:
        started = self._clock()
        _observe_lateness(started - due if started > due else 0.0)
        try:
            result = await self._probe(target)
        except Exception as exc:  # a probe function that raises must not drop the target from the schedule
            result = ProbeResult(ok=False, detail=f"probe error: {type(exc).__name__}: {exc}"[:200], seconds=0.0)
        finally:
            self._running -= 1
            self._next()
        self.probes_run += 1
        current = self._targets.get(key)
        if current is None or current[1] != token:
            forget, endpoint = self._forget, _endpoint(target)
            if forget is not None and endpoint is not None and endpoint not in self._users:
                forget(*endpoint)  # forgotten while this probe ran, which may have opened a connection since
            return  # removed or changed while probing: the result is stale
        spread = target.interval * self._jitter
        self._push(key, token, started + target.interval + self._rng.uniform(-spread, spread))
        self._on_result(key, target, result)  # after rescheduling: a raising callback cannot stop the probes


def _endpoint(target: Target) -> Endpoint | None:
    """The (address, port) a target's probe connects to; None for a Lease check, which reads a cache."""
    check = target.check
    return None if isinstance(check, LeaseCheck) else (target.address, check.port)
