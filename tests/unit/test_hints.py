"""Connection-loss hints: a probe connection the peer closes while idle makes the prober probe that endpoint at
once, then re-probe at a short spacing until the unhealthy threshold or a pass, then resume the interval.

The scheduler's side is driven by a fake probe (and, for the rate limits, a fake clock); the checker's side by
real servers on loopback: plain HTTP keep-alive connections, gRPC channels and held TCP connections, closed by the
server (a hint) or by a probe's own failure or by beacon itself (never a hint)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import _async as health_aio  # public as grpc_health.v1.health.aio (absent from the stubs)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from beacon.checks import Checker
from beacon.health import EndpointHealth, Status, Thresholds, observe
from beacon.httpprobe import HttpProbeClient, Request
from beacon.metrics import REGISTRY
from beacon.policy import ProbePolicy
from beacon.prober import HintPolicy, Prober
from beacon.targets import Check, GrpcCheck, HttpCheck, ProbeResult, Target, TcpCheck

LOOPBACK_ALLOWED = ProbePolicy.with_allowed(["127.0.0.0/8"])
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
LOSS = "connection-loss"


async def wait_until(condition: Callable[[], bool], *, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.005)


def dropped(limit: str) -> float:
    return REGISTRY.get_sample_value("beacon_hints_dropped_total", {"limit": limit}) or 0.0


def hint_probes() -> float:
    return REGISTRY.get_sample_value("beacon_hint_probes_total") or 0.0


# ================================================================================================ the scheduler
def target(address: str = "198.18.0.1", *, interval: float = 60.0, threshold: int = 3, hints: bool = True) -> Target:
    return Target(
        address=address,
        check=TcpCheck(port=80),
        interval=interval,
        timeout=1.0,
        hints=hints,
        unhealthy_threshold=threshold,
    )


@dataclass
class FakeProbe:
    """Passes (or fails, per address) after an optional gate; records every start and every delivered result."""

    failing: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = None
    starts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    inflight: int = 0
    overlaps: int = 0
    delivered: list[tuple[Hashable, ProbeResult, float]] = field(default_factory=list)

    async def __call__(self, t: Target) -> ProbeResult:
        self.starts[t.address].append(time.monotonic())
        self.inflight += 1
        if self.inflight > 1:
            self.overlaps += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            ok = t.address not in self.failing
            return ProbeResult(ok=ok, detail="ok" if ok else "connection refused", seconds=0.0)
        finally:
            self.inflight -= 1

    def on_result(self, key: Hashable, t: Target, result: ProbeResult) -> None:
        self.delivered.append((key, result, time.monotonic()))

    def count(self, address: str = "198.18.0.1") -> int:
        return len(self.starts[address])

    def triggers(self) -> list[str]:
        return [result.trigger for _, result, _ in self.delivered]


@contextlib.asynccontextmanager
async def running(prober: Prober) -> AsyncIterator[Prober]:
    task = asyncio.create_task(prober.run())
    try:
        yield prober
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class FakeClock:
    """Monotonic time that a test can move forward at once (timers still run in real time)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.prober: Prober | None = None

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        if self.prober is not None:
            # the prober's one timer was armed in real seconds for a slot that is due now by this clock (a real
            # clock never jumps, so the timer would have fired already): re-arm it for what is due now
            self.prober._timer_due = math.inf
            self.prober._arm()


async def test_a_hint_probes_the_targets_of_that_endpoint_at_once_and_only_them() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target())
        prober.upsert("a-grpc", replace(target(), check=GrpcCheck(port=80)))  # another check of the same endpoint
        prober.upsert("other-port", replace(target(), check=TcpCheck(port=81)))
        prober.upsert("other-address", target("198.18.0.2"))
        await wait_until(lambda: len(fake.delivered) == 4)
        hinted_at = time.monotonic()
        prober.hint("198.18.0.1", 80)
        await wait_until(lambda: len(fake.delivered) == 6, within=1.0)  # not an interval (60 s) later
        await asyncio.sleep(0.2)
    assert max(starts[-1] for starts in fake.starts.values()) - hinted_at < 0.5
    assert sorted((key, result.trigger) for key, result, _ in fake.delivered[4:]) == [("a", LOSS), ("a-grpc", LOSS)]
    assert (fake.count("198.18.0.1"), fake.count("198.18.0.2")) == (5, 1)  # 3 first probes + 2 hint probes
    assert prober.hint_probes_run == 2
    prober.hint("198.18.0.9", 80)  # an endpoint nobody probes: nothing


