"""beacon's own keep-alive HTTP/1.1 probe client, against real servers on loopback: connection reuse, servers that
close, chunked and oversized bodies, exact timeouts, status ranges, refused connections, a name probed only at the
addresses checked for it, and the same verdict and detail as the aiohttp path for every kind of response (each
scenario is probed by both). The response parser is
also fed responses cut into arbitrary pieces (hypothesis): the pieces never change the answer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beacon.checks import Checker
from beacon.httpprobe import MAX_BODY, HttpProbeClient, ProbeError, Request, _Connection
from beacon.policy import ProbePolicy
from beacon.targets import HttpCheck, ProbeResult, Target
from beacon_dev.devcluster.cluster import free_port

LOOPBACK_ALLOWED = ProbePolicy.with_allowed(["127.0.0.0/8", "::1/128"])
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Raw:
    """A scripted TCP server: `serve(reader, writer)` runs per connection; connections and requests counted."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.serve(reader, writer)
        writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request on a connection, or None when the client hung up."""
        try:
            data = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer.set()
            return None
        self.requests.append(data)
        return data


@contextlib.asynccontextmanager
async def raw_server(
    serve: Callable[[Raw, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Any:
    raw = Raw(lambda r, w: serve(raw, r, w))
    server = await asyncio.start_server(raw._handle, host, port)
    raw.port = server.sockets[0].getsockname()[1]
    async with server:
        yield raw


def answering(*responses: bytes, then_close: bool = False, pause: float = 0.0) -> Any:
    """A server that answers every request with `responses` (written one by one, `pause` apart)."""

    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await raw.request(reader) is not None:
            for i, part in enumerate(responses):
                if i and pause:
                    await asyncio.sleep(pause)
                writer.write(part)
                await writer.drain()
            if then_close:
                return

    return serve


def target(port: int, *, timeout: float = 2.0, **kw: Any) -> Target:
    return Target(address="127.0.0.1", check=HttpCheck(port=port, **kw), interval=10.0, timeout=timeout)


@contextlib.asynccontextmanager
async def checker(*, native: bool = True) -> AsyncIterator[Checker]:
    async with Checker(policy=LOOPBACK_ALLOWED, leases=lambda ns, name: None, native_http=native) as c:
        yield c


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ------------------------------------------------------------------------------------------------ keep-alive
async def test_one_connection_is_reused_across_probes() -> None:
    async with raw_server(answering(OK)) as raw, checker() as c:
        results = [await c.run(target(raw.port)) for _ in range(5)]
    assert [(r.ok, r.detail) for r in results] == [(True, "HTTP 200")] * 5
    assert raw.connections == 1
    assert len(raw.requests) == 5


async def test_a_server_that_closes_after_each_answer_gets_a_new_connection_each_time() -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(close, then_close=True)) as raw, checker() as c:
        results = [await c.run(target(raw.port)) for _ in range(3)]
    assert all(r.ok for r in results)
    assert raw.connections == 3


async def test_an_idle_connection_closed_by_the_server_is_replaced() -> None:
    """The server drops the kept connection between probes (its keep-alive timeout): the next probe still passes."""
    async with raw_server(answering(OK, then_close=True)) as raw, checker() as c:
        first = await c.run(target(raw.port))
        await asyncio.sleep(0.05)  # the close arrives while the connection is idle
        second = await c.run(target(raw.port))
    assert (first.ok, second.ok) == (True, True)
    assert raw.connections == 2


async def test_a_kept_connection_closed_as_the_request_arrives_is_retried_once() -> None:
    """The race every keep-alive client meets: the server closes a kept connection just as the next request is
    sent. The request is retried on a new connection (as aiohttp does for a GET) instead of failing the probe."""

    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await raw.request(reader) is None:
            return
        writer.write(OK)  # answers (keep-alive), then drops the connection without answering the next request
        await writer.drain()
        await raw.request(reader)

    async with raw_server(serve) as raw, checker() as c:
        results = [await c.run(target(raw.port)) for _ in range(3)]
    assert [r.detail for r in results] == ["HTTP 200"] * 3
    # each connection answers one request and drops the next: the 2nd and 3rd probes are each retried once
    assert raw.connections == 3
    assert len(raw.requests) == 5


async def test_a_server_that_never_answers_fails_after_one_retry() -> None:
    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.request(reader)

    async with raw_server(serve) as raw, checker() as c:
        result = await c.run(target(raw.port))
    assert (result.ok, result.detail) == (False, "ServerDisconnectedError: Server disconnected")
    assert raw.connections == 2


# ------------------------------------------------------------------------------------------------ bodies
async def test_chunked_bodies_with_extensions_and_trailers_keep_the_connection() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"4;name=value\r\nwell\r\n",
        b"1\r\n!\r\n0\r\nX-Trailer: yes\r\n\r\n",
    )
    results = []
    async with raw_server(answering(*chunked, pause=0.01)) as raw, checker() as c:
        for _ in range(3):
            results.append(await c.run(target(raw.port)))
            await asyncio.sleep(0.1)  # the verdict came with the first chunk; the rest arrives meanwhile
    assert [r.detail for r in results] == ["HTTP 200"] * 3
    assert raw.connections == 1  # each body drained to its end, so the connection stayed usable


async def test_a_failing_chunked_body_shows_in_the_detail() -> None:
    chunked = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n8\r\ndb is do\r\n4\r\nwn!!\r\n0\r\n\r\n"
    async with raw_server(answering(chunked)) as raw, checker() as c:
        result = await c.run(target(raw.port))
    assert (result.ok, result.detail) == (False, "HTTP 500 b'db is down!!'")


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_4_kib_is_cut_and_its_connection_dropped(chunked: bool) -> None:
    body = b"".join(b"%06d " % i for i in range(3000))  # 21,000 bytes
    if chunked:
        head = b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n"
        parts = [head] + [
            b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000)
        ]
        parts.append(b"0\r\n\r\n")
    else:
        parts = [b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n" % len(body), body]
    async with raw_server(answering(*parts)) as raw, checker() as c:
        first = await c.run(target(raw.port))
        second = await c.run(target(raw.port))
    assert first.detail == second.detail == f"HTTP 503 {body[:60]!r}"
    assert raw.connections == 2  # never reused a connection with unread body
    assert len(body) > MAX_BODY


async def test_a_body_until_close_http_1_0() -> None:
    serve = answering(b"HTTP/1.0 503 Nope\r\n\r\n", b"gone fishing", then_close=True)
    async with raw_server(serve) as raw, checker() as c:
        result = await c.run(target(raw.port))
    assert (result.ok, result.detail) == (False, "HTTP 503 b'gone fishing'")


async def test_a_slow_rest_of_body_does_not_delay_the_verdict() -> None:
    """As aiohttp's read(): the first body bytes are enough for the verdict; the rest is drained afterwards so
    the connection can be reused."""
    parts = (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst", b"-last")
    async with raw_server(answering(*parts, pause=2.0)) as raw, checker() as c:
        started = time.monotonic()
        result = await c.run(target(raw.port, timeout=5.0))
        elapsed = time.monotonic() - started
        await asyncio.sleep(2.1)
        again = await c.run(target(raw.port, timeout=5.0))
    assert result.ok
    assert again.ok
    assert elapsed < 1.5  # the verdict did not wait for the rest of the body (2 s later); not a speed bound
    assert raw.connections == 1


# ------------------------------------------------------------------------------------------------ names
async def test_a_name_is_probed_at_its_checked_addresses_in_order_and_its_idle_connection_follows_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop's getaddrinfo answers "localhost" with the addresses below, one answer per probe. The probe tries
    them in order (nothing listens on 127.0.0.3), keeps its connection while the name still resolves to its
    address, and opens a new one when the name moves; the Host header is always the name."""
    answers = [["127.0.0.3", "127.0.0.2"], ["127.0.0.2"], ["127.0.0.4"]]
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo

    async def getaddrinfo(host: object, port: object, **kw: Any) -> list[Any]:
        if host != "localhost":
            return await real_getaddrinfo(host, port, **kw)  # type: ignore[arg-type]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port)) for a in answers.pop(0)]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    async with (
        raw_server(answering(OK), host="127.0.0.2") as first,
        raw_server(answering(OK), host="127.0.0.4", port=first.port) as moved,
        checker() as c,
    ):
        probe = Target(address="localhost", check=HttpCheck(port=first.port), interval=10.0, timeout=2.0)
        results = [await c.run(probe) for _ in range(3)]
        await asyncio.wait_for(first.closed_by_peer.wait(), 2.0)  # the connection to the old address dropped
    assert [(r.ok, r.detail) for r in results] == [(True, "HTTP 200")] * 3
    assert (first.connections, len(first.requests)) == (1, 2)
    assert (moved.connections, len(moved.requests)) == (1, 1)
    assert all(f"\r\nHost: localhost:{first.port}\r\n".encode() in r for r in first.requests + moved.requests)
    assert answers == []


