"""kopf handlers: thin translations of watch events into calls on the engines kept in kopf's memo.

Why it exists: kopf owns watching, reconnecting after 410 Gone, peering and the liveness endpoint. Everything
else happens in `beacon.discovery` (and `beacon.config` for ConfigEntries). The handlers are raw event handlers,
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


@kopf.on.event("beacon.dev", "v1alpha1", "serviceentries")
async def serviceentry_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    discovery = runtime_of(memo).discovery
    if type == "DELETED":
        await discovery.entry_deleted(body["metadata"]["namespace"], body["metadata"]["name"])
    else:
        await discovery.entry_changed(dict(body))


@kopf.on.event("", "v1", "pods")
async def pod_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    runtime_of(memo).discovery.pod_changed(body["metadata"]["namespace"], dict(body), deleted=type == "DELETED")


@kopf.on.event("coordination.k8s.io", "v1", "leases")
async def lease_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    runtime_of(memo).discovery.lease_changed(body["metadata"]["namespace"], dict(body), deleted=type == "DELETED")