async def test_a_passing_hint_probe_costs_exactly_one_probe_and_no_transition() -> None:
    """A server closing idle connections on purpose: the hint probe replaces the interval probe that was due (it
    is not run on top of it), and the next probe comes an interval after the hint's."""
    before = hint_probes()
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01, jitter=0.0)
    async with running(prober):
        prober.upsert("a", target(interval=1.0))
        await wait_until(lambda: fake.count() == 1)
        first = fake.starts["198.18.0.1"][0]
        await asyncio.sleep(0.4)
        prober.hint("198.18.0.1", 80)
        await wait_until(lambda: fake.count() == 2)
        hinted = fake.starts["198.18.0.1"][1]
        await asyncio.sleep(max(0.0, first + 1.0 + 0.2 - time.monotonic()))  # past the slot the hint replaced
        assert fake.count() == 2, "the replaced interval probe ran too"
        await wait_until(lambda: fake.count() == 3)
    assert fake.starts["198.18.0.1"][2] - hinted >= 1.0 - 0.01  # the interval resumes from the hint probe
    assert fake.triggers() == ["interval", LOSS, "interval"]
    assert hint_probes() - before == 1
    health = EndpointHealth()
    transitions = 0
    for _, result, _ in fake.delivered:
        health, changed = observe(health, ok=result.ok, detail=result.detail, now=0.0, thresholds=Thresholds())
        transitions += changed
    assert transitions == 1  # unknown -> passing with the first probe, and nothing since


async def test_failing_hint_probes_repeat_at_the_short_spacing_until_the_threshold_then_the_interval_resumes() -> None:
    fake = FakeProbe()
    prober = Prober(
        probe=fake,
        on_result=fake.on_result,
        first_probe_within=0.01,
        jitter=0.0,
        hints=HintPolicy(reprobe_seconds=0.1),
    )
    async with running(prober):
        prober.upsert("a", target(interval=1.0, threshold=3))
        await wait_until(lambda: fake.count() == 1)
        fake.failing.add("198.18.0.1")  # the backend crashed: its connection closes, and every probe fails now
        prober.hint("198.18.0.1", 80)
        await wait_until(lambda: fake.count() == 4, within=2.0)
        await wait_until(lambda: fake.count() == 5, within=3.0)
    starts = fake.starts["198.18.0.1"]
    assert fake.triggers() == ["interval", LOSS, LOSS, LOSS, "interval"]
    gaps = [b - a for a, b in itertools.pairwise(starts[1:4])]
    assert all(0.1 - 0.01 <= gap < 0.5 for gap in gaps), gaps  # the short spacing, not the interval
    assert starts[4] - starts[3] >= 1.0 - 0.01  # after the threshold, back on the interval
    assert [result.ok for _, result, _ in fake.delivered] == [True, False, False, False, False]
    health = EndpointHealth()
    for _, result, _ in fake.delivered[:4]:
        health, _ = observe(health, ok=result.ok, detail=result.detail, now=0.0, thresholds=Thresholds(unhealthy=3))
    assert health.status is Status.CRITICAL  # the hint's probes alone reached the threshold


async def test_a_hint_probe_that_passes_after_a_failure_ends_the_sequence() -> None:
    fake = FakeProbe(failing={"198.18.0.1"})
    prober = Prober(
        probe=fake, on_result=fake.on_result, first_probe_within=0.01, hints=HintPolicy(reprobe_seconds=0.1)
    )
    async with running(prober):
        prober.upsert("a", target(threshold=5))
        await wait_until(lambda: fake.count() == 1)
        prober.hint("198.18.0.1", 80)
        await wait_until(lambda: fake.count() == 3)
        fake.failing.clear()  # a restart, done before the threshold
        await wait_until(lambda: fake.count() == 4)
        await asyncio.sleep(0.4)
    assert fake.count() == 4
    assert [(r.trigger, r.ok) for _, r, _ in fake.delivered] == [
        ("interval", False),
        (LOSS, False),
        (LOSS, False),
        (LOSS, True),
    ]


