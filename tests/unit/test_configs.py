"""The ConfigEntry engine's fan-out, without a cluster: a change reaches the entries of its scope only (the
namespace's entries for a namespace-wide one), a reconcile reads only the layers that can apply, a new hash
reaches only the workloads that read that ConfigMap, and start-up schedules each entry once."""

from __future__ import annotations

import asyncio
from typing import Any

from beacon.configs import Configs


class NoKube:
    """No call may reach the API in these tests: the engine's scheduling is replaced by a recorder."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected API call: {name}")


def config_entry(name: str, *, namespace: str = "ns", service: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"data": {"k": name}}
    if service is not None:
        spec["service"] = service
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}"}, "spec": spec}


def _engine() -> tuple[Configs, list[tuple[str, str]]]:
    configs = Configs(kube=NoKube())  # type: ignore[arg-type]
    scheduled: list[tuple[str, str]] = []
    configs._schedule = scheduled.append  # type: ignore[method-assign]
    return configs, scheduled


async def test_a_change_fans_out_only_within_its_scope() -> None:
    configs, scheduled = _engine()
    for body in (
        config_entry("global"),
        config_entry("cart-a", service="cart"),
        config_entry("cart-b", service="cart"),
        config_entry("shop-a", service="shop"),
        config_entry("cart-a", namespace="other", service="cart"),
        config_entry("global", namespace="other"),
    ):
        await configs.entry_changed(body)
    scheduled.clear()

    changed = config_entry("cart-a", service="cart")
    changed["spec"]["data"] = {"k": "new"}
    await configs.entry_changed(changed)
    assert sorted(set(scheduled)) == [("ns", "cart-a"), ("ns", "cart-b")]

    scheduled.clear()
    moved = config_entry("shop-a", service="cart")  # moves scope: both the old and the new scope
    await configs.entry_changed(moved)
    assert sorted(set(scheduled)) == [("ns", "cart-a"), ("ns", "cart-b"), ("ns", "shop-a")]

    scheduled.clear()
    wide = config_entry("global")
    wide["spec"]["data"] = {"k": "new"}
    await configs.entry_changed(wide)  # namespace-wide: its namespace's entries, and no other namespace's
    assert sorted(set(scheduled)) == [("ns", "cart-a"), ("ns", "cart-b"), ("ns", "global"), ("ns", "shop-a")]

    layers = configs._layers(configs._entries[("ns", "cart-b")].entry)
    assert sorted(e.name for e in layers) == ["cart-a", "cart-b", "global", "shop-a"]
    scheduled.clear()
    await configs.entry_deleted("ns", "cart-a")
    assert sorted(set(scheduled)) == [("ns", "cart-b"), ("ns", "shop-a")]
    assert sorted(e.name for e in configs._layers(configs._entries[("ns", "cart-b")].entry)) == [
        "cart-b",
        "global",
        "shop-a",
    ]
    await configs.close()


async def test_a_new_hash_reaches_only_the_workloads_that_read_that_config_map() -> None:
    configs, _ = _engine()
    evaluated: list[str] = []
    configs._evaluate = lambda w: evaluated.append(w.name)  # type: ignore[method-assign]

    def deployment(name: str, reads: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "ns", "uid": name, "annotations": {"beacon.dev/reload": reads}}}

    configs.workload_changed("Deployment", deployment("web", "web-config"))
    configs.workload_changed("Deployment", deployment("api", "api-config,shared"))
    configs.workload_changed("Deployment", {"metadata": {"name": "plain", "namespace": "ns", "uid": "plain"}})
    evaluated.clear()
    configs._set_hash("ns", "shared", "h1")
    assert evaluated == ["api"]
    configs.workload_changed("Deployment", deployment("api", "api-config"))  # stops reading "shared"
    evaluated.clear()
    configs._set_hash("ns", "shared", "h2")
    assert evaluated == []
    configs.workload_changed("Deployment", deployment("web", "web-config"), deleted=True)
    assert ("ns", "web-config") not in configs._readers
    await configs.close()


async def test_start_up_schedules_each_entry_once_without_fan_out() -> None:
    configs, scheduled = _engine()
    bodies = [config_entry("global"), *(config_entry(f"svc-{i}", service=f"s{i % 3}") for i in range(30))]

    async def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return bodies, []

    configs._list = listing  # type: ignore[method-assign]
    await configs.start()
    assert sorted(scheduled) == sorted({(b["metadata"]["namespace"], b["metadata"]["name"]) for b in bodies})
    await configs.close()


class StatusKube:
    """Records status patches; nothing else may reach the API."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, str, dict[str, Any]]] = []

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append((namespace, name, status))


async def test_an_entry_that_cannot_be_read_is_refused_alone_and_never_blocks_start_up() -> None:
    kube = StatusKube()
    configs = Configs(kube=kube)  # type: ignore[arg-type]
    scheduled: list[tuple[str, str]] = []
    configs._schedule = scheduled.append  # type: ignore[method-assign]
    broken = config_entry("broken")
    broken["spec"]["priority"] = "high"  # an integer by schema; a bypassed schema let it in
    bodies = [config_entry("good"), broken, config_entry("also-good")]

    async def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return bodies, []

    configs._list = listing  # type: ignore[method-assign]
    await configs.start()
    assert sorted(scheduled) == [("ns", "also-good"), ("ns", "good")]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    ((namespace, name, status),) = kube.statuses
    assert (namespace, name) == ("ns", "broken")
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "high" in ready["message"]
    broken["status"] = status  # the status patch comes back as a watch event: nothing more to say
    await configs.entry_changed(broken)
    await asyncio.sleep(0)
    assert len(kube.statuses) == 1
    await configs.close()
