"""The probe scheduler, driven by a fake probe function: prompt first probes, periodic probing, bounded
concurrency, no overlap per target, results of removed or changed targets never delivered, and the checker told
(`forget`) when the last target of an endpoint goes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field, replace

from beacon.metrics import REGISTRY
from beacon.prober import Prober
from beacon.targets import GrpcCheck, LeaseCheck, ProbeResult, Target, TcpCheck


def target(address: str = "198.18.0.1", *, interval: float = 0.1, timeout: float = 1.0) -> Target:
    return Target(address=address, check=TcpCheck(port=80), interval=interval, timeout=timeout)


@dataclass
class FakeProbe:
    """Records every probe start (monotonic time per address), how many run at once, and what was delivered."""

    delay: float = 0.0
    gate: asyncio.Event | None = None  # when set, probes wait for it
    starts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    inflight: int = 0
    max_inflight: int = 0
    inflight_per_address: Counter[str] = field(default_factory=Counter)
    overlaps: int = 0
    delivered: list[tuple[Hashable, Target, ProbeResult]] = field(default_factory=list)

    async def __call__(self, t: Target) -> ProbeResult:
        self.starts[t.address].append(time.monotonic())
        self.inflight += 1
        self.inflight_per_address[t.address] += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        if self.inflight_per_address[t.address] > 1:
            self.overlaps += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay)
            return ProbeResult(ok=True, detail=f"probed {t.address} timeout={t.timeout}", seconds=self.delay)
        finally:
            self.inflight -= 1
            self.inflight_per_address[t.address] -= 1

    def on_result(self, key: Hashable, t: Target, result: ProbeResult) -> None:
        self.delivered.append((key, t, result))

    def count(self, address: str = "198.18.0.1") -> int:
        return len(self.starts[address])


@contextlib.asynccontextmanager
async def running(prober: Prober) -> AsyncIterator[Prober]:
    task = asyncio.create_task(prober.run())
    try:
        yield prober
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(condition: Callable[[], bool], *, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.005)


async def test_first_probe_comes_long_before_the_interval() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.05)
    async with running(prober):
        prober.upsert("a", target(interval=60.0))
        await wait_until(lambda: fake.count() == 1, within=2.0)  # not an interval later
        assert fake.delivered[0][0] == "a"
        await asyncio.sleep(0.2)
        assert fake.count() == 1  # the next one waits for the interval


async def test_targets_are_probed_periodically_and_never_early() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01, jitter=0.1)
    async with running(prober):
        prober.upsert("a", target(interval=0.1))
        await wait_until(lambda: fake.count() >= 6)
    starts = fake.starts["198.18.0.1"]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.1 * 0.9 - 0.005  # interval minus jitter (and timer granularity)
    assert prober.probes_run == len(starts)


async def test_concurrency_bound_is_never_exceeded_and_targets_never_overlap() -> None:
    fake = FakeProbe(delay=0.05)
    prober = Prober(probe=fake, on_result=fake.on_result, concurrency=3, first_probe_within=0.01)
    async with running(prober):
        for i in range(20):
            prober.upsert(i, target(f"198.18.0.{i}", interval=0.05))
        await wait_until(lambda: all(fake.count(f"198.18.0.{i}") >= 2 for i in range(20)))
    assert fake.max_inflight == 3
    assert fake.overlaps == 0


async def test_due_probes_waiting_for_a_slot_show_as_queue_depth() -> None:
    fake = FakeProbe(gate=asyncio.Event())
    prober = Prober(probe=fake, on_result=fake.on_result, concurrency=2, first_probe_within=0.01)
    async with running(prober):
        for i in range(5):
            prober.upsert(i, target(f"198.18.0.{i}", interval=60.0))
        await wait_until(lambda: fake.inflight == 2)
        await asyncio.sleep(0.05)
        assert fake.inflight == 2
        assert prober.queue_depth == 3  # 5 due, 2 running
        assert fake.gate is not None
        fake.gate.set()
        await wait_until(lambda: len(fake.delivered) == 5)
        assert prober.queue_depth == 0


def lateness(stat: str) -> float:
    return REGISTRY.get_sample_value(f"beacon_probe_lateness_seconds_{stat}") or 0.0


async def test_every_probe_records_how_late_it_started_once() -> None:
    count0, sum0 = lateness("count"), lateness("sum")
    fake = FakeProbe(gate=asyncio.Event())
    prober = Prober(probe=fake, on_result=fake.on_result, concurrency=1, first_probe_within=0.01)
    async with running(prober):
        for i in range(3):
            prober.upsert(i, target(f"198.18.0.{i}", interval=60.0))
        await wait_until(lambda: fake.inflight == 1)
        await asyncio.sleep(0.1)  # two probes are due and wait for the one slot
        assert fake.gate is not None
        fake.gate.set()
        await wait_until(lambda: len(fake.delivered) == 3)
    assert lateness("count") - count0 == prober.probes_run == 3
    # the two that waited for the slot started late by about 0.1 s each (their due times spread over 0.01 s)
    assert lateness("sum") - sum0 >= 2 * 0.05


async def test_remove_stops_probing() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target(interval=0.05))
        prober.upsert("b", target("198.18.0.2", interval=0.05))
        await wait_until(lambda: fake.count() >= 2)
        prober.remove("a")
        assert prober.keys() == ["b"]
        removed_at = fake.count()
        b_before = fake.count("198.18.0.2")
        await asyncio.sleep(0.3)
    assert fake.count() == removed_at
    assert fake.count("198.18.0.2") > b_before  # the scheduler still runs the others


async def test_upserting_an_identical_target_keeps_the_schedule() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01, jitter=0.0)
    async with running(prober):
        prober.upsert("a", target(interval=0.4))
        await wait_until(lambda: fake.count() == 1)
        for _ in range(10):  # an entry re-read ten times within one interval
            prober.upsert("a", target(interval=0.4))
            await asyncio.sleep(0.02)
        assert fake.count() == 1
        assert len(prober) == 1


async def test_a_changed_target_is_probed_promptly_under_its_new_settings() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target(interval=60.0))
        await wait_until(lambda: fake.count() == 1)
        prober.upsert("a", target(interval=60.0, timeout=2.0))
        await wait_until(lambda: fake.count() == 2)
    assert [t.timeout for _, t, _ in fake.delivered] == [1.0, 2.0]


async def test_results_of_a_target_changed_while_probing_are_dropped() -> None:
    fake = FakeProbe(gate=asyncio.Event())
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    old, new = target(interval=60.0), target(interval=60.0, timeout=2.0)
    async with running(prober):
        prober.upsert("a", old)
        await wait_until(lambda: fake.count() == 1)  # the old probe is in flight
        prober.upsert("a", new)
        await wait_until(lambda: fake.count() == 2)  # and so is the new one
        assert fake.gate is not None
        fake.gate.set()
        await wait_until(lambda: prober.probes_run == 2)
        await asyncio.sleep(0.05)
    assert [(key, t) for key, t, _ in fake.delivered] == [("a", new)]


async def test_results_of_a_target_removed_while_probing_are_dropped() -> None:
    fake = FakeProbe(gate=asyncio.Event())
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target(interval=0.05))
        await wait_until(lambda: fake.count() == 1)
        prober.remove("a")
        assert fake.gate is not None
        fake.gate.set()
        await wait_until(lambda: prober.probes_run == 1)
        await asyncio.sleep(0.2)
    assert fake.delivered == []
    assert fake.count() == 1


async def test_a_probe_function_that_raises_does_not_lose_the_target() -> None:
    calls: list[float] = []
    delivered: list[ProbeResult] = []

    async def flaky(t: Target) -> ProbeResult:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("boom")
        return ProbeResult(ok=True, detail="ok", seconds=0.0)

    prober = Prober(probe=flaky, on_result=lambda k, t, r: delivered.append(r), first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target(interval=0.05))
        await wait_until(lambda: len(calls) >= 3)
    assert not delivered[0].ok
    assert "boom" in delivered[0].detail
    assert all(r.ok for r in delivered[1:])


async def test_targets_added_while_idle_wake_the_scheduler() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    async with running(prober):
        await asyncio.sleep(0.05)  # nothing to do: the loop sleeps without a deadline
        prober.upsert("a", replace(target(), interval=60.0))
        await wait_until(lambda: fake.count() == 1, within=2.0)


async def test_a_result_callback_that_raises_does_not_stop_the_probes() -> None:
    fake = FakeProbe()
    seen: list[ProbeResult] = []

    def on_result(key: Hashable, t: Target, result: ProbeResult) -> None:
        seen.append(result)
        if len(seen) == 1:
            raise RuntimeError("callback bug")

    prober = Prober(probe=fake, on_result=on_result, first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target(interval=0.05))
        await wait_until(lambda: len(seen) >= 3)


async def test_a_new_target_is_probed_at_once() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result)  # first probes may spread over 1 s, but only in bursts
    async with running(prober):
        await asyncio.sleep(0.02)
        added = time.monotonic()
        prober.upsert("a", target(interval=60.0))
        await wait_until(lambda: fake.count() == 1)
    assert fake.starts["198.18.0.1"][0] - added < 0.05


async def test_a_target_due_sooner_than_the_armed_timer_is_not_kept_waiting() -> None:
    """The one timer is armed for the earliest slot; a new earlier slot re-arms it."""
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, jitter=0.0)
    async with running(prober):
        prober.upsert("a", target("198.18.0.1", interval=60.0))
        await wait_until(lambda: fake.count("198.18.0.1") == 1)  # the timer now waits ~60 s for a
        prober.upsert("b", target("198.18.0.2", interval=60.0))
        await wait_until(lambda: fake.count("198.18.0.2") == 1, within=0.5)


async def test_many_targets_arriving_together_spread_their_first_probes_over_at_most_a_second() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, concurrency=500, first_probe_burst=20)
    async with running(prober):
        added = time.monotonic()
        for i in range(400):
            prober.upsert(i, target(f"198.18.{i // 250}.{i % 250}", interval=60.0))
        upserted = time.monotonic() - added  # no probe can start before the loop is given back
        await wait_until(lambda: len(fake.delivered) == 400, within=3.0)
    firsts = sorted(starts[0] - added for starts in fake.starts.values())
    assert all(offset < upserted + 0.05 for offset in firsts[:20])  # the first ones of the burst go at once
    assert firsts[-1] < 1.0 + 0.05  # the rest within the spread
    assert firsts[-1] > 0.5  # and spread indeed, not all at once
    assert max(len(s) for s in fake.starts.values()) == 1


async def test_targets_arriving_one_entry_after_another_are_probed_at_once() -> None:
    """Entries applied one after another (10 endpoints every 50 ms, 200 a second) are not a burst: no spreading."""
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, concurrency=500, first_probe_burst=20)
    added: dict[str, float] = {}
    async with running(prober):
        for entry in range(20):
            for i in range(10):
                address = f"198.18.{entry}.{i}"
                added[address] = time.monotonic()
                prober.upsert(address, target(address, interval=60.0))
            await asyncio.sleep(0.05)
        await wait_until(lambda: len(fake.starts) == 200, within=2.0)
    assert max(fake.starts[a][0] - t for a, t in added.items()) < 0.05


async def test_first_probes_are_never_spread_beyond_the_interval() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, concurrency=200, first_probe_burst=0)
    async with running(prober):
        added = time.monotonic()
        for i in range(100):
            prober.upsert(i, target(f"198.18.0.{i}", interval=0.2))
        await wait_until(lambda: len(fake.starts) == 100, within=2.0)
    assert max(starts[0] for starts in fake.starts.values()) - added < 0.2 + 0.05


def test_an_endpoint_is_forgotten_once_its_last_target_goes() -> None:
    """Targets sharing an endpoint (address, port) keep it; `forget` is called once the last of them is removed or
    moved to another port. A Lease check connects nowhere: nothing to forget."""
    fake = FakeProbe()
    forgotten: list[tuple[str, int]] = []
    prober = Prober(probe=fake, on_result=fake.on_result, forget=lambda a, p: forgotten.append((a, p)))
    grpc = Target(address="198.18.0.1", check=GrpcCheck(port=50051), interval=60.0, timeout=1.0)
    prober.upsert("overall", grpc)
    prober.upsert("payments", replace(grpc, check=GrpcCheck(port=50051, service="payments.v1.Payments")))
    prober.upsert("tcp", target("198.18.0.1"))  # port 80: another endpoint of the same address
    prober.upsert("lease", replace(grpc, check=LeaseCheck(namespace="shop", name="payments-a")))
    prober.remove("overall")
    assert forgotten == []  # "payments" still probes 198.18.0.1:50051
    prober.upsert("payments", replace(grpc, check=GrpcCheck(port=50051, service="other.v1.Other")))
    assert forgotten == []  # changed, but the same endpoint
    prober.remove("payments")
    assert forgotten == [("198.18.0.1", 50051)]
    prober.remove("payments")  # gone already: nothing more
    prober.upsert("tcp", replace(target("198.18.0.1"), check=TcpCheck(port=8080)))
    assert forgotten == [("198.18.0.1", 50051), ("198.18.0.1", 80)]  # moved to another port
    prober.remove("lease")
    prober.remove("tcp")
    assert forgotten == [("198.18.0.1", 50051), ("198.18.0.1", 80), ("198.18.0.1", 8080)]


async def test_an_endpoint_removed_while_its_probe_runs_is_forgotten_again_when_the_probe_ends() -> None:
    """The probe in flight may open a connection after the removal forgot the endpoint: forgotten once more."""
    fake = FakeProbe(gate=asyncio.Event())
    forgotten: list[tuple[str, int]] = []
    prober = Prober(
        probe=fake, on_result=fake.on_result, first_probe_within=0.01, forget=lambda a, p: forgotten.append((a, p))
    )
    async with running(prober):
        prober.upsert("a", target(interval=60.0))
        prober.upsert("b", target("198.18.0.2", interval=60.0))
        await wait_until(lambda: fake.inflight == 2)
        prober.remove("a")
        prober.upsert("b", target("198.18.0.2", interval=30.0))  # changed while probing, same endpoint
        assert forgotten == [("198.18.0.1", 80)]
        assert fake.gate is not None
        fake.gate.set()
        await wait_until(lambda: fake.inflight == 0 and fake.count("198.18.0.2") == 2)
    assert forgotten == [("198.18.0.1", 80), ("198.18.0.1", 80)]  # "b" is still probed: never forgotten
    assert [key for key, _, _ in fake.delivered] == ["b"]
