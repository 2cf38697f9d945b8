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
namespace-wide), so a change fans out to the entries of its scope only; opted-in workloads are indexed by the
ConfigMaps they read, so a new hash reaches only those. Work per entry does not grow with its namespace either:
the layering of each scope (`config_core.layering`) is computed once per change of the scope and shared by its
entries, so materialising a namespace of N entries is O(N), and the fan-out of changes to one scope is coalesced
(the first change schedules the scope's entries at once, further ones within `coalesce` seconds once more at the
end of that window), so editing all N entries of a namespace schedules O(N) reconciles, not O(N^2).

What beacon owns is repaired as it breaks, not only at the periodic resync: watches of the materialised ConfigMaps
and of the ControllerRevisions (both by the entry-uid label, every namespace) re-queue the owning entry when
someone else deletes or edits one, and its reconcile writes it back (`watch_outputs`). What a revision held is
recoverable when beacon still has it: in the object itself (a revision's data is immutable, so an edit leaves it
intact), in memory (the content beacon materialised last, and the data of spec.rollbackTo it read), or in another
stored revision of the same content hash. A revision deleted by hand whose content is nowhere left (an older one,
after a restart) is dropped from the history with a warning: rolling back to it then reports RevisionNotFound.

Adoption (how far the current revision has got) needs the pods of opted-in workloads: they are listed, then
watched, only in namespaces that have such a workload (as discovery does for selector entries), kept as the few
fields adoption reads (`config_core.PodConfig`), and matched to workloads by their selectors. A pod event marks
the entries its workloads read; their adoption is computed once per coalescing window and the entry is queued
only when the summary its status shows would change, so a rollout's pod events cost no status write of their own.
Adoption is computed only from complete inputs (workloads listed, the namespace's pods listed); until then an
entry keeps what its status shows, so a restart writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import sys
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
    ANNOTATION_REVISION,
    ANNOTATION_TEMPLATE_HASHES,
    ANNOTATION_TEMPLATE_REVISIONS,
    LABEL_ENTRY_UID,
    Adoption,
    ConfigEntry,
    Current,
    Layering,
    Plan,
    PodConfig,
    ReloadSyntaxError,
    Revision,
    Selection,
    WorkloadConfig,
    adoption,
    choose_revision,
    content_hash,
    current_of,
    debounce_due,
    desired_config_map,
    desired_copy,
    desired_revision,
    desired_status,
    format_revisions,
    layering,
    owned_by_other,
    parse_hashes,
    parse_reload,
    plan_in,
    rate_limit_next,
    reload_decision,
    revision_data,
    revision_from_object,
    revision_intact,
    selection_hash,
    selects,
    to_prune,
)
from beacon.engine import Controller, Owns
from beacon.kube import ApiError, Kube, NotOursError
from beacon.reconcile import Condition, merge_conditions, status_changed
from beacon.retries import RETRIES
from beacon.rollout_core import (
    COMPLETE,
    FAILED,
    LABEL_CANARY_REVISION,
    ROLLED_BACK,
    WAVES,
    Member,
    RollbackRecord,
    Rollout,
    TokenBucket,
    canary_map_name,
    condition_of,
    copy_revision,
    rewrite_refs,
    stale_copies,
    step,
    template_refs,
)
from beacon.workqueue import repeat

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
    content: dict[str, str] | None = None  # the data beacon materialised last (that of `current`), in memory
    suspect: set[str] = field(default_factory=set)  # revisions someone else deleted or edited: check, repair
    rollout: Rollout | None = None  # status.rollout: the revision being released (tracked entries)
    rollback: RollbackRecord | None = None  # status.rollback: the automatic rollback in force
    staged: tuple[str, dict[str, str]] | None = None  # hash and data of the revision in its canary step
    wake: asyncio.TimerHandle | None = None  # the next look at the rollout (end of a hold, a timeout)
    warned: set[tuple[int, str]] = field(default_factory=set)  # OnDelete workloads warned about, per revision


@dataclass(frozen=True)
class _Gate:
    """Which readers of a tracked entry's ConfigMap may move to the revision being released: the members of the
    step in progress (status.rollout.members); the others keep what their template was rolled out for. During
    the canary step the released canaries read the revision's immutable copy."""

    revision: int | None
    hash: str | None
    released: frozenset[WorkloadKey] = frozenset()
    copy: str | None = None


@dataclass
class _Workload:
    kind: str
    namespace: str
    name: str
    uid: str
    names: tuple[str, ...]
    template: dict[str, str] | None
    baseline: dict[str, str] | None
    keys: dict[str, Selection] = field(default_factory=dict)  # ConfigMap name -> the keys it reads (None: all)
    selector: dict[str, Any] | None = None  # spec.selector: its pods
    replicas: int = 1  # desired pods
    pods: set[str] = field(default_factory=set)  # names of its pods (by its selector) in the pod cache
    first_change: float | None = None
    last_change: float | None = None
    target: str | None = None  # the rollout the debounce timers are running for
    rollouts: list[float] = field(default_factory=list)
    deferred: bool = False  # a rate-limit deferral was reported for the pending rollout
    labels: dict[str, str] = field(default_factory=dict)  # metadata.labels (spec.canary.selector)
    refs: frozenset[str] = frozenset()  # the ConfigMaps its pod template references
    deadline_exceeded: bool = False  # a Deployment's Progressing=False ProgressDeadlineExceeded, for its template
    on_delete: bool = False  # an OnDelete update strategy: a template change restarts nothing


@dataclass(frozen=True)
class ReloadPolicy:
    """Operator flags: --reload-debounce, --reload-max-delay, --reload-rate-limit, --restart-budget."""

    debounce: float = 2.0
    max_delay: float = 30.0
    rate_count: int = 3
    rate_period: float = 60.0
    budget_count: int = 20
    budget_period: float = 10.0


