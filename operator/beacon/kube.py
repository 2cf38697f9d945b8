"""The only module that calls the Kubernetes API: reads, watches, server-side apply on change, status patches,
events.

Why it exists: "write only on change" is a property of one place, not a habit spread over handlers. Every write
goes through `ensure()`, which compares the desired object with what beacon last applied (or, after a restart,
with what the API holds) and skips the write when nothing beacon owns differs. Steady state therefore costs zero
writes. Counts of writes by verb and kind are exported as metrics (and asserted by the tests through the audit
log), as is the number of requests not answered yet.

Requests and watches run on aiohttp in the event loop, at most `CONCURRENCY` requests at once; watches (one long
response read line by line) have a connection pool of their own, so no number of watches can starve requests.
The kubernetes client's blocking calls in a thread pool were measured against this: a namespace-wide edit of
5,000 ConfigEntries (5,000 ConfigMap writes, then the bookkeeping) cost the operator about twice the CPU and the
apiserver a quarter more, and took half as long again (bench/bench_config.py). A response body over
`_THREAD_JSON` bytes (a listing) is parsed in a thread, so a big list does not hold the loop.

The credentials are the kubernetes client's: its Configuration and config loaders (in-cluster or kubeconfig),
its TLS files, and ApiClient.param_serialize for the URL and the authentication headers, with the bearer token
refreshed per request. No generated model classes, no private client internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import aiohttp
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from beacon import metrics
from beacon.retries import RETRIES

log = logging.getLogger("beacon.kube")

FIELD_MANAGER = "beacon"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
WATCH_SECONDS = 300  # the server ends each watch request after this long; it is resumed from the last version
CONCURRENCY = 64  # API requests in flight at most; more wait for a slot (counted by beacon_api_requests_pending)
REQUEST_SECONDS = 30  # a request not answered by then fails (and is retried by its caller's work queue)
_THREAD_JSON = 1 << 20  # response bodies bigger than this are parsed off the event loop
Obj = dict[str, Any]

_PATHS = {
    "Service": "/api/v1/namespaces/{ns}/services",
    "Endpoints": "/api/v1/namespaces/{ns}/endpoints",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Event": "/api/v1/namespaces/{ns}/events",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Lease": "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
    "ServiceEntry": "/apis/beacon.dev/v1alpha1/namespaces/{ns}/serviceentries",
    "ConfigEntry": "/apis/beacon.dev/v1alpha1/namespaces/{ns}/configentries",
    "ControllerRevision": "/apis/apps/v1/namespaces/{ns}/controllerrevisions",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets",
    "DaemonSet": "/apis/apps/v1/namespaces/{ns}/daemonsets",
}


class _Unread(enum.Enum):
    UNREAD = "unread"


UNREAD = _Unread.UNREAD  # `ensure(observed=...)` not given: read the object first


class FencedError(RuntimeError):
    """A write refused before it left: this replica's shard Lease is not valid (see beacon.shards)."""


class NotOursError(RuntimeError):
    """An object with the name beacon wants exists and belongs to someone else; beacon leaves it alone."""


class ApiError(RuntimeError):
    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body


def covers(actual: Any, desired: Any) -> bool:
    """True when `actual` already holds everything `desired` says: dicts as subsets (the server adds defaults and
    other owners' fields), lists element by element with equal length, scalars equal."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(k in actual and covers(actual[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(covers(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


def _owned_view(obj: Mapping[str, Any]) -> Obj:
    """The parts of an object beacon owns and compares: everything but status and server-managed metadata."""
    meta = obj.get("metadata", {})
    view = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
    view["metadata"] = {k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta}
    return view


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every field path of `obj` (maps walked, a list is one field): what an apply of `obj` sets."""
    found = {prefix}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found |= _paths(value, (*prefix, str(key)))
    return found


