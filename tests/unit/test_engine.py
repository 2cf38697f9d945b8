"""The controller engine's wiring: each controller watches the kinds it owns (metadata only, by label), and a
change by someone else, never the echo of beacon's own write, re-queues the owner. Features are proven on the
real control plane (tests/integration: outputs deleted or edited by hand are written back within 2 s)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from beacon.engine import Controller, Owns, owner_uids


class WatchingKube:
    """A watch per (kind, label selector) fed by the test; `changed_by_others` answers from a set of versions."""

    def __init__(self) -> None:
        self.feeds: dict[str, asyncio.Queue[tuple[str, dict[str, Any]]]] = {}
        self.watched: list[tuple[str, str | None, str | None, bool]] = []
        self.ours: set[str] = set()  # resourceVersions beacon wrote
        self.forgotten: list[tuple[str, str, str]] = []

    async def watch(
        self, kind: str, namespace: str | None, *, label_selector: str | None = None, metadata_only: bool = False
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watched.append((kind, namespace, label_selector, metadata_only))
        feed = self.feeds.setdefault(kind, asyncio.Queue())
        while True:
            yield await feed.get()

    def changed_by_others(self, kind: str, type_: str, meta: Mapping[str, Any]) -> bool:
        return type_ == "DELETED" or meta.get("resourceVersion") not in self.ours

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.forgotten.append((kind, namespace, name))


def _meta(name: str, version: str, owner: str, namespace: str = "shop") -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "resourceVersion": version,
        "ownerReferences": [{"kind": "ServiceEntry", "uid": owner}],
    }


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_someone_elses_change_of_an_owned_object_requeues_its_owner_and_beacons_own_echo_does_not() -> None:
    kube = WatchingKube()
    reconciled: list[str] = []
    touched: list[tuple[str, str]] = []

    async def reconcile(key: str) -> None:
        reconciled.append(key)

    owners = {"uid-payments": "shop/payments"}
    controller: Controller[str] = Controller(
        name="ServiceEntry",
        kube=kube,  # type: ignore[arg-type]
        reconcile=reconcile,
        owns=[Owns("Service", "beacon.dev/service-entry"), Owns("EndpointSlice", "beacon.dev/service-entry")],
        owner_of=lambda _kind, meta: next((owners[u] for u in owner_uids(meta) if u in owners), None),
        on_owned_change=lambda kind, key, _meta: touched.append((kind, key)),
        in_scope=lambda namespace: namespace != "elsewhere",
    )
    controller.watch_owned()
    controller.watch_owned()  # once is enough: no second watch
    await _turns()
    assert sorted(kube.watched) == [
        ("EndpointSlice", None, "beacon.dev/service-entry", True),
        ("Service", None, "beacon.dev/service-entry", True),
    ]
    kube.ours.add("10")
    await kube.feeds["Service"].put(("MODIFIED", {"metadata": _meta("payments", "10", "uid-payments")}))
    await _turns()
    assert reconciled == [], "the echo of beacon's own write is no news"
    await kube.feeds["EndpointSlice"].put(("MODIFIED", {"metadata": _meta("payments-ipv4-0", "11", "uid-payments")}))
    await _turns()
    assert reconciled == ["shop/payments"]
    assert touched == [("EndpointSlice", "shop/payments")]
    assert kube.forgotten == [("EndpointSlice", "shop", "payments-ipv4-0")], "the reconcile reads it again"
    await kube.feeds["Service"].put(("DELETED", {"metadata": _meta("payments", "10", "uid-payments")}))
    await _turns()
    assert reconciled == ["shop/payments", "shop/payments"], "a deletion re-queues even at beacon's own version"
    await kube.feeds["Service"].put(("MODIFIED", {"metadata": _meta("orphan", "12", "uid-unknown")}))
    await kube.feeds["Service"].put(("MODIFIED", {"metadata": _meta("payments", "13", "uid-payments", "elsewhere")}))
    await _turns()
    assert reconciled == ["shop/payments", "shop/payments"], "no owner, or not served here: nothing to do"
    await controller.close()
    assert all(task.done() for task in controller._watches.values())