CRASH_POINT_ENV = "BEACON_TEST_CRASH_POINT"  # tests only: "after-restart-patch:K" exits after the K-th restart


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
        serves: Callable[[str], bool] | None = None,
        served_by: str | None = None,
    ) -> None:
        """`serves(namespace)`: whether this replica serves the namespace now (sharded mode); entries and
        workloads elsewhere cost no state and no write."""
        self.kube = kube
        self._serves = serves or (lambda _namespace: True)
        self._served_by = served_by  # sharded mode: this replica's name, shown in each entry's status
        self.policy = policy or ReloadPolicy()
        self._coalesce = coalesce_seconds
        self._clock = clock
        self._wall = wall_clock
        self._entries: dict[EntryKey, _EntryState] = {}
        self._by_uid: dict[str, EntryKey] = {}  # entry uid -> key (the label on everything an entry owns)
        self._scopes: dict[str, dict[str | None, set[EntryKey]]] = {}  # namespace -> service (or None) -> entries
        # the layering of each scope, computed when first needed after a change: (namespace, service or None) ->
        # (the namespace's wide version it was built on, the layering); a namespace-wide change bumps the version,
        # which outdates every layering of the namespace at once (they are rebuilt as their entries reconcile)
        self._layerings: dict[tuple[str, str | None], tuple[int, Layering]] = {}
        self._wide_versions: dict[str, int] = {}
        # coalesced fan-out: (namespace, service, or None for the whole namespace) -> the timer ending its window
        self._fan_out_windows: dict[tuple[str, str | None], asyncio.TimerHandle] = {}
        self._fan_out_pending: set[tuple[str, str | None]] = set()
        # The ConfigEntry controller owns each entry's materialised ConfigMap and its ControllerRevisions (both
        # labelled with the entry's uid): a change by someone else re-queues the entry, whose reconcile repairs it.
        self.entries: Controller[EntryKey] = Controller(
            name="ConfigEntry",
            kube=kube,
            reconcile=self.reconcile,
            owns=[
                Owns("ConfigMap", LABEL_ENTRY_UID),
                Owns("ControllerRevision", LABEL_ENTRY_UID, changed=self._revision_broken),
            ],
            owner_of=self._owner_key,
            on_owned_change=self._output_changed,
            in_scope=self._in_scope,
            delay=coalesce_seconds,
            alive=lambda key: key in self._entries,
            on_error=self._forget_entry,
        )
        self._locks: dict[EntryKey, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._hashes: dict[tuple[str, str], str] = {}  # (namespace, ConfigMap name) -> materialised hash
        self._workloads: dict[WorkloadKey, _Workload] = {}
        self._readers: dict[tuple[str, str], set[WorkloadKey]] = {}  # (namespace, ConfigMap) -> workloads
        # The Reload controller rolls out the workloads that opt in (it owns nothing: it patches one annotation of
        # someone else's object); a workload's key runs `coalesce` seconds after a change, failures retry.
        self.reloads: Controller[WorkloadKey] = Controller(
            name="Reload",
            kube=kube,
            reconcile=self._reload,
            delay=coalesce_seconds,
            alive=lambda key: key in self._workloads,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._namespaces: tuple[str, ...] = ()
        # adoption: the revision and data of each materialised ConfigMap (the data only as beacon materialised it
        # in this process: key-aware workloads hash their keys of it), the entry that materialises it, the
        # opted-in workloads of each namespace, and their pods, watched only in namespaces that have some
        self._revisions: dict[tuple[str, str], int] = {}
        self._contents: dict[tuple[str, str], tuple[str, Mapping[str, str]]] = {}
        self._map_entries: dict[tuple[str, str], EntryKey] = {}
        self._namespace_workloads: dict[str, set[WorkloadKey]] = {}
        self._pods: dict[str, dict[str, PodConfig]] = {}
        self._pod_watches: dict[str, asyncio.Task[None]] = {}
        self._watching = False  # pods are watched once this replica may write (watch_outputs)
        # adoption is computed only from complete inputs: every opted-in workload listed (`list_workloads`), and
        # the pods of an entry's namespace listed; until then an entry's status keeps the adoption it shows, so a
        # restart writes nothing
        self._workloads_listed = True
        self._pods_synced: set[str] = set()
        self._pod_listings: dict[str, list[set[str]]] = {}  # pods touched by events while a listing is under way
        self._adoptions: dict[EntryKey, Adoption] = {}  # the last computed adoption of each entry
        # the metric series of each entry: (namespace, entry, workload, revision) pods, (namespace, entry, workload)
        self._series: dict[EntryKey, tuple[set[tuple[str, str, str, str]], set[tuple[str, str, str]]]] = {}
        self._invalid: dict[WorkloadKey, str] = {}  # malformed beacon.dev/reload values already reported
        self._adoption_dirty: set[EntryKey] = set()  # entries whose adoption to compute when the timer fires
        self._adoption_timer: asyncio.TimerHandle | None = None
        # tracked rollouts: the gate of each tracked entry's ConfigMap, and the cluster-wide restart budget
        self._gates: dict[tuple[str, str], _Gate] = {}
        self._rollout_dirty: set[EntryKey] = set()  # tracked entries whose readers changed (coalesced as adoption)
        self._budget = TokenBucket(self.policy.budget_count, self.policy.budget_period)
        self._restarts = 0
        point, _, count = os.environ.get(CRASH_POINT_ENV, "").partition(":")
        self._crash_after = int(count) if point == "after-restart-patch" and count.isdigit() else None

    # ------------------------------------------------------------------ start-up
    async def start(self, *, namespaces: Sequence[str] = ()) -> None:
        """Before any watch event: know every entry (so no entry is materialised from a partial namespace) and
        the hash every beacon ConfigMap holds (so workloads are compared with what their pods really got)."""
        self._namespaces = tuple(namespaces)
        self._workloads_listed = False
        entries, maps = await self._list()
        started = time.perf_counter()
        for item in maps:
            meta = item["metadata"]
            annotations = meta.get("annotations") or {}
            digest = annotations.get(ANNOTATION_HASH)
            if digest and self._in_scope(meta["namespace"]):
                self._hashes[(meta["namespace"], meta["name"])] = str(digest)
                number = str(annotations.get(ANNOTATION_REVISION, ""))
                if number.isdigit():
                    self._revisions[(meta["namespace"], meta["name"])] = int(number)
        for body in entries:
            # every entry is scheduled on its own: no fan-out, so start-up is O(entries), not O(entries x scope)
            self._take(body, fan_out=False)
        held = time.perf_counter() - started
        metrics.CONFIG_START_HOLD.set(held)
        log.info(
            "configs: %d entries, %d materialised ConfigMaps; start-up held the event loop %.3fs",
            len(entries),
            len(self._hashes),
            held,
        )

    async def list_workloads(self) -> None:
        """Every Deployment, StatefulSet and DaemonSet in the watched namespaces, taken as watch events: after
        it, the adoption of every entry is computed from all its workloads (kopf's events of them may come
        later, and change nothing then)."""
        for kind in WORKLOAD_KINDS:
            if self._namespaces:
                bodies = [b for ns in self._namespaces for b in await self.kube.list(kind, ns)]
            else:
                bodies = await self.kube.list_all(kind)
            for body in bodies:
                self.workload_changed(kind, body)
        self._workloads_listed = True
        self._refresh_adoptions(list(self._entries))

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
        for namespace in sorted(self._pods_synced):
            await self._list_pods(namespace)  # pod deletions a watch gap missed
        actual = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in maps}
        for key, state in list(self._entries.items()):
            if state.foreign:
                self._schedule(key)  # the other ConfigMap may be gone by now (a read; writes only if it is)
                continue
            if state.current is None or not state.config_map or self.entries.is_dirty(key):
                continue
            item = actual.get((key[0], state.config_map))
            digest = ((item or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_HASH)
            if item is None or digest != state.current.hash or content_hash(item.get("data") or {}) != digest:
                log.info("resync: ConfigMap %s/%s was deleted or edited; writing it back", key[0], state.config_map)
                self.kube.forget("ConfigMap", key[0], state.config_map)
                state.loaded = False
                self._schedule(key)

    def watch_outputs(self) -> None:
        """Repair the materialised ConfigMaps and the ControllerRevisions as they break, not only at the next
        resync: watch them (by their entry's uid label, every namespace).

        A ConfigMap deleted, or written by anyone but beacon (metadata-only watch), is read again by its entry's
        reconcile and written back if its content is not what beacon materialised (keys added by hand are
        removed). The echo of beacon's own writes is known by its resourceVersion and costs nothing.

        A ControllerRevision is created once and never written again by beacon, so the watch (whole objects: the
        `revision` number is not metadata) compares each event with beacon's record of that revision: one
        deleted while beacon keeps it in the history, or differing from what beacon wrote (labels, annotations,
        owner, number, content hash), re-queues its entry, whose reconcile reads it and writes it back exactly as
        beacon wrote it (`_repair_revisions`). beacon's own creations and prunings match its record, or are not in
        it (yet, or any more), and cost nothing.

        From now on the pods of opted-in workloads are watched too (for adoption), in their namespaces only."""
        self.entries.watch_owned()
        self._watching = True
        for namespace in list(self._namespace_workloads):
            self._sync_pod_watch(namespace)

    def _in_scope(self, namespace: str) -> bool:
        return (not self._namespaces or namespace in self._namespaces) and self._serves(namespace)

    async def release(self, keep: Callable[[str], bool]) -> set[str]:
        """Let go of every namespace `keep` rejects (sharded mode): forget its entries and workloads, and wait
        until no reconcile of them is under way. Nothing is written: the ConfigMaps and revisions stay as they
        are, for the next owner to load. Returns the namespaces released."""
        gone = {key[0] for key in self._entries if not keep(key[0])}
        gone |= {key[1] for key in self._workloads if not keep(key[1])}
        keys = [key for key in self._entries if key[0] in gone]
        for key in keys:
            state = self._entries.pop(key)
            self._stop_rollout(state)
            self._by_uid.pop(state.entry.uid, None)
            self._unscope(state.entry)
            self._outdate(state.entry, None)
            if state.config_map:
                self.kube.forget("ConfigMap", key[0], state.config_map)
                self._hashes.pop((key[0], state.config_map), None)
        for key in keys:
            lock = self._locks.get(key)
            if lock is not None:
                async with lock:
                    pass
            self._locks.pop(key, None)
        for workload_key in [k for k in self._workloads if k[1] in gone]:
            self._drop_workload(workload_key)
        for key in keys:
            self._forget_adoption(key)
        for table in (self._revisions, self._contents, self._map_entries):
            for map_key in [k for k in table if k[0] in gone]:
                del table[map_key]
        return gone

    def _owner_key(self, kind: str, meta: Mapping[str, Any]) -> EntryKey | None:
        """The entry an owned object belongs to, by the uid in its label (or its ownerReference): for a ConfigMap,
        only while it is the entry's own materialised map."""
        uids = [(meta.get("labels") or {}).get(LABEL_ENTRY_UID)]
        uids += [ref.get("uid") for ref in meta.get("ownerReferences") or []]
        key = next((self._by_uid[u] for u in uids if u in self._by_uid), None)
        state = self._entries.get(key) if key is not None else None
        if state is None or key is None or key[0] != meta.get("namespace"):
            return None
        if kind == "ConfigMap" and (state.config_map != meta.get("name") or state.foreign):
            return None
        return key

    def _output_changed(self, kind: str, key: EntryKey, meta: Mapping[str, Any]) -> None:
        state = self._entries.get(key)
        if state is None:
            return
        if kind == "ConfigMap":
            state.loaded = False  # read history and ConfigMap again, compare, write back what differs
        else:
            state.suspect.add(str(meta.get("name")))

    def _revision_broken(self, type_: str, obj: Mapping[str, Any]) -> bool:
        """Whether a watch event says a ControllerRevision that beacon keeps in an entry's history is gone
        (deleted, or its label removed) or no longer what beacon wrote. beacon's own creations and prunings match
        its record, or are not in it (yet, or any more), and are no news."""
        meta = obj.get("metadata") or {}
        key = self._owner_key("ControllerRevision", meta)
        state = self._entries.get(key) if key is not None else None
        if state is None or not state.loaded:
            return False  # not an entry beacon knows (yet): its history is read when it is loaded
        recorded = next((r for r in state.history.values() if r.name == meta.get("name")), None)
        if recorded is None:
            return False  # not (or no longer) in the history: beacon's own pruning, or a creation not yet recorded
        return type_ == "DELETED" or not revision_intact(obj, state.entry, recorded)

    def _revision_changed(self, type_: str, obj: Mapping[str, Any]) -> None:
        """A watch event of a ControllerRevision, as the ConfigEntry controller's watch delivers it."""
        self.entries.owned_changed("ControllerRevision", type_, obj)

    async def resync_forever(self, *, every: float) -> None:
        await repeat(every=every, action=self.resync, what="configs resync")

    # ------------------------------------------------------------------ inputs (called by thin kopf handlers)
    async def entry_changed(self, body: Mapping[str, Any]) -> None:
        self._take(body, fan_out=True)

    def _take(self, body: Mapping[str, Any], *, fan_out: bool) -> None:
        if not self._in_scope(str((body.get("metadata") or {}).get("namespace", ""))):
            return  # another replica serves it (sharded mode)
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
            if state is not None:
                self._by_uid.pop(state.entry.uid, None)
            state = _EntryState(entry=entry, status=dict(body.get("status") or {}) or None)
            state.config_map = (state.status or {}).get("configMapName")
            state.rollout = Rollout.from_status((state.status or {}).get("rollout"))
            state.rollback = RollbackRecord.from_status((state.status or {}).get("rollback"))
            self._entries[entry.key] = state
            self._by_uid[entry.uid] = entry.key
        if before is not None:
            self._unscope(before)
        self._scopes.setdefault(entry.namespace, {}).setdefault(entry.service, set()).add(entry.key)
        state.entry = entry
        if before is not None and before.config_map_name != entry.config_map_name:
            self._set_gate((entry.namespace, before.config_map_name), None)
        self._sync_gate(state)
        self._outdate(entry, before)
        self._schedule(entry.key)
        if fan_out:
            self._schedule_dependents(entry, before)

    async def entry_deleted(self, namespace: str, name: str) -> None:
        state = self._entries.pop((namespace, name), None)
        self.entries.cancel((namespace, name))
        if state is not None:
            self._by_uid.pop(state.entry.uid, None)
            self._unscope(state.entry)
            self._outdate(state.entry, None)
            self._stop_rollout(state)
            # the garbage collector removes the ConfigMap and the ControllerRevisions (ownerReferences)
            if state.config_map and not state.foreign:
                self.kube.forget("ConfigMap", namespace, state.config_map)
                self._hashes.pop((namespace, state.config_map), None)
                self._revisions.pop((namespace, state.config_map), None)
                self._contents.pop((namespace, state.config_map), None)
                if self._map_entries.get((namespace, state.config_map)) == (namespace, name):
                    del self._map_entries[(namespace, state.config_map)]
            self._forget_adoption((namespace, name))
            self._schedule_dependents(state.entry, None)  # layers and conflicts of the others change

    def workload_changed(self, kind: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        if not self._in_scope(str(meta.get("namespace", ""))):
            return
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        if deleted:
            self._drop_workload(key)
            self._invalid.pop(key, None)
            return
        value = (meta.get("annotations") or {}).get(ANNOTATION_RELOAD)
        try:
            keys = parse_reload(value)
        except ReloadSyntaxError as exc:
            self._report_invalid(key, body, str(value), exc)
            keys = {}
        else:
            self._invalid.pop(key, None)
        if not keys:
            self._drop_workload(key)
            return
        workload = self._workloads.get(key)
        if workload is None or workload.uid != meta.get("uid"):
            if workload is not None:
                self._drop_workload(key)
            workload = _Workload(kind, key[1], key[2], meta.get("uid", ""), (), None, None)
            self._workloads[key] = workload
            self._namespace_workloads.setdefault(key[1], set()).add(key)
            self._sync_pod_watch(key[1])
        self._observe(workload, body)
        self._evaluate(workload)
        self._adoption_changed(workload)

    def _drop_workload(self, key: WorkloadKey) -> None:
        gone = self._workloads.pop(key, None)
        if gone is None:
            return
        self._index_workload(gone, before=gone.names, after=())
        self.reloads.cancel(key)
        members = self._namespace_workloads.get(key[1], set())
        members.discard(key)
        if not members:
            self._namespace_workloads.pop(key[1], None)
            self._sync_pod_watch(key[1])
        self._adoption_changed(gone)

    def _report_invalid(self, key: WorkloadKey, body: Mapping[str, Any], value: str, exc: Exception) -> None:
        """A beacon.dev/reload value beacon cannot read: the workload is not reloaded (as if it had not opted in)
        until it is fixed; said once per value, in the log and as a Warning Event on the workload."""
        if self._invalid.get(key) == value:
            return
        self._invalid[key] = value
        message = f"{ANNOTATION_RELOAD}: {value[:200]!r} is malformed ({exc}); this workload is not reloaded"
        log.warning("%s %s/%s: %s", key[0], key[1], key[2], message)
        uid = str((body.get("metadata") or {}).get("uid", ""))
        self._event(_Workload(key[0], key[1], key[2], uid, (), None, None), "Warning", "ConfigReloadInvalid", message)

    def _observe(self, workload: _Workload, body: Mapping[str, Any]) -> None:
        """`_observe`, keeping the index of which workloads read which ConfigMap in step."""
        before = workload.names
        selector = workload.selector
        _observe(workload, body)
        if workload.names != before:
            self._index_workload(workload, before=before, after=workload.names)
        if workload.selector != selector:
            self._match_pods(workload)

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
        (or was) namespace-wide, else the entries of its service (and of its previous service). Coalesced per
        scope (`_fan_out`): a burst of changes to one scope schedules its entries twice, not once per change."""
        scopes = {entry.service} | ({before.service} if before is not None else set())
        for scope in [None] if None in scopes else sorted(s for s in scopes if s is not None):
            self._fan_out(entry.namespace, scope)

    def _fan_out(self, namespace: str, scope: str | None) -> None:
        """Schedule the entries of `scope` (None: every entry of the namespace) now, unless a fan-out of it
        happened within the last `coalesce` seconds: then once more when that window ends. Every change is
        followed by a schedule of each dependent entry, and a burst of N changes costs O(entries), not
        O(N x entries)."""
        key = (namespace, scope)
        if key in self._fan_out_windows:
            self._fan_out_pending.add(key)
            return
        self._fan_out_now(key)

    def _fan_out_now(self, key: tuple[str, str | None]) -> None:
        namespace, scope = key
        index = self._scopes.get(namespace, {})
        for keys in list(index.values()) if scope is None else [index.get(scope, set())]:
            for entry_key in list(keys):
                self._schedule(entry_key)
        loop = asyncio.get_running_loop()
        self._fan_out_windows[key] = loop.call_later(self._coalesce, self._fan_out_window_ended, key)

    def _fan_out_window_ended(self, key: tuple[str, str | None]) -> None:
        self._fan_out_windows.pop(key, None)
        if key in self._fan_out_pending:
            self._fan_out_pending.discard(key)
            self._fan_out_now(key)

    def _outdate(self, entry: ConfigEntry, before: ConfigEntry | None) -> None:
        """Drop the layerings that `entry` (as it was `before`, and is now) is part of. O(1): a namespace-wide
        change outdates the whole namespace by bumping its version."""
        for e in (entry, before):
            if e is None:
                continue
            if e.service is None:
                self._wide_versions[e.namespace] = self._wide_versions.get(e.namespace, 0) + 1
            self._layerings.pop((e.namespace, e.service), None)

    def _layering(self, namespace: str, service: str | None) -> Layering:
        """The layering of a scope, from the cache while no entry of it (or of the namespace-wide scope beneath
        it) changed; else computed from the index, once for all the scope's entries."""
        version = self._wide_versions.get(namespace, 0)
        cached = self._layerings.get((namespace, service))
        if cached is not None and cached[0] == version:
            return cached[1]
        base = self._layering(namespace, None) if service is not None else None
        keys = self._scopes.get(namespace, {}).get(service, set())
        entries = [self._entries[key].entry for key in keys if key in self._entries]
        result = layering(entries, namespace=namespace, service=service, base=base)
        if self._scopes.get(namespace, {}).get(service):
            self._layerings[(namespace, service)] = (version, result)
        return result

    def _unscope(self, entry: ConfigEntry) -> None:
        index = self._scopes.get(entry.namespace, {})
        keys = index.get(entry.service)
        if keys is not None:
            keys.discard(entry.key)
            if not keys:
                del index[entry.service]
                self._layerings.pop((entry.namespace, entry.service), None)
        if not index:
            self._scopes.pop(entry.namespace, None)
            self._wide_versions.pop(entry.namespace, None)

    def _layers(self, entry: ConfigEntry) -> list[ConfigEntry]:
        """The entries that can apply to `entry` or conflict with it: namespace-wide ones and those of its
        service (config_core.applies_to, conflicts), read from the index instead of every entry. For inspection
        and tests; reconciles use the shared layering of the scope (`_layering`)."""
        index = self._scopes.get(entry.namespace, {})
        keys = index.get(None, set()) | index.get(entry.service, set())
        return [self._entries[key].entry for key in sorted(keys) if key in self._entries]

    def _schedule(self, key: EntryKey) -> None:
        """One worker per entry reconciles `coalesce` seconds after a change, and again while changes keep coming:
        a burst of edits costs one round of writes, never concurrent ones (see beacon.workqueue)."""
        self.entries.enqueue(key)

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
            rollback = None
            if entry.rollback_to is not None and entry.rollback_to in state.history:
                rollback = await self._revision_data(state, entry.rollback_to)
            started = time.perf_counter()
            scope = self._layering(entry.namespace, entry.service)
            decided = plan_in(entry, scope, history=list(state.history.values()), rollback_data=rollback)
            metrics.CONFIG_PLANNING.inc(time.perf_counter() - started)
            decided = await self._auto_rollback_plan(state, decided)
            if state.suspect:
                await self._repair_revisions(state, decided.data, decided.hash)
            ready = decided.ready
            events: list[tuple[str, str, str]] = []
            if decided.data is not None and decided.hash is not None:
                if state.foreign:
                    ready = _target_conflict(entry)
                else:
                    try:
                        if entry.rollout is not None:
                            events = await self._release(state, decided.data, decided.hash, decided.rollback_of)
                        else:
                            state.rollout = state.rollback = None
                            await self._materialise(state, decided.data, decided.hash, decided.rollback_of)
                    except NotOursError as exc:
                        state.foreign = True
                        ready = Condition("Ready", "False", "TargetConflict", str(exc))
            elif ready.status == "False":
                log.warning("%s/%s not materialised: %s", entry.namespace, entry.name, ready.message)
            if entry.rollout is None:
                state.rollout = state.rollback = None
            computed = self._adoption(state)
            if computed is not None:
                self._publish(key, computed)
            shown = computed.status if computed is not None else (state.status or {}).get("adoption")
            said = condition_of(state.rollout, state.rollback)
            status = desired_status(
                entry,
                ready=ready,
                conflict=decided.conflict,
                current=state.current,
                config_map=state.config_map,
                previous=state.status,
                now=self._wall(),
                served_by=self._served_by,
                adoption=shown,
                rollout=state.rollout.to_status() if state.rollout is not None else None,
                rollback=state.rollback.to_status() if state.rollback is not None else None,
                rollout_condition=Condition("Rollout", *said) if said is not None else None,
            )
            if status_changed(state.status, status):
                try:
                    await self.kube.patch_status(
                        "ConfigEntry", entry.namespace, entry.name, _with_removals(state.status, status)
                    )
                except ApiError as exc:
                    if exc.status == 404:
                        return  # the entry is gone; its DELETED event follows
                    raise
                state.status = status
            # the step is in status now: only then may its members move (a restart of the operator moves the same)
            self._sync_gate(state)
            for type_, reason, message in events:
                self._entry_event(entry, type_, reason, message)

    async def _auto_rollback_plan(self, state: _EntryState, decided: Plan) -> Plan:
        """While an automatic rollback is in force (status.rollback) and spec.data is still what failed, serve the
        restored revision's content instead of the plan. A manual spec.rollbackTo wins; a change of spec.data ends
        it (the new data is released as any other), and so does a change of the merged content that comes from
        another entry's layer (the failed content is then no longer what the plan gives)."""
        record, entry = state.rollback, state.entry
        if record is None:
            return decided
        failed = state.history.get(record.failed_revision)
        moved = failed is not None and decided.hash is not None and decided.hash != failed.hash
        if entry.rollout is None or content_hash(entry.data) != record.data_hash:
            state.rollback = None
            return decided
        if entry.rollback_to is not None or decided.data is None:
            return decided  # a manual rollback wins while it is set; the record stays
        if moved:
            state.rollback = None
            return decided
        if record.restored_revision not in state.history:
            message = f"revision {record.restored_revision} (to roll back to) is no longer kept"
            return Plan(None, None, Condition("Ready", "False", "RevisionNotFound", message), decided.conflict)
        data = await self._revision_data(state, record.restored_revision)
        if data is None:
            message = f"revision {record.restored_revision} (to roll back to) could not be read"
            return Plan(None, None, Condition("Ready", "False", "RevisionUnreadable", message), decided.conflict)
        digest = content_hash(data)
        message = (
            f"serving the content of revision {record.restored_revision} again (hash {digest}): revision "
            f"{record.failed_revision} failed its rollout"
        )
        ready = Condition("Ready", "True", "AutoRolledBack", message)
        return Plan(data, digest, ready, decided.conflict, record.restored_revision)

    async def _release(
        self, state: _EntryState, data: dict[str, str], digest: str, rollback_of: int | None
    ) -> list[tuple[str, str, str]]:
        """A tracked entry's reconcile: start the rollout of new content (staged as a copy for the canaries, or
        materialised for waves; a rollback at once), then advance it as far as it goes now (`rollout_core.step`).
        Returns the Events to post once the status holds the result."""
        entry = state.entry
        spec = entry.rollout
        assert spec is not None
        rollout = state.rollout
        events: list[tuple[str, str, str]] = []
        if rollout is None or rollout.hash != digest:
            if rollout is not None and not rollout.ended and state.rollback is None:
                metrics.CONFIG_ROLLOUTS.labels(outcome="superseded").inc()
            served = state.current
            record = state.rollback
            auto = record is not None and entry.rollback_to is None and rollback_of == record.restored_revision
            if served is not None and served.hash != digest:
                start: int | None = served.revision
            elif rollout is not None:  # the ConfigMap holds it already: a crash came between the two writes
                start = rollout.from_revision if rollout.unpromoted else rollout.revision
            else:
                start = None
            if rollback_of is None and served is not None and served.hash != digest and spec.canary is not None:
                number = await self._stage(state, data, digest)
                state.rollout = Rollout(revision=number, hash=digest, phase="Canary", from_revision=start)
            else:
                # into the target ConfigMap now: waves without canaries, a first content, or a rollback (released
                # to every workload at once); readers are held until the status says who may move
                self._set_gate((entry.namespace, entry.config_map_name), _Gate(None, None))
                failed = rollout.revision if auto and rollout is not None else None
                await self._materialise(state, data, digest, rollback_of, after=failed)
                assert state.current is not None
                number = state.current.revision
                if auto and record is not None:
                    state.rollback = dataclasses.replace(record, revision=number)
                    state.rollout = Rollout(number, digest, ROLLED_BACK, from_revision=start, message=record.message)
                    message = (
                        f"revision {record.failed_revision} failed ({record.message}); serving the content of "
                        f"revision {record.restored_revision} again as revision {number}"
                    )
                    events.append(("Warning", "ConfigAutoRolledBack", message))
                elif rollback_of is not None:
                    message = f"rollback to revision {rollback_of}: released to every workload at once"
                    state.rollout = Rollout(number, digest, COMPLETE, from_revision=start, message=message)
                else:
                    state.rollout = Rollout(number, digest, WAVES, from_revision=start)
        elif rollout.unpromoted:
            state.staged = (digest, data)  # the target keeps the promoted content meanwhile
        else:
            await self._materialise(state, data, digest, rollback_of)  # no write while the API holds it
        rollout = state.rollout
        if rollout is None or rollout.ended:
            self._wake(state, None)
            return events
        members = self._members(state, rollout)
        if members is None:
            return events  # inputs incomplete (after a restart): the next change looks again
        now = self._wall()
        decided = step(spec, rollout, members, now=now, promote=entry.promote)
        events.extend(decided.events)
        state.rollout = decided.rollout
        if decided.rollout.phase != rollout.phase and decided.rollout.phase in (COMPLETE, FAILED):
            metrics.CONFIG_ROLLOUTS.labels(outcome=decided.rollout.phase.lower()).inc()
        if decided.promote:
            await self._materialise(state, data, digest, None)
        if decided.failure is not None:
            start = rollout.from_revision
            if start is not None and start in state.history:
                metrics.CONFIG_ROLLOUTS.labels(outcome="rolled_back").inc()
                state.rollback = RollbackRecord(rollout.revision, start, content_hash(entry.data), decided.failure)
                self._schedule(entry.key)  # the rollback is served once the decision is in status
            else:
                metrics.CONFIG_ROLLOUTS.labels(outcome="failed").inc()
                message = f"{decided.failure}; there is no earlier revision to roll back to"
                state.rollout = dataclasses.replace(decided.rollout, phase=FAILED, message=message)
        self._warn_on_delete(state, members)
        self._wake(state, decided.wake_at)
        return events

    def _members(self, state: _EntryState, rollout: Rollout) -> list[Member] | None:
        """The readers of the entry's ConfigMap as `rollout_core.step` sees them; None while the inputs are
        incomplete (workloads or pods not listed, the data of a key-aware reader's revision not known)."""
        entry = state.entry
        spec = entry.rollout
        name = entry.config_map_name
        computed = self._adoption(state)
        if computed is None or spec is None:
            return None
        on = {f"{row.kind}/{row.name}": row.revision for row in computed.workloads}
        out = []
        for key in sorted(self._readers.get((entry.namespace, name), ())):
            w = self._workloads.get(key)
            if w is None:
                continue
            target = self._served_one(w, name, rollout.hash)
            if target is None:
                return None
            template = (w.template or {}).get(name)
            held = template or (w.baseline or {}).get(name)
            out.append(
                Member(
                    key=f"{w.kind}/{w.name}",
                    canary=spec.canary is not None and selects(spec.canary, w.labels),
                    pending=held is not None and held != target,
                    done=on.get(f"{w.kind}/{w.name}") == rollout.revision,
                    failed="Progressing=False, ProgressDeadlineExceeded"
                    if w.deadline_exceeded and template == target
                    else None,
                    waited=not w.on_delete,
                )
            )
        return out

    def _warn_on_delete(self, state: _EntryState, members: Sequence[Member]) -> None:
        rollout = state.rollout
        if rollout is None:
            return
        for member in members:
            if member.waited or member.key not in rollout.members or (rollout.revision, member.key) in state.warned:
                continue
            state.warned.add((rollout.revision, member.key))
            kind, _, name = member.key.partition("/")
            workload = self._workloads.get((kind, state.entry.namespace, name))
            if workload is not None:
                message = (
                    f"updateStrategy OnDelete: the pod template carries revision {rollout.revision} of "
                    f"{state.entry.config_map_name}, but its pods take it only when deleted; the rollout does not "
                    "wait for them"
                )
                self._event(workload, "Warning", "ConfigRolloutSkipped", message)

    def _wake(self, state: _EntryState, at: float | None) -> None:
        """Look at the rollout again at `at` (wall clock): the end of a hold, a step's timeout."""
        if state.wake is not None:
            state.wake.cancel()
            state.wake = None
        if at is not None:
            delay = max(0.0, at - self._wall()) + 0.05
            state.wake = asyncio.get_running_loop().call_later(delay, self._schedule, state.entry.key)

    async def _stage(self, state: _EntryState, data: dict[str, str], digest: str) -> int:
        """Record new content as a revision and write its immutable copy for the canaries; the target ConfigMap
        keeps what it holds. Copies of revisions no longer kept that no workload references are deleted."""
        entry = state.entry
        number, record = choose_revision(
            history=list(state.history.values()), current=state.current, desired_hash=digest
        )
        await self.kube.create(desired_copy(entry, data=data, digest=digest, revision=number))
        if record:
            obj = desired_revision(entry, data=data, digest=digest, revision=number, rollback_of=None)
            await self.kube.create(obj)
            state.history[number] = Revision(number, obj["metadata"]["name"], digest, None)
            metrics.CONFIG_REVISIONS.inc()
            log.info(
                "%s/%s: revision %d (hash %s) staged for the canaries", entry.namespace, entry.name, number, digest
            )
        state.staged = (digest, data)
        copies = await self.kube.list(
            "ConfigMap", entry.namespace, label_selector=f"{LABEL_ENTRY_UID}={entry.uid},{LABEL_CANARY_REVISION}"
        )
        referenced = {
            ref
            for key in self._readers.get((entry.namespace, entry.config_map_name), ())
            if (w := self._workloads.get(key)) is not None
            for ref in w.refs
        }
        names = [str(c["metadata"]["name"]) for c in copies]
        keep = {*state.history, number}
        for stale in stale_copies(names, target=entry.config_map_name, keep_revisions=keep, referenced=referenced):
            await self.kube.delete("ConfigMap", entry.namespace, stale)
        return number

    def _entry_event(self, entry: ConfigEntry, type_: str, reason: str, message: str) -> None:
        involved = {
            "apiVersion": "beacon.dev/v1alpha1",
            "kind": "ConfigEntry",
            "metadata": {"name": entry.name, "namespace": entry.namespace, "uid": entry.uid},
        }
        self._post_event(involved, type_, reason, message)

    async def _load(self, state: _EntryState) -> None:
        """What the API holds for this entry: its history and what its ConfigMap carries (after a restart, or
        after an error, or after someone else touched the ConfigMap).

        What beacon recorded in this process stays the truth about the revisions it wrote: one missing from the
        listing, or listed differently (a hand edit), keeps beacon's record and is repaired (`state.suspect`)."""
        entry = state.entry
        items = await self.kube.list(
            "ControllerRevision", entry.namespace, label_selector=f"{LABEL_ENTRY_UID}={entry.uid}"
        )
        recorded = {r.name: r for r in state.history.values()}
        state.history = {}
        for item in items:
            if not _owned(item, entry):
                continue
            revision = revision_from_object(item)
            known = recorded.pop(revision.name, None)
            if known is not None:
                if not revision_intact(item, entry, known):
                    state.suspect.add(known.name)
                revision = known
            state.history[revision.number] = revision
        for missing in recorded.values():  # gone from the API, and beacon did not prune it: a hand deletion
            state.history[missing.number] = missing
            state.suspect.add(missing.name)
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
                self._map_entries[(entry.namespace, entry.config_map_name)] = entry.key
                # its data, for key-aware readers to hash their keys of (also when the entry cannot materialise);
                # only as beacon wrote it: a hand edit is written back (and rolled out) by the reconcile, not here
                data = actual.get("data") if actual is not None else None
                if isinstance(data, dict) and content_hash(data) == current.hash:
                    self._set_hash(
                        entry.namespace, entry.config_map_name, current.hash, revision=current.revision, data=data
                    )
            elif state.current is None and actual is None:
                # the ConfigMap is gone (deleted by hand); the status still says what it held, which keeps
                # revision numbers increasing even if the history went with it
                status = state.status or {}
                if isinstance(status.get("currentRevision"), int) and status.get("hash"):
                    state.current = Current(status["currentRevision"], str(status["hash"]))
        state.pinned = None
        state.loaded = True

    async def _repair_revisions(
        self, state: _EntryState, planned: Mapping[str, str] | None, planned_hash: str | None
    ) -> None:
        """Write back the revisions someone else deleted or edited (`state.suspect`, from the watch): each is read,
        and one that is gone or not exactly what beacon wrote is created again (an edited one is deleted first: a
        revision's data is immutable, and beacon's RBAC creates and deletes revisions, it never patches them).

        Its data comes from the object itself when that still holds the recorded content hash (an edit of the
        metadata or of the number), else from what beacon has in memory with that hash (the content it
        materialised last, the plan at hand, the data of spec.rollbackTo it read), else from another stored
        revision with the same hash. Nothing left: the revision is dropped from the history (counted, logged)."""
        entry = state.entry
        for name in sorted(state.suspect):
            state.suspect.discard(name)
            recorded = next((r for r in state.history.values() if r.name == name), None)
            if recorded is None:
                continue  # pruned meanwhile
            actual = await self.kube.get("ControllerRevision", entry.namespace, name)
            if actual is not None and revision_intact(actual, entry, recorded):
                continue  # as beacon wrote it (the event was beacon's own repair coming back)
            data = await self._content_of(state, recorded, actual, planned, planned_hash)
            if data is None:
                log.warning(
                    "%s/%s: ControllerRevision %s was deleted or edited and its content (hash %s) is nowhere left; "
                    "dropping revision %d from the history",
                    entry.namespace,
                    entry.name,
                    name,
                    recorded.hash,
                    recorded.number,
                )
                del state.history[recorded.number]
                metrics.CONFIG_REVISION_REPAIRS.labels(outcome="unrecoverable").inc()
                continue
            if actual is not None:
                await self.kube.delete("ControllerRevision", entry.namespace, name)
            obj = desired_revision(
                entry, data=data, digest=recorded.hash, revision=recorded.number, rollback_of=recorded.rollback_of
            )
            await self.kube.create(obj)
            metrics.CONFIG_REVISION_REPAIRS.labels(outcome="recreated").inc()
            log.info(
                "%s/%s: ControllerRevision %s written back (revision %d)",
                entry.namespace,
                entry.name,
                name,
                recorded.number,
            )

    async def _content_of(
        self,
        state: _EntryState,
        recorded: Revision,
        actual: Mapping[str, Any] | None,
        planned: Mapping[str, str] | None,
        planned_hash: str | None,
    ) -> dict[str, str] | None:
        """The data of revision `recorded`, wherever beacon can still find content with its hash."""
        held = revision_data(actual) if actual is not None else None
        if held is not None and content_hash(held) == recorded.hash:
            return held
        if state.content is not None and state.current is not None and state.current.hash == recorded.hash:
            return dict(state.content)
        if planned is not None and planned_hash == recorded.hash:
            return dict(planned)
        if state.pinned is not None and state.pinned[1] is not None and content_hash(state.pinned[1]) == recorded.hash:
            return dict(state.pinned[1])
        for other in sorted(state.history.values(), key=lambda r: -r.number):
            if other.hash != recorded.hash or other.name == recorded.name:
                continue
            obj = await self.kube.get("ControllerRevision", state.entry.namespace, other.name)
            data = revision_data(obj) if obj is not None else None
            if data is not None and content_hash(data) == recorded.hash:
                return data
        return None

    async def _revision_data(self, state: _EntryState, number: int) -> dict[str, str] | None:
        if state.pinned is not None and state.pinned[0] == number:
            return state.pinned[1]
        obj = await self.kube.get("ControllerRevision", state.entry.namespace, state.history[number].name)
        data = revision_data(obj) if obj is not None else None
        state.pinned = (number, data)
        return data

    async def _materialise(
        self,
        state: _EntryState,
        data: dict[str, str],
        digest: str,
        rollback_of: int | None,
        *,
        after: int | None = None,
    ) -> None:
        """Write the ConfigMap, then record the revision. The ConfigMap first: it is what the workloads read, and
        when thousands of entries change at once (a namespace-wide edit) their ConfigMaps are all written before
        the bookkeeping of any (requests leave in the order they are made). A failure between the two records the
        revision at the retry; a crash between them records the content as the next revision at the restart
        (`choose_revision`: numbers only go up), so whatever a workload read is in the history."""
        entry = state.entry
        current = state.current
        if after is not None and (current is None or current.revision < after):
            current = Current(after, "")  # an automatic rollback is numbered after the revision it undoes
        number, record = choose_revision(history=list(state.history.values()), current=current, desired_hash=digest)
        await self.kube.ensure(desired_config_map(entry, data=data, digest=digest, revision=number), merge=True)
        if record:
            obj = desired_revision(entry, data=data, digest=digest, revision=number, rollback_of=rollback_of)
            await self.kube.create(obj)
            state.history[number] = Revision(number, obj["metadata"]["name"], digest, rollback_of)
            metrics.CONFIG_REVISIONS.inc()
            log.info("%s/%s: revision %d (hash %s)", entry.namespace, entry.name, number, digest)
        await self._remove_stray_keys(state, data)
        previous_map = state.config_map
        state.current = Current(number, digest)
        state.content = data
        state.config_map = entry.config_map_name
        if previous_map and previous_map != state.config_map:
            await self._drop_old_map(entry, previous_map)
        self._map_entries[(entry.namespace, state.config_map)] = entry.key
        self._set_hash(entry.namespace, state.config_map, digest, revision=number, data=data)
        keep = (number, entry.rollback_to, *_rollout_keeps(state))
        for stale in to_prune(numbers=state.history, limit=entry.history_limit, keep=keep):
            # out of the history first: the watch then knows the deletion coming back as beacon's own
            pruned = state.history.pop(stale)
            await self.kube.delete("ControllerRevision", entry.namespace, pruned.name)

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
        for table in (self._hashes, self._revisions, self._contents, self._map_entries):
            table.pop((entry.namespace, name), None)
        old = await self.kube.get("ConfigMap", entry.namespace, name)
        if old is not None and not owned_by_other(old, entry):
            await self.kube.delete("ConfigMap", entry.namespace, name)

    # ------------------------------------------------------------------ adoption
    def _sync_pod_watch(self, namespace: str) -> None:
        """Watch a namespace's pods while it has an opted-in workload (and this replica may write); forget them
        with its last one. Namespaces without one cost nothing, not even parsing (as discovery does)."""
        want = self._watching and bool(self._namespace_workloads.get(namespace))
        task = self._pod_watches.get(namespace)
        if want and task is None:
            self._pod_watches[namespace] = asyncio.ensure_future(self._follow_pods(namespace))
        elif not want and task is not None:
            del self._pod_watches[namespace]
            task.cancel()
            self._pods.pop(namespace, None)
            self._pods_synced.discard(namespace)

    async def _follow_pods(self, namespace: str) -> None:
        """List the namespace's pods (then its entries' adoption is complete), then follow them."""
        while True:
            try:
                await self._list_pods(namespace)
                RETRIES.forget(("configs pods", namespace))
                break
            except (ApiError, OSError) as exc:
                wait = RETRIES.when(("configs pods", namespace))
                log.warning("cannot list the pods of namespace %s yet, retrying in %.1fs: %s", namespace, wait, exc)
                await asyncio.sleep(wait)
        async for type_, body in self.kube.watch("Pod", namespace):
            self.pod_changed(namespace, body, deleted=type_ == "DELETED")

    async def _list_pods(self, namespace: str) -> None:
        """List the namespace's pods into the cache, except those that watch events touched meanwhile (those
        events are at least as new as the listing)."""
        touched: set[str] = set()
        self._pod_listings.setdefault(namespace, []).append(touched)
        try:
            items = await self.kube.list("Pod", namespace)
        finally:
            listings = self._pod_listings[namespace]
            listings.remove(touched)
            if not listings:
                del self._pod_listings[namespace]
        if namespace not in self._pod_watches:
            return  # no opted-in workload left there meanwhile
        listed = {pod.name: pod for pod in (PodConfig.from_body(item) for item in items)}
        before = self._pods.get(namespace)
        for name in touched:
            if before is not None and name in before:
                listed[name] = before[name]
            else:
                listed.pop(name, None)
        self._pods[namespace] = listed
        first = namespace not in self._pods_synced
        self._pods_synced.add(namespace)
        if not first and before == listed:
            return
        for key in sorted(self._namespace_workloads.get(namespace, ())):
            workload = self._workloads.get(key)
            if workload is not None:
                self._match_pods(workload)
                self._adoption_changed(workload)

    def pod_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A pod event in a namespace with opted-in workloads: the adoption of the entries its workloads read is
        computed again, and their status written only if the summary changed (by the entry's reconcile)."""
        if self._watching and namespace not in self._pod_watches:
            return  # a late event of a watch stopped with the namespace's last opted-in workload
        pod = PodConfig.from_body(body)
        for touched in self._pod_listings.get(namespace, ()):
            touched.add(pod.name)
        cached = self._pods.setdefault(namespace, {})
        old = cached.get(pod.name)
        if deleted:
            cached.pop(pod.name, None)
        elif old == pod:
            return  # nothing adoption looks at changed
        else:
            cached[pod.name] = pod
        for key in sorted(self._namespace_workloads.get(namespace, ())):
            workload = self._workloads.get(key)
            if workload is None:
                continue
            member = not deleted and selects(workload.selector, pod.labels)
            if member:
                workload.pods.add(pod.name)
            elif pod.name in workload.pods:
                workload.pods.discard(pod.name)
            else:
                continue
            self._adoption_changed(workload)

    def _match_pods(self, workload: _Workload) -> None:
        cached = self._pods.get(workload.namespace, {})
        workload.pods = {name for name, pod in cached.items() if selects(workload.selector, pod.labels)}

    def _adoption_changed(self, workload: _Workload) -> None:
        """Something adoption looks at changed for `workload` (its pods, template, opt-in): the entries whose
        ConfigMap it reads compute their adoption again, once per `coalesce` window whatever the number of pod
        events in it (a rollout of N pods costs O(windows x N), not O(N^2)), and are queued when the status
        summary differs."""
        for name in workload.names:
            key = self._map_entries.get((workload.namespace, name))
            if key is not None:
                self._adoption_dirty.add(key)
                if (workload.namespace, name) in self._gates:
                    self._rollout_dirty.add(key)
        if not self._adoption_dirty or self._adoption_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the event loop (never in the operator): at once
            self._flush_adoptions()
            return
        self._adoption_timer = loop.call_later(self._coalesce, self._flush_adoptions)

    def _flush_adoptions(self) -> None:
        self._adoption_timer = None
        keys, self._adoption_dirty = sorted(self._adoption_dirty), set()
        rolling, self._rollout_dirty = self._rollout_dirty, set()
        for key in sorted(rolling):
            self._schedule(key)  # a rollout in progress looks at its members again
        for key in keys:
            state = self._entries.get(key)
            computed = self._adoption(state) if state is not None else None
            if state is None or computed is None:
                continue
            before = self._adoptions.get(key)
            if before is None or before.workloads != computed.workloads:
                self._publish(key, computed)
            if (state.status or {}).get("adoption") != computed.status:
                self._schedule(key)

    def _refresh_adoptions(self, keys: Sequence[EntryKey]) -> None:
        self._adoption_dirty.update(keys)
        self._flush_adoptions()

    def _adoption(self, state: _EntryState) -> Adoption | None:
        """The entry's adoption now, from memory (no API call): its ConfigMap's readers and their pods. None
        while its inputs are incomplete (workloads or their pods not listed yet) or there is nothing to say."""
        if state.current is None or not state.config_map or state.foreign or not self._workloads_listed:
            return None
        namespace, name = state.entry.namespace, state.config_map
        readers = self._readers.get((namespace, name), set())
        if readers and namespace not in self._pods_synced:
            return None
        cached = self._pods.get(namespace, {})
        gate = self._gates.get((namespace, name))
        current = gate.revision if gate is not None and gate.revision is not None else state.current.revision
        views = []
        for key in sorted(readers):
            w = self._workloads.get(key)
            if w is None:
                continue
            views.append(
                WorkloadConfig(
                    kind=w.kind,
                    name=w.name,
                    replicas=w.replicas,
                    desired_hash=self._target_one(w, name),
                    template_hash=(w.template or {}).get(name),
                    baseline_hash=(w.baseline or {}).get(name),
                    whole=w.keys.get(name) is None,
                    pods=tuple(cached[p] for p in sorted(w.pods) if p in cached),
                )
            )
        return adoption(config=name, workloads=views, current=current, history=state.history.values())

    def _publish(self, key: EntryKey, computed: Adoption) -> None:
        """The per-workload detail as metric series: pods per (workload, revision), and whether each workload is
        fully on the current revision. Series of revisions outside status' window are summed under "older", so
        an entry has at most (workloads x (window + 3)) series; those that go are removed."""
        self._adoptions[key] = computed
        window = {str(item["revision"]) for item in computed.status["revisions"]}
        current = str(computed.status["revision"])
        series: dict[tuple[str, str, str, str], int] = {}
        for row in computed.workloads:
            workload = f"{row.kind}/{row.name}"
            for rev, (pods, _ready) in row.pods.items():
                label = str(rev) if str(rev) in window or not isinstance(rev, int) else "older"
                series[(key[0], key[1], workload, label)] = series.get((key[0], key[1], workload, label), 0) + pods
            metrics.CONFIG_WORKLOAD_ADOPTED.labels(key[0], key[1], workload).set(
                1 if row.revision is not None and str(row.revision) == current else 0
            )
        for labels, value in series.items():
            metrics.CONFIG_WORKLOAD_PODS.labels(*labels).set(value)
        workloads = {(key[0], key[1], f"{row.kind}/{row.name}") for row in computed.workloads}
        self._drop_series(key, keep_pods=set(series), keep_workloads=workloads)
        self._series[key] = (set(series), workloads)

    def _drop_series(
        self,
        key: EntryKey,
        *,
        keep_pods: set[tuple[str, str, str, str]],
        keep_workloads: set[tuple[str, str, str]],
    ) -> None:
        pods, workloads = self._series.get(key, (set(), set()))
        for labels in pods - keep_pods:
            with contextlib.suppress(KeyError):
                metrics.CONFIG_WORKLOAD_PODS.remove(*labels)
        for three in workloads - keep_workloads:
            with contextlib.suppress(KeyError):
                metrics.CONFIG_WORKLOAD_ADOPTED.remove(*three)

    def _forget_adoption(self, key: EntryKey) -> None:
        self._adoptions.pop(key, None)
        self._drop_series(key, keep_pods=set(), keep_workloads=set())
        self._series.pop(key, None)

    # ------------------------------------------------------------------ reloads
    def _set_hash(
        self,
        namespace: str,
        name: str,
        digest: str,
        *,
        revision: int | None = None,
        data: Mapping[str, str] | None = None,
    ) -> None:
        """What a ConfigMap holds now (its hash, revision and, when beacon just materialised it, its data): the
        workloads that read it are evaluated when it changed (or when its data, which key-aware readers need,
        arrived)."""
        key = (namespace, name)
        if revision is not None:
            self._revisions[key] = revision
        fresh = False
        if data is not None and self._contents.get(key, ("", {}))[0] != digest:
            self._contents[key] = (digest, data)  # shared with the plan, never mutated
            fresh = True
        if self._hashes.get(key) == digest and not fresh:
            return
        self._hashes[key] = digest
        self._evaluate_readers(key)

    def _evaluate_readers(self, key: tuple[str, str]) -> None:
        """Evaluate every opted-in workload that reads ConfigMap `key` (what it may take changed)."""
        for reader in sorted(self._readers.get(key, ())):
            workload = self._workloads.get(reader)
            if workload is not None:
                self._evaluate(workload)

    def _served_one(self, workload: _Workload, name: str, digest: str | None = None) -> str | None:
        """The hash `workload` would run for one ConfigMap holding `digest` (default: what it holds now): that
        hash, or for a workload that reads only some keys the hash of those keys (None until beacon holds the data
        of that hash)."""
        digest = digest or self._hashes.get((workload.namespace, name))
        selection = workload.keys.get(name)
        if digest is None or selection is None:
            return digest
        held = self._contents.get((workload.namespace, name))
        if held is not None and held[0] == digest:
            return selection_hash(held[1], selection)
        entry_key = self._map_entries.get((workload.namespace, name))
        state = self._entries.get(entry_key) if entry_key is not None else None
        if state is not None and state.staged is not None and state.staged[0] == digest:
            return selection_hash(state.staged[1], selection)
        return None

    def _target_one(self, workload: _Workload, name: str) -> str | None:
        """What `workload` runs once it is on the newest revision of one ConfigMap: for a tracked entry, the
        revision being released (during its canary step the target ConfigMap still holds the previous one)."""
        gate = self._gates.get((workload.namespace, name))
        return self._served_one(workload, name, gate.hash if gate is not None else None)

    def _desired_one(self, workload: _Workload, name: str) -> str | None:
        """The hash `workload` should be rolled out for now, for one ConfigMap: the newest (`_target_one`), except
        that a reader of a tracked entry not released by its rollout keeps what it was rolled out for."""
        gate = self._gates.get((workload.namespace, name))
        if gate is not None and (workload.kind, workload.namespace, workload.name) not in gate.released:
            held = (workload.template or {}).get(name) or (workload.baseline or {}).get(name)
            return held if held is not None else self._served_one(workload, name)
        return self._target_one(workload, name)

    def _revision_of(self, workload: _Workload, name: str, digest: str) -> int | None:
        """The revision a restart for `digest` gives `workload`: the one being released when that is what it
        takes (a canary takes it before the target ConfigMap holds it), else the one the ConfigMap holds."""
        gate = self._gates.get((workload.namespace, name))
        if gate is not None and gate.revision is not None and digest == self._served_one(workload, name, gate.hash):
            return gate.revision
        return self._revisions.get((workload.namespace, name))

    def _reads_from(self, workload: _Workload, name: str) -> str:
        """The ConfigMap `workload`'s pods should read for `name`: a released canary reads the revision's copy."""
        gate = self._gates.get((workload.namespace, name))
        if gate is not None and gate.copy and (workload.kind, workload.namespace, workload.name) in gate.released:
            return gate.copy
        return name

    # ------------------------------------------------------------------ tracked rollouts: the gate
    def _set_gate(self, key: tuple[str, str], gate: _Gate | None) -> None:
        """Install (None: remove) the gate of one ConfigMap and evaluate its readers when it changed."""
        before = self._gates.get(key)
        if gate == before:
            return
        if gate is None:
            del self._gates[key]
        else:
            self._gates[key] = gate
        self._evaluate_readers(key)

    def _sync_gate(self, state: _EntryState) -> None:
        """The gate as the entry's rollout state says: open (none) when the entry is not tracked or its rollout is
        finished with what its ConfigMap holds; else only the step's members may move. A tracked entry whose state
        does not match its ConfigMap (new, or a restart after a crash between the two writes) holds every reader
        until its reconcile decides."""
        entry = state.entry
        key = (entry.namespace, entry.config_map_name)
        rollout = state.rollout
        if entry.rollout is None or state.foreign:
            self._set_gate(key, None)
            return
        if rollout is None:
            self._set_gate(key, _Gate(None, None))
            return
        if rollout.final:
            self._set_gate(key, None if rollout.hash == self._hashes.get(key) else _Gate(None, None))
            return
        released = frozenset(
            (kind, entry.namespace, name) for kind, _, name in (m.partition("/") for m in rollout.members)
        )
        copy = canary_map_name(entry.config_map_name, rollout.revision) if rollout.unpromoted else None
        self._set_gate(key, _Gate(rollout.revision, rollout.hash, released, copy))

    def _stop_rollout(self, state: _EntryState) -> None:
        """The entry is gone (deleted, or its namespace handed to another replica): drop its timer and its gate
        without evaluating its readers, which must not be restarted for it now."""
        if state.wake is not None:
            state.wake.cancel()
            state.wake = None
        self._gates.pop((state.entry.namespace, state.entry.config_map_name), None)

    def _desired(self, workload: _Workload) -> dict[str, str] | None:
        """The hashes `workload` should be rolled out for, of the ConfigMaps it names that exist; None while the
        data of one it reads only some keys of is not known yet (after a restart, until its entry is loaded):
        deciding without it would drop that ConfigMap from the rollout."""
        hashes = {n: self._desired_one(workload, n) for n in workload.names}
        if any(h is None and (workload.namespace, n) in self._hashes for n, h in hashes.items()):
            return None
        return {n: h for n, h in hashes.items() if h is not None}

    def _evaluate(self, workload: _Workload) -> None:
        desired = self._desired(workload)
        if desired is None:
            return  # evaluated again when the data arrives (`_set_hash`)
        decision = reload_decision(desired=desired, template=workload.template, baseline=workload.baseline)
        if decision.action == "none":
            workload.first_change = workload.last_change = workload.target = None
            return
        if decision.action == "rollout" and workload.target != decision.template:
            now = self._clock()
            workload.target = decision.template
            workload.last_change = now
            if workload.first_change is None:
                workload.first_change = now
        self.reloads.enqueue((workload.kind, workload.namespace, workload.name))

    async def _reload(self, key: WorkloadKey) -> None:
        """The Reload controller's reconcile of one workload: decide, wait out the debounce and the rate limit,
        patch. A failure (the API unreachable, anything else) is retried by the queue, never dropped; a workload
        that is gone (404) stops being retried."""
        try:
            await self._reload_until_settled(key)
        except ApiError as exc:
            if exc.status != 404:
                raise
            self._workloads.pop(key, None)

    async def _reload_until_settled(self, key: WorkloadKey) -> None:
        while (workload := self._workloads.get(key)) is not None:
            desired = self._desired(workload)
            if desired is None:
                return  # evaluated again when the data arrives (`_set_hash`)
            decision = reload_decision(desired=desired, template=workload.template, baseline=workload.baseline)
            if decision.action == "none":
                workload.first_change = workload.last_change = workload.target = None
                return
            if decision.action == "baseline":
                baseline: dict[str, Any] = {"metadata": {"annotations": {ANNOTATION_BASELINE: decision.baseline}}}
                self._observe(workload, await self._patch(workload, baseline))
                self._adoption_changed(workload)
                continue
            if not await self._wait_for_rollout(workload, decision.template):
                continue
            wait = self._budget.take(self._clock())
            if wait > 0:  # the cluster-wide restart budget: wait for a token, then decide again
                metrics.RELOADS.labels(kind=workload.kind, outcome="budget_wait").inc()
                await asyncio.sleep(wait)
                continue
            hashes = parse_hashes(decision.template) or {}
            revisions = {
                name: number
                for name, digest in hashes.items()
                if (number := self._revision_of(workload, name, digest)) is not None
            }
            annotations = {
                ANNOTATION_TEMPLATE_HASHES: decision.template,
                ANNOTATION_TEMPLATE_REVISIONS: format_revisions(revisions),
            }
            patch: dict[str, Any] = {
                "metadata": {"annotations": {ANNOTATION_BASELINE: None}},
                "spec": {"template": {"metadata": {"annotations": annotations}}},
            }
            if not await self._point_refs(workload, patch):
                continue  # gone meanwhile (the next event decides)
            self._observe(workload, await self._patch(workload, patch))
            self._restarted()
            self._adoption_changed(workload)
            workload.rollouts = [*workload.rollouts[-self.policy.rate_count :], self._clock()]
            workload.first_change = workload.last_change = workload.target = None
            workload.deferred = False
            metrics.RELOADS.labels(kind=workload.kind, outcome="rolled_out").inc()
            log.info("%s %s/%s rolled out for %s", workload.kind, workload.namespace, workload.name, decision.template)
            self._event(workload, "Normal", "ConfigReload", f"pod template bumped for {decision.template}")

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

    async def _point_refs(self, workload: _Workload, patch: dict[str, Any]) -> bool:
        """Add to a restart's patch the pod-template references to change: a released canary reads its revision's
        copy, every other reader the target ConfigMap itself (a canary moves back at its next restart). The lists
        are read fresh and replaced whole, guarded by the resourceVersion read (a conflict is retried). False when
        the workload is gone."""
        wanted = {name: self._reads_from(workload, name) for name in workload.names}
        moves = [
            name
            for name, want in wanted.items()
            if want not in workload.refs
            and any(ref == name or copy_revision(ref, name) is not None for ref in workload.refs)
        ]
        if not moves:
            return True
        body = await self.kube.get(workload.kind, workload.namespace, workload.name)
        if body is None:
            return False
        pod_spec = ((body.get("spec") or {}).get("template") or {}).get("spec") or {}
        parts = rewrite_refs(pod_spec, {name: wanted[name] for name in moves})
        if parts:
            patch["metadata"]["resourceVersion"] = (body.get("metadata") or {}).get("resourceVersion")
            patch["spec"]["template"]["spec"] = parts
        return True

    def _restarted(self) -> None:
        """Count a restart; the test-only crash point exits here, after the patch and before anything (the
        entry's status) records it."""
        self._restarts += 1
        if self._crash_after is not None and self._restarts >= self._crash_after:
            sys.stderr.write(f"{CRASH_POINT_ENV}: exiting after restart patch {self._restarts}\n")
            sys.stderr.flush()
            os._exit(137)

    async def _patch(self, workload: _Workload, patch: dict[str, Any]) -> Mapping[str, Any]:
        result = await self.kube.merge_patch(workload.kind, workload.namespace, workload.name, patch)
        return result or {}

    def _event(self, workload: _Workload, type_: str, reason: str, message: str) -> None:
        involved = {
            "apiVersion": "apps/v1",
            "kind": workload.kind,
            "metadata": {"name": workload.name, "namespace": workload.namespace, "uid": workload.uid},
        }
        self._post_event(involved, type_, reason, message)

    def _post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
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
        if self._adoption_timer is not None:
            self._adoption_timer.cancel()
            self._adoption_timer = None
        for task in self._pod_watches.values():
            task.cancel()
        self._pod_watches.clear()
        for timer in self._fan_out_windows.values():
            timer.cancel()
        self._fan_out_windows.clear()
        await self.entries.close()
        await self.reloads.close()
        for task in list(self._tasks):
            task.cancel()


def _observe(workload: _Workload, body: Mapping[str, Any]) -> None:
    """Take what a workload's body says about its opt-in, its pods and what it was rolled out for."""
    if not body:
        return
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = body.get("spec") or {}
    template = (((spec.get("template") or {}).get("metadata") or {}).get("annotations")) or {}
    with contextlib.suppress(ReloadSyntaxError):
        keys = parse_reload(annotations.get(ANNOTATION_RELOAD))
        if keys:
            workload.keys = keys
            workload.names = tuple(keys)
    workload.template = parse_hashes(template.get(ANNOTATION_TEMPLATE_HASHES))
    workload.baseline = parse_hashes(annotations.get(ANNOTATION_BASELINE))
    selector = spec.get("selector")
    workload.selector = dict(selector) if isinstance(selector, Mapping) else None
    workload.labels = dict(meta.get("labels") or {})
    workload.refs = frozenset(template_refs((spec.get("template") or {}).get("spec") or {}))
    strategy = spec.get("updateStrategy") or {}
    workload.on_delete = workload.kind != "Deployment" and strategy.get("type") == "OnDelete"
    status = body.get("status") or {}
    observed = int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    workload.deadline_exceeded = observed and any(
        c.get("type") == "Progressing" and c.get("status") == "False" and c.get("reason") == "ProgressDeadlineExceeded"
        for c in status.get("conditions") or ()
    )
    if workload.kind == "DaemonSet":
        workload.replicas = int((body.get("status") or {}).get("desiredNumberScheduled") or 0)
    else:
        replicas = spec.get("replicas")
        workload.replicas = int(replicas) if isinstance(replicas, int) else 1


def _rollout_keeps(state: _EntryState) -> tuple[int | None, ...]:
    """Revisions a tracked rollout still needs: the one released, the one to roll back to."""
    rollout, record = state.rollout, state.rollback
    return (
        rollout.revision if rollout is not None else None,
        rollout.from_revision if rollout is not None else None,
        record.restored_revision if record is not None else None,
        record.failed_revision if record is not None else None,
    )


def _with_removals(previous: Mapping[str, Any] | None, status: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that makes status.rollout and status.rollback what `status` says: keys they no longer
    have are removed (a merge patch keeps what it does not name)."""
    body = dict(status)
    for name in ("rollout", "rollback"):
        before = (previous or {}).get(name)
        if not isinstance(before, Mapping):
            continue
        if name not in status:
            body[name] = None
        else:
            body[name] = {**dict.fromkeys(before), **status[name]}
    return body


def _owned(obj: Mapping[str, Any], entry: ConfigEntry) -> bool:
    return any(ref.get("uid") == entry.uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _target_conflict(entry: ConfigEntry) -> Condition:
    message = (
        f"ConfigMap {entry.namespace}/{entry.config_map_name} exists and is not managed by this entry; "
        "set spec.target to another name or delete that ConfigMap"
    )
    return Condition("Ready", "False", "TargetConflict", message)
