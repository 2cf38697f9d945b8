"""kopf handlers: thin translations of watch events into calls on the engines kept in kopf's memo.

Why it exists: kopf owns watching, reconnecting after 410 Gone, peering and the liveness endpoint. Everything
else happens in `beacon.discovery` (and `beacon.configs` for ConfigEntries). The handlers are raw event handlers,
not kopf's create/update/delete handlers: beacon is level-based (each event leads to "compute desired state,
write what differs"), so it needs no per-object progress bookkeeping, adds no finalizers and makes no writes of
its own to the watched objects.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from beacon.operator_runtime import Runtime, runtime_of

log = logging.getLogger("beacon.handlers")


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # no "handler succeeded" Events: only real problems
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="beacon.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="beacon.dev")
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    runtime: Runtime = memo["runtime"]
    await runtime.start()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await runtime_of(memo).stop()


@kopf.on.probe(id="beacon")
async def liveness(memo: kopf.Memo, **_: Any) -> str:
    """Part of kopf's liveness endpoint: it fails (HTTP 500) once a task beacon needs forever has stopped."""
    failure = runtime_of(memo).failure()
    if failure is not None:
        raise kopf.PermanentError(failure)
    return "ok"


async def _active(memo: Any) -> Runtime:
    """The runtime, activated first (a no-op after the first event): with --peering, kopf delivers events only to
    the active replica, so an event here means this replica may write (see Runtime.activate)."""
    runtime = runtime_of(memo)
    await runtime.activate()
    return runtime


def watch_peering(*, name: str, clusterwide: bool) -> None:
    """With --peering: also watch the peering object itself. It always exists, so when kopf resumes this replica
    its first event activates the runtime even in a cluster where nothing else changes. Registered only in
    peering mode (the object's CRD need not exist otherwise)."""
    plural = "clusterkopfpeerings" if clusterwide else "kopfpeerings"

    @kopf.on.event("kopf.dev", "v1", plural, field="metadata.name", value=name, id="peering-activation")
    async def peering_event(memo: Any, **_: Any) -> None:
        await _active(memo)


@kopf.on.event("beacon.dev", "v1alpha1", "serviceentries")
async def serviceentry_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    discovery = (await _active(memo)).discovery
    if type == "DELETED":
        await discovery.entry_deleted(body["metadata"]["namespace"], body["metadata"]["name"])
    else:
        await discovery.entry_changed(dict(body))


# Pods and Leases are not watched through kopf: kopf would watch (and parse) every one in the cluster. The discovery
# engine watches them itself, and only in namespaces where an entry needs them (see beacon.discovery); the config
# engine watches the pods of namespaces with opted-in workloads, for adoption (see beacon.configs).


@kopf.on.event("beacon.dev", "v1alpha1", "configentries")
async def configentry_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    configs = (await _active(memo)).configs
    if type == "DELETED":
        await configs.entry_deleted(body["metadata"]["namespace"], body["metadata"]["name"])
    else:
        await configs.entry_changed(dict(body))


# Workloads opt in to reloads with the beacon.dev/reload annotation. No kopf filter on it: a filter would hide the
# event that removes the annotation, so the engine filters (a dictionary lookup per event).
@kopf.on.event("apps", "v1", "deployments")
async def deployment_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    (await _active(memo)).configs.workload_changed("Deployment", body, deleted=type == "DELETED")


@kopf.on.event("apps", "v1", "statefulsets")
async def statefulset_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    (await _active(memo)).configs.workload_changed("StatefulSet", body, deleted=type == "DELETED")


@kopf.on.event("apps", "v1", "daemonsets")
async def daemonset_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    (await _active(memo)).configs.workload_changed("DaemonSet", body, deleted=type == "DELETED")
