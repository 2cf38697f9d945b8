"""An in-memory stand-in for `beacon.kube.Kube`, for unit tests of the discovery engine's wiring.

Why it exists: the engine's bookkeeping (seeding, coalescing, drains, status items, the fail-safe policies) is
tested without an apiserver, and those tests need the same small fake: objects in a dict, every write counted, no
watch events (the tests deliver them by calling the engine). One copy here instead of one per test module. It
never counts as proof that a feature works on a real control plane: tests/integration does that.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

from beacon.kube import covers

Obj = dict[str, Any]


class FakeKube:
    """Just enough of beacon.kube.Kube: objects in a dict, entries by (namespace, name), every write counted as
    (verb, kind, name), each entry's last status patch in `statuses` (and the latest of all in `status`)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.entries: dict[tuple[str, str], Obj] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.statuses: dict[tuple[str, str], Obj] = {}
        self.status: Obj | None = None
        self.watching: list[tuple[str, str]] = []  # (kind, namespace) of every watch running now

    async def watch(self, kind: str, namespace: str, **_: Any) -> AsyncIterator[tuple[str, Obj]]:
        self.watching.append((kind, namespace))
        try:
            await asyncio.Event().wait()  # no events: the tests deliver them by calling the engine
            yield "ADDED", {}
        finally:
            self.watching.remove((kind, namespace))

    async def request(self, method: str, path: str, **_: Any) -> Obj | None:
        assert method == "GET"
        if path == "/apis/beacon.dev/v1alpha1/serviceentries":
            return {"items": [copy.deepcopy(e) for e in self.entries.values()]}
        return {"items": []}

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[Obj]:
        items = [o for (k, ns, _), o in self.objects.items() if k == kind and ns == namespace]
        if label_selector and "=" in label_selector:
            wanted = dict(part.split("=", 1) for part in label_selector.split(","))
            items = [o for o in items if covers(o["metadata"].get("labels") or {}, wanted)]
        return [copy.deepcopy(o) for o in items]

    def cached(self, obj: Obj) -> bool:
        return (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]) in self.objects

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    async def ensure(self, obj: Obj, **_: Any) -> bool:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if self.objects.get(key) == obj:
            return False
        self.objects[key] = copy.deepcopy(obj)
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.writes.append(("delete", kind, name))
        return self.objects.pop((kind, namespace, name), None) is not None

    async def patch_status(self, kind: str, namespace: str, name: str, status: Obj) -> None:
        self.writes.append(("status", kind, name))
        self.statuses[(namespace, name)] = self.status = copy.deepcopy(status)
        if (namespace, name) in self.entries:
            self.entries[(namespace, name)]["status"] = status

    async def event(self, **_: Any) -> None:
        self.writes.append(("event", "Event", ""))

    def forget(self, *_: Any) -> None:
        pass

    def forget_namespace_entry(self, *_: Any) -> None:
        pass
