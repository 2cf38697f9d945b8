"""The API writer's comparison rules (`covers`, `_owned_view`), and the wiring of write-on-change in `ensure()`
against a tiny fake apiserver on loopback (wiring only: features are proven on the real control plane)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client as k8s

from beacon.kube import Kube, NotOursError, _owned_view, covers, merge_patch_between, merged_leftovers, stale_fields


# ------------------------------------------------------------------------------------------------ covers
@pytest.mark.parametrize(
    ("actual", "desired", "expected"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),  # the server adds fields: still covered
        ({"a": 1}, {"a": 1, "b": 2}, False),  # a field we want is missing
        ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1}}, True),  # subsets all the way down
        ({"a": {"x": 1}}, {"a": {"x": 2}}, False),
        ({"a": None}, {"a": None}, True),
        ({}, {"a": None}, False),  # a key we set to null must exist
        ({"a": 1}, {}, True),
        ([1, 2], [1, 2], True),
        ([1, 2, 3], [1, 2], False),  # lists: exact length (an extra endpoint is a difference)
        ([1], [1, 2], False),
        ([2, 1], [1, 2], False),  # ...and order
        ([{"ip": "a", "nodeName": "n"}], [{"ip": "a"}], True),  # list elements compared as subsets
        ("x", "x", True),
        (1, 1.0, True),
        (True, "true", False),
        (None, {}, False),
        ({"a": 1}, [("a", 1)], False),
        ([], [], True),
    ],
)
def test_covers(actual: Any, desired: Any, expected: bool) -> None:
    assert covers(actual, desired) is expected


def test_owned_view_drops_status_and_server_managed_metadata() -> None:
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "payments",
            "namespace": "shop",
            "uid": "u",
            "resourceVersion": "42",
            "managedFields": [{}],
            "labels": {"a": "b"},
            "annotations": {"c": "d"},
            "ownerReferences": [{"uid": "o"}],
        },
        "spec": {"ports": []},
        "status": {"loadBalancer": {}},
    }
    assert _owned_view(obj) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}, "ownerReferences": [{"uid": "o"}]},
        "spec": {"ports": []},
    }


# ------------------------------------------------------------------------------------------------ ensure
def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


class FakeApiserver:
    """Objects by path; GET, POST (create), server-side-apply and merge PATCH only; each request kept as (method,
    path)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.merges: list[dict[str, Any]] = []  # bodies of JSON merge patches

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if request.method == "GET":
            listed = [o for path, o in self.objects.items() if path.rsplit("/", 1)[0] == request.path]
            if listed:  # a collection: like the apiserver, no kind or apiVersion on the items
                items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in listed]
                return web.json_response({"kind": "ServiceList", "apiVersion": "v1", "items": items})
            obj = self.objects.get(request.path)
            if obj is None:
                return web.json_response({"kind": "Status", "code": 404}, status=404)
            return web.json_response(obj)
        if request.method == "PATCH" and request.content_type == "application/merge-patch+json":
            assert request.query["fieldManager"] == "beacon"
            self.merges.append(json.loads(await request.read()))
            merged = _merge(self.objects[request.path], self.merges[-1])
            self.objects[request.path] = merged
            return web.json_response(merged)
        if request.method == "PATCH":
            assert request.content_type == "application/apply-patch+yaml"
            assert request.query["fieldManager"] == "beacon"
            body = json.loads(await request.read())
            stored = {**body, "metadata": {**body["metadata"], "uid": "server-uid", "resourceVersion": "1"}}
            self.objects[request.path] = stored
            return web.json_response(stored)
        if request.method == "POST":
            assert request.query["fieldManager"] == "beacon"
            body = json.loads(await request.read())
            path = f"{request.path}/{body['metadata']['name']}"
            if path in self.objects:
                return web.json_response({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, status=409)
            self.objects[path] = {**body, "metadata": {**body["metadata"], "uid": "server-uid"}}
            return web.json_response(self.objects[path], status=201)
        return web.json_response({}, status=405)

    def writes(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] != "GET"]