def _applied_paths(fields: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The field paths a managedFields entry (fieldsV1) claims, in `_paths`' terms: map fields ("f:name") walked,
    a list's items ("k:", "v:", "i:") folded into the list field itself."""
    found: set[tuple[str, ...]] = set()
    if not isinstance(fields, Mapping):
        return found
    for key in fields:
        if key.startswith("f:"):
            path = (*prefix, key[2:])
            found.add(path)
            found |= _applied_paths(fields[key], path)
    return found


def stale_fields(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> set[tuple[str, ...]]:
    """Fields that beacon's field manager applied to `actual` and that `desired` no longer sets: a label or an
    annotation that an older beacon wrote, a key of a ConfigMap it no longer has. Applying `desired` removes them
    (server-side apply drops what the manager's last apply set and this one does not). Only Apply entries count:
    fields beacon holds through an Update (a POST that created the object) are not removed by an apply, so they
    would ask for a write at every start. Lists are compared whole by `covers`, so they are fields here."""
    wanted = _paths({k: v for k, v in desired.items() if k != "status"})
    claimed: set[tuple[str, ...]] = set()
    for entry in (actual.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply" and not entry.get("subresource"):
            claimed |= _applied_paths(entry.get("fieldsV1"))
    return {path for path in claimed if path not in wanted and path[0] != "status"}


MERGED_MAPS = (("data",), ("metadata", "annotations"))  # what `ensure(merge=True)` may write by a merge patch


def _at(obj: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    for part in path:
        obj = obj.get(part) or {}
    return obj


def _put(patch: Obj, path: tuple[str, ...], value: Obj) -> None:
    """Set `value` at `path` in the nested dict `patch`, making the levels on the way."""
    for part in path[:-1]:
        patch = patch.setdefault(part, {})
    patch[path[-1]] = value


def _without_maps(view: Mapping[str, Any]) -> Obj:
    """`view` without the maps of MERGED_MAPS."""
    rest = {k: v for k, v in view.items() if k != "data"}
    rest["metadata"] = {k: v for k, v in (view.get("metadata") or {}).items() if k != "annotations"}
    return rest


def merge_patch_between(basis: Mapping[str, Any], desired: Mapping[str, Any]) -> Obj | None:
    """The JSON merge patch that takes `basis` (an owned view beacon wrote) to `desired` when the two differ only
    in the keys and values of MERGED_MAPS (a materialised ConfigMap's data and its hash annotations): changed and
    new keys with their values, removed keys as null. None when anything else differs (labels, owners: an apply)."""
    if _without_maps(basis) != _without_maps(desired):
        return None
    patch: Obj = {}
    for path in MERGED_MAPS:
        old, new = _at(basis, path), _at(desired, path)
        changes = {k: v for k, v in new.items() if old.get(k) != v} | {k: None for k in old if k not in new}
        if changes:
            _put(patch, path, changes)
    return patch or None


def merged_leftovers(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> Obj | None:
    """A merge patch removing the keys of MERGED_MAPS that beacon's field manager holds in `actual`, by any
    operation, and `desired` no longer has. A key that beacon last set with a merge patch is held by its Update
    entry, and an apply removes only what its own Apply entry held: these go explicitly, or they would stay."""
    held: set[tuple[str, ...]] = set()
    for entry in (actual.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and not entry.get("subresource"):
            held |= _applied_paths(entry.get("fieldsV1"))
    patch: Obj = {}
    for path in MERGED_MAPS:
        wanted = _at(desired, path)
        gone = {k: None for k in _at(actual, path) if (*path, k) in held and k not in wanted}
        if gone:
            _put(patch, path, gone)
    return patch or None


def _key(kind: str, namespace: str, name: str) -> tuple[str, str, str]:
    return (kind, namespace, name)


class Kube:
    """Async facade over the blocking kubernetes client, with an applied-object cache for write-on-change."""

    def __init__(self, api: k8s.ApiClient, *, concurrency: int = CONCURRENCY) -> None:
        self._api = api
        self._concurrency = concurrency
        self._gate = asyncio.Semaphore(concurrency)  # FIFO: requests leave in the order they were made
        self._applied: dict[tuple[str, str, str], Obj] = {}
        self._versions: dict[tuple[str, str, str], str] = {}  # the resourceVersion of beacon's last write or read
        self._writing: dict[tuple[str, str, str], int] = {}  # objects with a write of beacon's in flight
        self._session: aiohttp.ClientSession | None = None  # requests
        self._watches: aiohttp.ClientSession | None = None  # watches: a pool of their own
        self.fence: Callable[[], bool] = lambda: True  # sharded mode: the replica's Lease is valid

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
        configuration = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=configuration)
        return cls(k8s.ApiClient(configuration))

    async def aclose(self) -> None:
        """Close the connections and the kubernetes client."""
        for session in (self._session, self._watches):
            if session is not None:
                await session.close()
        self._session = self._watches = None
        self._api.close()

    # ------------------------------------------------------------------ raw requests
    def _ssl(self) -> ssl.SSLContext | bool:
        """TLS as the kubernetes client's configuration says (CA, verification, client certificate)."""
        cfg = self._api.configuration
        if not cfg.host.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    def _requests(self) -> aiohttp.ClientSession:
        if self._session is None:
            # one kept-alive connection per request in flight (the gate in `request` keeps to the limit; the time a
            # request waits there is not part of its timeout)
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=self._concurrency)
            self._session = aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20)
        return self._session

    def _url(self, method: str, path: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The full URL of `path` and the headers with the client's authentication (a fresh token each time)."""
        _, url, with_auth, _, _ = self._api.param_serialize(
            method=method, resource_path=path, header_params=headers, auth_settings=["BearerToken"]
        )
        return str(url), dict(with_auth)

    async def _send(
        self, method: str, path: str, *, body: Any, query: Sequence[tuple[str, str]], content_type: str
    ) -> Obj | None:
        url, headers = self._url(method, path, {"Accept": "application/json", "Content-Type": content_type})
        data = None if body is None else json.dumps(body, separators=(",", ":"))  # JSON is YAML too (apply)
        timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
        async with self._requests().request(
            method, url, params=list(query), data=data, headers=headers, timeout=timeout
        ) as resp:
            raw = await resp.read()
            status, reason = resp.status, resp.reason
        if status == 404 and method == "GET":
            return None
        if status >= 400:
            raise ApiError(status, reason or "", raw.decode(errors="replace"))
        if not raw:
            return None
        result: Obj = await asyncio.to_thread(json.loads, raw) if len(raw) > _THREAD_JSON else json.loads(raw)
        return result

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str = "application/json",
        kind: str = "",
        fenced: bool = True,
    ) -> Obj | None:
        """One request. A write (anything but GET) is refused with FencedError while `fence` says this replica
        may not write (sharded mode: its Lease is not valid); `fenced=False` is for the Lease renewal itself."""
        if method != "GET":
            if fenced and not self.fence():
                raise FencedError(f"{method} {path}: this replica's shard Lease is not valid; it writes nothing")
            metrics.API_WRITES.labels(verb=method.lower(), kind=kind or "other").inc()
        metrics.API_PENDING.inc()
        try:
            async with self._gate:
                return await self._send(method, path, body=body, query=query, content_type=content_type)
        finally:
            metrics.API_PENDING.dec()

    @staticmethod
    def path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        """The API path of `kind` in `namespace` (None: in every namespace), of one object, of a subresource."""
        template = _PATHS[kind]
        path = template.replace("/namespaces/{ns}", "") if namespace is None else template.format(ns=namespace)
        if name:
            path += f"/{urllib.parse.quote(name)}"
        if sub:
            path += f"/{sub}"
        return path

    # ------------------------------------------------------------------ reads
    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return await self.request("GET", self.path(kind, namespace, name))

    async def list_all(self, kind: str, *, label_selector: str | None = None) -> list[Obj]:
        """List `kind` in every namespace."""
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self.request("GET", self.path(kind, None), query=query)
        return _items(result)

    async def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[Obj]:
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self.request("GET", self.path(kind, namespace), query=query)
        return _items(result)

    # ------------------------------------------------------------------ watches
    def _watch_session(self) -> aiohttp.ClientSession:
        if self._watches is None:
            # a watch event is one line: allow objects far bigger than aiohttp's 64 KiB default read buffer; no
            # limit on connections (each watch holds one for its whole life)
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=0)
            self._watches = aiohttp.ClientSession(connector=connector, read_bufsize=1 << 22)
        return self._watches

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
    ) -> AsyncIterator[tuple[str, Obj]]:
        """Events of `kind` in `namespace` (None: every namespace), forever: ("ADDED" | "MODIFIED" | "DELETED",
        object). `metadata_only`: the objects carry only their metadata (PartialObjectMetadata), which is all a
        watch that looks for other writers needs: a 1,000-service registry ConfigMap is not sent whole on every
        rewrite. `field_selector` ("metadata.name=ca-bundle"): one object's watch, as kubelet watches the
        ConfigMaps its pods mount.

        It starts without a resource version, so the server first sends a synthetic ADDED event per existing
        object (the listing, streamed: memory stays one object deep). Each request ends after `WATCH_SECONDS`
        and the next resumes from the last version seen (bookmarks keep it fresh); a version the server no longer
        has (410 Gone) starts over with a new listing. Deletions missed in such a gap are the resync's to find.
        Errors are logged and retried when the operator's shared retry limiter says; only cancellation ends it.
        """
        version: str | None = None
        retry_key = ("watch", kind, namespace, label_selector, field_selector)
        path = self.path(kind, namespace)
        while True:
            query = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS)}
            if version:
                query["resourceVersion"] = version
            if label_selector:
                query["labelSelector"] = label_selector
            if field_selector:
                query["fieldSelector"] = field_selector
            url, headers = self._url("GET", path, {"Accept": METADATA_ONLY if metadata_only else "application/json"})
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=WATCH_SECONDS + 30)
                async with self._watch_session().get(url, params=query, headers=headers, timeout=timeout) as resp:
                    if resp.status == 410:
                        version = None
                        continue
                    if resp.status >= 400:
                        raise ApiError(resp.status, resp.reason or "", await resp.text())
                    async for line in resp.content:
                        event = json.loads(line)
                        type_, obj = event["type"], event["object"]
                        if type_ == "ERROR":
                            if obj.get("code") == 410:
                                version = None
                                break
                            raise ApiError(int(obj.get("code", 500)), obj.get("reason", ""), obj.get("message", ""))
                        version = obj.get("metadata", {}).get("resourceVersion") or version
                        RETRIES.forget(retry_key)
                        if type_ != "BOOKMARK":
                            yield type_, obj
            except (aiohttp.ClientError, TimeoutError, ApiError, ValueError) as exc:
                wait = RETRIES.when(retry_key)
                log.warning("watching %s in %s failed, retrying in %.1fs: %s", kind, namespace, wait, exc)
                await asyncio.sleep(wait)

    # ------------------------------------------------------------------ writes
    def _remember(self, key: tuple[str, str, str], desired: Obj, actual: Obj | None) -> None:
        """What beacon wants of an object, and the version of it that beacon last wrote (or read and found in
        order): the watch's echo of that version is no news."""
        self._applied[key] = desired
        version = ((actual or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            self._versions[key] = str(version)
        else:
            self._versions.pop(key, None)

    def written_by_others(self, kind: str, meta: Mapping[str, Any]) -> bool:
        """Whether an object beacon wrote (or read and found in order) has since been written by someone else: its
        resourceVersion, as a watch delivered it, is not the one beacon's own last write produced. False for
        objects beacon holds no copy of, and for the echo of beacon's own writes, even if that version does not
        look like what beacon asked for (another field manager keeps an item of a keyed list: comparing again
        would only write again, forever). Whether the other writer touched anything beacon owns is for the next
        `ensure` to find out (it reads the object, compares, and writes only on a difference)."""
        key = _key(kind, meta["namespace"], meta["name"])
        if key in self._writing:
            # the watch can deliver the echo of a write before its response is back: whatever it is, the write
            # under way settles the object (a change by someone else after it shows up as a later version)
            return False
        return key in self._applied and meta.get("resourceVersion") != self._versions.get(key)

    def holds(self, kind: str, meta: Mapping[str, Any]) -> bool:
        """Whether beacon holds a copy of this object (it wrote it, or read it and found it in order)."""
        return _key(kind, meta["namespace"], meta["name"]) in self._applied

    def changed_by_others(self, kind: str, type_: str, meta: Mapping[str, Any]) -> bool:
        """Whether a watch event of an object beacon owns is someone else's doing: a deletion of an object beacon
        holds, or a version beacon did not write. beacon's own deletions and writes coming back are not."""
        if type_ == "DELETED":
            return self.holds(kind, meta)
        return self.written_by_others(kind, meta)

    def cached(self, obj: Obj) -> bool:
        """Whether `ensure(obj)` can compare with what beacon wrote (or read) before, without reading the API."""
        return self.holds(obj["kind"], obj["metadata"])

    async def ensure(
        self, obj: Obj, *, absent: bool = False, observed: Obj | _Unread | None = UNREAD, merge: bool = False
    ) -> bool:
        """Server-side apply `obj` unless the API already holds it. Returns whether a write was made.

        "Holds it" is decided on the object as read: it has every field `obj` sets, with the same values, and it
        has no field that beacon's field manager applied and `obj` no longer sets (see `stale_fields`; so a field
        that a previous beacon wrote goes at the first reconcile after a restart).

        An existing object is taken over only if it is already beacon's: owned by the same controller (the
        ownerReference uid in `obj`) or, for objects without an owner, carrying the same labels. Anything else
        raises NotOursError, so a user's own Service or ConfigMap of the same name is never overwritten.

        `absent`: the caller knows beacon never published this object (a new entry's EndpointSlice or Endpoints),
        so it is created with a POST instead of being read first: one request instead of two, and still never
        over someone else's object (a POST fails with 409 when the name is taken; then the usual read-and-compare
        path runs). Only for kinds whose lists are atomic (EndpointSlice, Endpoints): the creating POST leaves its
        fields co-owned by an Update entry of beacon's field manager, which a later apply would not prune from a
        keyed list (a Service's ports).

        `observed`: the object as the caller has just read it (None: not there), to compare with instead of
        reading it here; a batch of entries can read their Services with one LIST.

        `merge`: an object whose data and annotations change often and nothing else (a materialised ConfigMap).
        A change confined to MERGED_MAPS, from what beacon wrote, goes as one JSON merge patch: the apiserver
        spends about a third less CPU on it than on an apply, which it parses as YAML and merges field by field
        (measured in bench/bench_config.py). What a merge patch sets is held by beacon's Update entry, which an
        apply does not prune: so keys that go are sent as null, and after an apply or a restart the keys of
        those maps that beacon holds by any operation and no longer wants are removed explicitly
        (`merged_leftovers`).
        """
        kind, meta = obj["kind"], obj["metadata"]
        key = _key(kind, meta["namespace"], meta["name"])
        desired = _owned_view(obj)
        cached = self._applied.get(key)
        if cached is not None and cached == desired:
            return False
        patch = merge_patch_between(cached, desired) if merge and cached is not None else None
        if patch is not None:
            with self._write_of(key):
                written = await self.merge_patch(kind, meta["namespace"], meta["name"], patch, manage=True)
                self._remember(key, desired, written)
            return True
        if cached is None and absent:
            try:
                with self._write_of(key):
                    written = await self.request(
                        "POST",
                        self.path(kind, meta["namespace"]),
                        body=obj,
                        query=[("fieldManager", FIELD_MANAGER)],
                        kind=kind,
                    )
            except ApiError as exc:
                if exc.status != 409:
                    raise
            else:
                self._remember(key, desired, written)
                return True
        if cached is None:
            actual = await self.get(kind, meta["namespace"], meta["name"]) if observed is UNREAD else observed
            if actual is not None:
                if not _ours(actual, obj):
                    raise NotOursError(
                        f"{kind} {meta['namespace']}/{meta['name']} exists and is not managed by beacon; "
                        "rename the entry or delete that object"
                    )
                if (
                    covers(_owned_view(actual), desired)
                    and not stale_fields(actual, obj)
                    and not (merge and merged_leftovers(actual, desired))
                ):
                    self._remember(key, desired, actual)
                    return False
        with self._write_of(key):
            written = await self.apply(obj)
            leftovers = merged_leftovers(written, desired) if merge and written is not None else None
            if leftovers is not None:
                written = await self.merge_patch(kind, meta["namespace"], meta["name"], leftovers, manage=True)
            self._remember(key, desired, written)
        return True

    async def apply(self, obj: Obj, *, fenced: bool = True) -> Obj | None:
        """One server-side apply of `obj` as beacon's field manager, taking over conflicting fields, uncached
        (`ensure` is the cached, write-on-change way; the shard Lease renewal calls this with `fenced=False`)."""
        meta = obj["metadata"]
        return await self.request(
            "PATCH",
            self.path(obj["kind"], meta["namespace"], meta["name"]),
            body=obj,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
            kind=obj["kind"],
            fenced=fenced,
        )

    @contextlib.contextmanager
    def _write_of(self, key: tuple[str, str, str]) -> Iterator[None]:
        """Mark a write of `key` in flight (see `written_by_others`)."""
        self._writing[key] = self._writing.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._writing[key] - 1
            if left:
                self._writing[key] = left
            else:
                del self._writing[key]

    async def create(self, obj: Obj) -> bool:
        """Create `obj` (an object that never changes once written, e.g. a ControllerRevision) without caching it.
        Returns False when it already exists and is beacon's (a retry); raises NotOursError when it is not."""
        kind, meta = obj["kind"], obj["metadata"]
        try:
            await self.request("POST", self.path(kind, meta["namespace"]), body=obj, kind=kind)
        except ApiError as exc:
            if exc.status != 409:
                raise
            actual = await self.get(kind, meta["namespace"], meta["name"])
            if actual is not None and not _ours(actual, obj):
                raise NotOursError(
                    f"{kind} {meta['namespace']}/{meta['name']} exists and is not managed by beacon"
                ) from exc
            return False
        return True

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Obj, *, manage: bool = False
    ) -> Obj | None:
        """A JSON merge patch: touches only the fields in `patch`. Of someone else's object (e.g. one annotation
        of a Deployment) it is recorded under the client's default manager name; `manage`: under beacon's field
        manager (an object beacon owns, see `ensure(merge=True)`). Returns the patched object."""
        return await self.request(
            "PATCH",
            self.path(kind, namespace, name),
            body=patch,
            query=[("fieldManager", FIELD_MANAGER)] if manage else (),
            content_type="application/merge-patch+json",
            kind=kind,
        )

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """Drop the cached copy, so the next `ensure` re-reads the API (after a conflict or an outside edit)."""
        self._applied.pop(_key(kind, namespace, name), None)
        self._versions.pop(_key(kind, namespace, name), None)

    def forget_namespace_entry(self, namespace: str, label_value: str) -> None:
        for key in [k for k, v in self._applied.items() if k[1] == namespace and _entry_label(v) == label_value]:
            self._applied.pop(key, None)
            self._versions.pop(key, None)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.forget(kind, namespace, name)
        try:
            await self.request("DELETE", self.path(kind, namespace, name), kind=kind)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(self, kind: str, namespace: str, name: str, status: Obj) -> None:
        await self.request(
            "PATCH",
            self.path(kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
            kind=f"{kind}/status",
        )

    async def event(self, *, involved: Mapping[str, Any], type_: str, reason: str, message: str, now_iso: str) -> None:
        meta = involved["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "beacon"},
            "reportingComponent": "beacon.dev/operator",
            "reportingInstance": "beacon",
            "firstTimestamp": now_iso,
            "lastTimestamp": now_iso,
            "count": 1,
        }
        await self.request("POST", self.path("Event", meta["namespace"]), body=body, kind="Event")


def _items(listed: Obj | None) -> list[Obj]:
    """A list response's items as whole objects: the server leaves out each item's kind and apiVersion, which the
    list states once ("ServiceList", "v1"); without them a listed object never covers a desired one."""
    listed = listed or {}
    kind = str(listed.get("kind") or "").removesuffix("List")
    api_version = listed.get("apiVersion")
    items = list(listed.get("items") or [])
    for item in items:
        if kind:
            item.setdefault("kind", kind)
        if api_version:
            item.setdefault("apiVersion", api_version)
    return items


def _ours(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    want = {ref.get("uid") for ref in desired["metadata"].get("ownerReferences") or []}
    have = {ref.get("uid") for ref in actual.get("metadata", {}).get("ownerReferences") or []}
    if want:
        return bool(want & have)
    labels = actual.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (desired["metadata"].get("labels") or {}).items())


def _entry_label(view: Mapping[str, Any]) -> str | None:
    labels = view.get("metadata", {}).get("labels") or {}
    value = labels.get("beacon.dev/service-entry")
    return str(value) if value is not None else None
