"""A keyed, coalescing work queue: one worker per key, run at the leading edge, retried with capped backoff.

Why it exists: ServiceEntries, namespace registries and ConfigEntries all need the same discipline (client-go's
workqueue gives it to controllers written in Go): changes to one key arriving in a burst cost a bounded number
of rounds of writes; the same key is never reconciled twice at once; a failure of any kind (the apiserver gone,
a 409, a client library error) is retried with backoff instead of silently killing the worker; a key that
disappears stops being retried.

Retries of every queue wait as one shared limiter says (`beacon.retries`: per-key jittered exponential backoff and
a global token bucket), so 5,000 keys that failed together in an apiserver outage do not retry in lockstep.

When to run is the queue's one policy knob. An idle key runs at once (the leading edge: a decisive probe is
published without waiting for a timer), and only changes that arrive while its run is in flight are coalesced
into one follow-up run. `min_interval` adds a throttle for outputs that are costly to rewrite (a namespace's
registry): a key runs at most once per interval, still at once when it has been quiet that long. `delay` keeps
the older trailing-edge debounce for engines that want a burst of edits to become one result (ConfigEntry
revisions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from beacon import logfields, metrics
from beacon.logfields import key_fields
from beacon.retries import RETRIES, Retries

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("beacon.workqueue")


class WorkQueue(Generic[K]):
    """`schedule(key)` marks a key dirty; its worker runs `process(key)` at once (after `delay` seconds when set)
    and again, once, if the key was marked dirty during the run (no sooner than `min_interval` seconds after the
    previous run started). Exceptions from `process` are logged, passed to `on_error` (to drop caches) and
    retried when `retries` says (1, 2, 4 ... up to `MAX_BACKOFF` seconds, jittered, metered by the shared bucket),
    for as long as `alive(key)` holds."""

    def __init__(
        self,
        *,
        name: str,
        process: Callable[[K], Awaitable[None]],
        alive: Callable[[K], bool] = lambda _: True,
        on_error: Callable[[K, Exception], None] = lambda _key, _exc: None,
        retries: Retries = RETRIES,
        delay: float = 0.0,
        min_interval: float = 0.0,
    ) -> None:
        self._name = name
        self._delay = delay
        self._min_interval = min_interval
        self._process = process
        self._alive = alive
        self._on_error = on_error
        self._retries = retries
        self._dirty: set[K] = set()
        self._workers: dict[K, asyncio.Task[None]] = {}

    def schedule(self, key: K) -> None:
        self._dirty.add(key)
        task = self._workers.get(key)
        if task is None or task.done():
            self._workers[key] = asyncio.ensure_future(self._work(key))

    def is_dirty(self, key: K) -> bool:
        """Whether a change to `key` is waiting to be processed."""
        return key in self._dirty

    def cancel(self, key: K) -> None:
        self._dirty.discard(key)
        self._retries.forget((self._name, key))
        task = self._workers.pop(key, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._workers.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._workers.clear()
        self._dirty.clear()

    async def _work(self, key: K) -> None:
        if self._delay > 0:
            await asyncio.sleep(self._delay)
        loop = asyncio.get_running_loop()
        while key in self._dirty and self._alive(key):
            self._dirty.discard(key)
            started = loop.time()
            try:
                await self._process(key)
                metrics.RECONCILES.labels(kind=self._name, outcome="ok").inc()
                self._retries.forget((self._name, key))
                if self._min_interval > 0:
                    # the worker lingers for the rest of the interval: changes meanwhile join the next run
                    await asyncio.sleep(max(0.0, started + self._min_interval - loop.time()))
            except Exception as exc:  # anything: retry, never let the worker die silently
                metrics.RECONCILES.labels(kind=self._name, outcome="error").inc()
                wait = self._retries.when((self._name, key))
                log.warning(
                    "%s %s failed, retrying in %.1fs: %s",
                    self._name,
                    key,
                    wait,
                    exc,
                    extra=key_fields(logfields.ERROR, key, kind=self._name),
                )
                self._on_error(key, exc)
                self._dirty.add(key)
                await asyncio.sleep(wait)
        self._dirty.discard(key)
        if not self._alive(key):
            self._retries.forget((self._name, key))


async def repeat(*, every: float, action: Callable[[], Awaitable[None]], what: str) -> None:
    """Run `action` every `every` seconds forever; a failure (say, the API unreachable) waits for the next turn."""
    while True:
        await asyncio.sleep(every)
        try:
            await action()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc, extra=logfields.fields(logfields.ERROR, namespace=None))
