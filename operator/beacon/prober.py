"""One scheduler for every endpoint's probes: jittered, bounded in concurrency, never overlapping per target.

Why it exists: a kopf timer per object does not scale to 10,000 endpoints and puts API traffic on every tick.
Here a single heap orders all targets by due time. The first probe of a new target runs within a second (so a
fresh entry becomes ready quickly) and later ones every `interval` seconds with ±10% jitter, so thousands of
targets do not fire in lockstep. A semaphore bounds how many probes are in flight; a target's next probe is
scheduled only after its current one finished. Results go to a callback; this module never calls the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from beacon.targets import ProbeResult, Target

Key = Hashable
ResultCallback = Callable[[Key, Target, ProbeResult], None]
ProbeFn = Callable[[Target], Awaitable[ProbeResult]]


@dataclass(order=True)
class _Slot:
    due: float
    seq: int
    key: Key = field(compare=False)
    token: int = field(compare=False)


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
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._probe = probe
        self._on_result = on_result
        self._sem = asyncio.Semaphore(concurrency)
        self._jitter = jitter
        self._first = first_probe_within
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._targets: dict[Key, tuple[Target, int]] = {}
        self._heap: list[_Slot] = []
        self._seq = 0
        self._tokens = 0
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._waiting_for_slot = 0  # a due probe popped from the heap, waiting on the semaphore
        self.probes_run = 0

    # ------------------------------------------------------------------ target set
    def upsert(self, key: Key, target: Target) -> None:
        """Add or change a target. An unchanged target keeps its place in the schedule."""
        current = self._targets.get(key)
        if current is not None and current[0] == target:
            return
        self._tokens += 1
        self._targets[key] = (target, self._tokens)
        self._push(key, self._tokens, self._clock() + self._rng.uniform(0, min(self._first, target.interval)))

    def remove(self, key: Key) -> None:
        self._targets.pop(key, None)  # its heap slot is skipped when it comes due (token mismatch)

    def keys(self) -> list[Key]:
        return list(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def queue_depth(self) -> int:
        """Probes that are due now but not started (waiting for a concurrency slot or the loop)."""
        now = self._clock()
        return self._waiting_for_slot + sum(1 for slot in self._heap if slot.due <= now and self._live(slot))

    def _live(self, slot: _Slot) -> bool:
        current = self._targets.get(slot.key)
        return current is not None and current[1] == slot.token

    def _push(self, key: Key, token: int, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Slot(due=due, seq=self._seq, key=key, token=token))
        self._wake.set()

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        try:
            while True:
                await self._run_due()
                timeout = self._heap[0].due - self._clock() if self._heap else None
                self._wake.clear()
                if timeout is None or timeout > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            for task in list(self._inflight):
                task.cancel()

    async def _run_due(self) -> None:
        now = self._clock()
        while self._heap and self._heap[0].due <= now:
            slot = heapq.heappop(self._heap)
            if not self._live(slot):
                continue
            self._waiting_for_slot = 1
            try:
                await self._sem.acquire()  # backpressure: due probes wait here, counted by queue_depth
            finally:
                self._waiting_for_slot = 0
            target, token = self._targets.get(slot.key, (None, -1))
            if target is None or token != slot.token:
                self._sem.release()
                continue
            task = asyncio.create_task(self._one(slot.key, target, token))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _one(self, key: Key, target: Target, token: int) -> None:
        started = self._clock()
        try:
            result = await self._probe(target)
        except Exception as exc:  # a probe function that raises must not drop the target from the schedule
            result = ProbeResult(ok=False, detail=f"probe error: {type(exc).__name__}: {exc}"[:200], seconds=0.0)
        finally:
            self._sem.release()
        self.probes_run += 1
        current = self._targets.get(key)
        if current is None or current[1] != token:
            return  # removed or changed while probing: the result is stale
        spread = target.interval * self._jitter
        self._push(key, token, started + target.interval + self._rng.uniform(-spread, spread))
        self._on_result(key, target, result)  # after rescheduling: a raising callback cannot stop the probes
