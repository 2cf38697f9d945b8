"""The configuration engine: keeps ConfigEntries and opted-in workloads in memory, materialises each entry's
ConfigMap with its history (ControllerRevisions), and rolls out the workloads that use it, debounced and
rate-limited.

Why it exists: the kopf handlers only translate watch events into calls on this object, and `beacon.config_core`
only decides. Something has to own the state in between: when to reconcile (one worker per entry, coalesced; a
change to a namespace-wide entry re-materialises every entry of the namespace), what the API already holds after
a restart (history, the ConfigMap's hash, the workloads' annotations, so that a restart rewrites and restarts
nothing), and the timers of the reloads (one worker per workload: a burst of changes within the debounce window
gives one rollout; at most N rollouts per period; excess changes wait and coalesce, never dropped). Every API
call goes through `beacon.kube`.

Work per event does not grow with the cluster: entries are indexed by namespace and scope (service, or None for
namespace-wide), so a change fans out to the entries of its scope only, and a reconcile reads only the layers
that can apply; opted-in workloads are indexed by the ConfigMaps they read, so a new hash reaches only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from beacon import metrics
from beacon.config_core import (
    ANNOTATION_BASELINE,
    ANNOTATION_HASH,
    ANNOTATION_RELOAD,
    ANNOTATION_TEMPLATE_HASHES,
    LABEL_ENTRY_UID,
    ConfigEntry,
    Current,
    Revision,
    choose_revision,
    content_hash,
    current_of,
    debounce_due,
    desired_config_map,
    desired_revision,
    desired_status,
    owned_by_other,
    parse_hashes,
    plan,
    rate_limit_next,
    reload_decision,
    reload_names,
    revision_data,
    revision_from_object,
    to_prune,
)
from beacon.kube import ApiError, Kube, NotOursError
from beacon.reconcile import Condition, merge_conditions, status_changed
from beacon.retries import RETRIES
from beacon.workqueue import WorkQueue, repeat

log = logging.getLogger("beacon.configs")

EntryKey = tuple[str, str]  # namespace, name
WorkloadKey = tuple[str, str, str]  # kind, namespace, name
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


@dataclass
class _EntryState:
    entry: ConfigEntry
    status: dict[str, Any] | None = None
    loaded: bool = False
    history: dict[int, Revision] = field(default_factory=dict)
    current: Current | None = None
    config_map: str | None = None  # where the data is materialised (status.configMapName)
    foreign: bool = False  # the target ConfigMap exists and belongs to someone else
    pinned: tuple[int, dict[str, str] | None] | None = None  # cached data of spec.rollbackTo
    stray: dict[str, Any] = field(default_factory=dict)  # keys someone else added to our ConfigMap (to remove)


@dataclass
class _Workload:
    kind: str
    namespace: str
    name: str
    uid: str
    names: tuple[str, ...]
    template: dict[str, str] | None
    baseline: dict[str, str] | None
    first_change: float | None = None
    last_change: float | None = None
    target: str | None = None  # the rollout the debounce timers are running for
    rollouts: list[float] = field(default_factory=list)
    deferred: bool = False  # a rate-limit deferral was reported for the pending rollout


@dataclass(frozen=True)
class ReloadPolicy:
    """Operator flags: --reload-debounce, --reload-max-delay, --reload-rate-limit."""

    debounce: float = 2.0
    max_delay: float = 30.0
    rate_count: int = 3
    rate_period: float = 60.0


class Configs:
    """State and timing of ConfigEntry materialisation and workload reloads. Create it inside a running loop."""

    def __init__(
        self,
        *,
        kube: Kube,
        policy: ReloadPolicy | None = None,
        coalesce_seconds: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.policy = policy or ReloadPolicy()
        self._coalesce = coalesce_seconds
        self._clock = clock
        self._wall = wall_clock
        self._entries: dict[EntryKey, _EntryState] = {}
        self._scopes: dict[str, dict[str | None, set[EntryKey]]] = {}  # namespace -> service (or None) -> entries
        self._queue: WorkQueue[EntryKey] = WorkQueue(
            name="ConfigEntry",
            delay=coalesce_seconds,
            process=self.reconcile,
            alive=lambda key: key in self._entries,
            on_error=self._forget_entry,
        )
        self._locks: dict[EntryKey, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._hashes: dict[tuple[str, str], str] = {}  # (namespace, ConfigMap name) -> materialised hash
        self._workloads: dict[WorkloadKey, _Workload] = {}
        self._readers: dict[tuple[str, str], set[WorkloadKey]] = {}  # (namespace, ConfigMap) -> workloads
        self._workload_tasks: dict[WorkloadKey, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None  # the materialised ConfigMaps (watch_outputs)
        self._namespaces: tuple[str, ...] = ()

    # ------------------------------------------------------------------ start-up
    async def start(self, *, namespaces: Sequence[str] = ()) -> None:
        """Before any watch event: know every entry (so no entry is materialised from a partial namespace) and
        the hash every beacon ConfigMap holds (so workloads are compared with what their pods really got)."""
        self._namespaces = tuple(namespaces)
        entries, maps = await self._list()
        for item in maps:
            meta = item["metadata"]
            digest = (meta.get("annotations") or {}).get(ANNOTATION_HASH)
            if digest:
                self._hashes[(meta["namespace"], meta["name"])] = str(digest)
        for body in entries:
            # every entry is scheduled on its own: no fan-out, so start-up is O(entries), not O(entries x scope)
            self._take(body, fan_out=False)
        log.info("configs: %d entries, %d materialised ConfigMaps", len(entries), len(self._hashes))

    async def _list(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every ConfigEntry, and every ConfigMap beacon materialised, in the watched namespaces."""
        selector = LABEL_ENTRY_UID
        if self._namespaces:
            entries = [e for ns in self._namespaces for e in await self.kube.list("ConfigEntry", ns)]
            maps = [
                m for ns in self._namespaces for m in await self.kube.list("ConfigMap", ns, label_selector=selector)
            ]
            return entries, maps
        return await self.kube.list_all("ConfigEntry"), await self.kube.list_all("ConfigMap", label_selector=selector)

    async def resync(self) -> None:
        """Compare memory with the API (reads only) and repair what watch events missed: entries deleted or
        created during a watch gap (410 Gone), and ConfigMaps someone deleted or edited by hand, which are
        written back. A resync that finds nothing wrong writes nothing."""
        entries, maps = await self._list()
        present = {(i["metadata"]["namespace"], i["metadata"]["name"]): i for i in entries}
        for key, state in list(self._entries.items()):
            body = present.get(key)
            if body is None or body["metadata"]["uid"] != state.entry.uid:
                log.info("resync: ConfigEntry %s/%s is gone", *key)
                await self.entry_deleted(*key)
        for body in present.values():
            await self.entry_changed(body)
        actual = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in maps}
        for key, state in list(self._entries.items()):
            if state.foreign:
                self._schedule(key)  # the other ConfigMap may be gone by now (a read; writes only if it is)
                continue
            if state.current is None or not state.config_map or self._queue.is_dirty(key):
                continue
            item = actual.get((key[0], state.config_map))
            digest = ((item or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_HASH)
            if item is None or digest != state.current.hash or content_hash(item.get("data") or {}) != digest:
                log.info("resync: ConfigMap %s/%s was deleted or edited; writing it back", key[0], state.config_map)
                self.kube.forget("ConfigMap", key[0], state.config_map)
                state.loaded = False
                self._schedule(key)

    def watch_outputs(self) -> None:
        """Repair the materialised ConfigMaps as they break, not only at the next resync: watch them (by their
        entry's uid label, metadata only, every namespace). One deleted, or written by anyone but beacon, is read
        again by its entry's reconcile and written back if its content is not what beacon materialised (keys added
        by hand are removed). The echo of beacon's own writes is known by its resourceVersion and costs nothing."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._follow_maps())

    async def _follow_maps(self) -> None:
        async for type_, body in self.kube.watch("ConfigMap", None, label_selector=LABEL_ENTRY_UID, metadata_only=True):
            self._map_changed(type_, body["metadata"])

    def _map_changed(self, type_: str, meta: Mapping[str, Any]) -> None:
        namespace, name = meta["namespace"], meta["name"]
        if self._namespaces and namespace not in self._namespaces:
            return
        if not self.kube.changed_by_others("ConfigMap", type_, meta):
            return  # beacon's own write or deletion coming back (or the garbage collector's after the entry)
        uid = (meta.get("labels") or {}).get(LABEL_ENTRY_UID)
        for keys in self._scopes.get(namespace, {}).values():
            for key in keys:
                state = self._entries.get(key)
                if state is not None and state.entry.uid == uid and state.config_map == name and not state.foreign:
                    log.info("ConfigMap %s/%s was deleted or written by someone else: checking it", namespace, name)
                    self.kube.forget("ConfigMap", namespace, name)
                    state.loaded = False
                    self._schedule(key)
                    return

    async def resync_forever(self, *, every: float) -> None:
        await repeat(every=every, action=self.resync, what="configs resync")

    # ------------------------------------------------------------------ inputs (called by thin kopf handlers)
    async def entry_changed(self, body: Mapping[str, Any]) -> None:
        self._take(body, fan_out=True)

    def _take(self, body: Mapping[str, Any], *, fan_out: bool) -> None:
        try:
            entry = ConfigEntry.from_body(body)
        except (KeyError, TypeError, ValueError) as exc:  # past the schema somehow: this entry only is refused
            self._refuse(body, exc)
            return
        state = self._entries.get(entry.key)
        if state is not None and state.entry == entry:
            return  # a status-only or metadata-only change (often our own status patch)
        before = state.entry if state is not None else None
        if state is None or state.entry.uid != entry.uid:
            state = _EntryState(entry=entry, status=dict(body.get("status") or {}) or None)
            state.config_map = (state.status or {}).get("configMapName")
            self._entries[entry.key] = state
        if before is not None:
            self._unscope(before)
        self._scopes.setdefault(entry.namespace, {}).setdefault(entry.service, set()).add(entry.key)
        state.entry = entry
        self._schedule(entry.key)
        if fan_out:
            self._schedule_dependents(entry, before)

    async def entry_deleted(self, namespace: str, name: str) -> None:
        state = self._entries.pop((namespace, name), None)
        self._queue.cancel((namespace, name))
        if state is not None:
            self._unscope(state.entry)
            # the garbage collector removes the ConfigMap and the ControllerRevisions (ownerReferences)
            if state.config_map and not state.foreign:
                self.kube.forget("ConfigMap", namespace, state.config_map)
                self._hashes.pop((namespace, state.config_map), None)
            self._schedule_dependents(state.entry, None)  # layers and conflicts of the others change

    def workload_changed(self, kind: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        names = reload_names((meta.get("annotations") or {}).get(ANNOTATION_RELOAD))
        if deleted or not names:
            gone = self._workloads.pop(key, None)
            if gone is not None:
                self._index_workload(gone, before=gone.names, after=())
                task = self._workload_tasks.pop(key, None)
                if task is not None:
                    task.cancel()
            return
        workload = self._workloads.get(key)
        if workload is None or workload.uid != meta.get("uid"):
            if workload is not None:
                self._index_workload(workload, before=workload.names, after=())
            workload = _Workload(kind, key[1], key[2], meta.get("uid", ""), (), None, None)
            self._workloads[key] = workload
        self._observe(workload, body)
        self._evaluate(workload)

    def _observe(self, workload: _Workload, body: Mapping[str, Any]) -> None:
        """`_observe`, keeping the index of which workloads read which ConfigMap in step."""
        before = workload.names
        _observe(workload, body)
        if workload.names != before:
            self._index_workload(workload, before=before, after=workload.names)

    def _index_workload(self, workload: _Workload, *, before: Sequence[str], after: Sequence[str]) -> None:
        key = (workload.kind, workload.namespace, workload.name)
        for name in set(before) - set(after):
            readers = self._readers.get((workload.namespace, name))
            if readers is not None:
                readers.discard(key)
                if not readers:
                    del self._readers[(workload.namespace, name)]
        for name in set(after) - set(before):
            self._readers.setdefault((workload.namespace, name), set()).add(key)

    # ------------------------------------------------------------------ entries: scheduling
    def _schedule_dependents(self, entry: ConfigEntry, before: ConfigEntry | None) -> None:
        """Entries whose content or conflicts may change with `entry`: every entry of the namespace when it is
        (or was) namespace-wide, else the entries of its service (and of its previous service)."""
        scopes = {entry.service} | ({before.service} if before is not None else set())
        index = self._scopes.get(entry.namespace, {})
        for scope in list(index) if None in scopes else scopes:
            for key in list(index.get(scope, ())):
                self._schedule(key)

    def _unscope(self, entry: ConfigEntry) -> None:
        index = self._scopes.get(entry.namespace, {})
        keys = index.get(entry.service)
        if keys is not None:
            keys.discard(entry.key)
            if not keys:
                del index[entry.service]
        if not index:
            self._scopes.pop(entry.namespace, None)

    def _layers(self, entry: ConfigEntry) -> list[ConfigEntry]:
        """The entries that can apply to `entry` or conflict with it: namespace-wide ones and those of its
        service (config_core.applies_to, conflicts), read from the index instead of every entry."""
        index = self._scopes.get(entry.namespace, {})
        keys = index.get(None, set()) | index.get(entry.service, set())
        return [self._entries[key].entry for key in sorted(keys) if key in self._entries]

    def _schedule(self, key: EntryKey) -> None:
        """One worker per entry reconciles `coalesce` seconds after a change, and again while changes keep coming:
        a burst of edits costs one round of writes, never concurrent ones (see beacon.workqueue)."""
        self._queue.schedule(key)

    def _forget_entry(self, key: EntryKey, _exc: Exception) -> None:
        state = self._entries.get(key)
        if state is not None:
            state.loaded = False  # re-read history and ConfigMap before the retry
            self.kube.forget("ConfigMap", key[0], state.entry.config_map_name)

    # ------------------------------------------------------------------ entries: reconcile
    async def reconcile(self, key: EntryKey) -> None:
        async with self._locks[key]:
            state = self._entries.get(key)
            if state is None:
                return
            entry = state.entry
            if not state.loaded or state.foreign:
                await self._load(state)
            peers = self._layers(entry)
            rollback = None
            if entry.rollback_to is not None and entry.rollback_to in state.history:
                rollback = await self._revision_data(state, entry.rollback_to)
            decided = plan(entry, peers, history=list(state.history.values()), rollback_data=rollback)
            ready = decided.ready
            if decided.data is not None and decided.hash is not None:
                if state.foreign:
                    ready = _target_conflict(entry)
                else:
                    try:
                        await self._materialise(state, decided.data, decided.hash, decided.rollback_of)
                    except NotOursError as exc:
                        state.foreign = True
                        ready = Condition("Ready", "False", "TargetConflict", str(exc))
            elif ready.status == "False":
                log.warning("%s/%s not materialised: %s", entry.namespace, entry.name, ready.message)
            status = desired_status(
                entry,
                ready=ready,
                conflict=decided.conflict,
                current=state.current,
                config_map=state.config_map,
                previous=state.status,
                now=self._wall(),
            )
            if status_changed(state.status, status):
                try:
                    await self.kube.patch_status("ConfigEntry", entry.namespace, entry.name, status)
                except ApiError as exc:
                    if exc.status == 404:
                        return  # the entry is gone; its DELETED event follows
                    raise
                state.status = status

    async def _load(self, state: _EntryState) -> None:
        """What the API holds for this entry: its history and what its ConfigMap carries (after a restart, or
        after an error)."""
        entry = state.entry
        items = await self.kube.list(
            "ControllerRevision", entry.namespace, label_selector=f"{LABEL_ENTRY_UID}={entry.uid}"
        )
        state.history = {}
        for item in items:
            if _owned(item, entry):
                revision = revision_from_object(item)
                state.history[revision.number] = revision
        actual = await self.kube.get("ConfigMap", entry.namespace, entry.config_map_name)
        state.foreign = owned_by_other(actual, entry)
        state.stray = {}
        if actual is not None and not state.foreign:
            # server-side apply removes only keys beacon applied itself; keys added by hand are removed explicitly,
            # so the ConfigMap holds exactly the revision's data
            state.stray = {"data": sorted(actual.get("data") or {}), "binaryData": bool(actual.get("binaryData"))}
        if not state.foreign:
            current = current_of(actual, entry)
            if current is not None:
                state.current = current
                state.config_map = entry.config_map_name
            elif state.current is None and actual is None:
                # the ConfigMap is gone (deleted by hand); the status still says what it held, which keeps
                # revision numbers increasing even if the history went with it
                status = state.status or {}
                if isinstance(status.get("currentRevision"), int) and status.get("hash"):
                    state.current = Current(status["currentRevision"], str(status["hash"]))
        state.pinned = None
        state.loaded = True

    async def _revision_data(self, state: _EntryState, number: int) -> dict[str, str] | None:
        if state.pinned is not None and state.pinned[0] == number:
            return state.pinned[1]
        obj = await self.kube.get("ControllerRevision", state.entry.namespace, state.history[number].name)
        data = revision_data(obj) if obj is not None else None
        state.pinned = (number, data)
        return data

    async def _materialise(
        self, state: _EntryState, data: dict[str, str], digest: str, rollback_of: int | None
    ) -> None:
        entry = state.entry
        number, record = choose_revision(
            history=list(state.history.values()), current=state.current, desired_hash=digest
        )
        if record:
            obj = desired_revision(entry, data=data, digest=digest, revision=number, rollback_of=rollback_of)
            await self.kube.create(obj)
            state.history[number] = Revision(number, obj["metadata"]["name"], digest, rollback_of)
            metrics.CONFIG_REVISIONS.inc()
            log.info("%s/%s: revision %d (hash %s)", entry.namespace, entry.name, number, digest)
        await self.kube.ensure(desired_config_map(entry, data=data, digest=digest, revision=number))
        await self._remove_stray_keys(state, data)
        previous_map = state.config_map
        state.current = Current(number, digest)
        state.config_map = entry.config_map_name
        if previous_map and previous_map != state.config_map:
            await self._drop_old_map(entry, previous_map)
        self._set_hash(entry.namespace, state.config_map, digest)
        for stale in to_prune(numbers=state.history, limit=entry.history_limit, keep=(number, entry.rollback_to)):
            await self.kube.delete("ControllerRevision", entry.namespace, state.history[stale].name)
            del state.history[stale]

    async def _remove_stray_keys(self, state: _EntryState, data: Mapping[str, str]) -> None:
        patch: dict[str, Any] = {}
        stray = [k for k in state.stray.get("data", []) if k not in data]
        if stray:
            patch["data"] = dict.fromkeys(stray)
        if state.stray.get("binaryData"):
            patch["binaryData"] = None
        if patch:
            log.info(
                "%s/%s: removing keys added by hand: %s", state.entry.namespace, state.entry.config_map_name, patch
            )
            await self.kube.merge_patch("ConfigMap", state.entry.namespace, state.entry.config_map_name, patch)
        state.stray = {}

    async def _drop_old_map(self, entry: ConfigEntry, name: str) -> None:
        """spec.target was set after the entry had materialised into its default name: remove that ConfigMap."""
        self._hashes.pop((entry.namespace, name), None)
        old = await self.kube.get("ConfigMap", entry.namespace, name)
        if old is not None and not owned_by_other(old, entry):
            await self.kube.delete("ConfigMap", entry.namespace, name)

    # ------------------------------------------------------------------ reloads
    def _set_hash(self, namespace: str, name: str, digest: str) -> None:
        if self._hashes.get((namespace, name)) == digest:
            return
        self._hashes[(namespace, name)] = digest
        for key in sorted(self._readers.get((namespace, name), ())):
            workload = self._workloads.get(key)
            if workload is not None:
                self._evaluate(workload)

    def _desired(self, workload: _Workload) -> dict[str, str]:
        hashes = {n: self._hashes.get((workload.namespace, n)) for n in workload.names}
        return {n: h for n, h in hashes.items() if h is not None}

    def _evaluate(self, workload: _Workload) -> None:
        decision = reload_decision(
            desired=self._desired(workload), template=workload.template, baseline=workload.baseline
        )
        if decision.action == "none":
            workload.first_change = workload.last_change = workload.target = None
            return
        if decision.action == "rollout" and workload.target != decision.template:
            now = self._clock()
            workload.target = decision.template
            workload.last_change = now
            if workload.first_change is None:
                workload.first_change = now
        key = (workload.kind, workload.namespace, workload.name)
        task = self._workload_tasks.get(key)
        if task is None or task.done():
            self._workload_tasks[key] = asyncio.ensure_future(self._workload_worker(key))

    async def _workload_worker(self, key: WorkloadKey) -> None:
        await asyncio.sleep(self._coalesce)
        while (workload := self._workloads.get(key)) is not None:
            decision = reload_decision(
                desired=self._desired(workload), template=workload.template, baseline=workload.baseline
            )
            try:
                if decision.action == "none":
                    workload.first_change = workload.last_change = workload.target = None
                    RETRIES.forget(("reload", key))
                    return
                if decision.action == "baseline":
                    baseline: dict[str, Any] = {"metadata": {"annotations": {ANNOTATION_BASELINE: decision.baseline}}}
                    self._observe(workload, await self._patch(workload, baseline))
                    continue
                if not await self._wait_for_rollout(workload, decision.template):
                    continue
                patch: dict[str, Any] = {
                    "metadata": {"annotations": {ANNOTATION_BASELINE: None}},
                    "spec": {
                        "template": {"metadata": {"annotations": {ANNOTATION_TEMPLATE_HASHES: decision.template}}}
                    },
                }
                self._observe(workload, await self._patch(workload, patch))
                workload.rollouts = [*workload.rollouts[-self.policy.rate_count :], self._clock()]
                workload.first_change = workload.last_change = workload.target = None
                workload.deferred = False
                metrics.RELOADS.labels(kind=workload.kind, outcome="rolled_out").inc()
                log.info(
                    "%s %s/%s rolled out for %s", workload.kind, workload.namespace, workload.name, decision.template
                )
                self._event(workload, "Normal", "ConfigReload", f"pod template bumped for {decision.template}")
                RETRIES.forget(("reload", key))
            except Exception as exc:  # the API unreachable or anything else: retry, never drop a pending reload
                if isinstance(exc, ApiError) and exc.status == 404:
                    self._workloads.pop(key, None)
                    RETRIES.forget(("reload", key))
                    return
                wait = RETRIES.when(("reload", key))
                log.warning("reload of %s %s/%s failed, retrying in %.1fs: %s", *key, wait, exc)
                await asyncio.sleep(wait)

    async def _wait_for_rollout(self, workload: _Workload, template: str | None) -> bool:
        """True when the rollout may happen now; otherwise sleep until it may (the caller then decides again,
        with whatever changed meanwhile)."""
        now = self._clock()
        if workload.first_change is None or workload.last_change is None or workload.target != template:
            workload.first_change = workload.first_change or now
            workload.last_change = now
            workload.target = template
        due = debounce_due(
            first_change=workload.first_change,
            last_change=workload.last_change,
            window=self.policy.debounce,
            max_delay=self.policy.max_delay,
        )
        allowed = rate_limit_next(
            rollouts=workload.rollouts, now=now, count=self.policy.rate_count, period=self.policy.rate_period
        )
        if allowed > max(now, due) and not workload.deferred:
            workload.deferred = True
            metrics.RELOADS.labels(kind=workload.kind, outcome="deferred").inc()
            message = (
                f"rollout for {template} deferred {allowed - now:.0f}s by the rate limit "
                f"({self.policy.rate_count} per {self.policy.rate_period:.0f}s); later changes join it"
            )
            log.info("%s %s/%s: %s", workload.kind, workload.namespace, workload.name, message)
            self._event(workload, "Normal", "ConfigReloadDeferred", message)
        wait = max(due, allowed) - now
        if wait <= 0:
            return True
        await asyncio.sleep(wait)
        return False

    async def _patch(self, workload: _Workload, patch: dict[str, Any]) -> Mapping[str, Any]:
        result = await self.kube.merge_patch(workload.kind, workload.namespace, workload.name, patch)
        return result or {}

    def _event(self, workload: _Workload, type_: str, reason: str, message: str) -> None:
        involved = {
            "apiVersion": "apps/v1",
            "kind": workload.kind,
            "metadata": {"name": workload.name, "namespace": workload.namespace, "uid": workload.uid},
        }
        now_iso = dt.datetime.fromtimestamp(self._wall(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        async def post() -> None:
            with contextlib.suppress(ApiError, OSError):
                await self.kube.event(involved=involved, type_=type_, reason=reason, message=message, now_iso=now_iso)

        task: asyncio.Task[None] = asyncio.ensure_future(post())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, body: Mapping[str, Any], exc: Exception) -> None:
        """An entry beacon cannot read (its schema was bypassed, or an older CRD let it in): say so in its status
        and go on with the others. It must never stop start-up or the other entries."""
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        message = f"cannot read this ConfigEntry: {type(exc).__name__}: {exc}"[:1024]
        reported = [c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
        if reported and reported[0].get("reason") == "InvalidSpec" and reported[0].get("message") == message:
            return  # said already (this event is likely that status patch coming back)
        log.error("ConfigEntry %s/%s: %s", namespace, name, message)
        generation = int(meta.get("generation", 1))
        ready = Condition("Ready", "False", "InvalidSpec", message)
        status = {
            "observedGeneration": generation,
            "conditions": merge_conditions(reported, [ready], generation=generation, now=self._wall()),
        }

        async def report() -> None:
            with contextlib.suppress(ApiError, OSError):
                await self.kube.patch_status("ConfigEntry", namespace, name, status)

        task: asyncio.Task[None] = asyncio.ensure_future(report())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self._queue.close()
        for task in [*self._workload_tasks.values(), *self._tasks]:
            task.cancel()


def _observe(workload: _Workload, body: Mapping[str, Any]) -> None:
    """Take what a workload's body says about its opt-in and what it was rolled out for."""
    if not body:
        return
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    template = ((((body.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations")) or {}
    workload.names = reload_names(annotations.get(ANNOTATION_RELOAD)) or workload.names
    workload.template = parse_hashes(template.get(ANNOTATION_TEMPLATE_HASHES))
    workload.baseline = parse_hashes(annotations.get(ANNOTATION_BASELINE))


def _owned(obj: Mapping[str, Any], entry: ConfigEntry) -> bool:
    return any(ref.get("uid") == entry.uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _target_conflict(entry: ConfigEntry) -> Condition:
    message = (
        f"ConfigMap {entry.namespace}/{entry.config_map_name} exists and is not managed by this entry; "
        "set spec.target to another name or delete that ConfigMap"
    )
    return Condition("Ready", "False", "TargetConflict", message)
