"""The keyed work queue behind every reconcile: bursts coalesce, keys never run concurrently, failures of any
kind are retried, and keys that are gone or cancelled stop."""

from __future__ import annotations

import asyncio

from beacon.retries import Retries
from beacon.workqueue import WorkQueue


async def test_a_burst_of_schedules_is_processed_once() -> None:
    calls: list[str] = []

    async def process(key: str) -> None:
        calls.append(key)

    queue: WorkQueue[str] = WorkQueue(name="t", delay=0.05, process=process)
    for _ in range(10):
        queue.schedule("a")
    queue.schedule("b")
    await asyncio.sleep(0.2)
    assert sorted(calls) == ["a", "b"]
    await queue.close()


async def test_a_key_is_never_processed_concurrently_and_late_changes_run_again() -> None:
    running = 0
    overlaps = 0
    calls = 0

    async def process(key: str) -> None:
        nonlocal running, overlaps, calls
        running += 1
        overlaps += running > 1
        calls += 1
        await asyncio.sleep(0.05)
        running -= 1

    queue: WorkQueue[str] = WorkQueue(name="t", delay=0.0, process=process)
    queue.schedule("a")
    await asyncio.sleep(0.02)
    queue.schedule("a")  # arrives while the first run is in progress: one more run afterwards
    queue.schedule("a")
    await asyncio.sleep(0.3)
    assert overlaps == 0
    assert calls == 2
    await queue.close()


async def test_any_exception_is_retried_and_reported() -> None:
    attempts = 0
    errors: list[str] = []

    async def process(key: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError("not a kubernetes error at all")

    queue: WorkQueue[str] = WorkQueue(
        name="t",
        delay=0.0,
        process=process,
        on_error=lambda k, e: errors.append(str(e)),
        retries=Retries(base=0.01, cap=0.01),
    )
    queue.schedule("a")
    await asyncio.sleep(0.2)
    assert attempts == 3
    assert errors == ["not a kubernetes error at all"] * 2
    assert not queue.is_dirty("a")
    await queue.close()


async def test_keys_that_are_gone_or_cancelled_stop() -> None:
    attempts = 0
    alive = {"a": True}

    async def process(key: str) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("always")

    queue: WorkQueue[str] = WorkQueue(
        name="t", delay=0.0, process=process, alive=lambda k: alive.get(k, False), retries=Retries(base=0.01, cap=0.01)
    )
    queue.schedule("a")
    await asyncio.sleep(0.05)
    alive["a"] = False
    await asyncio.sleep(0.05)
    stopped_at = attempts
    await asyncio.sleep(0.1)
    assert attempts == stopped_at, "retries continue for a key that no longer exists"

    queue.schedule("b")  # not alive from the start: never processed
    queue.cancel("b")
    await asyncio.sleep(0.05)
    assert attempts == stopped_at
    await queue.close()


async def _turns(n: int = 5) -> None:
    """Let the event loop run a few rounds without letting any time pass for timers."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_an_idle_key_runs_at_the_leading_edge_without_a_timer() -> None:
    calls: list[str] = []

    async def process(key: str) -> None:
        calls.append(key)

    queue: WorkQueue[str] = WorkQueue(name="t", process=process)
    queue.schedule("a")
    await _turns()  # no sleep with a duration: a delay of any length would leave `calls` empty here
    assert calls == ["a"]
    queue.schedule("a")  # idle again: again at once
    await _turns()
    assert calls == ["a", "a"]
    await queue.close()


async def test_changes_during_an_in_flight_run_coalesce_into_exactly_one_follow_up() -> None:
    calls = 0
    gate = asyncio.Event()

    async def process(key: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()  # the first write is in flight until the gate opens

    queue: WorkQueue[str] = WorkQueue(name="t", process=process)
    queue.schedule("a")
    await _turns()
    assert calls == 1
    for _ in range(5):
        queue.schedule("a")
        await _turns()
    assert calls == 1, "a change during the run started a concurrent one"
    gate.set()
    await _turns(10)
    assert calls == 2
    assert not queue.is_dirty("a")
    await queue.close()


async def test_min_interval_throttles_a_key_and_coalesces_what_comes_meanwhile() -> None:
    starts: list[float] = []
    loop = asyncio.get_running_loop()

    async def process(key: str) -> None:
        starts.append(loop.time())

    queue: WorkQueue[str] = WorkQueue(name="t", process=process, min_interval=0.1)
    queue.schedule("a")
    await _turns()
    assert len(starts) == 1, "the first run is at the leading edge"
    for _ in range(5):
        queue.schedule("a")
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.3)
    assert len(starts) == 2, "the changes within the interval made one more run"
    assert starts[1] - starts[0] >= 0.1 - 1e-3
    await queue.close()