@contextlib.asynccontextmanager
async def fake_kube() -> AsyncIterator[tuple[Kube, FakeApiserver]]:
    fake = FakeApiserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    kube = Kube(k8s.ApiClient(configuration), concurrency=2)
    try:
        yield kube, fake
    finally:
        await kube.aclose()
        await runner.cleanup()


SVC_PATH = "/api/v1/namespaces/shop/services/payments"


def service(port: int = 8080, owner_uid: str = "entry-uid") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "payments",
            "namespace": "shop",
            "labels": {"beacon.dev/service-entry": "payments"},
            "ownerReferences": [{"apiVersion": "beacon.dev/v1alpha1", "kind": "ServiceEntry", "uid": owner_uid}],
        },
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": port}]},
    }


async def test_ensure_writes_once_then_only_on_change() -> None:
    async with fake_kube() as (kube, fake):
        assert await kube.ensure(service())
        assert fake.writes() == [("PATCH", SVC_PATH)]
        assert not await kube.ensure(service())  # unchanged: no request at all
        assert len(fake.requests) == 2  # the first GET (nothing cached yet) and the PATCH
        assert await kube.ensure(service(port=9090))
        assert fake.writes() == [("PATCH", SVC_PATH), ("PATCH", SVC_PATH)]
        assert fake.objects[SVC_PATH]["spec"]["ports"] == [{"name": "http", "port": 9090}]


async def test_ensure_after_restart_skips_objects_the_api_already_holds() -> None:
    async with fake_kube() as (kube, fake):
        existing = service()
        existing["metadata"]["resourceVersion"] = "7"
        existing["spec"]["ports"][0]["protocol"] = "TCP"  # a server default
        existing["spec"]["clusterIPs"] = ["None"]
        fake.objects[SVC_PATH] = existing
        assert not await kube.ensure(service())
        assert fake.writes() == []


async def test_ensure_after_restart_removes_a_field_beacon_applied_and_no_longer_sets() -> None:
    """An older beacon applied a label that this one no longer sets: the object covers what is wanted, but the
    stale label (beacon's field manager holds it through an Apply) makes the first ensure write, which removes it."""
    async with fake_kube() as (kube, fake):
        existing = service()
        existing["metadata"]["resourceVersion"] = "7"
        existing["metadata"]["labels"]["beacon.dev/old-tier"] = "gold"
        applied = {
            "f:metadata": {"f:labels": {".": {}, "f:beacon.dev/service-entry": {}, "f:beacon.dev/old-tier": {}}},
            "f:spec": {"f:clusterIP": {}, "f:ports": {'k:{"port":8080,"protocol":"TCP"}': {".": {}, "f:name": {}}}},
        }
        existing["metadata"]["managedFields"] = [
            {"manager": "beacon", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": applied},
            # someone else's label, and a field beacon holds only through an Update (a create): never a reason
            {"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:metadata": {"f:labels": {"f:team": {}}}}},
            {"manager": "beacon", "operation": "Update", "fieldsV1": {"f:metadata": {"f:labels": {"f:made": {}}}}},
        ]
        fake.objects[SVC_PATH] = existing
        assert await kube.ensure(service())
        assert fake.writes() == [("PATCH", SVC_PATH)]
        assert "beacon.dev/old-tier" not in fake.objects[SVC_PATH]["metadata"]["labels"]


def test_stale_fields_names_only_what_beacon_applied_and_no_longer_sets() -> None:
    desired = service()
    applied = {"f:metadata": {"f:labels": {"f:beacon.dev/service-entry": {}}}, "f:spec": {"f:ports": {}}}
    actual = {"metadata": {"managedFields": [{"manager": "beacon", "operation": "Apply", "fieldsV1": applied}]}}
    assert stale_fields(actual, desired) == set()
    applied["f:data"] = {"f:gone": {}}
    assert stale_fields(actual, desired) == {("data",), ("data", "gone")}


