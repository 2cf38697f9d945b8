"""The keyed work queue behind every reconcile: bursts coalesce, keys never run concurrently, failures of any
kind are retried, and keys that are gone or cancelled stop."""

from __future__ import annotations

import asyncio

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
        name="t", delay=0.0, process=process, on_error=lambda k, e: errors.append(str(e)), max_backoff=0.01
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
        name="t", delay=0.0, process=process, alive=lambda k: alive.get(k, False), max_backoff=0.01
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
