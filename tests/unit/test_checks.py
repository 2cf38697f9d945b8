"""The probes, against real servers on the loopback interface (allowed by an explicit probe policy): HTTP, TCP,
gRPC health and Lease checks, bounded body reads, timeouts, the policy refusing before anything is sent (also to a
name that answers an allowed address first and a refused one next: DNS rebinding), and the gRPC channel of an
endpoint closed when the prober drops its last target."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import _async as health_aio  # public as grpc_health.v1.health.aio (absent from the stubs)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from beacon.checks import MAX_BODY, Checker
from beacon.policy import ProbePolicy
from beacon.prober import Prober
from beacon.targets import Check, GrpcCheck, HttpCheck, LeaseCheck, LeaseRecord, ProbeResult, Target, TcpCheck
from beacon_dev.devcluster.cluster import free_port

LOOPBACK_ALLOWED = ProbePolicy.with_allowed(["127.0.0.0/8", "::1/128"])
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)


@contextlib.asynccontextmanager
async def http_server(
    routes: dict[str, Handler], *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[int, Seen]]:
    seen = Seen()

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.paths.append(request.path)
        seen.headers.append(dict(request.headers))
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        seen.peers.add((peer[0], peer[1]))
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield port, seen
    finally:
        await runner.cleanup()


def status(code: int, body: bytes = b"") -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=code, body=body)

    return handler


def http(port: int, **kw: object) -> HttpCheck:
    return HttpCheck(port=port, **kw)  # type: ignore[arg-type]


def probe_target(check: Check, *, address: str = "127.0.0.1", timeout: float = 2.0) -> Target:
    return Target(address=address, check=check, interval=10.0, timeout=timeout)


@contextlib.asynccontextmanager
async def checker(
    policy: ProbePolicy = LOOPBACK_ALLOWED,
    leases: dict[tuple[str, str], LeaseRecord] | None = None,
    now: float = 0.0,
    native_http: bool = True,
) -> AsyncIterator[Checker]:
    table = leases or {}
    async with Checker(
        policy=policy, leases=lambda ns, name: table.get((ns, name)), wall_clock=lambda: now, native_http=native_http
    ) as c:
        yield c


async def wait_until(condition: Callable[[], bool], *, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------------------ HTTP
async def test_http_passes_on_2xx_and_sends_configured_headers() -> None:
    async with http_server({"/healthz": status(200, b"ok")}) as (port, seen), checker() as c:
        result = await c.run(probe_target(http(port, path="/healthz", headers=(("X-Probe", "yes"),))))
    assert result.ok
    assert result.detail == "HTTP 200"
    assert not result.refused
    assert seen.paths == ["/healthz"]
    assert seen.headers[0]["X-Probe"] == "yes"
    assert seen.headers[0]["User-Agent"].startswith("beacon-probe")


async def test_http_fails_outside_expected_statuses_and_shows_the_body() -> None:
    async with http_server({"/h": status(503, b"database down")}) as (port, _), checker() as c:
        result = await c.run(probe_target(http(port, path="/h")))
    assert not result.ok
    assert "HTTP 503" in result.detail
    assert "database down" in result.detail


@pytest.mark.parametrize(("code", "ok"), [(204, True), (200, False), (418, True), (419, False)])
async def test_http_expected_status_ranges(code: int, ok: bool) -> None:
    async with http_server({"/": status(code)}) as (port, _), checker() as c:
        result = await c.run(probe_target(http(port, expected=((204, 204), (400, 418)))))
    assert result.ok is ok


async def test_http_redirects_are_not_followed() -> None:
    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    routes = {"/": redirect, "/elsewhere": status(500)}
    async with http_server(routes) as (port, seen), checker() as c:
        result = await c.run(probe_target(http(port)))
    assert result.ok  # 302 is inside the default 200-399
    assert seen.paths == ["/"]  # a redirect could point anywhere (the metadata service): never followed


async def test_http_body_read_is_bounded() -> None:
    """A health endpoint streaming an endless body still gives a result, and the connection is dropped."""
    sent = 0
    finished = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            while True:
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            finished.set()
        return response

    async with http_server({"/": endless}) as (port, _), checker() as c:
        result = await c.run(probe_target(http(port), timeout=5.0))
        await asyncio.wait_for(finished.wait(), 5.0)  # the checker hung up instead of reading on
    assert result.ok
    assert result.detail == "HTTP 200"
    assert sent > MAX_BODY


async def test_http_keeps_connections_alive_between_probes() -> None:
    async with http_server({"/": status(200, b"ok")}) as (port, seen), checker() as c:
        for _ in range(3):
            assert (await c.run(probe_target(http(port)))).ok
    assert len(seen.paths) == 3
    assert len(seen.peers) == 1  # one connection, reused


async def test_http_timeout() -> None:
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    async with http_server({"/": slow}) as (port, _), checker() as c:
        result = await c.run(probe_target(http(port), timeout=0.2))
        release.set()
    assert not result.ok
    assert result.detail == "timed out after 0.2s"


async def test_http_over_ipv6() -> None:
    try:
        async with http_server({"/": status(200)}, host="::1") as (port, _), checker() as c:
            result = await c.run(probe_target(http(port), address="::1"))
    except OSError as exc:  # pragma: no cover - hosts without IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {exc}")
    assert result.ok


async def test_connection_refused_is_a_failure() -> None:
    port = free_port()
    async with checker() as c:
        tcp = await c.run(probe_target(TcpCheck(port=port)))
        web_ = await c.run(probe_target(http(port)))
    assert not tcp.ok
    assert not tcp.refused  # a failed probe, not a policy refusal
    assert "ConnectionRefused" in tcp.detail or "Connect call failed" in tcp.detail
    assert not web_.ok


# ------------------------------------------------------------------------------------------------ TCP
async def test_tcp_connect_passes() -> None:
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, checker() as c:
        result = await c.run(probe_target(TcpCheck(port=port)))
        await asyncio.sleep(0.05)
    assert result.ok
    assert connections == 1


# ------------------------------------------------------------------------------------------------ policy
@pytest.mark.parametrize("address", ["127.0.0.1", "localhost"])
async def test_policy_refusal_sends_nothing(address: str) -> None:
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    results: list[ProbeResult] = []
    async with server, checker(policy=ProbePolicy()) as c:
        for check in (HttpCheck(port=port), TcpCheck(port=port), GrpcCheck(port=port)):
            results.append(await c.run(probe_target(check, address=address)))
        await asyncio.sleep(0.05)
    assert connections == 0
    for result in results:
        assert result.refused
        assert not result.ok
        assert "loopback" in result.detail
    if address == "localhost":
        assert results[0].detail.startswith("localhost resolves to")


async def test_unresolvable_names_are_probe_failures_not_refusals() -> None:
    async with checker(policy=ProbePolicy()) as c:
        result = await c.run(probe_target(TcpCheck(port=80), address="does-not-exist.invalid", timeout=2.0))
    assert not result.ok
    assert not result.refused


CHECKED = "127.0.0.2"  # what "localhost" answers to the first lookup: allowed by REBINDING_POLICY
REBOUND = "127.0.0.1"  # what it answers to every later lookup: loopback, refused
REBINDING_POLICY = ProbePolicy.with_allowed([f"{CHECKED}/32"])


@contextlib.asynccontextmanager
async def allowed_server(kind: str, port: int) -> AsyncIterator[tuple[Check, Seen]]:
    """A server of `kind` on CHECKED:port; what an HTTP one received goes to the Seen."""
    if kind.startswith("http"):
        async with http_server({"/": status(200)}, host=CHECKED, port=port) as (_, seen):
            yield HttpCheck(port=port), seen
    elif kind == "tcp":
        server = await asyncio.start_server(lambda r, w: w.close(), CHECKED, port)
        async with server:
            yield TcpCheck(port=port), Seen()
    else:
        async with grpc_health_server(f"{CHECKED}:{port}") as (_, servicer):
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            yield GrpcCheck(port=port), Seen()


@pytest.mark.parametrize("kind", ["http", "http-aiohttp", "tcp", "grpc"])
async def test_a_name_is_resolved_once_and_only_the_checked_address_is_connected_to(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: "localhost" answers an allowed address to the first lookup and a refused one to every later
    lookup (the loop's getaddrinfo is replaced; gRPC's own resolver would answer the refused one too). The probe
    connects to the address it checked, with the name as the Host header; the next probe looks the name up again
    and is refused. Nothing ever reaches the refused address."""
    reached_refused = 0

    def on_refused_address(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal reached_refused
        reached_refused += 1
        writer.close()

    refused_server = await asyncio.start_server(on_refused_address, REBOUND, 0)
    port = refused_server.sockets[0].getsockname()[1]  # the allowed server listens on the same port
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo
    lookups: list[object] = []

    async def getaddrinfo(host: object, port_: object, **kw: Any) -> list[Any]:
        if host != "localhost":
            return await real_getaddrinfo(host, port_, **kw)  # type: ignore[arg-type]
        lookups.append(host)
        answer = CHECKED if len(lookups) == 1 else REBOUND
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answer, port_ or 0))]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    async with (
        refused_server,
        allowed_server(kind, port) as (check, seen),
        checker(policy=REBINDING_POLICY, native_http=kind != "http-aiohttp") as c,
    ):
        first = await c.run(probe_target(check, address="localhost", timeout=1.0))
        second = await c.run(probe_target(check, address="localhost", timeout=1.0))
        await asyncio.sleep(0.05)
    assert reached_refused == 0, "a probe reached the address the policy refuses"
    assert (first.ok, first.refused) == (True, False), first.detail
    assert second.refused
    assert not second.ok
    assert second.detail.startswith(f"localhost resolves to {REBOUND} is loopback")
    assert len(lookups) == 2  # once per probe
    if kind.startswith("http"):
        assert seen.headers[0]["Host"] == f"localhost:{port}"
        assert seen.paths == ["/"]