async def test_ensure_never_overwrites_an_object_owned_by_someone_else() -> None:
    async with fake_kube() as (kube, fake):
        fake.objects[SVC_PATH] = service(owner_uid="someone-else")
        with pytest.raises(NotOursError, match="not managed by beacon"):
            await kube.ensure(service())
        unowned = service()
        del unowned["metadata"]["ownerReferences"]
        unowned["metadata"]["labels"] = {"app": "theirs"}
        fake.objects[SVC_PATH] = unowned
        with pytest.raises(NotOursError):
            await kube.ensure(service())
        assert fake.writes() == []


async def test_ensure_of_an_object_known_absent_creates_it_without_reading_first() -> None:
    async with fake_kube() as (kube, fake):
        assert await kube.ensure(service(), absent=True)
        assert fake.requests == [("POST", "/api/v1/namespaces/shop/services")]
        assert fake.objects[SVC_PATH]["spec"]["ports"] == [{"name": "http", "port": 8080}]
        assert not await kube.ensure(service(), absent=True)  # cached now: no request at all
        assert len(fake.requests) == 1


async def test_ensure_of_an_object_known_absent_still_never_overwrites_someone_elses() -> None:
    """The name was taken after all: the POST fails with 409 and the usual read-and-compare path decides."""
    async with fake_kube() as (kube, fake):
        fake.objects[SVC_PATH] = service(owner_uid="someone-else")
        with pytest.raises(NotOursError, match="not managed by beacon"):
            await kube.ensure(service(), absent=True)
        assert fake.requests == [("POST", "/api/v1/namespaces/shop/services"), ("GET", SVC_PATH)]
        assert fake.objects[SVC_PATH]["metadata"]["ownerReferences"][0]["uid"] == "someone-else"
        fake.objects[SVC_PATH] = service()  # ours (an earlier run of beacon wrote it): compared, then applied
        assert await kube.ensure(service(port=9090), absent=True)
        assert fake.writes()[-1] == ("PATCH", SVC_PATH)


async def test_a_listed_object_compares_like_a_read_one() -> None:
    """List items come without kind and apiVersion; `list` restores them, so `ensure(observed=item)` of an unchanged
    object (restart: Services read in a batch) writes nothing."""
    async with fake_kube() as (kube, fake):
        fake.objects[SVC_PATH] = service()
        (item,) = await kube.list("Service", "shop")
        assert (item["kind"], item["apiVersion"]) == ("Service", "v1")
        assert not await kube.ensure(service(), observed=item)
        assert fake.writes() == []


async def test_a_write_by_someone_else_is_told_from_the_echo_of_beacons_own() -> None:
    async with fake_kube() as (kube, fake):
        meta = {"name": "payments", "namespace": "shop", "resourceVersion": "9"}
        assert not kube.holds("Service", meta)
        assert not kube.written_by_others("Service", meta)  # nothing written or read: nothing to tell
        await kube.ensure(service())  # written: the fake answers with resourceVersion "1"
        assert kube.holds("Service", meta)
        # the version beacon wrote is no news, whatever it looks like (another manager may keep a list item)
        assert not kube.written_by_others("Service", {**meta, "resourceVersion": "1"})
        assert kube.written_by_others("Service", meta)  # anything else is someone else's write
        kube.forget("Service", "shop", "payments")
        assert not kube.written_by_others("Service", meta)
        fake.objects[SVC_PATH]["metadata"]["resourceVersion"] = "5"
        assert not await kube.ensure(service())  # read and found in order: that version is beacon's now
        assert not kube.written_by_others("Service", {**meta, "resourceVersion": "5"})


async def test_the_echo_of_a_write_that_arrives_before_its_response_is_not_someone_elses() -> None:
    """The watch may deliver the event of beacon's own write before the write's response is back (a thread
    finishes the request, the event loop reads the watch first): that event is not a change by someone else."""
    async with fake_kube() as (kube, _fake):
        meta = {"name": "payments", "namespace": "shop", "resourceVersion": "2"}
        await kube.ensure(service())  # version "1" is beacon's
        seen: list[bool] = []
        original = kube.request

        async def request(method: str, path: str, **options: Any) -> dict[str, Any] | None:
            if method == "PATCH":  # the echo (version "2") arrives while the write is still in flight
                seen.append(kube.written_by_others("Service", meta))
            return await original(method, path, **options)

        kube.request = request  # type: ignore[method-assign]
        assert await kube.ensure(service(port=9090))
        assert seen == [False]
        assert kube.written_by_others("Service", {**meta, "resourceVersion": "7"}), "later versions are news again"