async def test_a_hint_that_finds_the_targets_probe_in_flight_probes_right_after_it_never_alongside() -> None:
    fake = FakeProbe(gate=asyncio.Event())
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target())
        await wait_until(lambda: fake.inflight == 1)
        prober.hint("198.18.0.1", 80)  # e.g. another target's connection to the endpoint closed meanwhile
        await asyncio.sleep(0.1)
        assert fake.count() == 1  # never a second probe of the same target alongside
        assert fake.gate is not None
        fake.gate.set()
        await wait_until(lambda: fake.count() == 2, within=1.0)
        await asyncio.sleep(0.2)
    assert fake.overlaps == 0
    assert fake.triggers() == ["interval", LOSS]


async def test_an_entry_that_opted_out_is_not_probed_on_a_hint() -> None:
    fake = FakeProbe()
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01)
    async with running(prober):
        prober.upsert("a", target(hints=False))
        prober.upsert("b", target("198.18.0.2"))
        await wait_until(lambda: len(fake.delivered) == 2)
        prober.hint("198.18.0.1", 80)
        prober.hint("198.18.0.2", 80)
        await wait_until(lambda: fake.count("198.18.0.2") == 2)
        await asyncio.sleep(0.2)
    assert fake.count("198.18.0.1") == 1
    assert prober.hints_taken == 1
    assert sum(prober.hints_dropped.values()) == 0  # ignored, not dropped


async def test_one_hint_sequence_at_a_time_per_endpoint_and_a_gap_after_it_doubled_while_closes_are_benign() -> None:
    clock = FakeClock()
    fake = FakeProbe(gate=asyncio.Event())
    endpoint_drops = dropped("endpoint")
    prober = Prober(
        probe=fake,
        on_result=fake.on_result,
        first_probe_within=0.01,
        clock=clock,
        hints=HintPolicy(gap_seconds=1.0, rate=1000.0, burst=1000),
    )
    clock.prober = prober
    assert fake.gate is not None
    fake.gate.set()

    async def hint(*, after: float, taken: bool) -> None:
        clock.advance(after)
        drops, delivered = prober.hints_dropped["endpoint"], len(fake.delivered)
        prober.hint("198.18.0.1", 80)
        if taken:
            assert prober.hints_dropped["endpoint"] == drops
            await wait_until(lambda: len(fake.delivered) > delivered)
        else:
            assert prober.hints_dropped["endpoint"] == drops + 1

    async with running(prober):
        prober.upsert("a", target(interval=10.0))
        await wait_until(lambda: fake.count() == 1)

        fake.gate.clear()
        prober.hint("198.18.0.1", 80)
        await wait_until(lambda: fake.count() == 2)  # the hint's probe is running
        prober.hint("198.18.0.1", 80)  # the same endpoint, its sequence still running: dropped
        assert prober.hints_dropped["endpoint"] == 1
        fake.gate.set()
        await wait_until(lambda: len(fake.delivered) == 2)  # passed: the sequence is over, a benign one

        await hint(after=1.5, taken=False)  # after a benign sequence the gap is 2 s
        await hint(after=0.7, taken=True)
        await hint(after=3.5, taken=False)  # two benign in a row: 4 s
        await hint(after=0.7, taken=True)

        fake.failing.add("198.18.0.1")
        await hint(after=8.2, taken=True)  # three: 8 s
        await wait_until(lambda: len(fake.delivered) == 7)  # 3 failures: the threshold
        fake.failing.clear()
        await hint(after=0.5, taken=False)
        await hint(after=0.7, taken=True)  # a sequence that met a failure reset the gap to 1 s

        await hint(after=2.2, taken=True)
        await hint(after=4.2, taken=True)
        await hint(after=8.2, taken=True)  # four benign in a row would be 16 s, but never more than the interval
        await hint(after=9.5, taken=False)
        # (its interval probe is about due: a change probes it now, so that the jump below skips no probe)
        prober.upsert("a", target(interval=10.0, threshold=4))
        await wait_until(lambda: len(fake.delivered) == 12)
        await hint(after=0.8, taken=True)  # 10.3 s after the last sequence: the interval caps the gap
    assert fake.triggers() == ["interval"] + [LOSS] * 10 + ["interval", LOSS]
    assert prober.hints_dropped["endpoint"] == 5
    assert dropped("endpoint") - endpoint_drops == 5


