"""Membership of a sharded beacon: each replica keeps its own Lease, learns the others from theirs, and serves the
namespaces that rendezvous hashing gives it, never one that another replica may still be serving.

Why it exists: with several active replicas, "exactly one writer per namespace" must hold through joins, leaves
and crashes, with Kubernetes as the only coordinator (coordination.k8s.io Leases, no consensus protocol of our
own). Three rules give it:

* **Fencing.** A replica writes only while its own Lease is valid: until `duration` after the moment it sent the
  last renewal that succeeded, on its own monotonic clock (`may_write`). The others count a Lease's expiry from
  when they saw it change, which is later, so a replica that cannot renew has stopped writing before anyone
  takes its namespaces over.
* **Acknowledged views.** A replica's view is the set of live members. Before it announces a view (an annotation
  on its Lease), it releases every namespace that view gives to someone else (`on_release`: stop probing, drop
  state, write nothing). A namespace it gains under a new view is served only once every other live member has
  announced that same view, i.e. has released it; namespaces it keeps are served without a gap.
* **Expiry.** A member that crashed stops announcing anything; once its Lease expires (by the observers' own
  clocks) it leaves every view, and its namespaces move to the survivors.

The choice of owner itself is pure and lives in `beacon.sharding`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from beacon.kube import ApiError, Kube
from beacon.sharding import Seen, live, observe, owner

LABEL_GROUP = "beacon.dev/shard-group"
ANNOTATION_VIEW = "beacon.dev/shard-view"

log = logging.getLogger("beacon.shards")


def view_digest(members: Iterable[str]) -> str:
    """A short, order-free name for a set of members (what a Lease announces)."""
    return hashlib.sha256("\n".join(sorted(set(members))).encode()).hexdigest()[:16]


def _micro_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Member:
    """This replica in a shard group: renew its Lease, watch the others', keep `view` and the served set.

    `on_release(view)` is awaited before a view is announced: the engines drop (without writing) every namespace
    that `view` gives to another member. `on_acquire()` is called when the namespaces this replica may serve grow
    (the engines list and start the new ones)."""

    def __init__(
        self,
        *,
        kube: Kube,
        identity: str,
        namespace: str,
        group: str = "beacon",
        duration: float = 10.0,
        renew_every: float = 2.0,
        on_release: Callable[[frozenset[str]], Awaitable[None]] | None = None,
        on_acquire: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.identity = identity
        self.namespace = namespace
        self.group = group
        self.duration = duration
        self.renew_every = renew_every
        self._on_release = on_release
        self._on_acquire = on_acquire
        self._clock = clock
        self._wall = wall_clock
        self._valid_until = float("-inf")
        self._seen: dict[str, Seen] = {}
        self._announced: dict[str, str] = {}  # member -> the view digest its Lease announces
        self.view: frozenset[str] = frozenset()  # the members this replica announced (after releasing)
        self.settled: frozenset[str] = frozenset()  # the last view every live member announced
        self.handovers = 0
        self._lock = asyncio.Lock()
        self._watching_since: float | None = None  # when this replica first listed the group's Leases

    # ------------------------------------------------------------------ questions the engines ask
    def may_write(self) -> bool:
        """Whether this replica's own Lease is valid now (fencing: checked before every write)."""
        return self._clock() < self._valid_until

    def serves(self, unit: str) -> bool:
        """Whether this replica serves `unit` now: it owns it in its announced view, and either owned it in the
        last view everyone announced too (no gap for what stays) or everyone has announced this view (so the
        previous owner has let go)."""
        if not self.may_write() or owner(unit, self.view) != self.identity:
            return False
        return self.settled == self.view or owner(unit, self.settled) == self.identity

    def live_members(self) -> frozenset[str]:
        members = set(live(self._seen, now=self._clock()))
        if self.may_write():
            members.add(self.identity)
        else:
            members.discard(self.identity)
        return frozenset(members)

    # ------------------------------------------------------------------ the loops
    async def start(self) -> None:
        """Announce this replica (its first renewal) and learn the group as it stands (one listing)."""
        await self.renew()
        for item in await self.kube.list("Lease", self.namespace, label_selector=f"{LABEL_GROUP}={self.group}"):
            self.lease_changed("ADDED", item)
        self._watching_since = self._clock()

    async def run(self) -> None:
        """Start, then renew, watch and decide until cancelled; on the way out, give the Lease up (the others need
        not wait for it to expire)."""
        if self._watching_since is None:
            await self.start()
        watcher = asyncio.ensure_future(self._watch())
        try:
            while True:
                await self.renew()
                await self.decide()
                await asyncio.sleep(self.renew_every)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            await self.leave()

    async def renew(self) -> bool:
        """Apply this replica's Lease (renewTime now, the announced view). True when it succeeded: the fencing
        deadline then moves to `duration` after the moment the request was sent."""
        sent = self._clock()
        name = self.lease_name(self.identity)
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {LABEL_GROUP: self.group},
                "annotations": {ANNOTATION_VIEW: view_digest(self.view)},
            },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration)),
                "renewTime": _micro_time(self._wall()),
            },
        }
        try:
            await self.kube.apply(body, fenced=False)  # renewing is how a replica becomes valid again
        except (ApiError, OSError) as exc:
            log.warning("shard %s: cannot renew its Lease (writes stop once it expires): %s", self.identity, exc)
            return False
        self._valid_until = sent + self.duration
        return True

    async def leave(self) -> None:
        self._valid_until = float("-inf")
        with contextlib.suppress(ApiError, OSError):
            await self.kube.request(
                "DELETE",
                self.kube.path("Lease", self.namespace, self.lease_name(self.identity)),
                kind="Lease",
                fenced=False,
            )

    def _heard_everyone(self) -> bool:
        """Whether this replica has watched the group long enough to know every live member: two renewal
        intervals after its first listing, every member that was alive then has renewed (and been seen) at least
        once. Two replicas started together must not each settle on a group of one."""
        return self._watching_since is not None and self._clock() - self._watching_since >= 2 * self.renew_every

    def lease_name(self, identity: str) -> str:
        return f"{self.group}-shard-{identity}"

    async def _watch(self) -> None:
        async for type_, body in self.kube.watch("Lease", self.namespace, label_selector=f"{LABEL_GROUP}={self.group}"):
            self.lease_changed(type_, body)
            await self.decide()

    def lease_changed(self, type_: str, body: dict[str, Any]) -> None:
        """Take one watch event of a member's Lease."""
        spec = body.get("spec") or {}
        member = spec.get("holderIdentity")
        if not member or member == self.identity:
            return
        if type_ == "DELETED":
            self._seen.pop(member, None)
            self._announced.pop(member, None)
            return
        stamp = str(spec.get("renewTime") or "")
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        self._seen[member] = observe(self._seen.get(member), stamp=stamp, duration=duration, now=self._clock())
        view = ((body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_VIEW)
        if view:
            self._announced[member] = view

    async def decide(self) -> None:
        """Move to the current view: release what it gives away, announce it, and serve what it gives once every
        live member announces it too."""
        async with self._lock:
            members = self.live_members()
            if members != self.view and self.identity in members:
                before = self.view
                if self._on_release is not None:
                    await self._on_release(members)
                self.view = members
                log.info(
                    "shard %s: members %s (were %s); announcing",
                    self.identity,
                    ", ".join(sorted(members)),
                    ", ".join(sorted(before)) or "none",
                )
                await self.renew()  # announce at once: the others wait for it
            digest = view_digest(self.view)
            others = self.view - {self.identity}
            if not self.view or self.settled == self.view or not self._heard_everyone():
                return
            if all(self._announced.get(m) == digest for m in others):
                self.settled = self.view
                self.handovers += 1
                log.info("shard %s: every member serves %s now", self.identity, ", ".join(sorted(self.view)))
                if self._on_acquire is not None:
                    self._on_acquire()