# ------------------------------------------------------------------------------------------------ Lease
@pytest.mark.parametrize(
    ("record", "ok", "detail"),
    [
        (LeaseRecord(renew_time=990.0, duration=15.0), True, "valid for 5.0s"),
        (LeaseRecord(renew_time=980.0, duration=15.0), False, "expired 5.0s ago"),
        (LeaseRecord(renew_time=985.0, duration=15.0), False, "expired 0.0s ago"),  # exactly at the deadline
        (LeaseRecord(renew_time=None, duration=15.0), False, "no renewTime"),
        (LeaseRecord(renew_time=990.0, duration=None), False, "no renewTime/leaseDurationSeconds"),
        (None, False, "not found"),
    ],
)
async def test_lease_check_against_a_fake_clock(record: LeaseRecord | None, ok: bool, detail: str) -> None:
    leases = {("shop", "payments-a"): record} if record is not None else {}
    async with checker(policy=ProbePolicy(), leases=leases, now=1000.0) as c:
        # a Lease check reads the cache, never the address: the loopback policy does not apply
        result = await c.run(probe_target(LeaseCheck(namespace="shop", name="payments-a"), address="127.0.0.1"))
    assert result.ok is ok
    assert not result.refused
    assert detail in result.detail


# ------------------------------------------------------------------------------------------------ gRPC
@contextlib.asynccontextmanager
async def grpc_health_server(address: str = "127.0.0.1:0") -> AsyncIterator[tuple[int, health_aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


async def test_grpc_health_serving_not_serving_and_service_names() -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    async with grpc_health_server() as (port, servicer), checker() as c:
        await servicer.set("", serving)
        await servicer.set("payments.v1.Payments", not_serving)
        overall = await c.run(probe_target(GrpcCheck(port=port)))
        named = await c.run(probe_target(GrpcCheck(port=port, service="payments.v1.Payments")))
        unknown = await c.run(probe_target(GrpcCheck(port=port, service="nope.v1.Nope")))
        await servicer.set("payments.v1.Payments", serving)
        recovered = await c.run(probe_target(GrpcCheck(port=port, service="payments.v1.Payments")))
    assert (overall.ok, overall.detail) == (True, "gRPC SERVING")
    assert (named.ok, named.detail) == (False, "gRPC NOT_SERVING")
    assert not unknown.ok
    assert "NOT_FOUND" in unknown.detail
    assert recovered.ok  # the cached channel keeps working


async def test_grpc_unreachable_fails_within_the_timeout() -> None:
    port = free_port()
    async with checker() as c:
        started = time.monotonic()
        result = await c.run(probe_target(GrpcCheck(port=port), timeout=0.5))
        elapsed = time.monotonic() - started
    assert not result.ok
    assert elapsed < 5.0  # bounded by the probe timeout, not by gRPC's own reconnect backoff


async def test_the_grpc_channel_of_an_endpoint_is_closed_when_the_prober_drops_its_last_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prober tells the checker (`forget`) when no target uses an endpoint any more: its channel is closed and
    no longer cached. Two targets of one endpoint share one channel, which stays while either is left."""
    channels: list[Any] = []
    real_channel = grpc.aio.insecure_channel

    def recording_channel(target: str, *args: Any, **kwargs: Any) -> Any:
        channels.append(real_channel(target, *args, **kwargs))
        return channels[-1]

    monkeypatch.setattr(grpc.aio, "insecure_channel", recording_channel)
    shutdown = grpc.ChannelConnectivity.SHUTDOWN
    results: list[tuple[Hashable, ProbeResult]] = []
    async with grpc_health_server() as (port, servicer), checker() as c:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await servicer.set("payments.v1.Payments", health_pb2.HealthCheckResponse.SERVING)
        prober = Prober(
            probe=c.run, on_result=lambda k, t, r: results.append((k, r)), first_probe_within=0.01, forget=c.forget
        )
        task = asyncio.create_task(prober.run())
        try:
            prober.upsert("overall", probe_target(GrpcCheck(port=port)))
            prober.upsert("payments", probe_target(GrpcCheck(port=port, service="payments.v1.Payments")))
            await wait_until(lambda: len(results) == 2)
            assert all(result.ok for _, result in results)
            (channel,) = channels  # one channel for the endpoint
            prober.remove("overall")
            await asyncio.sleep(0.1)
            assert channel.get_state() != shutdown  # "payments" still uses it
            prober.remove("payments")
            await wait_until(lambda: channel.get_state() == shutdown)
            prober.upsert("overall", probe_target(GrpcCheck(port=port)))
            await wait_until(lambda: len(results) == 3)
            assert results[-1][1].ok
            assert len(channels) == 2  # the closed channel was not cached any more: a new one
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