async def test_the_global_token_bucket_drops_hints_beyond_its_budget() -> None:
    """A rolling restart: 10 endpoints lose their connections at once, the bucket holds 4. The other 6 hints are
    dropped (counted) and those endpoints keep their interval; the bucket refills at `rate`."""
    clock = FakeClock()
    fake = FakeProbe()
    global_drops = dropped("global")
    prober = Prober(
        probe=fake,
        on_result=fake.on_result,
        first_probe_within=0.01,
        clock=clock,
        hints=HintPolicy(rate=1.0, burst=4),
    )
    clock.prober = prober
    addresses = [f"198.18.0.{i}" for i in range(1, 11)]
    async with running(prober):
        for address in addresses:
            prober.upsert(address, target(address))
        await wait_until(lambda: len(fake.delivered) == 10)
        for address in addresses:
            prober.hint(address, 80)
        await wait_until(lambda: len(fake.delivered) == 14)
        await asyncio.sleep(0.1)
        assert len(fake.delivered) == 14
        assert prober.hints_dropped == {"global": 6}
        clock.advance(2.0)  # two tokens more
        for address in addresses[4:]:
            prober.hint(address, 80)
        await wait_until(lambda: len(fake.delivered) == 16)
        await asyncio.sleep(0.1)
    assert [fake.count(a) for a in addresses] == [2, 2, 2, 2, 2, 2, 1, 1, 1, 1]
    assert prober.hints_dropped == {"global": 10}
    assert dropped("global") - global_drops == 10


async def test_a_target_changed_or_removed_during_its_hint_sequence_leaves_it() -> None:
    fake = FakeProbe(failing={"198.18.0.1"})
    prober = Prober(probe=fake, on_result=fake.on_result, first_probe_within=0.01, hints=HintPolicy(gap_seconds=0))
    async with running(prober):
        prober.upsert("a", target(threshold=100))
        await wait_until(lambda: fake.count() == 1)
        prober.hint("198.18.0.1", 80)
        await wait_until(lambda: fake.count() >= 3)
        prober.remove("a")
        stopped = fake.count()
        await asyncio.sleep(0.3)
        assert fake.count() == stopped
        prober.upsert("a", target(threshold=100))
        await wait_until(lambda: fake.count() == stopped + 1)  # a new target: its first probe
        prober.hint("198.18.0.1", 80)  # the endpoint's sequence ended with the removal: a new one is taken
        await wait_until(lambda: fake.count() == stopped + 3)
        prober.upsert("a", target(threshold=100, interval=30.0))  # changed: probed at once, then on its interval
        await asyncio.sleep(0.3)
        changed = fake.count()
        await asyncio.sleep(0.3)
    assert fake.count() == changed
    assert fake.delivered[-1][1].trigger == "interval"


# ================================================================================================ plain HTTP
class Backend:
    """A keep-alive HTTP server on loopback. `close_idle()` closes its connections (a keep-alive timeout);
    `crash()` stops listening and resets them, as the kernel does when the process dies. With `hang_up` set it
    reads a request and closes the connection without answering (a close while a probe is on it)."""

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self.requests = 0
        self.hang_up = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.hang_up:
                    await asyncio.sleep(0.05)
                    return
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def close_idle(self, *, reset: bool = False) -> None:
        for writer in list(self.writers):
            if reset:  # RST instead of FIN
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()

    async def crash(self) -> None:
        assert self.server is not None
        self.server.close()
        self.close_idle(reset=True)
        await self.server.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.close_idle()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[Backend]:
    server = await Backend().start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class Rig:
    """A Checker whose hint sink is a Prober's `hint` (as the runtime wires them), and what came out."""

    checker: Checker
    prober: Prober
    hints: list[tuple[str, int]]
    results: list[tuple[Hashable, ProbeResult, float]]

    def triggers(self, key: Hashable | None = None) -> list[tuple[str, bool]]:
        return [(r.trigger, r.ok) for k, r, _ in self.results if key is None or k == key]


