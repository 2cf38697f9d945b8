"""A minimal keep-alive HTTP/1.1 client for plain-HTTP health probes, on asyncio Protocols.

Why it exists: at 10,000 endpoints the probe path is the operator's hot path, and a general HTTP client spends
most of each probe on work a health check does not need (URL parsing, header multidicts, a full response
parser, redirect and cookie machinery). A probe needs one GET, the status line, the few headers that frame the
body (Content-Length, Transfer-Encoding, Connection) and at most `MAX_BODY` bytes of body for the failure detail.
So this client writes request bytes built once per target, parses only that, and keeps one idle connection per
endpoint (address, port) for the next probe. A connection that errors, is closed by the server, carries more
body than `MAX_BODY` or sits idle for `idle_seconds` is dropped; the next probe opens a new one. The client never
resolves a name itself: a DNS name's probe connects only to the addresses checks.py resolved and checked for that
probe (a second lookup could answer an address nobody checked: DNS rebinding), trying them in order as asyncio does,
and an idle connection to an address the name no longer resolves to is not reused.

It behaves like the aiohttp request it replaces (checks.py keeps aiohttp for HTTPS): the verdict is ready as
soon as the status line, the headers and the first body bytes (or the whole, possibly empty, body) are in, as
`resp.content.read(MAX_BODY)` returns; the rest of a body of at most `MAX_BODY` bytes is drained in the
background so the connection can be reused. A request that meets a closed or reset connection is retried once
on a new one (aiohttp does the same for idempotent requests, RFC 9112 section 9.3.1). Failures carry a detail
worded like aiohttp's exception of the same case. Redirects are never followed. No Kubernetes API calls.

Connection-loss hints: when the server closes or resets a connection while it sits IDLE in the pool (no request on
it, response complete), the client tells `on_lost(address, port)`: a backend process that exits or crashes
closes its sockets, and the kernel says so within milliseconds, long before the next probe would notice. The
prober answers with probes (prober.py); the close itself is no verdict. A close during a request is not reported
(the request fails and says so), and neither is any close the client makes itself (forget, the idle sweep, a body
too long, a full pool, shutdown): those set `closed` before the transport goes, which is how they are told apart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import resource
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar, cast

import yarl

MAX_BODY = 4096  # bytes of a response body read at most
MAX_HEAD = 65536  # bytes of status line + headers accepted
USER_AGENT = "beacon-probe/1"

_TOKEN = re.compile(r"^[-A-Za-z0-9!#$%&'*+.^_`|~]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

# parser states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_EOF, _DONE = range(8)


class ProbeError(Exception):
    """A request that produced no response; `detail` is the probe's detail text (worded like aiohttp's)."""

    def __init__(self, detail: str, *, retry: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry = retry  # the server closed or reset before answering: worth one more try on a new connection


def _disconnected() -> ProbeError:
    return ProbeError("ServerDisconnectedError: Server disconnected", retry=True)


def _bad_response(why: str) -> ProbeError:
    return ProbeError(f"ClientResponseError: 400, message='Invalid HTTP response: {why}'")


def host_for_url(address: str) -> str:
    """`address` as it appears in a URL and a Host header: IPv6 literals in brackets."""
    try:
        return f"[{address}]" if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address) else address
    except ValueError:
        return address


@dataclass(frozen=True, slots=True)
class Request:
    """One target's GET, as the bytes sent on every probe."""

    address: str
    port: int
    data: bytes

    @classmethod
    def build(cls, *, address: str, port: int, path: str, headers: Iterable[tuple[str, str]] = ()) -> Request:
        """The request aiohttp would send for `GET http://address:port/path` with these headers (a user's Host,
        User-Agent or Accept header replaces the default one). Raises ValueError for a header that would break
        the request's framing."""
        host = host_for_url(address)
        url = yarl.URL(f"http://{host}:{port}{path}")  # the same path and query encoding as aiohttp's
        given = list(headers)
        for name, value in given:
            if not _TOKEN.match(name) or _BAD_VALUE.search(value):
                raise ValueError(f"invalid HTTP header {name!r}")
        lower = {name.lower() for name, _ in given}
        lines = [f"GET {url.raw_path_qs} HTTP/1.1"]
        if "host" not in lower:
            lines.append(f"Host: {host}" if port == 80 else f"Host: {host}:{port}")
        if "user-agent" not in lower:
            lines.append(f"User-Agent: {USER_AGENT}")
        lines += [f"{name}: {value}" for name, value in given]
        if "accept" not in lower:
            lines.append("Accept: */*")
        return cls(address=address, port=port, data=("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))


class _Connection(asyncio.Protocol):
    """One TCP connection and the parser of the response in flight on it."""

    # 10,000 endpoints keep 10,000 of these: slots instead of a __dict__ each
    __slots__ = (
        "_body",
        "_buf",
        "_client",
        "_drain_timer",
        "_got_any",
        "_loop",
        "_received",
        "_remaining",
        "_reusable",
        "_state",
        "_status",
        "_waiter",
        "closed",
        "idle_since",
        "key",
        "peer",
        "transport",
    )

    def __init__(self, client: HttpProbeClient, key: tuple[str, int], peer: str | None = None) -> None:
        self._client = client
        self.key = key
        self.peer = key[0] if peer is None else peer  # the IP address connected to
        self._loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._state = _DONE
        self._buf = b""
        self._status = 0
        self._body = b""
        self._remaining = 0  # bytes left in the current Content-Length body or chunk
        self._received = 0  # body bytes seen so far (kept or not)
        self._reusable = False
        self._got_any = False

    # ------------------------------------------------------------------ lifetime
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._client.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        idle = self._idle()
        self._forget()
        self._end(exc)
        if idle:
            self._client.peer_closed(self.key)

    def eof_received(self) -> bool:
        idle = self._idle()
        self._forget()
        self._end(None)
        if idle:
            self._client.peer_closed(self.key)
        return False  # the transport closes itself (connection_lost follows, and finds it closed: no second hint)

    def _idle(self) -> bool:
        """Whether the peer is closing this connection while it waits in the pool (not one the client closed)."""
        return not self.closed and self._client.is_idle(self)

    def close(self, *, abort: bool = True) -> None:
        if self.closed:
            return
        self._forget()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # ------------------------------------------------------------------ one request
    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        waiter: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._waiter = waiter
        self._state = _HEAD
        self._buf = b""
        self._body = b""
        self._received = 0
        self._got_any = False
        self.transport.write(data)
        return waiter

    def data_received(self, data: bytes) -> None:
        if self._state == _DONE:  # bytes nobody asked for: the framing of this connection cannot be trusted
            self.close()
            return
        self._got_any = True
        try:
            self._parse(self._buf + data if self._buf else data)
        except ProbeError as exc:
            self._fail(exc)
            self.close()
            return
        state = self._state
        if state == _DONE:
            self._answer()
            if self._reusable and self._received <= MAX_BODY:  # a bigger body is never kept, as with aiohttp
                self._client.release(self)
            else:
                self.close()
        elif state != _HEAD:
            if self._body or self._received >= MAX_BODY:
                self._answer()  # as aiohttp's read(MAX_BODY) returns: the first body bytes are enough
            if self._received >= MAX_BODY:
                self.close()  # a body bigger than we read: never keep a half-read connection
            elif self._waiter is None and self._drain_timer is None:
                self._drain_timer = self._loop.call_later(self._client.drain_seconds, self.close)

    def _forget(self) -> None:
        self.closed = True
        self._client.lost(self)
        self.stop_draining()

    def stop_draining(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _end(self, exc: Exception | None) -> None:
        """The server closed (or reset) the connection."""
        state = self._state
        self._state = _DONE
        if state == _UNTIL_EOF:
            self._answer()
        elif state == _HEAD:
            if exc is not None and self._got_any is False:
                self._fail(ProbeError(f"ClientOSError: {exc}", retry=True))
            else:
                self._fail(_disconnected())
        elif state != _DONE:
            what = "content length" if state == _LENGTH else "transfer length"
            self._fail(
                ProbeError(
                    "ClientPayloadError: Response payload is not completed: "
                    f"<{'ContentLengthError' if state == _LENGTH else 'TransferEncodingError'}: 400, "
                    f"message='Not enough data to satisfy {what} header.'>"
                )
            )
        if not self.closed:
            self.close(abort=False)

    def _answer(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, self._body))

    def _fail(self, exc: ProbeError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # ------------------------------------------------------------------ parsing
    def _parse(self, buf: bytes) -> None:
        """Consume `buf`; what is left unconsumed (an incomplete line) waits in `self._buf`."""
        while buf:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if not buf.startswith(b"HTTP/"[: len(buf)]):
                        raise _bad_response("no HTTP status line")
                    if len(buf) > MAX_HEAD:
                        raise _bad_response(f"headers larger than {MAX_HEAD} bytes")
                    break
                self._head(buf[:end])
                buf = buf[end + 4 :]
            elif state in (_LENGTH, _CHUNK_DATA):
                take = min(len(buf), self._remaining)
                self._keep(buf[:take])
                buf = buf[take:]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DONE if state == _LENGTH else _CHUNK_CRLF
                elif self._received >= MAX_BODY:
                    break
            elif state == _UNTIL_EOF:
                self._keep(buf)
                buf = b""
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise _bad_response("chunk size line too long")
                    break
                size_text = buf[:end].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _bad_response("bad chunk size") from None
                if size < 0:
                    raise _bad_response("bad chunk size")
                buf = buf[end + 2 :]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise _bad_response("chunk not followed by CRLF")
                buf = buf[2:]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise _bad_response("trailers too long")
                    break
                buf = buf[end + 2 :]
                if end == 0:
                    self._state = _DONE
            else:  # _DONE with bytes left over: a pipelined answer nobody asked for
                self._reusable = False
                buf = b""
        self._buf = buf

    def _keep(self, data: bytes) -> None:
        if len(self._body) < MAX_BODY:
            self._body += data[: MAX_BODY - len(self._body)]
        self._received += len(data)

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        line = lines[0]
        if len(line) < 12 or line[:7] != b"HTTP/1." or line[8:9] != b" " or line[12:13] not in (b"", b" "):
            raise _bad_response(f"bad status line {line[:40]!r}")
        code = line[9:12]
        if not code.isdigit():
            raise _bad_response(f"bad status line {line[:40]!r}")
        status = int(code)
        keep_alive = line[7:8] == b"1"  # HTTP/1.1 keeps the connection unless told otherwise; 1.0 closes
        length = -1
        chunked = False
        for header in lines[1:]:
            colon = header.find(b":")
            if colon <= 0:
                raise _bad_response("bad header line")
            name = header[:colon].lower()
            if name == b"content-length":
                value = header[colon + 1 :].strip()
                if not value.isdigit() or (length >= 0 and int(value) != length):
                    raise _bad_response("bad Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                codings = [c.strip() for c in header[colon + 1 :].lower().split(b",")]
                chunked = codings[-1] == b"chunked"
                if not chunked:
                    length, keep_alive = -1, False  # framed by the end of the connection
            elif name == b"connection":
                tokens = {t.strip() for t in header[colon + 1 :].lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200 and status != 101:
            return  # an interim answer (100 Continue, 103 Early Hints): the final one follows
        self._status = status
        self._reusable = keep_alive
        if status == 101:
            self._state, self._reusable = _DONE, False  # the connection now speaks another protocol
        elif status in (204, 304):
            self._state = _DONE
        elif chunked:
            self._state = _CHUNK_SIZE
            self._reusable = keep_alive and length < 0  # both framings given: answer, then close (RFC 9112 6.3)
        elif length >= 0:
            self._remaining = length
            self._state = _LENGTH if length else _DONE
        else:
            self._state, self._reusable = _UNTIL_EOF, False


class HttpProbeClient:
    """Runs GETs over one idle keep-alive connection per (address, port). Create and use it inside one loop;
    `close()` closes every connection."""

    def __init__(
        self,
        *,
        idle_seconds: float = 60.0,
        max_idle: int = 16384,
        drain_seconds: float = 5.0,
        on_lost: Callable[[str, int], None] | None = None,
    ) -> None:
        """`on_lost(address, port)`: called when the peer closes or resets an idle connection (see above)."""
        self.loop = asyncio.get_running_loop()
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self.drain_seconds = drain_seconds  # how long a finished probe's remaining body may take to arrive
        self.on_lost = on_lost
        self._idle: dict[tuple[str, int], _Connection] = {}
        self._open: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.connections_opened = 0
        self.idle_losses = 0  # idle connections the peer closed (each one a hint to `on_lost`)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def get(self, request: Request, peers: Sequence[str] | None = None) -> tuple[int, bytes]:
        """(status, first bytes of the body). `peers` are the IP addresses to connect to when `request.address`
        is a DNS name (resolved and checked by the caller); None when it is an IP literal. Raises ProbeError;
        cancellation (a timeout) drops the connection."""
        key = (request.address, request.port)
        for attempt in (1, 2):
            conn = self._idle.pop(key, None)
            if conn is not None and peers is not None and conn.peer not in peers:
                conn.close(abort=False)  # the name resolves elsewhere now: only the addresses just checked are used
                conn = None
            if conn is None or conn.closed:
                conn = await self._connect(request, key, peers)
            waiter = conn.send(request.data)
            try:
                return await waiter
            except ProbeError as exc:
                if not exc.retry or attempt == 2:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self, request: Request, key: tuple[str, int], peers: Sequence[str] | None) -> _Connection:
        try:
            _, conn = await connect_first(
                self.loop, partial(_Connection, self, key), (request.address,) if peers is None else peers, request.port
            )
        except OSError as exc:
            kind = "ClientConnectorDNSError" if isinstance(exc, socket.gaierror) else "ClientConnectorError"
            why = exc.strerror or str(exc)
            raise ProbeError(
                f"{kind}: Cannot connect to host {request.address}:{request.port} ssl:default [{why}]"
            ) from exc
        return conn

    def forget(self, address: str, port: int) -> None:
        """Close the idle connection to a target that is no longer probed."""
        conn = self._idle.pop((address, port), None)
        if conn is not None:
            conn.close(abort=False)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing

    # ------------------------------------------------------------------ called by connections
    def opened(self, conn: _Connection) -> None:
        self._open.add(conn)
        self.connections_opened += 1

    def is_idle(self, conn: _Connection) -> bool:
        return self._idle.get(conn.key) is conn

    def peer_closed(self, key: tuple[str, int]) -> None:
        """The peer closed an idle connection to `key`: a connection-loss hint."""
        self.idle_losses += 1
        if self.on_lost is not None:
            self.on_lost(*key)

    def lost(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if self._idle.get(conn.key) is conn:
            del self._idle[conn.key]

    def release(self, conn: _Connection) -> None:
        """A connection whose response is complete: keep it for the next probe, unless one is kept already."""
        conn.stop_draining()
        if conn.closed:
            return
        if conn.key in self._idle or len(self._idle) >= self.max_idle:
            conn.close(abort=False)
            return
        conn.idle_since = self.loop.time()
        self._idle[conn.key] = conn
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_seconds / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        horizon = self.loop.time() - self.idle_seconds
        for conn in [c for c in self._idle.values() if c.idle_since < horizon]:
            conn.close(abort=False)
        if self._idle:
            self._sweeper = self.loop.call_later(self.idle_seconds / 2, self._sweep)


async def connect_first(
    loop: asyncio.AbstractEventLoop, factory: Callable[[str], _P], addresses: Sequence[str], port: int
) -> tuple[asyncio.Transport, _P]:
    """Connect to the first of `addresses` (IP literals, never names: nothing is resolved here) that accepts,
    trying them in order as asyncio does with the addresses of a name; `factory(address)` makes the protocol.
    Raises the failure as `connect_error` words it (asyncio's "Multiple exceptions" when they differ)."""
    errors: list[OSError] = []
    for address in addresses:
        try:
            transport, protocol = await loop.create_connection(partial(factory, address), address, port)
        except OSError as exc:
            errors.append(connect_error(exc, address, port))
        else:
            return transport, protocol
    if not errors:
        raise OSError(f"no address to connect to for port {port}")
    if len({str(exc) for exc in errors}) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in errors)}")


def connect_error(exc: OSError, address: str, port: int) -> OSError:
    """`exc`, a failed connect, worded as asyncio's own loop words it whichever loop runs: uvloop says
    "[Errno 111] Connection refused" where asyncio (and so aiohttp, on either loop) says
    "[Errno 111] Connect call failed ('198.18.0.10', 8080)"."""
    if isinstance(exc, socket.gaierror) or exc.errno is None or str(exc.strerror).startswith("Connect call failed"):
        return exc
    sockaddr: tuple[str | int, ...] = (address, port)
    if ":" in address:  # an IPv6 literal: asyncio reports the socket's 4-tuple
        sockaddr = (address, port, 0, 0)
    return type(exc)(exc.errno, f"Connect call failed {sockaddr}")


def nofile_limit() -> int:
    """The process's soft limit on open files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 30 if soft == resource.RLIM_INFINITY else int(soft)
