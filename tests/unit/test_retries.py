"""The shared retry limiter: per-key exponential backoff with jitter, metered by one token bucket, so thousands of
keys that failed together (an apiserver outage) retry spread out, neither in lockstep nor all at once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Hashable

from beacon.retries import Retries
from beacon.workqueue import WorkQueue


def test_a_keys_backoff_doubles_up_to_the_cap_and_restarts_after_a_success() -> None:
    upper = Retries(base=1.0, cap=10.0, clock=lambda: 0.0, rng=lambda: 1.0)
    assert [upper.when("a") for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    lower = Retries(base=1.0, cap=10.0, clock=lambda: 0.0, rng=lambda: 0.0)
    assert [lower.when("a") for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 5.0]  # jitter: the upper half
    assert upper.failures("a") == 6
    upper.forget("a")
    assert upper.when("a") == 1.0
    assert upper.when("b") == 1.0, "keys back off on their own"


def test_five_thousand_keys_that_failed_together_retry_spread_out() -> None:
    now = 100.0
    retries = Retries(base=1.0, cap=10.0, rate=100.0, burst=500, clock=lambda: now, rng=random.Random(7).random)
    waits = [retries.when(("entry", i)) for i in range(5000)]
    # the jitter: the first 500 (the burst) land anywhere in [0.5, 1] s, not on one instant
    first = sorted(waits[:500])
    assert first[0] >= 0.5
    assert first[-1] <= 1.0
    assert len({round(w, 3) for w in first}) > 300
    # the bucket: beyond the burst, at most `rate` retries per second, whatever their backoff says
    for t in range(1, 46):
        assert sum(w <= t for w in waits) <= 500 + 100 * t
    assert max(waits) >= 44.0, "the last of 5,000 waits its turn: 4,500 beyond the burst at 100/s"


def test_the_bucket_refills_with_time() -> None:
    clock = [0.0]
    retries = Retries(base=0.01, cap=0.01, rate=10.0, burst=2, clock=lambda: clock[0], rng=lambda: 1.0)
    assert [retries.when(i) for i in range(3)] == [0.01, 0.01, 0.1]  # the third finds the bucket empty
    clock[0] = 10.0  # long enough to fill it again
    assert retries.when(3) == 0.01


class Recording(Retries):
    def __init__(self) -> None:
        super().__init__(base=0.01, cap=0.01)
        self.asked: list[Hashable] = []
        self.forgotten: list[Hashable] = []

    def when(self, key: Hashable) -> float:
        self.asked.append(key)
        return super().when(key)

    def forget(self, key: Hashable) -> None:
        self.forgotten.append(key)
        super().forget(key)


async def test_a_work_queue_asks_the_shared_limiter_and_forgets_a_key_that_succeeded() -> None:
    attempts = 0

    async def process(key: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError("apiserver unavailable")

    retries = Recording()
    queue: WorkQueue[str] = WorkQueue(name="entries", process=process, retries=retries)
    queue.schedule("shop/payments")
    await asyncio.sleep(0.2)
    assert attempts == 3
    assert retries.asked == [("entries", "shop/payments")] * 2
    assert retries.forgotten[-1] == ("entries", "shop/payments")
    assert retries.failures(("entries", "shop/payments")) == 0
    await queue.close()
