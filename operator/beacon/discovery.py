"""The discovery engine: keeps ServiceEntries, pods, leases and endpoint health in memory, feeds the prober, and
turns health transitions into reconciles that the writer applies only on change.

Why it exists: kopf handlers should only translate watch events into calls on this object (thin handlers), and
the reconcile core should stay pure. Something has to own the state in between, decide *when* to reconcile
(at once when the entry is idle, coalesced while a write is in flight, so a burst costs a bounded number of
writes) and remember what was published so that a restart does not unpublish healthy endpoints. That is this
module. It calls the API only through `beacon.kube`.

Work per event does not grow with the cluster: Pods are watched only in namespaces where some entry has a
selector, and Leases only where some entry has a lease check (`Kube.watch`, one watch per such namespace, started
with the first such entry and stopped with the last), so 10,000 pods elsewhere cost nothing, not even parsing.
Selector entries are indexed by namespace and by one of their labels, so a Pod event looks only at the entries
that could select it; only pods some entry selects are cached. An entry that appears after its pods (or leases)
lists them through `beacon.kube`, so filtering before caching misses nothing.

CA bundles of verified TLS checks (`tls.caBundle`) are watched one ConfigMap at a time, as kubelet watches the
ConfigMaps its pods mount: a watch with the field selector `metadata.name=<name>` in the entry's namespace, started
with the first entry that names it (after one GET, awaited before the entry is published) and stopped with the
last. Nothing else of the namespace's ConfigMaps is sent, parsed or cached (not the registry beacon writes, not
the users' other ConfigMaps); the cost is one watch connection per distinct referenced ConfigMap. The bundle's
data is cached and goes into each target (`ServiceEntry.target`), so a change of it re-targets the entries that
name it: their probes use the new CA at once, without a restart. The resync reads each one again.

A transition remembers what triggered its decisive probe (`ProbeResult.trigger`: the interval, or a probe
connection the peer closed, see prober.py): the Event and the log line of a transition after a connection loss
say so ("after the connection was lost"), and `beacon_detections_total{trigger}` counts transitions to unhealthy
by trigger. The prober's hint policy (`HintPolicy`, from the operator's --hint-* flags) is passed through here.

Drain: a Pod's `beacon.dev/drain` annotation is kept with the cached pod (a change of it refreshes the entries that
select it, like any pod change), and a ServiceEntry's is part of its model; `beacon.reconcile` decides what a
drained endpoint publishes. Transition, drain, write and error lines carry `beacon.logfields` extras.

Failing safe (`beacon.failsafe`): every probe result of a network check feeds the operator-wide
`SelfPreservation` before anything else, so the mode starts from the raw results, ahead of the threshold
crossings it exists to hold. Each entry with flap damping keeps its own `FlapDamper`. A reconcile hands both, with
what its slices last published, to `reconcile.visible`, which applies the precedence. Here live their effects in
time: a mode change is logged (one WARNING), counted and, on exit, re-queues the entries that held endpoints; an
endpoint whose withdrawal is confirmed by probes after the exit re-queues its entry; a suppressed endpoint's entry
is re-queued when its penalty will have decayed. An entry's SelfPreservation condition coming and going posts one
Event each, in place of the transition Events of the endpoints it holds, and a suppressed endpoint's flaps post
none: a flapping backend costs no write per flap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from beacon import logfields, metrics
from beacon.engine import Controller, Owns, owner_uids
from beacon.failsafe import FlapDamper, Reason, SelfPreservation, SelfPreservationPolicy, check_kind
from beacon.health import EndpointHealth, Status, observe, seeded, settled
from beacon.kube import ApiError, Kube, NotOursError
from beacon.logfields import fields
from beacon.models import Endpoint, ServiceEntry, pod_drained
from beacon.prober import HintPolicy, Prober
from beacon.reconcile import (
    LABEL_ENTRY,
    LABEL_MANAGED_BY,
    LABEL_SERVICE_NAME,
    MANAGED_BY,
    Guard,
    ProbeKey,
    RegistryRecord,
    View,
    damping_policy,
    desired_endpoints,
    desired_service,
    desired_slices,
    desired_status,
    probe_key,
    registry_record,
    slot_address,
    slot_key,
    slot_label,
    status_changed,
    visible,
)
from beacon.registry import LABEL_REGISTRY, REGISTRY_NAME, desired_registry
from beacon.targets import LeaseRecord, ProbeResult, Target, Trigger, parse_micro_time
from beacon.workqueue import repeat

log = logging.getLogger("beacon.discovery")

# a new entry's first write waits at most this long (plus its check's timeout) for its endpoints' first probes: the
# prober spreads a burst's first probes over at most 1 s
FIRST_VERDICT_WAIT = 1.5

EntryKey = tuple[str, str]
Anchor = tuple[str, str] | None  # the label an entry's selector is indexed by (None: it selects every pod)
# an endpoint's health moved: (address, before, after, what triggered the probe that moved it)
Transition = tuple[str, EndpointHealth, EndpointHealth, Trigger]
# how an Event and the log name a transition's trigger (the interval, the usual case, goes unsaid)
TRIGGER_PHRASES: dict[Trigger, str] = {"interval": "", "connection-loss": " after the connection was lost"}


@dataclass
class _Pod:
    name: str
    ip: str | None
    labels: dict[str, str]
    terminating: bool
    node: str | None
    draining: bool = False  # annotated beacon.dev/drain: "true"


CaRef = tuple[str, str]  # (namespace, name) of a ConfigMap holding a CA bundle


@dataclass
class _EntryState:
    entry: ServiceEntry
    labels: dict[str, str]  # the entry's own labels: the registry's tags (the rest of its body is not kept)
    endpoints: list[Endpoint] = field(default_factory=list)
    health: dict[str, EndpointHealth] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    seeded: bool = False
    status: dict[str, Any] | None = None
    # the entry's EndpointSlices as they are in the API (listed, then as written), by name: the membership
    # that desired_slices keeps stable; None when unknown (after a failed write), so reconcile lists them first
    slices: dict[str, dict[str, Any]] | None = None
    transitions: list[Transition] = field(default_factory=list)
    # the transitions the reconcile in flight publishes (announced once it succeeds); later ones wait in
    # `transitions` for the next reconcile, so an Event never names a change that is not published yet
    in_flight: list[Transition] = field(default_factory=list)
    deregistered: set[str] = field(default_factory=set)
    members: set[str] = field(default_factory=set)  # names of the pods its selector matches
    pods_listed: bool = True  # False until the pods its (new) selector matches have been listed
    leases_wanted: bool = False  # counted in Discovery._lease_entries
    # the CA bundle ConfigMaps its checks name (entry-level and per-port): counted in Discovery._ca_entries
    ca_refs: frozenset[CaRef] = frozenset()
    # built once per spec (static) and per pod state (selected): a refresh rebuilds only what changed
    stale: bool = False  # pods changed since the endpoints were last refreshed
    static: list[Endpoint] | None = None
    pod_endpoints: dict[str, tuple[_Pod, Endpoint]] = field(default_factory=dict)
    probed: dict[str, Endpoint] = field(default_factory=dict)  # address -> the endpoint its target was made for
    # address -> the slot keys probed for it (`reconcile.slot_key`): the address itself for the entry-level check,
    # "<address>#<port>" for each port's own; health, refusals and first verdicts are kept by slot key
    slots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # until the entry is first published: endpoints whose first probe has not answered yet, and until when the
    # first write waits for them (so it carries their verdicts instead of "not ready" and a second write)
    published: bool = False
    unprobed: set[str] = field(default_factory=set)
    first_deadline: float = 0.0
    first_timer: asyncio.TimerHandle | None = None
    draining: set[str] = field(default_factory=set)  # the drained endpoints last published (for the log)
    damper: FlapDamper[ProbeKey] | None = None  # flap damping, when the entry asks for it
    release_timer: asyncio.TimerHandle | None = None  # re-queues the entry when a suppressed endpoint may go free
    held: set[str] = field(default_factory=set)  # endpoints held ready by self-preservation at the last publish
    flapping: int = 0  # endpoints suppressed by flap damping at the last publish
    panic: bool = False  # below its panic floor at the last publish

    def spec_changed(self) -> None:
        self.static, self.pod_endpoints, self.probed = None, {}, {}


def _selects(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def _anchor(entry: ServiceEntry) -> Anchor:
    """One label of the selector (any one will do: a pod it selects carries them all), None when it is empty."""
    selector = entry.spec.selector
    assert selector is not None
    return min(selector.match_labels.items()) if selector.match_labels else None


def _wants_leases(entry: ServiceEntry) -> bool:
    hc = entry.spec.health_check
    return hc is not None and hc.lease is not None


def pod_from_body(body: Mapping[str, Any]) -> _Pod:
    meta, status = body.get("metadata", {}), body.get("status", {})
    return _Pod(
        name=meta["name"],
        ip=status.get("podIP") or None,
        labels=dict(meta.get("labels") or {}),
        terminating=bool(meta.get("deletionTimestamp")),
        node=(body.get("spec") or {}).get("nodeName"),
        draining=pod_drained(meta.get("annotations")),
    )


Items = list[dict[str, Any]]
LIST_SHARE = 4  # a batch of entries LISTs their namespace when it holds at least a quarter of the namespace's entries


class _BatchedReads:
    """Reads of one kind of object per entry, batched: one read per namespace at a time, and every entry that asks
    while one is under way joins the next. A lone entry's read asks for its own objects (`read_one`); a batch's
    lists the namespace (`read_all`), and `owner_of` tells whose each item is. 1,000 entries applied at once (or
    found at start-up) cost a handful of LISTs instead of 1,000 reads, and each read still starts after its
    entries asked, so none misses an object that existed when it asked.

    A LIST costs what the whole namespace holds, whoever asked. So a batch that is small beside the namespace's
    entries (`population`; fewer than a `LIST_SHARE`th of them) reads each entry's own objects instead, concurrently.
    Without that, entries that trickle in one by one while the namespace is big (a restart: kopf delivers 1,000
    entries over seconds, and each LIST of their 1,000 slices takes long enough for the next few to queue up) made
    one full LIST per handful of entries: hundreds of multi-megabyte LISTs, most of the restart's time."""

    def __init__(
        self,
        *,
        read_one: Callable[[str, str], Awaitable[Items]],
        read_all: Callable[[str], Awaitable[Items]],
        owner_of: Callable[[dict[str, Any]], str],
        population: Callable[[str], int] = lambda _namespace: 0,
    ) -> None:
        self._read_one, self._read_all, self._owner_of = read_one, read_all, owner_of
        self._population = population
        self._next: dict[str, dict[str, asyncio.Future[Items]]] = {}  # namespace -> entry -> its answer
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[None]] = set()

    async def of(self, namespace: str, name: str) -> Items:
        batch = self._next.get(namespace)
        if batch is None:
            batch = self._next[namespace] = {}
            task = asyncio.ensure_future(self._read(namespace))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        answer = batch.get(name)
        if answer is None:
            answer = batch[name] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(answer)

    async def _read(self, namespace: str) -> None:
        async with self._locks[namespace]:
            batch = self._next.pop(namespace)  # from here on, whoever asks joins the next read
            try:
                if len(batch) > 1 and len(batch) * LIST_SHARE >= self._population(namespace):
                    items = await self._read_all(namespace)
                else:  # a lone entry, or a few beside many: their own objects, each read on its own
                    read = self._read_one
                    results = await asyncio.gather(*(read(namespace, name) for name in batch), return_exceptions=True)
                    for answer, result in zip(batch.values(), results, strict=True):
                        if answer.done():
                            continue
                        if isinstance(result, BaseException):
                            answer.set_exception(result)
                            answer.exception()  # retrieved, as below
                        else:
                            answer.set_result(result)
                    return
            except Exception as exc:
                for answer in batch.values():
                    if not answer.done():
                        answer.set_exception(exc)
                        answer.exception()  # retrieved: a caller cancelled meanwhile leaves no warning behind
                return
            finally:
                if namespace not in self._next:  # nobody waits for a next read: no lock to keep for it
                    self._locks.pop(namespace, None)
        by_owner: dict[str, Items] = defaultdict(list)
        for item in items:
            by_owner[self._owner_of(item)].append(item)
        for name, answer in batch.items():
            if not answer.done():
                answer.set_result(by_owner.get(name, []))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class Discovery:
    """State and timing of ServiceEntry reconciliation. Create it inside a running event loop."""

    def __init__(
        self,
        *,
        kube: Kube,
        probe: Callable[[Target], Any],
        concurrency: int = 64,
        registry_interval_seconds: float = 0.5,
        wall_clock: Callable[[], float] = time.time,
        namespaces: tuple[str, ...] = (),
        forget: Callable[[str, int], None] | None = None,
        serves: Callable[[str], bool] | None = None,
        served_by: str | None = None,
        hints: HintPolicy | None = None,
        self_preservation: SelfPreservationPolicy | None = None,
    ) -> None:
        """`forget(address, port)`: called when no target probes that endpoint any more (the checker closes what
        it keeps open for it: a gRPC channel, idle connections). `serves(namespace)`: whether this replica serves
        the namespace now (sharded mode); entries elsewhere cost no state, no probe and no write. `hints`: how the
        prober answers connection-loss hints (`Prober.hint`, which the runtime wires to the checker).
        `self_preservation`: when this replica stops trusting its own probes (`beacon.failsafe`; default on)."""
        self.self_preservation: SelfPreservation[ProbeKey] = SelfPreservation(self_preservation)
        self.kube = kube
        self._namespaces = set(namespaces)
        self._serves = serves or (lambda _namespace: True)
        self._served_by = served_by  # sharded mode: this replica's name, shown in each entry's status
        self._entries: dict[EntryKey, _EntryState] = {}
        self._names: dict[str, set[str]] = defaultdict(set)  # namespace -> names of its entries
        # selector entries by namespace and anchor label; the pods they select, and which entries select each
        self._selectors: dict[str, dict[Anchor, set[EntryKey]]] = {}
        self._pods: dict[str, dict[str, _Pod]] = {}
        self._pod_entries: dict[tuple[str, str], set[EntryKey]] = {}
        # leases are cached only in namespaces with a lease-check entry (namespace -> those entries)
        self._lease_entries: dict[str, set[EntryKey]] = {}
        self._leases: dict[str, dict[str, LeaseRecord]] = {}
        # CA bundle ConfigMaps, only those some entry's check names: namespace -> name -> data (None: not found);
        # which entries name each; its first read (awaited before they publish) and its watch
        self._ca_maps: dict[str, dict[str, dict[str, str] | None]] = {}
        self._ca_entries: dict[CaRef, set[EntryKey]] = {}
        self._ca_reads: dict[CaRef, asyncio.Task[None]] = {}
        self._ca_watches: dict[CaRef, asyncio.Task[None]] = {}
        # names that watch events touched while a listing of (kind, namespace) was under way: the events win
        self._listings: dict[tuple[str, str], list[set[str]]] = {}
        self._records: dict[str, dict[str, RegistryRecord]] = defaultdict(dict)
        self._expected: dict[str, set[str]] = defaultdict(set)
        # uids seen deleted: a resync list taken just before a deletion must not bring the entry back
        self._deleted_uids: collections.deque[str] = collections.deque(maxlen=4096)
        self._clock = wall_clock
        self._locks: dict[EntryKey, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._by_uid: dict[str, EntryKey] = {}  # an entry's uid -> its key: the owner of an output, in one lookup
        # The ServiceEntry controller owns each entry's Service, EndpointSlices and Endpoints (labelled with the
        # entry). At the leading edge: an idle entry is written at once; changes during a write join one follow-up.
        self.entries: Controller[EntryKey] = Controller(
            name="ServiceEntry",
            kube=kube,
            reconcile=self._reconcile_or_report,
            owns=[Owns(kind, LABEL_ENTRY) for kind in ("Service", "EndpointSlice", "Endpoints")],
            owner_of=self._owner_key,
            on_owned_change=self._output_changed,
            in_scope=self._in_scope,
            alive=lambda key: key in self._entries,
            # whatever was written before a failure is unknown now: re-read instead of trusting the cache
            on_error=self._forget_written,
        )
        # The Registry controller owns each namespace's registry ConfigMaps; its key is the namespace.
        self.registries: Controller[str] = Controller(
            name="Registry",
            kube=kube,
            reconcile=self.write_registry,
            owns=[Owns("ConfigMap", f"{LABEL_REGISTRY}=true")],
            owner_of=lambda _kind, meta: str(meta["namespace"]),
            in_scope=self._in_scope,
            min_interval=registry_interval_seconds,  # a namespace's whole catalog: at most one write per interval
            alive=self._in_scope,
            on_error=self._forget_registry,
        )
        self._registry_names: dict[str, set[str]] = {}
        self._lease_listings: dict[str, asyncio.Task[None]] = {}  # a namespace's first lease check: its listing
        self._registry_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.prober = Prober(
            probe=probe, on_result=self._on_result, concurrency=concurrency, forget=forget, hints=hints
        )
        managed = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        # where a new (or restarted) entry's outputs stand: its published slices, and any Service of its name
        self._slice_reads = _BatchedReads(
            read_one=lambda ns, name: kube.list(
                "EndpointSlice", ns, label_selector=f"{LABEL_SERVICE_NAME}={name},{managed}"
            ),
            read_all=lambda ns: kube.list("EndpointSlice", ns, label_selector=managed),
            owner_of=lambda item: (item["metadata"].get("labels") or {}).get(LABEL_SERVICE_NAME, ""),
            population=self._population,
        )
        self._service_reads = _BatchedReads(
            read_one=self._get_service,
            read_all=lambda ns: kube.list("Service", ns),
            owner_of=lambda item: str(item["metadata"]["name"]),
            population=self._population,
        )
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}  # (kind, namespace) -> its watch

    def _population(self, namespace: str) -> int:
        """How many entries the namespace holds, as far as known (those seen, or expected at start-up)."""
        return max(len(self._names.get(namespace, ())), len(self._expected.get(namespace, ())))

    # ------------------------------------------------------------------ inputs (called by thin kopf handlers)
    async def entry_changed(self, body: Mapping[str, Any]) -> None:
        if not self._in_scope(str((body.get("metadata") or {}).get("namespace", ""))):
            return  # another replica serves it (sharded mode)
        entry = ServiceEntry.from_body(dict(body))
        labels = dict((body.get("metadata") or {}).get("labels") or {})
        state = self._entries.get(entry.key)
        if state is not None and state.entry == entry and state.seeded and state.pods_listed:
            if labels != state.labels:  # a label-only edit: the registry's tags follow it
                state.labels = labels
                self._schedule(entry.key)
            return  # a status-only or metadata-only change (often our own status patch)
        before = state.entry if state is not None else None
        if state is None:
            state = _EntryState(entry=entry, labels=labels)
            state.status = dict(body.get("status") or {}) or None
            self._entries[entry.key] = state
            self._names[entry.namespace].add(entry.name)
        self._by_uid[entry.uid] = entry.key
        state.entry, state.labels = entry, labels
        if before is not None and before != entry:
            state.spec_changed()
        self._index(state, before)
        if not self._behind(state):
            self._refresh_endpoints(state)
        # Seeding and the listings happen in the reconcile, under the entry's lock and in its work queue: here, a
        # second event arriving while the first one's listings were under way would seed again, over the probe
        # results that came in meanwhile.
        self._schedule(entry.key)

    def _behind(self, state: _EntryState) -> bool:
        """Whether the entry must catch up (`_catch_up`) before its endpoints can be refreshed and published."""
        return (
            not state.seeded
            or not state.pods_listed
            or (state.leases_wanted and state.entry.namespace in self._lease_listings)
            or any(ref in self._ca_reads for ref in state.ca_refs)
        )

    def expect(self, keys: set[EntryKey]) -> None:
        """Entries that exist at start-up: a namespace's registry is not rewritten until each has a record, so a
        restart never publishes a registry that lacks services merely not yet seen."""
        for namespace, name in keys:
            self._expected[namespace].add(name)

    def _unprobe_endpoint(self, state: _EntryState, address: str) -> None:
        """Stop probing every check slot of one endpoint of an entry."""
        namespace, name = state.entry.key
        for slot in state.slots.pop(address, (address,)):
            self._unprobe((namespace, name, slot))

    def _unprobe(self, key: ProbeKey) -> None:
        """Stop probing an endpoint, and let the fail-safe policies forget it."""
        self.prober.remove(key)
        self.self_preservation.forget(key)
        state = self._entries.get(key[:2])
        if state is not None and state.damper is not None:
            state.damper.forget(key)

    async def entry_deleted(self, namespace: str, name: str) -> None:
        self._expected[namespace].discard(name)
        state = self._entries.pop((namespace, name), None)
        if state is not None:
            self._names[namespace].discard(name)
            self._deleted_uids.append(state.entry.uid)
            self._by_uid.pop(state.entry.uid, None)
            self._unindex(state)
            for ep in state.endpoints:
                self._unprobe_endpoint(state, ep.address)
            metrics.TARGETS.set(len(self.prober))
        self.kube.forget_namespace_entry(namespace, name)
        self._records[namespace].pop(name, None)
        self.entries.cancel((namespace, name))
        self._drop_lock(self._locks, (namespace, name))
        self.registries.enqueue(namespace)

    @staticmethod
    def _drop_lock(locks: dict[Any, asyncio.Lock], key: Any) -> None:
        """Forget a gone key's lock (unless a holder is still finishing: it drops it when done)."""
        lock = locks.get(key)
        if lock is not None and not lock.locked():
            del locks[key]

    def pod_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        pod = pod_from_body(body)
        for touched in self._listings.get(("Pod", namespace), ()):
            touched.add(pod.name)
        self._refresh(self._apply_pod(namespace, pod, deleted=deleted))

    def lease_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        name = body["metadata"]["name"]
        for touched in self._listings.get(("Lease", namespace), ()):
            touched.add(name)
        self._apply_lease(namespace, name, body, deleted=deleted)

    def lease_lookup(self, namespace: str, name: str) -> LeaseRecord | None:
        return self._leases.get(namespace, {}).get(name)

    def ca_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A watch event of a CA bundle's ConfigMap."""
        name = body["metadata"]["name"]
        for touched in self._listings.get(("ConfigMap", namespace), ()):
            touched.add(name)
        self._apply_ca(namespace, name, None if deleted else body)

    def _apply_ca(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        """Cache a CA bundle's ConfigMap (None: it does not exist); when its data changed, re-target the entries
        that name it (their endpoints' targets are rebuilt; equal ones keep their schedule)."""
        entries = self._ca_entries.get((namespace, name))
        if not entries:
            return
        data = None if body is None else {str(k): str(v) for k, v in (body.get("data") or {}).items()}
        cached = self._ca_maps.setdefault(namespace, {})
        if name in cached and cached[name] == data:
            return  # a metadata-only change, or what a resync read again
        cached[name] = data
        for key in entries:
            state = self._entries.get(key)
            if state is not None:
                state.probed = {}  # every endpoint's target is built again, with the bundle as it is now
        self._refresh(set(entries))

    # ------------------------------------------------------------------ indexes and filtered caches
    def _selecting(self, namespace: str, labels: Mapping[str, str]) -> set[EntryKey]:
        """The selector entries that select a pod with `labels`: only those indexed under one of its labels."""
        index = self._selectors.get(namespace)
        if not index:
            return set()
        found = set(index.get(None, ()))
        for pair in labels.items():
            for key in index.get(pair, ()):
                selector = self._entries[key].entry.spec.selector
                if selector is not None and _selects(selector.match_labels, labels):
                    found.add(key)
        return found

    def _refresh(self, keys: set[EntryKey]) -> None:
        """Mark the entries' endpoints stale and schedule them: the reconcile refreshes them (at once when the
        entry is idle), so a burst of pod events costs one refresh per write, not one per event."""
        for key in keys:
            state = self._entries.get(key)
            # an entry whose pods are being listed is refreshed (and scheduled) once the listing is in
            if state is not None and state.pods_listed:
                state.stale = True
                self._schedule(key)

    def _apply_pod(self, namespace: str, pod: _Pod, *, deleted: bool) -> set[EntryKey]:
        """Cache `pod` only while some entry selects it; returns exactly the entries it joins, leaves or changes
        (to be refreshed). A pod no entry selects (before or now) costs a lookup in the index and nothing else."""
        key = (namespace, pod.name)
        before = self._pod_entries.get(key, set())
        now = set() if deleted else self._selecting(namespace, pod.labels)
        if not before and not now:
            return set()
        cached = self._pods.get(namespace, {})
        old = cached.get(pod.name)
        if now:
            if old != pod:  # an equal pod keeps its object: the endpoint built from it stays valid
                self._pods.setdefault(namespace, {})[pod.name] = pod
            self._pod_entries[key] = now
        else:
            cached.pop(pod.name, None)
            if not cached:
                self._pods.pop(namespace, None)
            self._pod_entries.pop(key, None)
        changed: set[EntryKey] = set()
        for entry_key in before | now:
            state = self._entries.get(entry_key)
            if state is None:
                continue
            if entry_key in now:
                if entry_key in before and old == pod:
                    continue  # nothing this entry publishes changed
                state.members.add(pod.name)
            else:
                state.members.discard(pod.name)
            changed.add(entry_key)
        return changed

    def _apply_lease(self, namespace: str, name: str, body: Mapping[str, Any], *, deleted: bool) -> None:
        if deleted or not self._lease_entries.get(namespace):
            cached = self._leases.get(namespace)
            if cached is not None:
                cached.pop(name, None)
            return
        spec = body.get("spec") or {}
        duration = spec.get("leaseDurationSeconds")
        self._leases.setdefault(namespace, {})[name] = LeaseRecord(
            renew_time=parse_micro_time(spec.get("renewTime") or spec.get("acquireTime")),
            duration=float(duration) if duration is not None else None,
        )

    def _index(self, state: _EntryState, before: ServiceEntry | None) -> None:
        """Keep the selector index and the lease namespaces in step with the entry's spec; a new or changed
        selector (or the namespace's first lease check) needs a listing, done by `_catch_up`."""
        entry, key = state.entry, state.entry.key
        old_selector = before.spec.selector if before is not None else None
        if entry.spec.selector != old_selector:
            if before is not None and old_selector is not None:
                self._drop_selector(state, before)
            if entry.spec.selector is not None:
                self._selectors.setdefault(entry.namespace, {}).setdefault(_anchor(entry), set()).add(key)
                state.pods_listed = False
        wants = _wants_leases(entry)
        if wants and not state.leases_wanted:
            entries = self._lease_entries.setdefault(entry.namespace, set())
            if not entries:
                self._leases[entry.namespace] = {}
                self._schedule_lease_listing(entry.namespace)
            entries.add(key)
        elif not wants and state.leases_wanted:
            self._drop_lease_entry(key)
        state.leases_wanted = wants
        ca_refs = frozenset((entry.namespace, name) for name in entry.ca_bundles)
        for ref in state.ca_refs - ca_refs:
            self._drop_ca_entry(key, ref)
        for ref in ca_refs - state.ca_refs:
            self._add_ca_entry(key, ref)
        state.ca_refs = ca_refs
        self._sync_watches(entry.namespace)

    def _unindex(self, state: _EntryState) -> None:
        if state.entry.spec.selector is not None:
            self._drop_selector(state, state.entry)
        if state.leases_wanted:
            self._drop_lease_entry(state.entry.key)
            state.leases_wanted = False
        for ref in state.ca_refs:
            self._drop_ca_entry(state.entry.key, ref)
        state.ca_refs = frozenset()
        self._sync_watches(state.entry.namespace)

    def _add_ca_entry(self, key: EntryKey, ref: CaRef) -> None:
        """`key`'s check names the CA bundle ConfigMap `ref`: the first such entry starts its read and watch."""
        entries = self._ca_entries.setdefault(ref, set())
        if not entries:
            namespace, name = ref
            self._ca_watches[ref] = asyncio.ensure_future(self._follow_ca(namespace, name))
            task = asyncio.ensure_future(self._read_ca(ref))
            self._ca_reads[ref] = task

            def done(_: asyncio.Task[None]) -> None:
                if self._ca_reads.get(ref) is task:
                    del self._ca_reads[ref]

            task.add_done_callback(done)
        entries.add(key)

    def _drop_ca_entry(self, key: EntryKey, ref: CaRef) -> None:
        """The last entry that names `ref` stops its watch and forgets its data."""
        entries = self._ca_entries.get(ref, set())
        entries.discard(key)
        if entries:
            return
        self._ca_entries.pop(ref, None)
        for tasks in (self._ca_watches, self._ca_reads):
            task = tasks.pop(ref, None)
            if task is not None:
                task.cancel()
        namespace, name = ref
        cached = self._ca_maps.get(namespace, {})
        cached.pop(name, None)
        if not cached:
            self._ca_maps.pop(namespace, None)

    async def _follow_ca(self, namespace: str, name: str) -> None:
        async for type_, body in self.kube.watch("ConfigMap", namespace, field_selector=f"metadata.name={name}"):
            self.ca_changed(namespace, body, deleted=type_ == "DELETED")

    async def _read_ca(self, ref: CaRef) -> None:
        """Read a CA bundle's ConfigMap (unless a watch event brings it meanwhile: the event is at least as new).
        A failed read leaves it unknown ("not found" to the probes) until the watch or the resync brings it."""
        namespace, name = ref
        touched: set[str] = set()
        self._listings.setdefault(("ConfigMap", namespace), []).append(touched)
        try:
            body = await self.kube.get("ConfigMap", namespace, name)
        except Exception as exc:
            log.warning("cannot read the CA bundle ConfigMap %s/%s yet: %s", namespace, name, exc)
            return
        finally:
            listings = self._listings[("ConfigMap", namespace)]
            listings.remove(touched)
            if not listings:
                del self._listings[("ConfigMap", namespace)]
        if name not in touched:
            self._apply_ca(namespace, name, body)

    def _drop_selector(self, state: _EntryState, entry: ServiceEntry) -> None:
        """Take `entry`'s (old) selector out of the index, and uncache the pods no other entry selects."""
        key, namespace = state.entry.key, entry.namespace
        index = self._selectors.get(namespace, {})
        anchor = _anchor(entry)
        index.get(anchor, set()).discard(key)
        if not index.get(anchor, True):
            index.pop(anchor, None)
        if not index:
            self._selectors.pop(namespace, None)
        members = state.members
        for name in list(members):
            selected_by = self._pod_entries.get((namespace, name), set())
            selected_by.discard(key)
            if not selected_by:
                self._pod_entries.pop((namespace, name), None)
                cached = self._pods.get(namespace, {})
                cached.pop(name, None)
                if not cached:
                    self._pods.pop(namespace, None)
        members.clear()

    def _drop_lease_entry(self, key: EntryKey) -> None:
        entries = self._lease_entries.get(key[0], set())
        entries.discard(key)
        if not entries:
            self._lease_entries.pop(key[0], None)
            self._leases.pop(key[0], None)

    def _sync_watches(self, namespace: str) -> None:
        """Watch the namespace's pods while a selector entry is in it, its leases while a lease check is."""
        wanted: list[tuple[str, bool, Callable[..., None]]] = [
            ("Pod", namespace in self._selectors, self.pod_changed),
            ("Lease", bool(self._lease_entries.get(namespace)), self.lease_changed),
        ]
        for kind, want, apply in wanted:
            task = self._watches.get((kind, namespace))
            if want and task is None:
                self._watches[(kind, namespace)] = asyncio.ensure_future(self._follow(kind, namespace, apply))
            elif not want and task is not None:
                del self._watches[(kind, namespace)]
                task.cancel()

    def watch_outputs(self) -> None:
        """Repair what beacon owns: each controller watches the kinds it owns (`beacon.engine`). Called once this
        replica is the active one."""
        self.entries.watch_owned()
        self.registries.watch_owned()

    def _in_scope(self, namespace: str) -> bool:
        return (not self._namespaces or namespace in self._namespaces) and self._serves(namespace)

    def held_namespaces(self) -> set[str]:
        return {namespace for namespace, names in self._names.items() if names}

    async def release(self, keep: Callable[[str], bool]) -> set[str]:
        """Let go of every namespace `keep` rejects (sharded mode: another replica serves it from now on): stop
        probing its entries, forget their state, and wait until no reconcile or registry write of them is still
        under way. Nothing is written or deleted: the outputs stay as published, for the next owner to seed from.
        Returns the namespaces released."""
        tables = (self._names, self._records, self._expected, self._registry_names)
        gone = {namespace for table in tables for namespace in table if not keep(namespace)}
        keys = [(namespace, name) for namespace in gone for name in list(self._names.get(namespace, ()))]
        held = {namespace for namespace in gone if self._names.get(namespace) or self._records.get(namespace)}
        for namespace, name in keys:
            state = self._entries.pop((namespace, name), None)
            if state is not None:
                self._names[namespace].discard(name)
                self._by_uid.pop(state.entry.uid, None)
                self._unindex(state)
                for ep in state.endpoints:
                    self._unprobe_endpoint(state, ep.address)
            self.kube.forget_namespace_entry(namespace, name)
        metrics.TARGETS.set(len(self.prober))
        for key in keys:  # a reconcile under way finishes its request; the next one finds no state and stops
            lock = self._locks.get(key)
            if lock is not None:
                async with lock:
                    pass
            self._drop_lock(self._locks, key)
        for namespace in gone:
            lock = self._registry_locks.get(namespace)
            if lock is not None:
                async with lock:
                    pass
            for table in tables:
                table.pop(namespace, None)
            self._drop_lock(self._registry_locks, namespace)
        return held

    def _owner_key(self, _kind: str, meta: Mapping[str, Any]) -> EntryKey | None:
        """The entry an output belongs to: by its ownerReference (labels may be what someone edited)."""
        for uid in owner_uids(meta):
            key = self._by_uid.get(uid)
            state = self._entries.get(key) if key is not None else None
            if state is not None and state.entry.uid == uid:
                return key
        return None

    def _output_changed(self, kind: str, key: EntryKey, _meta: Mapping[str, Any]) -> None:
        state = self._entries.get(key)
        if state is not None and kind == "EndpointSlice":
            state.slices = None  # read them again: what stands there now is not what was written

    async def _follow(self, kind: str, namespace: str, apply: Callable[..., None]) -> None:
        async for type_, body in self.kube.watch(kind, namespace):
            apply(namespace, body, deleted=type_ == "DELETED")

    def _schedule_lease_listing(self, namespace: str) -> None:
        task = asyncio.ensure_future(self._list_leases(namespace))
        self._lease_listings[namespace] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._lease_listings.get(namespace) is task:
                del self._lease_listings[namespace]

        task.add_done_callback(done)

    async def _list_leases(self, namespace: str) -> None:
        """The namespace's first lease check: cache its leases (kept current by the watch from now on). A
        failure is repaired by the next resync; until then the lease check reads "not found", never a stale
        "valid"."""
        try:
            await self._listed("Lease", namespace, None, apply=self._apply_listed_lease)
        except Exception as exc:
            log.warning("cannot list the leases of namespace %s yet: %s", namespace, exc)

    def _apply_listed_lease(self, namespace: str, item: Mapping[str, Any]) -> set[EntryKey]:
        self._apply_lease(namespace, item["metadata"]["name"], item, deleted=False)
        return set()

    def _apply_listed_pod(self, namespace: str, item: Mapping[str, Any]) -> set[EntryKey]:
        return self._apply_pod(namespace, pod_from_body(item), deleted=False)

    async def _listed(
        self,
        kind: str,
        namespace: str,
        label_selector: str | None,
        *,
        apply: Callable[[str, Mapping[str, Any]], set[EntryKey]],
    ) -> tuple[set[str], set[EntryKey]]:
        """List `kind` in `namespace` and apply each item as if it were a watch event, except the items that
        watch events touched meanwhile (those events are at least as new). Returns the names listed (and
        touched), and the entries to refresh: once per listing, not once per item."""
        touched: set[str] = set()
        self._listings.setdefault((kind, namespace), []).append(touched)
        try:
            items = await self.kube.list(kind, namespace, label_selector=label_selector)
        finally:
            listings = self._listings[(kind, namespace)]
            listings.remove(touched)
            if not listings:
                del self._listings[(kind, namespace)]
        changed: set[EntryKey] = set()
        for item in items:
            if item["metadata"]["name"] not in touched:
                changed |= apply(namespace, item)
        return {item["metadata"]["name"] for item in items} | touched, changed

    async def _catch_up(self, state: _EntryState) -> None:
        """Read what the entry needs before it is published: its EndpointSlices (restart safety), the pods its
        selector matches and the leases of its namespace (not cached while no entry needed them)."""
        listing = self._lease_listings.get(state.entry.namespace) if state.leases_wanted else None
        if listing is not None:
            await asyncio.shield(listing)  # never fails: a failed listing is repaired by the resync
        ca_reads = [read for ref in state.ca_refs if (read := self._ca_reads.get(ref)) is not None]
        if ca_reads:  # never fail (a failed read is repaired by the watch or the resync); a cancelled one (the
            await asyncio.wait(ca_reads)  # last entry naming it went) leaves nothing to wait for
        if not state.seeded:
            await self._seed(state)
        selector = state.entry.spec.selector
        if not state.pods_listed and selector is not None:
            label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.match_labels.items())) or None
            _, changed = await self._listed("Pod", state.entry.namespace, label_selector, apply=self._apply_listed_pod)
            self._refresh(changed - {state.entry.key})  # the entry itself is refreshed by the caller
        state.pods_listed = True

    # ------------------------------------------------------------------ periodic resync
    async def resync(self) -> None:
        """Compare memory with the API (reads only) and repair what watch events missed.

        A watch that ends in 410 Gone is restarted by kopf with a fresh list, which reports the objects that exist
        but not the ones deleted during the gap. Informers solve this with a periodic resync; so does beacon:
        entries and pods that are gone are dropped, entries never seen are added. Steady state stays at zero
        writes: a resync that finds nothing changed writes nothing.
        """
        listed = await self.kube.request("GET", "/apis/beacon.dev/v1alpha1/serviceentries")
        if listed is None:
            return
        present = {
            (i["metadata"]["namespace"], i["metadata"]["name"]): i
            for i in listed.get("items", [])
            if not self._namespaces or i["metadata"]["namespace"] in self._namespaces
        }
        for key, state in list(self._entries.items()):
            body = present.get(key)
            if body is None or body["metadata"]["uid"] != state.entry.uid:
                log.info("resync: %s/%s is gone", *key)
                await self.entry_deleted(*key)
        for key, body in present.items():
            if key not in self._entries and body["metadata"]["uid"] not in self._deleted_uids:
                log.info("resync: %s/%s was not seen yet", *key)
                await self.entry_changed(body)
        for namespace in sorted(self._selectors):
            names, changed = await self._listed("Pod", namespace, None, apply=self._apply_listed_pod)
            for name, pod in list(self._pods.get(namespace, {}).items()):
                if name not in names:
                    changed |= self._apply_pod(namespace, pod, deleted=True)
            self._refresh(changed)
        for namespace in sorted(self._lease_entries):
            names, _ = await self._listed("Lease", namespace, None, apply=self._apply_listed_lease)
            for name in [n for n in self._leases.get(namespace, {}) if n not in names]:
                self._apply_lease(namespace, name, {}, deleted=True)
        for ref in sorted(self._ca_entries):
            await self._read_ca(ref)

    async def resync_forever(self, *, every: float) -> None:
        await repeat(every=every, action=self.resync, what="resync")

    # ------------------------------------------------------------------ endpoints and seeding
    def _endpoints_of(self, state: _EntryState) -> list[Endpoint]:
        entry = state.entry
        if state.static is None:
            state.static = entry.static_endpoints()
        endpoints = {e.address: e for e in state.static}
        if entry.spec.selector is not None:
            default_ports = {p.name: p.port for p in entry.spec.ports}
            cached = self._pods.get(entry.namespace, {})
            built = state.pod_endpoints
            for name in [n for n in built if n not in state.members]:
                del built[name]
            for name in sorted(state.members):
                pod = cached.get(name)
                if pod is None or not pod.ip:
                    continue
                hit = built.get(name)
                if hit is None or hit[0] is not pod:
                    endpoint = Endpoint(
                        address=pod.ip,
                        ports=default_ports,
                        pod=pod.name,
                        node=pod.node,
                        terminating=pod.terminating,
                        draining=pod.draining,
                        labels={},
                    )
                    hit = built[name] = (pod, endpoint)
                endpoints.setdefault(pod.ip, hit[1])
        return list(endpoints.values())

    async def _observe_slices(self, state: _EntryState) -> dict[str, dict[str, Any]]:
        """List the entry's EndpointSlices: where each endpoint is published now."""
        items = await self._slice_reads.of(*state.entry.key)
        state.slices = {item["metadata"]["name"]: item for item in items}
        return state.slices

    async def _get_service(self, namespace: str, name: str) -> Items:
        found = await self.kube.get("Service", namespace, name)
        return [] if found is None else [found]

    def _forget_written(self, key: EntryKey, _exc: Exception) -> None:
        """After a failed reconcile, whatever was written is unknown: re-read instead of trusting memory."""
        self.kube.forget_namespace_entry(*key)
        state = self._entries.get(key)
        if state is not None:
            state.slices = None
            state.transitions[:0], state.in_flight = state.in_flight, []  # not published: the retry announces them

    async def _seed(self, state: _EntryState) -> None:
        """Restore last published readiness from the entry's EndpointSlices (restart safety)."""
        now = self._clock()
        slices = await self._observe_slices(state)
        entry = state.entry
        own = entry.own_checks
        gated = [p.name for p in entry.spec.ports if p.health_check is None]
        for item in slices.values():
            # with per-port checks an endpoint is published under the ports it is healthy on: a port's check was
            # passing when its port is in the endpoint's slice and the endpoint serves
            names = {str(port.get("name")) for port in item.get("ports") or []}
            for ep in item.get("endpoints") or []:
                conditions = ep.get("conditions") or {}
                ready = bool(conditions.get("serving", conditions.get("ready")))
                for address in ep.get("addresses") or []:
                    slots = {address: ready and (not own or any(p in names for p in gated))}
                    slots |= {slot_key(address, p): ready and p in names for p in own}
                    for slot, passing in slots.items():
                        if slot not in state.health:  # a probe's verdict is always fresher than what was published
                            state.health[slot] = seeded(ready=passing, now=now)
        state.seeded = True
        state.published = state.published or bool(slices)

    def _refresh_endpoints(self, state: _EntryState) -> None:
        entry = state.entry
        state.stale = False
        new = self._endpoints_of(state)
        old_addresses = {e.address for e in state.endpoints}
        new_addresses = {e.address for e in new}
        for gone in old_addresses - new_addresses:
            for slot in state.slots.get(gone, (gone,)):
                state.health.pop(slot, None)
                state.refused.pop(slot, None)
            self._unprobe_endpoint(state, gone)
        state.endpoints = new
        now = self._clock()
        probed, state.probed = state.probed, {}
        ca_bundles = self._ca_maps.get(entry.namespace) if state.ca_refs else None
        for ep in new:
            state.probed[ep.address] = ep
            if probed.get(ep.address) is ep:
                continue  # the same endpoint as at the last refresh: its health and target are in place
            targets = {
                slot_key(ep.address, port): target for port, target in entry.targets(ep, ca_bundles=ca_bundles).items()
            }
            for slot in state.slots.get(ep.address, ()):
                if slot not in targets:  # a check the spec dropped
                    self._unprobe((entry.namespace, entry.name, slot))
                    state.health.pop(slot, None)
                    state.refused.pop(slot, None)
            if not targets:  # nothing probed: the entry-level slot still carries the endpoint's (unchecked) health
                self._unprobe((entry.namespace, entry.name, ep.address))
                state.health.setdefault(ep.address, EndpointHealth(since=now))
            state.slots[ep.address] = tuple(targets) or (ep.address,)
            for slot, target in targets.items():
                fresh = slot not in state.health
                state.health.setdefault(slot, EndpointHealth(since=now))
                self.prober.upsert((entry.namespace, entry.name, slot), target)
                if fresh and not state.published:
                    if not state.unprobed:
                        state.first_deadline = time.monotonic() + FIRST_VERDICT_WAIT + target.timeout
                    state.unprobed.add(slot)
        for slot in list(state.health):
            if slot_address(slot) not in new_addresses:
                state.health.pop(slot, None)
        metrics.TARGETS.set(len(self.prober))

    # ------------------------------------------------------------------ probe results
    def _on_result(self, key: Any, target: Target, result: ProbeResult) -> None:
        namespace, name, address = key
        metrics.record_probe(target.check, ok=result.ok, seconds=result.seconds)
        state = self._entries.get((namespace, name))
        if state is None or not state.entry.probed:
            return
        hc = state.entry.health_check
        if not result.refused:  # the raw result, before any threshold: the mode must start ahead of the crossings
            sp = self.self_preservation
            now = self._clock()
            kind = check_kind(target.check)
            confirmed = sp.observe(
                key, ok=result.ok, kind=kind, now=now, started=now - result.seconds, threshold=hc.unhealthy_threshold
            )
            if confirmed:  # an endpoint held ready failed enough probes after the mode ended: withdraw it now
                self._schedule(state.entry.key)
            if sp.pending_changes:
                self._mode_changed(now)
        if address in state.unprobed:  # a first verdict before the first write: the write waits for the last one
            state.unprobed.discard(address)
            if not state.unprobed:
                self._schedule(state.entry.key)
        before = state.health.get(address)
        if (  # the result changes nothing: no bookkeeping (the common case by far)
            before is not None
            and not result.refused
            and settled(before, ok=result.ok, detail=result.detail)
            and address not in state.refused
            and (result.ok or address in state.deregistered or not hc.deregister_after_seconds)
        ):
            return
        dirty = False
        if result.refused:
            if state.refused.get(address) != result.detail:
                state.refused[address] = result.detail
                dirty = True
        elif state.refused.pop(address, None) is not None:
            dirty = True
        now = self._clock()
        before = state.health.get(address, EndpointHealth(since=now))
        thresholds = hc.thresholds
        after, changed = observe(
            before, ok=result.ok, detail=result.detail, now=now, thresholds=thresholds, latency=result.seconds
        )
        state.health[address] = after
        if changed:
            metrics.TRANSITIONS.labels(to=after.status.value).inc()
            if after.status is Status.CRITICAL:
                metrics.DETECTIONS.labels(trigger=result.trigger).inc()
            state.transitions.append((address, before, after, result.trigger))
            dirty = True
        gone = after.deregistered(now=now, thresholds=thresholds)
        if gone != (address in state.deregistered):
            (state.deregistered.add if gone else state.deregistered.discard)(address)
            dirty = True
        if dirty:
            self._schedule(state.entry.key)

    async def _post_transitions(self, state: _EntryState, pending: list[Transition]) -> None:
        """One Event per direction per reconcile, naming every endpoint that moved (with the probe's detail):
        a burst of transitions (a new entry, a rack going down) costs one or two writes, not one per endpoint.
        A new endpoint passing its first checks (unknown -> passing) is logged but is not news worth an Event
        (Kubernetes posts none when a Pod becomes Ready): 1,000 new entries do not cost 1,000 Events."""
        entry = state.entry
        for healthy in (False, True):
            moved = [t for t in pending if (t[2].status is Status.PASSING) is healthy]
            if not moved:
                continue
            parts = [
                f"endpoint {slot_label(a)}: {b.status.value} -> {c.status.value} ({c.detail}){TRIGGER_PHRASES[trigger]}"
                for a, b, c, trigger in moved[:10]
            ]
            if len(moved) > 10:
                parts.append(f"and {len(moved) - 10} more")
            # transitions are what an operator's log is for (one line per direction per reconcile, like the Event)
            log.info(
                "%s/%s: %s",
                entry.namespace,
                entry.name,
                "; ".join(parts),
                extra=fields(
                    logfields.TRANSITION,
                    namespace=entry.namespace,
                    entry=entry.name,
                    endpoint=list(dict.fromkeys(slot_address(a) for a, _, _, _ in moved)),
                    to=moved[0][2].status.value,
                ),
            )
            if healthy and all(before.status is Status.UNKNOWN for _, before, _, _ in moved):
                continue
            await self._event(
                state,
                type_="Normal" if healthy else "Warning",
                reason="EndpointHealthy" if healthy else "EndpointUnhealthy",
                message="; ".join(parts),
            )

    async def _event(self, state: _EntryState, *, type_: str, reason: str, message: str) -> None:
        """One Event on the entry: best effort, never worth a retry storm."""
        entry = state.entry
        involved = {
            "apiVersion": "beacon.dev/v1alpha1",
            "kind": "ServiceEntry",
            "metadata": {"name": entry.name, "namespace": entry.namespace, "uid": entry.uid},
        }
        try:
            await self.kube.event(
                involved=involved, type_=type_, reason=reason, message=message, now_iso=_iso(self._clock())
            )
        except Exception as exc:
            log.warning(
                "cannot post event for %s/%s: %s",
                entry.namespace,
                entry.name,
                exc,
                extra=fields(logfields.ERROR, namespace=entry.namespace, entry=entry.name),
            )

    # ------------------------------------------------------------------ scheduling
    def _schedule(self, key: EntryKey) -> None:
        self.entries.enqueue(key)

    async def _reconcile_or_report(self, key: EntryKey) -> None:
        try:
            await self.reconcile(key)
        except NotOursError as exc:  # not retried: the entry reports the conflict until someone resolves it
            metrics.RECONCILES.labels(kind="ServiceEntry", outcome="conflict").inc()
            self._forget_written(key, exc)
            state = self._entries.get(key)
            if state is not None:  # nothing was published: these transitions are nobody's news
                state.transitions.clear()
            await self._report_conflict(key, str(exc))

    # ------------------------------------------------------------------ reconcile
    async def reconcile(self, key: EntryKey) -> None:
        try:
            await self._reconcile(key)
        finally:
            if key not in self._entries:  # deleted meanwhile: its lock goes with it
                self._drop_lock(self._locks, key)

    async def _reconcile(self, key: EntryKey) -> None:
        async with self._locks[key]:
            state = self._entries.get(key)
            if state is None:
                return
            if self._behind(state):
                # never publish before knowing what was published (restart safety), nor without the entry's pods
                await self._catch_up(state)
                self._refresh_endpoints(state)
            elif state.stale:
                self._refresh_endpoints(state)
            entry = state.entry
            if not state.published and state.unprobed and self._await_first_verdicts(state):
                return
            now = self._clock()
            observed = state.slices if state.slices is not None else await self._observe_slices(state)
            views = visible(
                entry, state.endpoints, state.health, state.refused, now=now, guard=self._guard(state, observed)
            )
            state.in_flight += state.transitions  # what these views publish
            state.transitions = []
            written: list[str] = []  # what this reconcile writes, for its log line
            tags = dict(state.labels)
            record = registry_record(entry, views, tags=tags)
            if self._records[entry.namespace].get(entry.name) != record:
                self._records[entry.namespace][entry.name] = record
                self._schedule_registry(entry.namespace)
            service = desired_service(entry)
            if self.kube.cached(service):
                wrote = await self.kube.ensure(service)
            else:  # not written by this process yet: what stands there is read in a batch with other entries'
                wrote = await self.kube.ensure(service, observed=next(iter(await self._service_reads.of(*key)), None))
            written += [f"Service {entry.name}"] if wrote else []
            slices = desired_slices(entry, views, observed)
            for item in slices:
                if await self.kube.ensure(item, absent=item["metadata"]["name"] not in observed):
                    written.append(f"EndpointSlice {item['metadata']['name']}")
            wanted = {item["metadata"]["name"]: item for item in slices}
            for stale in sorted(set(observed) - set(wanted)):
                if await self.kube.delete("EndpointSlice", entry.namespace, stale):
                    written.append(f"EndpointSlice {stale} (deleted)")
            state.slices = wanted
            # an entry never published (no slices when it was seeded) has no Endpoints object either
            if await self.kube.ensure(desired_endpoints(entry, views), absent=not state.published):
                written.append(f"Endpoints {entry.name}")
            previous = state.status or {}
            status = desired_status(
                entry,
                views,
                previous_conditions=previous.get("conditions") or [],
                previous_endpoints=previous.get("endpoints") or [],
                now=now,
                served_by=self._served_by,
            )
            if status_changed(state.status, status):
                await self.kube.patch_status("ServiceEntry", entry.namespace, entry.name, status)
                state.status = status
                written.append("status")
            state.published = True
            state.unprobed.clear()
            pending, state.in_flight = state.in_flight, []
            draining = {v.endpoint.address for v in views if v.endpoint.draining}
            if written:
                moved = sorted({slot_address(a) for a, _, _, _ in pending} | (draining ^ state.draining))
                log.debug(
                    "%s/%s: wrote %s",
                    entry.namespace,
                    entry.name,
                    ", ".join(written),
                    extra=fields(
                        logfields.WRITE, namespace=entry.namespace, entry=entry.name, endpoint=moved, objects=written
                    ),
                )
            self._log_drains(state, draining)
            # the news of a held or suppressed endpoint is the policy's (told below), and one that recovers while
            # held never left: neither is an endpoint transition worth an Event
            overridden = {v.endpoint.address for v in views if v.verdict in (Reason.HELD, Reason.FLAPPING)}
            pending = [t for t in pending if slot_address(t[0]) not in overridden | state.held]
            if pending:
                await self._post_transitions(state, pending)
            await self._failsafe_published(state, views, now)

    def _guard(self, state: _EntryState, observed: Mapping[str, Mapping[str, Any]]) -> Guard:
        """What the fail-safe policies need for one reconcile: what the entry's slices publish now, the
        operator's self-preservation, and the entry's damper (made, or remade, when its policy changes)."""
        policy = damping_policy(state.entry)
        if policy is None:
            state.damper = None
        elif state.damper is None or state.damper.policy != policy:
            state.damper = FlapDamper(policy)
        published = {
            str(ep["addresses"][0]): bool((ep.get("conditions") or {}).get("ready"))
            for item in observed.values()
            for ep in item.get("endpoints") or []
            if ep.get("addresses")
        }
        entry = state.entry
        check = entry.health_check.kind
        own = entry.own_checks
        if own and (check is None or len(own) == len(entry.spec.ports)):  # the ports' own checks decide
            port = next(p for p in entry.spec.ports if p.name == own[0])
            assert port.health_check is not None
            check = port.health_check.kind
        return Guard(published=published, check=check, self_preservation=self.self_preservation, damper=state.damper)

    async def _failsafe_published(self, state: _EntryState, views: list[View], now: float) -> None:
        """After a publish: the policies' news (an Event when the entry starts or stops holding endpoints, or
        enters or leaves panic) and their timers (a suppressed endpoint's entry is re-queued when its penalty
        will have decayed)."""
        entry = state.entry
        held = [v.endpoint.address for v in views if v.verdict is Reason.HELD]
        flapping = [v.endpoint.address for v in views if v.verdict is Reason.FLAPPING]
        panic = [v.endpoint.address for v in views if v.verdict is Reason.PANIC]
        if bool(held) != bool(state.held):
            if held:
                await self._event(
                    state,
                    type_="Warning",
                    reason="HeldBySelfPreservation",
                    message=f"{len(held)} failing endpoints held ready: most of the operator's probes fail at "
                    f"once, more likely its own network than the backends ({', '.join(held[:5])}"
                    f"{' and more' if len(held) > 5 else ''})",
                )
            else:
                await self._event(
                    state,
                    type_="Normal",
                    reason="SelfPreservationEnded",
                    message="no endpoint is held by self-preservation any more",
                )
        if bool(panic) != state.panic:
            metrics.PANIC_CHANGES.labels(to="on" if panic else "off").inc()
            healthy = sum(1 for v in views if v.ready) - len(panic)
            hc = entry.spec.health_check
            floor = hc.min_healthy_percent if hc is not None else None
            log.warning(
                "%s/%s: %s",
                entry.namespace,
                entry.name,
                f"panic: {healthy} of {len(views)} endpoints healthy, below the floor of {floor}%; publishing all"
                if panic
                else f"out of panic: {healthy} of {len(views)} endpoints healthy",
                extra=fields(logfields.TRANSITION, namespace=entry.namespace, entry=entry.name),
            )
            await self._event(
                state,
                type_="Warning" if panic else "Normal",
                reason="Panic" if panic else "PanicEnded",
                message=f"{healthy} of {len(views)} endpoints healthy, below the floor of {floor}%: every endpoint "
                "is published ready"
                if panic
                else f"{healthy} of {len(views)} endpoints healthy: only the healthy ones are published again",
            )
        state.held, state.flapping, state.panic = set(held), len(flapping), bool(panic)
        if state.release_timer is not None:
            state.release_timer.cancel()
            state.release_timer = None
        damper = state.damper
        if damper is not None and flapping:
            due = [t for a in flapping if (t := damper.release_at(probe_key(entry, a))) is not None]
            if due:
                key = entry.key

                def release() -> None:
                    state.release_timer = None
                    if self._entries.get(key) is state:
                        self._schedule(key)

                delay = max(0.0, min(due) - now) + 0.05  # just past the decay, so the penalty is at reuse
                state.release_timer = asyncio.get_running_loop().call_later(delay, release)

    def _mode_changed(self, now: float) -> None:
        """Self-preservation started or ended: one WARNING line each, a metric; on exit, re-queue the entries
        that hold endpoints (their status clears; the held endpoints stay until probes after now confirm them)."""
        for change in self.self_preservation.take_changes():
            log.warning("%s", change.describe())
            metrics.SELF_PRESERVATION.set(1 if change.entered else 0)
            metrics.SELF_PRESERVATION_CHANGES.labels(to="on" if change.entered else "off").inc()
            if not change.entered:
                for key, state in self._entries.items():
                    if state.held:
                        self._schedule(key)

    def tick(self) -> None:
        """Once a second (the runtime's gauge loop): re-judge the mode as time passes, and set the gauges."""
        now = self._clock()
        mode = self.self_preservation.state(now)
        if self.self_preservation.pending_changes:
            self._mode_changed(now)
        metrics.SELF_PRESERVATION.set(1 if mode.active else 0)
        metrics.SELF_PRESERVATION_FAILING.set(mode.share)
        states = self._entries.values()
        metrics.ENDPOINTS_HELD.set(sum(len(s.held) for s in states))
        metrics.ENDPOINTS_FLAPPING.set(sum(s.flapping for s in states))
        metrics.ENTRIES_IN_PANIC.set(sum(1 for s in states if s.panic))

    def _log_drains(self, state: _EntryState, draining: set[str]) -> None:
        """One line per direction when endpoints were published drained, or undrained, by this reconcile."""
        entry = state.entry
        for what, addresses in (("draining", draining - state.draining), ("undrained", state.draining - draining)):
            if addresses:
                log.info(
                    "%s/%s: endpoint %s: %s",
                    entry.namespace,
                    entry.name,
                    ", ".join(sorted(addresses)),
                    what,
                    extra=fields(
                        logfields.DRAIN,
                        namespace=entry.namespace,
                        entry=entry.name,
                        endpoint=sorted(addresses),
                        draining=what == "draining",
                    ),
                )
        state.draining = draining

    def _await_first_verdicts(self, state: _EntryState) -> bool:
        """Whether the entry's first write should wait: some endpoints' first probes have not answered and the
        deadline is still ahead. The last first verdict (or the deadline) schedules the entry again."""
        left = state.first_deadline - time.monotonic()
        if left <= 0:
            return False
        if state.first_timer is None:
            key = state.entry.key

            def due() -> None:
                state.first_timer = None
                if self._entries.get(key) is state:
                    self._schedule(key)

            state.first_timer = asyncio.get_running_loop().call_later(left, due)
        return True

    async def _report_conflict(self, key: EntryKey, message: str) -> None:
        state = self._entries.get(key)
        if state is None:
            return
        from beacon.reconcile import Condition, merge_conditions

        entry = state.entry
        conditions = merge_conditions(
            (state.status or {}).get("conditions") or [],
            [
                Condition("Ready", "False", "OutputConflict", message),
                Condition("Degraded", "True", "OutputConflict", message),
            ],
            generation=entry.generation,
            now=self._clock(),
        )
        status = {"observedGeneration": entry.generation, "conditions": conditions}
        merged = {**(state.status or {}), **status}
        if not status_changed(state.status, merged):
            return  # reported already: health flips meanwhile cost no writes
        log.error(
            "%s/%s: %s",
            entry.namespace,
            entry.name,
            message,
            extra=fields(logfields.ERROR, namespace=entry.namespace, entry=entry.name),
        )
        with contextlib.suppress(ApiError):
            await self.kube.patch_status("ServiceEntry", entry.namespace, entry.name, status)
            state.status = merged

    # ------------------------------------------------------------------ registry
    def _schedule_registry(self, namespace: str) -> None:
        self.registries.enqueue(namespace)

    def _forget_registry(self, namespace: str, _exc: Exception) -> None:
        for item in self._registry_names.pop(namespace, set()):
            self.kube.forget("ConfigMap", namespace, item)

    async def write_registry(self, namespace: str) -> None:
        if not self._in_scope(namespace):
            return  # released meanwhile: the namespace's registry is another replica's now
        if await self._write_registry(namespace):
            self._forget_namespace(namespace)

    async def _write_registry(self, namespace: str) -> bool:
        """Write the namespace's registry; True when it has no entries left (and no registry now)."""
        async with self._registry_locks[namespace]:
            known = self._expected[namespace] | self._names[namespace]
            if any(name not in self._records[namespace] for name in known):
                return False  # an entry not reconciled yet; its reconcile schedules the registry again
            records = list(self._records[namespace].values())
            has_entries = bool(known)
            existing = await self.kube.list("ConfigMap", namespace, label_selector=f"{LABEL_REGISTRY}=true")
            existing_names = {item["metadata"]["name"] for item in existing}
            if not has_entries:
                for name in sorted(existing_names):
                    await self.kube.delete("ConfigMap", namespace, name)
                return True
            head = next((i for i in existing if i["metadata"]["name"] == REGISTRY_NAME), None)
            previous = (head or {}).get("metadata", {}).get("annotations") if head else None
            shards = desired_registry(namespace, records, previous=previous)
            self._registry_names[namespace] = {s["metadata"]["name"] for s in shards}
            for shard in shards:
                if await self.kube.ensure(shard):
                    log.debug(
                        "registry %s/%s written",
                        namespace,
                        shard["metadata"]["name"],
                        extra=fields(logfields.WRITE, namespace=namespace, objects=[shard["metadata"]["name"]]),
                    )
            for stale in sorted(existing_names - {s["metadata"]["name"] for s in shards}):
                await self.kube.delete("ConfigMap", namespace, stale)
            return False

    def _forget_namespace(self, namespace: str) -> None:
        """The namespace's last entry is gone and so is its registry: keep nothing for it (unless an entry came
        meanwhile, while the registry was being deleted)."""
        if self._names.get(namespace) or self._expected.get(namespace) or self._records.get(namespace):
            return
        for table in (self._names, self._records, self._expected, self._registry_names):
            table.pop(namespace, None)
        self._drop_lock(self._registry_locks, namespace)

    async def registry_resync(self, namespace: str) -> None:
        """After start-up listing: rewrite (only if different) the registry of a namespace."""
        self._schedule_registry(namespace)

    async def close(self) -> None:
        for task in list(self._lease_listings.values()):
            task.cancel()
        await self._slice_reads.close()
        await self._service_reads.close()
        for task in self._watches.values():
            task.cancel()
        self._watches.clear()
        for tasks in (self._ca_watches, self._ca_reads):
            for task in tasks.values():
                task.cancel()
            tasks.clear()
        await self.entries.close()
        await self.registries.close()


def _iso(now: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