async def test_forget_makes_ensure_read_the_api_again() -> None:
    async with fake_kube() as (kube, fake):
        await kube.ensure(service())
        fake.objects.pop(SVC_PATH)  # someone deleted it behind our back
        assert not await kube.ensure(service())  # the cache still believes it is there
        kube.forget("Service", "shop", "payments")
        assert await kube.ensure(service())
        assert SVC_PATH in fake.objects


# ------------------------------------------------------------------------------------------------ merge patches
CM_PATH = "/api/v1/namespaces/shop/configmaps/settings"


def config_map(data: dict[str, str], digest: str = "h1", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "settings",
            "namespace": "shop",
            "labels": labels or {"beacon.dev/config-entry": "settings"},
            "annotations": {"beacon.dev/hash": digest},
        },
        "data": data,
    }


def test_merge_patch_between_covers_data_and_annotations_only() -> None:
    before = _owned_view(config_map({"a": "1", "b": "1"}))
    after = _owned_view(config_map({"a": "2", "c": "3"}, digest="h2"))
    assert merge_patch_between(before, after) == {
        "data": {"a": "2", "c": "3", "b": None},
        "metadata": {"annotations": {"beacon.dev/hash": "h2"}},
    }
    assert merge_patch_between(before, before) is None
    relabelled = _owned_view(config_map({"a": "2"}, labels={"beacon.dev/config-entry": "other"}))
    assert merge_patch_between(before, relabelled) is None  # anything else: an apply


def test_merged_leftovers_removes_what_beacon_holds_by_any_operation_and_no_longer_wants() -> None:
    actual = config_map({"kept": "1", "updated-by-beacon": "1", "applied-by-beacon": "1", "theirs": "1"})
    actual["metadata"]["managedFields"] = [
        {"manager": "beacon", "operation": "Apply", "fieldsV1": {"f:data": {"f:kept": {}, "f:applied-by-beacon": {}}}},
        {"manager": "beacon", "operation": "Update", "fieldsV1": {"f:data": {"f:updated-by-beacon": {}}}},
        {"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:data": {"f:theirs": {}}}},
    ]
    desired = _owned_view(config_map({"kept": "1"}))
    assert merged_leftovers(actual, desired) == {"data": {"updated-by-beacon": None, "applied-by-beacon": None}}
    assert merged_leftovers(actual, _owned_view(actual)) is None


async def test_ensure_merge_sends_changes_of_data_and_annotations_as_merge_patches() -> None:
    async with fake_kube() as (kube, fake):
        assert await kube.ensure(config_map({"a": "1", "b": "1"}), merge=True)
        assert fake.writes() == [("PATCH", CM_PATH)]  # nothing cached yet: an apply
        assert not fake.merges
        assert await kube.ensure(config_map({"a": "2", "b": "1"}, digest="h2"), merge=True)
        assert fake.merges == [{"data": {"a": "2"}, "metadata": {"annotations": {"beacon.dev/hash": "h2"}}}]
        assert await kube.ensure(config_map({"a": "2"}, digest="h2"), merge=True)
        assert fake.merges[-1] == {"data": {"b": None}}  # a key that goes is sent as null
        assert fake.objects[CM_PATH]["data"] == {"a": "2"}
        assert not await kube.ensure(config_map({"a": "2"}, digest="h2"), merge=True)  # unchanged: no request
        assert await kube.ensure(config_map({"a": "2"}, labels={"x": "y"}), merge=True)
        assert len(fake.merges) == 2  # a label changed: an apply, as without merge
        assert await kube.ensure(config_map({"a": "3"}))
        assert len(fake.merges) == 2  # not asked for: always an apply
