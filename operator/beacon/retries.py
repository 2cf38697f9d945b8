"""When to retry: one limiter for every retry in the operator (work queues, start-up listings, watches).

Why it exists: client-go gives Go controllers a default rate limiter for their work queues, the later of a per-key
exponential backoff and a global token bucket. beacon had four retry loops, each with its own doubling and no
jitter: after an apiserver outage, thousands of keys that failed together retried together, every 1, 2, 4 and
then 10 seconds, in lockstep. One shared `Retries` spreads them (jitter) and meters them (the bucket), and every
loop that retries asks it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable

MAX_BACKOFF = 10.0  # seconds; after an apiserver outage, convergence waits at most this long for a key's retry
RETRY_RATE = 100.0  # retries per second across the operator, once the burst is spent
RETRY_BURST = 500


class Retries:
    """When to retry a key that failed: the later of its own backoff and the shared bucket's next free token.

    The backoff doubles from `base` with each consecutive failure of the key, up to `cap`, and is drawn at random
    from its upper half (jitter: keys that failed together retry apart). The token bucket holds `burst` tokens,
    refilled at `rate` per second; each retry takes one, and a retry that finds none waits for its turn (the
    bucket goes into debt, so a flood of failures queues up instead of retrying at once). `forget(key)` after a
    success starts the key's backoff from `base` again."""

    def __init__(
        self,
        *,
        base: float = 1.0,
        cap: float = MAX_BACKOFF,
        rate: float = RETRY_RATE,
        burst: int = RETRY_BURST,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._base, self._cap, self._rate, self._burst = base, cap, rate, float(burst)
        self._clock, self._rng = clock, rng
        self._failures: dict[Hashable, int] = {}
        self._tokens = float(burst)
        self._stamp = clock()

    def when(self, key: Hashable) -> float:
        """Seconds to wait before retrying `key`, which has just failed."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        backoff = min(self._cap, self._base * 2.0 ** min(failures, 62))
        backoff *= 0.5 + 0.5 * self._rng()
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        turn = 0.0 if self._tokens >= 0 else -self._tokens / self._rate
        return max(backoff, turn)

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)


RETRIES = Retries()  # the one limiter every queue and retry loop of the operator shares