# ------------------------------------------------------------------------------------------------ timeouts, refusals
async def test_timeout_is_exact_and_drops_the_connection() -> None:
    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.request(reader)
        await raw.request(reader)  # returns None when the client hangs up

    async with raw_server(serve) as raw, checker() as c:
        started = time.monotonic()
        result = await c.run(target(raw.port, timeout=0.25))
        elapsed = time.monotonic() - started
        await asyncio.wait_for(raw.closed_by_peer.wait(), 2.0)
    assert (result.ok, result.detail) == (False, "timed out after 0.25s")
    # it waited for the timeout (timers may fire a fraction of a millisecond early) and did not hang beyond it
    assert 0.2 <= elapsed < 2.0


async def test_connection_refused_reads_like_aiohttp() -> None:
    port = free_port()
    async with checker() as native, checker(native=False) as old:
        mine = await native.run(target(port))
        theirs = await old.run(target(port))
    assert not mine.ok
    assert mine.detail.startswith(f"ClientConnectorError: Cannot connect to host 127.0.0.1:{port} ssl:default [")
    assert mine.detail == theirs.detail


@given(
    code=st.integers(min_value=200, max_value=599),
    ranges=st.lists(st.tuples(st.integers(200, 599), st.integers(0, 50)), min_size=1, max_size=3),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_status_ranges_decide_the_verdict(code: int, ranges: list[tuple[int, int]]) -> None:
    expected = tuple((low, low + width) for low, width in ranges)
    body = b"" if code in (204, 304) else b"why"
    response = b"HTTP/1.1 %d Whatever\r\nContent-Length: %d\r\n\r\n%s" % (code, len(body), body)

    async def probe() -> ProbeResult:
        async with raw_server(answering(response)) as raw, checker() as c:
            return await c.run(target(raw.port, expected=expected))

    result = asyncio.run(probe())
    ok = any(low <= code <= high for low, high in expected)
    assert result.ok is ok
    assert result.detail == (f"HTTP {code}" if ok else f"HTTP {code} {body!r}")


# ------------------------------------------------------------------------------------------------ same as aiohttp
def _reset(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
    async def serve() -> None:
        if await raw.request(reader) is not None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST instead of an answer

    return serve()


SCENARIOS: dict[str, Any] = {
    "200 with a length": answering(OK),
    "503 with a body": answering(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 13\r\n\r\ndatabase down"),
    "204 without a body": answering(b"HTTP/1.1 204 No Content\r\n\r\n"),
    "302 not followed": answering(
        b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n"
    ),
    "chunked 200": answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    "chunked 500": answering(
        b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nT: 1\r\n\r\n"
    ),
    "HTTP/1.0 until close": answering(b"HTTP/1.0 503 Nope\r\n\r\nbody until close", then_close=True),
    "Connection: close": answering(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", then_close=True
    ),
    "100 Continue first": answering(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 418 Teapot\r\nContent-Length: 3\r\n\r\ntea"
    ),
    "head and body apart": answering(b"HTTP/1.1 503 X\r\nContent-Length: 5\r\n\r\n", b"later", pause=0.05),
    "empty reply": answering(then_close=True),
    "reset": _reset,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_the_same_verdict_and_detail_as_aiohttp(scenario: str) -> None:
    answers: dict[bool, list[tuple[bool, str]]] = {}
    for native in (True, False):
        async with raw_server(SCENARIOS[scenario]) as raw, checker(native=native) as c:
            answers[native] = [((r := await c.run(target(raw.port))).ok, r.detail) for _ in range(2)]
    assert answers[True] == answers[False]


async def test_the_request_matches_aiohttps_and_headers_are_sent() -> None:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        for native in (True, False):
            async with checker(native=native) as c:
                check = {"path": "/a b/%41?x=1&y=ä", "headers": (("X-Probe", "yes"), ("user-agent", "mine"))}
                assert (await c.run(target(port, **check))).ok
    finally:
        await runner.cleanup()
    mine, theirs = seen
    assert mine.raw_path == theirs.raw_path == "/a%20b/A?x=1&y=%C3%A4"
    for request in seen:
        assert request.headers["X-Probe"] == "yes"
        assert request.headers.getall("User-Agent") == ["mine"]
        assert request.host == f"127.0.0.1:{port}"


def test_request_bytes() -> None:
    request = Request.build(address="::1", port=80, path="/h")
    assert request.data == b"GET /h HTTP/1.1\r\nHost: [::1]\r\nUser-Agent: beacon-probe/1\r\nAccept: */*\r\n\r\n"
    with pytest.raises(ValueError, match="invalid HTTP header"):
        Request.build(address="198.18.0.1", port=8080, path="/", headers=(("X", "a\r\nInjected: 1"),))
    with pytest.raises(ValueError, match="invalid HTTP header"):
        Request.build(address="198.18.0.1", port=8080, path="/", headers=(("Bad Name", "v"),))


# ------------------------------------------------------------------------------------------------ parser
class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int, bytes, bool]:
    """(wire bytes, status, body, whether the connection may be kept) of one valid response."""
    status = draw(st.sampled_from([200, 201, 204, 302, 404, 500, 503]))
    body = b"" if status == 204 else draw(st.binary(max_size=2 * MAX_BODY))
    framing = "none" if status == 204 else draw(st.sampled_from(["length", "chunked", "close"]))
    interim = draw(st.booleans())
    head = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    head += b"HTTP/1.1 %d Reason Phrase\r\nServer: test\r\n" % status
    if framing == "length":
        wire = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        chunks = b"".join(b"%X\r\n%s\r\n" % (len(p), p) for p in pieces)
        wire = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    elif framing == "close":
        wire = head + b"Connection: close\r\n\r\n" + body
    else:
        wire = head + b"\r\n"
    keep = framing in ("length", "chunked", "none") and len(body) <= MAX_BODY
    return wire, status, body, keep


@given(response=responses(), cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=8))
@settings(max_examples=300, deadline=None)
def test_a_response_in_any_pieces_gives_the_same_answer(
    response: tuple[bytes, int, bytes, bool], cuts: list[int]
) -> None:
    wire, status, body, _ = response

    async def feed() -> tuple[tuple[int, bytes] | BaseException, bool, bool]:
        client = HttpProbeClient()
        conn = _Connection(client, ("198.18.0.1", 80))
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        waiter = conn.send(b"GET / HTTP/1.1\r\n\r\n")
        points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
        for a, b in itertools.pairwise(points):
            if b > a and not transport.closed:
                conn.data_received(wire[a:b])
        if not transport.closed:
            conn.eof_received()  # the server closes after its answer (framing "close" needs it)
        answer: tuple[int, bytes] | BaseException = (
            waiter.result() if waiter.done() and not waiter.exception() else (waiter.exception() or TimeoutError())
        )
        kept = client.idle_connections == 1
        await client.close()
        return answer, kept, transport.closed

    answer, _, _ = asyncio.run(feed())
    assert not isinstance(answer, BaseException), answer
    got_status, got_body = answer
    assert got_status == status
    assert body.startswith(got_body)
    assert len(got_body) <= MAX_BODY
    assert bool(got_body) == bool(body)  # the first body bytes always come with the verdict


@given(response=responses())
@settings(max_examples=100, deadline=None)
def test_a_complete_response_keeps_its_connection_only_when_it_can_be_reused(
    response: tuple[bytes, int, bytes, bool],
) -> None:
    wire, status, _, keep = response

    async def feed() -> tuple[int, bool]:
        client = HttpProbeClient()
        conn = _Connection(client, ("198.18.0.1", 80))
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        waiter = conn.send(b"GET / HTTP/1.1\r\n\r\n")
        conn.data_received(wire)  # all at once
        if b"Connection: close" in wire:
            conn.eof_received()  # framed by the end of the connection
        got = waiter.result()[0] if waiter.done() else -1
        kept = client.idle_connections == 1
        await client.close()
        return got, kept

    got, kept = asyncio.run(feed())
    assert got == status
    assert kept is keep


@pytest.mark.parametrize(
    "wire",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_garbage_is_a_failure_at_once(wire: bytes) -> None:
    client = HttpProbeClient()
    conn = _Connection(client, ("198.18.0.1", 80))
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    waiter = conn.send(b"GET / HTTP/1.1\r\n\r\n")
    conn.data_received(wire)
    assert transport.closed
    with pytest.raises(ProbeError, match="ClientResponseError: 400, message='Invalid HTTP response"):
        waiter.result()
    await client.close()


def test_on_uvloop_too() -> None:
    """The operator runs on uvloop: the same answers as aiohttp's there, connections reused, timeouts exact."""
    import uvloop

    async def main() -> None:
        for scenario in SCENARIOS:
            await test_the_same_verdict_and_detail_as_aiohttp(scenario)
        await test_one_connection_is_reused_across_probes()
        await test_a_kept_connection_closed_as_the_request_arrives_is_retried_once()
        await test_timeout_is_exact_and_drops_the_connection()
        await test_connection_refused_reads_like_aiohttp()
        await test_a_slow_rest_of_body_does_not_delay_the_verdict()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_failed_connects_read_the_same_on_both_loops() -> None:
    import uvloop

    from beacon.targets import TcpCheck

    port = free_port()

    async def details() -> list[str]:
        async with checker() as c:
            tcp = Target(address="127.0.0.1", check=TcpCheck(port=port), interval=10.0, timeout=2.0)
            return [(await c.run(target(port))).detail, (await c.run(tcp)).detail]

    on_asyncio = asyncio.run(details())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        on_uvloop = runner.run(details())
    assert on_asyncio == on_uvloop
    assert on_asyncio[1] == f"ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', {port})"
