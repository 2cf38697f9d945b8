"""The liveness endpoint's beacon probe: it fails once a task the operator needs forever has stopped."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from beacon.handlers import liveness as _liveness
from beacon.operator_runtime import Options, Runtime

liveness: Any = _liveness  # as kopf calls it (the decorator types it as kopf's own callback protocol)


async def test_liveness_holds_while_the_prober_runs_and_fails_once_it_died() -> None:
    runtime = Runtime(options=Options())
    alive = asyncio.Event()

    async def prober() -> None:
        await alive.wait()
        raise RuntimeError("the heap is corrupt")

    task = asyncio.create_task(prober(), name="beacon-prober")
    runtime._tasks.append(task)
    assert await liveness(memo=kopf.Memo(runtime=runtime)) == "ok"
    alive.set()
    with pytest.raises(RuntimeError):
        await task
    with pytest.raises(kopf.PermanentError, match=r"beacon-prober stopped \(RuntimeError: the heap is corrupt\)"):
        await liveness(memo=kopf.Memo(runtime=runtime))
