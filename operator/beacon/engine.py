"""The small engine every beacon controller runs on: a work queue of keys, the reconcile that processes them, and
the kinds the controller owns, watched so that someone else's change re-queues the owner.

Why it exists: controller-runtime gives Go controllers one shape (`For(primary).Owns(secondary)`): a key-based,
rate-limited work queue and a watch of each owned kind that maps an object to its owner's key. beacon has four
controllers (ServiceEntry, Registry, ConfigEntry, Reload). Each states here what it owns, and one piece of code
watches the owned kinds and repairs them, instead of every engine growing its own watch loop.

An owned object is found by a label selector (beacon labels everything it writes) and watched metadata-only,
cluster-wide: a watch that looks for other writers needs no object bodies. `Kube.changed_by_others` tells a
foreign change (a deletion, or a resourceVersion beacon did not write) from the echo of beacon's own writes; only
the former re-queues the owner, whose reconcile reads the object, compares the fields beacon applied and writes
it back on a difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from beacon.kube import Kube
from beacon.retries import RETRIES, Retries
from beacon.workqueue import WorkQueue

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("beacon.engine")


@dataclass(frozen=True)
class Owns:
    """A kind a controller writes and keeps as it should be: its objects carry `label_selector`'s labels.

    By default the watch carries metadata only, and an event is someone else's doing when `Kube.changed_by_others`
    says so (a deletion, or a resourceVersion beacon's writes did not produce): right for what beacon applies.
    `changed(type, object)` replaces that test for objects beacon creates once and never applies (revisions):
    their watch then carries whole objects, and the controller compares them with its own record."""

    kind: str
    label_selector: str
    changed: Callable[[str, Mapping[str, Any]], bool] | None = field(default=None, compare=False)

    @property
    def metadata_only(self) -> bool:
        return self.changed is None


class Controller(Generic[K]):
    """One controller: `enqueue(key)` marks a key for `reconcile`, through a work queue that coalesces, never runs
    a key twice at once and retries failures as the shared limiter says. `watch_owned()` starts a watch per owned
    kind; an object changed or deleted by someone else maps to its owner with `owner_of(kind, metadata)` (None: no
    owner this controller knows), `on_owned_change(kind, key, metadata)` may drop what the owner keeps of it, and
    the owner is queued. `in_scope(namespace)` limits the controller to the namespaces it serves."""

    def __init__(
        self,
        *,
        name: str,
        kube: Kube,
        reconcile: Callable[[K], Awaitable[None]],
        owns: Sequence[Owns] = (),
        owner_of: Callable[[str, Mapping[str, Any]], K | None] = lambda _kind, _meta: None,
        on_owned_change: Callable[[str, K, Mapping[str, Any]], None] = lambda _kind, _key, _meta: None,
        in_scope: Callable[[str], bool] = lambda _namespace: True,
        alive: Callable[[K], bool] = lambda _key: True,
        on_error: Callable[[K, Exception], None] = lambda _key, _exc: None,
        delay: float = 0.0,
        min_interval: float = 0.0,
        retries: Retries = RETRIES,
    ) -> None:
        self.name = name
        self.owns = tuple(owns)
        self._kube = kube
        self._owner_of = owner_of
        self._on_owned_change = on_owned_change
        self._in_scope = in_scope
        self.queue: WorkQueue[K] = WorkQueue(
            name=name,
            process=reconcile,
            alive=alive,
            on_error=on_error,
            delay=delay,
            min_interval=min_interval,
            retries=retries,
        )
        self._owns = {owned.kind: owned for owned in self.owns}
        self._watches: dict[str, asyncio.Task[None]] = {}

    def enqueue(self, key: K) -> None:
        self.queue.schedule(key)

    def is_dirty(self, key: K) -> bool:
        return self.queue.is_dirty(key)

    def cancel(self, key: K) -> None:
        self.queue.cancel(key)

    def watch_owned(self) -> None:
        """Watch every owned kind (once; a second call changes nothing). Called when this replica may write."""
        for owned in self.owns:
            if owned.kind not in self._watches:
                self._watches[owned.kind] = asyncio.ensure_future(self._follow(owned))

    async def _follow(self, owned: Owns) -> None:
        watch = self._kube.watch(
            owned.kind, None, label_selector=owned.label_selector, metadata_only=owned.metadata_only
        )
        async for type_, body in watch:
            self.owned_changed(owned.kind, type_, body)

    def owned_changed(self, kind: str, type_: str, obj: Mapping[str, Any]) -> None:
        """One watch event of an owned object: re-queue its owner when someone else changed or deleted it."""
        meta = obj["metadata"]
        namespace = meta["namespace"]
        if not self._in_scope(namespace):
            return
        owned = self._owns[kind]
        ours = not owned.changed(type_, obj) if owned.changed else not self._kube.changed_by_others(kind, type_, meta)
        if ours:
            return  # beacon's own write or deletion coming back (or the garbage collector's after the owner)
        key = self._owner_of(kind, meta)
        what = "deleted" if type_ == "DELETED" else "written"
        log.info("%s %s/%s was %s by someone else: %s checks it", kind, namespace, meta["name"], what, self.name)
        if owned.metadata_only:  # an applied object: the reconcile reads it, compares, writes on a difference
            self._kube.forget(kind, namespace, meta["name"])
        if key is None:
            return
        self._on_owned_change(kind, key, meta)
        self.enqueue(key)

    async def close(self) -> None:
        watches = list(self._watches.values())
        self._watches.clear()
        for task in watches:
            task.cancel()
        for task in watches:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.queue.close()


def owner_uids(meta: Mapping[str, Any]) -> set[str]:
    """The uids of an object's owners (ownerReferences): how an owned object names its owner even when someone
    edited its labels."""
    return {str(ref["uid"]) for ref in meta.get("ownerReferences") or [] if ref.get("uid")}