@contextlib.asynccontextmanager
async def rig(policy: HintPolicy | None = None) -> AsyncIterator[Rig]:
    hints: list[tuple[str, int]] = []
    results: list[tuple[Hashable, ProbeResult, float]] = []
    prober_ref: list[Prober] = []

    def hint(address: str, port: int) -> None:
        hints.append((address, port))
        prober_ref[0].hint(address, port)

    async with Checker(policy=LOOPBACK_ALLOWED, leases=lambda ns, name: None, hint=hint) as checker:
        prober = Prober(
            probe=checker.run,
            on_result=lambda k, t, r: results.append((k, r, time.monotonic())),
            first_probe_within=0.01,
            forget=checker.forget,
            hints=policy or HintPolicy(reprobe_seconds=0.1),
        )
        prober_ref.append(prober)
        async with running(prober):
            yield Rig(checker=checker, prober=prober, hints=hints, results=results)


def probe_target(check: Check, *, interval: float = 60.0, hints: bool = True, threshold: int = 3) -> Target:
    return Target(
        address="127.0.0.1",
        check=check,
        interval=interval,
        timeout=1.0,
        hints=hints,
        unhealthy_threshold=threshold,
    )


@pytest.mark.parametrize("reset", [False, True], ids=["FIN", "RST"])
async def test_an_idle_http_connection_closed_by_the_server_triggers_an_immediate_probe(reset: bool) -> None:
    async with backend() as server, rig() as r:
        r.prober.upsert("a", probe_target(HttpCheck(port=server.port)))
        await wait_until(lambda: len(r.results) == 1)
        await asyncio.sleep(0.05)  # the connection waits in the pool
        closed_at = time.monotonic()
        server.close_idle(reset=reset)  # e.g. its keep-alive timeout
        await wait_until(lambda: len(r.results) == 2, within=2.0)
        await asyncio.sleep(0.2)
    assert r.results[1][2] - closed_at < 0.5  # at once, not an interval (60 s) later
    assert r.hints == [("127.0.0.1", server.port)]
    assert r.triggers() == [("interval", True), (LOSS, True)]  # passed: one probe, and that is all
    assert server.requests == 2


async def test_an_entry_that_opted_out_is_not_probed_when_its_http_connection_closes() -> None:
    async with backend() as server, rig() as r:
        r.prober.upsert("a", probe_target(HttpCheck(port=server.port), hints=False))
        await wait_until(lambda: len(r.results) == 1)
        await asyncio.sleep(0.05)
        server.close_idle()
        await asyncio.sleep(0.3)
    assert r.hints == [("127.0.0.1", server.port)]  # the checker reports it; the prober has no target that wants it
    assert len(r.results) == 1
    assert r.prober.hints_taken == 0


async def test_a_crashed_http_backend_is_reprobed_at_the_short_spacing_until_unhealthy_then_on_its_interval() -> None:
    async with backend() as server, rig(HintPolicy(reprobe_seconds=0.1)) as r:
        r.prober.upsert("a", probe_target(HttpCheck(port=server.port), interval=1.0, threshold=3))
        await wait_until(lambda: len(r.results) == 1)
        await asyncio.sleep(0.05)
        crashed_at = time.monotonic()
        await server.crash()
        await wait_until(lambda: len(r.results) == 4, within=2.0)
        detected_at = r.results[3][2]
        await wait_until(lambda: len(r.results) == 5, within=3.0)
    assert r.triggers() == [("interval", True), (LOSS, False), (LOSS, False), (LOSS, False), ("interval", False)]
    assert detected_at - crashed_at < 0.2 * 2 + 0.5  # threshold 3 at 0.1 s spacing, instead of 3 intervals
    times = [at for _, _, at in r.results]
    assert all(0.1 - 0.01 <= b - a < 0.5 for a, b in itertools.pairwise(times[1:4]))
    assert times[4] - times[3] >= 1.0 * 0.9 - 0.05  # the interval (jittered 10%) resumes
    assert "Cannot connect" in r.results[1][1].detail
    assert r.hints == [("127.0.0.1", server.port)]


