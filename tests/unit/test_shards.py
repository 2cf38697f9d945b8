"""Sharded membership through Leases, against an in-memory Lease store and a manual clock: at no instant do two
replicas serve the same namespace, through a join, a crash, a renewal failure and a simultaneous start. (The
real control plane proves it with operator processes; this is the protocol alone.)"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

from beacon.shards import Member

UNITS = [f"team-{i}" for i in range(60)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseStore:
    """The apiserver's Leases for every member: apply, list, delete, and a watch per member."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.feeds: list[asyncio.Queue[tuple[str, dict[str, Any]]]] = []
        self.down: set[str] = set()  # members whose requests fail (their path to the API is broken)

    def client(self, identity: str) -> LeaseKube:
        return LeaseKube(self, identity)

    def publish(self, type_: str, obj: dict[str, Any]) -> None:
        for feed in self.feeds:
            feed.put_nowait((type_, copy.deepcopy(obj)))


class LeaseKube:
    def __init__(self, store: LeaseStore, identity: str) -> None:
        self.store, self.identity = store, identity

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None) -> str:
        return f"{namespace}/{name}"

    async def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> dict[str, Any] | None:
        if self.identity in self.store.down:
            raise OSError("connection refused")
        name = path.split("/", 1)[1]
        if method == "DELETE":
            gone = self.store.leases.pop(name, None)
            if gone is not None:
                self.store.publish("DELETED", gone)
            return None
        self.store.leases[name] = copy.deepcopy(body)
        self.store.publish("MODIFIED", body)
        return body  # type: ignore[no-any-return]

    async def apply(self, obj: dict[str, Any], **_: Any) -> dict[str, Any] | None:
        return await self.request(
            "PATCH", self.path("Lease", obj["metadata"]["namespace"], obj["metadata"]["name"]), body=obj
        )

    async def list(self, kind: str, namespace: str, **_: Any) -> list[dict[str, Any]]:
        return [copy.deepcopy(lease) for lease in self.store.leases.values()]

    async def watch(self, kind: str, namespace: str, **_: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        feed: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.store.feeds.append(feed)
        while True:
            yield await feed.get()


class Replica:
    """A member and the namespaces its engines hold; `released` records what it let go, and when."""

    def __init__(self, store: LeaseStore, identity: str, clock: Clock) -> None:
        self.released: list[frozenset[str]] = []
        self.letting_go = asyncio.Event()  # cleared: its engines take their time to stop (probes in flight)
        self.letting_go.set()
        self.decisions: set[asyncio.Task[None]] = set()
        self.member = Member(
            kube=store.client(identity),  # type: ignore[arg-type]
            identity=identity,
            namespace="beacon-system",
            duration=10.0,
            renew_every=2.0,
            on_release=self._release,
            clock=clock,
            wall_clock=clock,
        )
        self.watcher: asyncio.Task[None] | None = None

    async def _release(self, view: frozenset[str]) -> None:
        await self.letting_go.wait()
        self.released.append(view)

    async def start(self) -> None:
        await self.member.start()
        self.watcher = asyncio.ensure_future(self.member._watch())

    async def tick(self) -> None:
        await self.member.renew()
        decision = asyncio.ensure_future(self.member.decide())  # may wait for the engines to let go
        self.decisions.add(decision)
        decision.add_done_callback(self.decisions.discard)
        await asyncio.sleep(0)

    def serving(self) -> set[str]:
        return {u for u in UNITS if self.member.serves(u)}


async def _turns() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _advance(clock: Clock, replicas: list[Replica], seconds: float, *, check: bool = True) -> None:
    """Let time pass in renewal steps; at every step no namespace may be served twice."""
    steps = int(seconds / 1.0)
    for _ in range(steps):
        clock.now += 1.0
        for replica in replicas:
            await replica.tick()
            if check:  # before the others have heard of this tick, and after
                _exclusive(replicas)
            await _turns()
            if check:
                _exclusive(replicas)


def _exclusive(replicas: list[Replica]) -> None:
    served: dict[str, str] = {}
    for replica in replicas:
        for unit in replica.serving():
            assert unit not in served, f"{unit} served by {served[unit]} and {replica.member.identity}"
            served[unit] = replica.member.identity


async def test_a_joining_replica_serves_nothing_until_the_others_let_go_and_then_a_share() -> None:
    store, clock = LeaseStore(), Clock()
    a = Replica(store, "a", clock)
    await a.start()
    await _advance(clock, [a], 6)
    assert a.serving() == set(UNITS), "alone, it serves everything"
    b = Replica(store, "b", clock)
    a.letting_go.clear()  # a is slow to stop what it gives away
    await b.start()
    assert b.serving() == set()
    await _advance(clock, [a, b], 8)
    assert b.serving() == set(), "b serves nothing while a has not let go"
    assert a.serving() == set(UNITS)
    a.letting_go.set()
    await _advance(clock, [a, b], 3)
    assert a.serving() | b.serving() == set(UNITS)
    assert 15 < len(b.serving()) < 45
    assert a.released[-1] == {"a", "b"}, "a let go of b's share before announcing the new view"
    for r in (a, b):
        assert r.watcher is not None
        r.watcher.cancel()


async def test_a_crashed_replicas_namespaces_move_after_its_lease_expired_and_not_before() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = Replica(store, "a", clock), Replica(store, "b", clock)
    await a.start()
    await b.start()
    await _advance(clock, [a, b], 8)
    theirs = b.serving()
    assert theirs
    # b is killed: it renews no more (and, dead, serves nothing; its last view stays on its Lease)
    for _ in range(9):
        clock.now += 1.0
        await a.tick()
        await _turns()
        assert not (a.serving() & theirs), "taken over before b's Lease expired"
    await _advance(clock, [a], 3)
    assert a.serving() == set(UNITS)


async def test_a_replica_that_cannot_renew_stops_writing_before_the_others_take_over() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = Replica(store, "a", clock), Replica(store, "b", clock)
    await a.start()
    await b.start()
    await _advance(clock, [a, b], 8)
    store.down.add("b")  # b's path to the apiserver breaks; b itself keeps running
    stopped_at = None
    for _ in range(16):
        clock.now += 1.0
        for replica in (a, b):
            await replica.tick()
            await _turns()
        if not b.member.may_write() and stopped_at is None:
            stopped_at = clock.now
        _exclusive([a, b])
        if a.serving() == set(UNITS):
            assert stopped_at is not None, "a served b's share while b could write"
            break
    else:
        raise AssertionError("a never took b's share over")
    assert b.serving() == set()


async def test_two_replicas_started_together_never_both_serve_everything() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = Replica(store, "a", clock), Replica(store, "b", clock)

    async def nothing_yet(*_: Any, **__: Any) -> list[dict[str, Any]]:
        return []  # both list the group before either's Lease is there: neither sees the other at first

    for replica in (a, b):
        replica.member.kube.list = nothing_yet  # type: ignore[method-assign]
    await a.start()
    await b.start()
    await _advance(clock, [a, b], 8)
    assert a.serving() | b.serving() == set(UNITS)
    assert a.serving()
    assert b.serving()
