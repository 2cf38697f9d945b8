"""The discovery engine: keeps ServiceEntries, pods, leases and endpoint health in memory, feeds the prober, and
turns health transitions into coalesced reconciles that the writer applies only on change.

Why it exists: kopf handlers should only translate watch events into calls on this object (thin handlers), and
the reconcile core should stay pure. Something has to own the state in between, decide *when* to reconcile
(coalesced per entry, a bounded number of writes per transition) and remember what was published so that a
restart does not unpublish healthy endpoints. That is this module. It calls the API only through `beacon.kube`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from beacon import metrics
from beacon.health import EndpointHealth, Status, observe, seeded, settled
from beacon.kube import ApiError, Kube, NotOursError
from beacon.models import Endpoint, ServiceEntry
from beacon.prober import Prober
from beacon.reconcile import (
    LABEL_MANAGED_BY,
    LABEL_SERVICE_NAME,
    MANAGED_BY,
    RegistryRecord,
    desired_endpoints,
    desired_service,
    desired_slices,
    desired_status,
    registry_record,
    status_changed,
    visible,
)
from beacon.registry import LABEL_REGISTRY, REGISTRY_NAME, desired_registry
from beacon.targets import LeaseRecord, ProbeResult, Target, parse_micro_time
from beacon.workqueue import WorkQueue, repeat

log = logging.getLogger("beacon.discovery")

EntryKey = tuple[str, str]
ProbeKey = tuple[str, str, str]  # namespace, entry, address


@dataclass
class _Pod:
    name: str
    ip: str | None
    labels: dict[str, str]
    terminating: bool
    node: str | None


@dataclass
class _EntryState:
    entry: ServiceEntry
    body: dict[str, Any]
    endpoints: list[Endpoint] = field(default_factory=list)
    health: dict[str, EndpointHealth] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    seeded: bool = False
    status: dict[str, Any] | None = None
    # the entry's EndpointSlices as they are in the API (listed, then as written), by name: the membership
    # that desired_slices keeps stable; None when unknown (after a failed write), so reconcile lists them first
    slices: dict[str, dict[str, Any]] | None = None
    transitions: list[tuple[str, EndpointHealth, EndpointHealth]] = field(default_factory=list)
    deregistered: set[str] = field(default_factory=set)


def pod_from_body(body: Mapping[str, Any]) -> _Pod:
    meta, status = body.get("metadata", {}), body.get("status", {})
    return _Pod(
        name=meta["name"],
        ip=status.get("podIP") or None,
        labels=dict(meta.get("labels") or {}),
        terminating=bool(meta.get("deletionTimestamp")),
        node=(body.get("spec") or {}).get("nodeName"),
    )


class Discovery:
    """State and timing of ServiceEntry reconciliation. Create it inside a running event loop."""

    def __init__(
        self,
        *,
        kube: Kube,
        probe: Callable[[Target], Any],
        concurrency: int = 64,
        coalesce_seconds: float = 0.2,
        registry_coalesce_seconds: float = 0.5,
        wall_clock: Callable[[], float] = time.time,
        namespaces: tuple[str, ...] = (),
    ) -> None:
        self.kube = kube
        self._namespaces = set(namespaces)
        self._entries: dict[EntryKey, _EntryState] = {}
        self._pods: dict[str, dict[str, _Pod]] = defaultdict(dict)
        self.leases: dict[tuple[str, str], LeaseRecord] = {}
        self._records: dict[str, dict[str, RegistryRecord]] = defaultdict(dict)
        self._expected: set[EntryKey] = set()
        # uids seen deleted: a resync list taken just before a deletion must not bring the entry back
        self._deleted_uids: collections.deque[str] = collections.deque(maxlen=4096)
        self._clock = wall_clock
        self._locks: dict[EntryKey, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._queue: WorkQueue[EntryKey] = WorkQueue(
            name="ServiceEntry",
            delay=coalesce_seconds,
            process=self._reconcile_or_report,
            alive=lambda key: key in self._entries,
            # whatever was written before a failure is unknown now: re-read instead of trusting the cache
            on_error=self._forget_written,
        )
        self._registry_queue: WorkQueue[str] = WorkQueue(
            name="Registry",
            delay=registry_coalesce_seconds,
            process=self.write_registry,
            on_error=self._forget_registry,
        )
        self._registry_names: dict[str, set[str]] = {}
        self._registry_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.prober = Prober(probe=probe, on_result=self._on_result, concurrency=concurrency)

    # ------------------------------------------------------------------ inputs (called by thin kopf handlers)
    async def entry_changed(self, body: Mapping[str, Any]) -> None:
        entry = ServiceEntry.from_body(dict(body))
        state = self._entries.get(entry.key)
        if state is not None and state.entry == entry and state.seeded:
            return  # a status-only or metadata-only change (often our own status patch)
        if state is None:
            state = _EntryState(entry=entry, body=dict(body))
            state.status = dict(body.get("status") or {}) or None
            self._entries[entry.key] = state
        state.entry, state.body = entry, dict(body)
        if not state.seeded:
            try:
                await self._seed(state)
            except Exception as exc:  # the API is unreachable: reconcile seeds (and retries) before publishing
                log.warning("cannot read the published EndpointSlices of %s/%s yet: %s", *entry.key, exc)
        self._refresh_endpoints(state)
        self._schedule(entry.key)

    def expect(self, keys: set[EntryKey]) -> None:
        """Entries that exist at start-up: a namespace's registry is not rewritten until each has a record, so a
        restart never publishes a registry that lacks services merely not yet seen."""
        self._expected |= keys

    async def entry_deleted(self, namespace: str, name: str) -> None:
        self._expected.discard((namespace, name))
        state = self._entries.pop((namespace, name), None)
        if state is not None:
            self._deleted_uids.append(state.entry.uid)
            for ep in state.endpoints:
                self.prober.remove((namespace, name, ep.address))
            metrics.TARGETS.set(len(self.prober))
        self.kube.forget_namespace_entry(namespace, name)
        self._records[namespace].pop(name, None)
        self._queue.cancel((namespace, name))
        self._registry_queue.schedule(namespace)

    def pod_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        pod = pod_from_body(body)
        before = self._pods[namespace].get(pod.name)
        if deleted:
            self._pods[namespace].pop(pod.name, None)
        else:
            self._pods[namespace][pod.name] = pod
        for state in list(self._entries.values()):
            selector = state.entry.spec.selector
            if state.entry.namespace != namespace or selector is None:
                continue
            labels_now = pod.labels if not deleted else {}
            matches = all(labels_now.get(k) == v for k, v in selector.match_labels.items())
            matched = before is not None and all(before.labels.get(k) == v for k, v in selector.match_labels.items())
            if matches or matched:
                self._refresh_endpoints(state)
                self._schedule(state.entry.key)

    def lease_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        name = body["metadata"]["name"]
        if deleted:
            self.leases.pop((namespace, name), None)
            return
        spec = body.get("spec") or {}
        duration = spec.get("leaseDurationSeconds")
        self.leases[(namespace, name)] = LeaseRecord(
            renew_time=parse_micro_time(spec.get("renewTime") or spec.get("acquireTime")),
            duration=float(duration) if duration is not None else None,
        )

    def lease_lookup(self, namespace: str, name: str) -> LeaseRecord | None:
        return self.leases.get((namespace, name))

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
        selector_namespaces = {k[0] for k, st in self._entries.items() if st.entry.spec.selector is not None}
        for namespace in sorted(selector_namespaces):
            pods = await self.kube.list("Pod", namespace)
            fresh = {p["metadata"]["name"]: pod_from_body(p) for p in pods}
            if fresh != self._pods[namespace]:
                self._pods[namespace] = fresh
                for state in self._entries.values():
                    if state.entry.namespace == namespace and state.entry.spec.selector is not None:
                        self._refresh_endpoints(state)
                        self._schedule(state.entry.key)
        lease_namespaces = {
            k[0] for k, st in self._entries.items() if st.entry.spec.health_check and st.entry.spec.health_check.lease
        }
        for namespace in sorted(lease_namespaces):
            leases = await self.kube.list("Lease", namespace)
            names = {item["metadata"]["name"] for item in leases}
            for item in leases:
                self.lease_changed(namespace, item)
            for ns, name in [k for k in self.leases if k[0] == namespace and k[1] not in names]:
                self.lease_changed(ns, {"metadata": {"name": name}}, deleted=True)

    async def resync_forever(self, *, every: float) -> None:
        await repeat(every=every, action=self.resync, what="resync")

    # ------------------------------------------------------------------ endpoints and seeding
    def _endpoints_of(self, entry: ServiceEntry) -> list[Endpoint]:
        endpoints = {e.address: e for e in entry.static_endpoints()}
        selector = entry.spec.selector
        if selector is not None:
            default_ports = {p.name: p.port for p in entry.spec.ports}
            for pod in sorted(self._pods[entry.namespace].values(), key=lambda p: p.name):
                if not pod.ip or not all(pod.labels.get(k) == v for k, v in selector.match_labels.items()):
                    continue
                endpoints.setdefault(
                    pod.ip,
                    Endpoint(
                        address=pod.ip,
                        ports=default_ports,
                        pod=pod.name,
                        node=pod.node,
                        terminating=pod.terminating,
                        labels={},
                    ),
                )
        return list(endpoints.values())

    async def _observe_slices(self, state: _EntryState) -> dict[str, dict[str, Any]]:
        """List the entry's EndpointSlices: where each endpoint is published now."""
        entry = state.entry
        selector = f"{LABEL_SERVICE_NAME}={entry.name},{LABEL_MANAGED_BY}={MANAGED_BY}"
        items = await self.kube.list("EndpointSlice", entry.namespace, label_selector=selector)
        state.slices = {item["metadata"]["name"]: item for item in items}
        return state.slices

    def _forget_written(self, key: EntryKey, _exc: Exception) -> None:
        """After a failed reconcile, whatever was written is unknown: re-read instead of trusting memory."""
        self.kube.forget_namespace_entry(*key)
        state = self._entries.get(key)
        if state is not None:
            state.slices = None

    async def _seed(self, state: _EntryState) -> None:
        """Restore last published readiness from the entry's EndpointSlices (restart safety)."""
        now = self._clock()
        slices = await self._observe_slices(state)
        for item in slices.values():
            for ep in item.get("endpoints") or []:
                conditions = ep.get("conditions") or {}
                ready = bool(conditions.get("serving", conditions.get("ready")))
                for address in ep.get("addresses") or []:
                    state.health[address] = seeded(ready=ready, now=now)
        state.seeded = True

    def _refresh_endpoints(self, state: _EntryState) -> None:
        entry = state.entry
        new = self._endpoints_of(entry)
        old_addresses = {e.address for e in state.endpoints}
        new_addresses = {e.address for e in new}
        for gone in old_addresses - new_addresses:
            self.prober.remove((entry.namespace, entry.name, gone))
            state.health.pop(gone, None)
            state.refused.pop(gone, None)
        state.endpoints = new
        now = self._clock()
        for ep in new:
            state.health.setdefault(ep.address, EndpointHealth(since=now))
            target = entry.target(ep)
            key = (entry.namespace, entry.name, ep.address)
            if target is None:
                self.prober.remove(key)
            else:
                self.prober.upsert(key, target)
        for address in list(state.health):
            if address not in new_addresses:
                state.health.pop(address, None)
        metrics.TARGETS.set(len(self.prober))

    # ------------------------------------------------------------------ probe results
    def _on_result(self, key: Any, target: Target, result: ProbeResult) -> None:
        namespace, name, address = key
        metrics.record_probe(target.check, ok=result.ok, seconds=result.seconds)
        state = self._entries.get((namespace, name))
        hc = state.entry.spec.health_check if state is not None else None
        if state is None or hc is None:
            return
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
        after, changed = observe(before, ok=result.ok, detail=result.detail, now=now, thresholds=thresholds)
        state.health[address] = after
        if changed:
            metrics.TRANSITIONS.labels(to=after.status.value).inc()
            state.transitions.append((address, before, after))
            dirty = True
        gone = after.deregistered(now=now, thresholds=thresholds)
        if gone != (address in state.deregistered):
            (state.deregistered.add if gone else state.deregistered.discard)(address)
            dirty = True
        if dirty:
            self._schedule(state.entry.key)

    async def _post_transitions(self, state: _EntryState) -> None:
        """One Event per direction per reconcile, naming every endpoint that moved (with the probe's detail):
        a burst of transitions (a new entry, a rack going down) costs one or two writes, not one per endpoint."""
        pending, state.transitions = state.transitions, []
        entry = state.entry
        involved = {
            "apiVersion": "beacon.dev/v1alpha1",
            "kind": "ServiceEntry",
            "metadata": {"name": entry.name, "namespace": entry.namespace, "uid": entry.uid},
        }
        for healthy in (False, True):
            moved = [t for t in pending if (t[2].status is Status.PASSING) is healthy]
            if not moved:
                continue
            parts = [f"endpoint {a}: {b.status.value} -> {c.status.value} ({c.detail})" for a, b, c in moved[:10]]
            if len(moved) > 10:
                parts.append(f"and {len(moved) - 10} more")
            # transitions are what an operator's log is for (one line per direction per reconcile, like the Event)
            log.info("%s/%s: %s", entry.namespace, entry.name, "; ".join(parts))
            try:
                await self.kube.event(
                    involved=involved,
                    type_="Normal" if healthy else "Warning",
                    reason="EndpointHealthy" if healthy else "EndpointUnhealthy",
                    message="; ".join(parts),
                    now_iso=_iso(self._clock()),
                )
            except Exception as exc:  # an Event is best effort; never worth a retry storm
                log.warning("cannot post event for %s/%s: %s", entry.namespace, entry.name, exc)

    # ------------------------------------------------------------------ scheduling
    def _schedule(self, key: EntryKey) -> None:
        self._queue.schedule(key)

    async def _reconcile_or_report(self, key: EntryKey) -> None:
        try:
            await self.reconcile(key)
        except NotOursError as exc:  # not retried: the entry reports the conflict until someone resolves it
            metrics.RECONCILES.labels(kind="ServiceEntry", outcome="conflict").inc()
            log.error("%s/%s: %s", key[0], key[1], exc)
            self._forget_written(key, exc)
            await self._report_conflict(key, str(exc))

    # ------------------------------------------------------------------ reconcile
    async def reconcile(self, key: EntryKey) -> None:
        async with self._locks[key]:
            state = self._entries.get(key)
            if state is None:
                return
            if not state.seeded:  # never publish before knowing what was published (restart safety)
                await self._seed(state)
            entry = state.entry
            now = self._clock()
            views = visible(entry, state.endpoints, state.health, state.refused, now=now)
            tags = dict((state.body.get("metadata") or {}).get("labels") or {})
            record = registry_record(entry, views, tags=tags)
            if self._records[entry.namespace].get(entry.name) != record:
                self._records[entry.namespace][entry.name] = record
                self._schedule_registry(entry.namespace)
            await self.kube.ensure(desired_service(entry))
            observed = state.slices if state.slices is not None else await self._observe_slices(state)
            slices = desired_slices(entry, views, observed)
            for item in slices:
                await self.kube.ensure(item)
            wanted = {item["metadata"]["name"]: item for item in slices}
            for stale in sorted(set(observed) - set(wanted)):
                await self.kube.delete("EndpointSlice", entry.namespace, stale)
            state.slices = wanted
            await self.kube.ensure(desired_endpoints(entry, views))
            previous = (state.status or {}).get("conditions") or []
            status = desired_status(entry, views, previous_conditions=previous, now=now)
            if status_changed(state.status, status):
                await self.kube.patch_status("ServiceEntry", entry.namespace, entry.name, status)
                state.status = status
            if state.transitions:
                await self._post_transitions(state)

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
        with contextlib.suppress(ApiError):
            await self.kube.patch_status("ServiceEntry", entry.namespace, entry.name, status)
            state.status = {**(state.status or {}), **status}

    # ------------------------------------------------------------------ registry
    def _schedule_registry(self, namespace: str) -> None:
        self._registry_queue.schedule(namespace)

    def _forget_registry(self, namespace: str, _exc: Exception) -> None:
        for item in self._registry_names.pop(namespace, set()):
            self.kube.forget("ConfigMap", namespace, item)

    async def write_registry(self, namespace: str) -> None:
        async with self._registry_locks[namespace]:
            known = {k for k in self._expected | set(self._entries) if k[0] == namespace}
            if any(name not in self._records[namespace] for _, name in known):
                return  # an entry not reconciled yet; its reconcile schedules the registry again
            records = list(self._records[namespace].values())
            has_entries = bool(known)
            existing = await self.kube.list("ConfigMap", namespace, label_selector=f"{LABEL_REGISTRY}=true")
            existing_names = {item["metadata"]["name"] for item in existing}
            if not has_entries:
                for name in sorted(existing_names):
                    await self.kube.delete("ConfigMap", namespace, name)
                return
            head = next((i for i in existing if i["metadata"]["name"] == REGISTRY_NAME), None)
            previous = (head or {}).get("metadata", {}).get("annotations") if head else None
            shards = desired_registry(namespace, records, previous=previous)
            self._registry_names[namespace] = {s["metadata"]["name"] for s in shards}
            for shard in shards:
                await self.kube.ensure(shard)
            for stale in sorted(existing_names - {s["metadata"]["name"] for s in shards}):
                await self.kube.delete("ConfigMap", namespace, stale)

    async def registry_resync(self, namespace: str) -> None:
        """After start-up listing: rewrite (only if different) the registry of a namespace."""
        self._schedule_registry(namespace)

    async def close(self) -> None:
        await self._queue.close()
        await self._registry_queue.close()


def _iso(now: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