async def test_a_close_while_a_probe_is_on_the_http_connection_is_not_a_hint() -> None:
    async with backend() as server, rig() as r:
        r.prober.upsert("a", probe_target(HttpCheck(port=server.port)))
        await wait_until(lambda: len(r.results) == 1)
        server.hang_up = True  # the next request finds its connection closed under it
        r.prober.upsert("a", probe_target(HttpCheck(port=server.port, path="/again")))  # probed at once
        await wait_until(lambda: len(r.results) == 2)
        await asyncio.sleep(0.3)
    assert r.results[1][1].detail == "ServerDisconnectedError: Server disconnected"  # the probe reports it
    assert r.hints == []
    assert r.triggers() == [("interval", True), ("interval", False)]


async def test_closes_the_http_client_makes_itself_are_not_hints() -> None:
    """forget, the idle sweep, a body too long, a `Connection: close` answer, shutdown: none is a hint. A close
    by the server of a pooled connection is (the control)."""
    lost: list[tuple[str, int]] = []
    long_body = b"HTTP/1.1 200 OK\r\nContent-Length: 8192\r\n\r\n" + b"x" * 8192
    answers = {"/": OK, "/long": long_body, "/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok"}
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                writer.write(answers[path])
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def request(path: str = "/") -> Request:
        return Request.build(address="127.0.0.1", port=port, path=path)

    async with server:
        client = HttpProbeClient(idle_seconds=0.1, on_lost=lambda a, p: lost.append((a, p)))
        try:
            await client.get(request())
            assert client.idle_connections == 1
            client.forget("127.0.0.1", port)
            await asyncio.sleep(0.05)
            await client.get(request())
            await wait_until(lambda: client.idle_connections == 0)  # the idle sweep (idle_seconds=0.1)
            await asyncio.sleep(0.05)
            await client.get(request("/long"))  # more body than MAX_BODY: the client drops the connection
            await client.get(request("/close"))
            await client.get(request())
            await asyncio.sleep(0.05)
            assert lost == []
        finally:
            await client.close()  # closes the pooled connection: still no hint
        await asyncio.sleep(0.05)
        assert lost == []

        client = HttpProbeClient(on_lost=lambda a, p: lost.append((a, p)))
        try:
            await client.get(request())
            for writer in writers:  # the control: the server closes the pooled connection
                writer.close()
            await wait_until(lambda: lost == [("127.0.0.1", port)])
        finally:
            await client.close()


async def test_the_checker_reports_no_hint_for_an_endpoint_it_forgets() -> None:
    async with backend() as server, rig() as r:
        r.prober.upsert("a", probe_target(HttpCheck(port=server.port)))
        await wait_until(lambda: len(r.results) == 1)
        r.prober.remove("a")  # the prober forgets the endpoint: the checker closes its connection
        await asyncio.sleep(0.1)
        server.close_idle()
        await asyncio.sleep(0.1)
    assert r.hints == []
    assert server.writers == set()


# ================================================================================================ gRPC
class SlowHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Answers SERVING, after `delay` seconds."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.calls = 0

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method's name
        self.calls += 1
        await asyncio.sleep(self.delay)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@contextlib.asynccontextmanager
async def grpc_server(servicer: Any | None = None) -> AsyncIterator[tuple[int, Any]]:
    server = grpc.aio.server()
    if servicer is None:
        servicer = health_aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, server
    finally:
        await server.stop(None)


async def test_a_grpc_channel_lost_while_idle_is_a_hint() -> None:
    async with rig() as r, grpc_server() as (port, server):
        r.prober.upsert("a", probe_target(GrpcCheck(port=port)))
        await wait_until(lambda: len(r.results) == 1)
        await asyncio.sleep(0.1)
        stopped_at = time.monotonic()
        await server.stop(None)  # the backend goes away: the channel leaves READY
        await wait_until(lambda: len(r.results) == 4, within=3.0)
        await asyncio.sleep(0.2)
    assert r.hints == [("127.0.0.1", port)]
    assert r.triggers() == [("interval", True)] + [(LOSS, False)] * 3
    assert r.results[1][2] - stopped_at < 0.5


async def test_a_grpc_channel_lost_during_a_probe_is_not_a_hint() -> None:
    servicer = SlowHealth()
    async with rig() as r, grpc_server(servicer) as (port, server):
        r.prober.upsert("a", probe_target(GrpcCheck(port=port)))
        await wait_until(lambda: len(r.results) == 1)
        servicer.delay = 5.0
        r.prober.upsert("a", probe_target(GrpcCheck(port=port), threshold=4))  # changed: probed at once
        await wait_until(lambda: servicer.calls == 2)  # its RPC is on the channel now
        await server.stop(None)
        await wait_until(lambda: len(r.results) == 2)
        await asyncio.sleep(0.3)
    assert not r.results[1][1].ok  # the probe reports the loss itself
    assert r.hints == []


async def test_grpc_channels_the_checker_closes_or_of_entries_that_opted_out_give_no_hints() -> None:
    async with rig() as r, grpc_server() as (port, server):
        r.prober.upsert("a", probe_target(GrpcCheck(port=port)))
        await wait_until(lambda: len(r.results) == 1)
        assert r.checker._channels[("127.0.0.1", port)].watcher is not None
        r.prober.remove("a")  # forget: the checker closes the channel
        await asyncio.sleep(0.2)
        assert r.hints == []
        r.prober.upsert("b", probe_target(GrpcCheck(port=port), hints=False))
        await wait_until(lambda: len(r.results) == 2)
        assert r.checker._channels[("127.0.0.1", port)].watcher is None  # nobody wants hints: no watcher
        await server.stop(None)
        await asyncio.sleep(0.3)
    assert r.hints == []


# ================================================================================================ held TCP
class TcpBackend:
    """Accepts connections and keeps them until the client or `close_all()` closes them."""

    def __init__(self) -> None:
        self.open: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open.add(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client's EOF
        self.open.discard(writer)
        writer.close()

    def close_all(self) -> None:
        for writer in list(self.open):
            writer.close()


@contextlib.asynccontextmanager
async def tcp_backend() -> AsyncIterator[tuple[int, TcpBackend]]:
    backend_ = TcpBackend()
    server = await asyncio.start_server(backend_.handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], backend_
    finally:
        backend_.close_all()
        server.close()
        await server.wait_closed()


async def test_a_held_tcp_connection_closed_by_the_server_is_a_hint() -> None:
    async with tcp_backend() as (port, server), rig() as r:
        r.prober.upsert("a", probe_target(TcpCheck(port=port, hold=True)))
        await wait_until(lambda: len(r.results) == 1)
        await wait_until(lambda: len(server.open) == 1)  # held after the check
        closed_at = time.monotonic()
        server.close_all()
        await wait_until(lambda: len(r.results) == 2, within=2.0)
        await wait_until(lambda: len(server.open) == 1)  # the hint probe's connection is the one held now
        await asyncio.sleep(0.2)
    assert r.hints == [("127.0.0.1", port)]
    assert r.triggers() == [("interval", True), (LOSS, True)]
    assert r.results[1][2] - closed_at < 0.5
    assert server.accepted == 2  # every probe is a new connection, as a TCP check must be


async def test_tcp_connections_are_held_only_when_asked_one_per_endpoint_and_their_own_closes_are_no_hints() -> None:
    async with tcp_backend() as (port, server), rig() as r:
        r.prober.upsert("plain", probe_target(TcpCheck(port=port)))
        await wait_until(lambda: len(r.results) == 1)
        await asyncio.sleep(0.1)
        assert server.open == set()  # not held: closed right after the check
        r.prober.upsert("plain", probe_target(TcpCheck(port=port, hold=True)))
        await wait_until(lambda: len(r.results) == 2)
        r.prober.upsert("plain", probe_target(TcpCheck(port=port, hold=True), interval=30.0))  # probed at once
        await wait_until(lambda: len(r.results) == 3)
        await asyncio.sleep(0.1)
        assert len(server.open) == 1  # the newest replaced the previous one, which the checker closed
        r.prober.remove("plain")  # forget: the held connection is closed by the checker
        await wait_until(lambda: server.open == set())
        await asyncio.sleep(0.1)
    assert r.hints == []
    assert r.checker._held == {}
