"""The probes themselves: one HTTP, TCP, gRPC-health, UDP or Lease check against one endpoint, with a hard timeout.

Why it exists: the scheduler (prober.py) decides *when*; this module decides *how*, and owns the long-lived
resources that make probing 10,000 endpoints cheap: plain HTTP goes over beacon's own keep-alive client
(httpprobe.py: one idle connection per endpoint, request bytes built once per target, response bodies read only
up to `MAX_BODY` bytes), HTTPS over one aiohttp session, gRPC over one channel and stub per target reused across
probes. Per probe it does no work that could be done once: policy verdicts are cached per address, gRPC requests
per service. The prober calls `forget` when the last target of an endpoint goes, which closes that endpoint's
connection and channel. It makes no Kubernetes API calls: Lease checks read a cache that the Lease watch fills.

Connection-loss hints: the checker is where an endpoint's idle connections live, so it is where their loss is
seen. `hint(address, port)` (wired by the runtime to `Prober.hint`) is told when the peer closes one while idle:
- plain HTTP: the keep-alive connection in the pool (httpprobe.py tells us);
- gRPC: the channel leaving READY while no probe's RPC is on it. grpc.aio reports connectivity only through the
  awaitable `channel.wait_for_state_change`, so each channel of a target that wants hints has one watcher task.
  It was chosen over polling `get_state` (a timer per channel, or a sweep over all: work while nothing happens,
  and a loss seen only at the next poll) because an idle watcher costs no work at all: the wait is a C-core
  connectivity watch completed through grpc's completion queue, and the task is a parked coroutine (about 1.5 KB
  of Python heap, measured; no thread, no wake-up until the state changes). A loss during an RPC is the probe's
  to report: an RPC in flight, or one that ended with the channel no longer READY, makes the change no hint;
- TCP with `hold`: the check's connection is kept open (one per endpoint, the newest replacing the previous one)
  and watched for EOF/RST; every probe still makes a new connection, as a TCP check must.
Closes the checker makes itself (forget, a name resolving elsewhere, shutdown) are never hints. HTTPS through
aiohttp gives no hints (aiohttp does not say when a pooled connection is closed by the peer).

UDP checks: one connected datagram socket per probe, read by an event-loop reader and closed when the probe ends. A
connected socket is told about the ICMP port-unreachable the endpoint's host answers to a datagram for a closed port
(ConnectionRefusedError from its next recv), so a stopped server fails at once with its own detail, and a silent port (a
firewall dropping the datagram) fails at the timeout with another. DNS mode builds its query once per target
(dnspython, imported with the first DNS check) and gives every probe a random id; the reply must parse, answer that
id and question, and carry the wanted rcode. A reply's `regex` is RE2 (google-re2, imported with the first one):
matching takes time linear in the reply, so a pattern in a ServiceEntry cannot stall the event loop, as one for a
backtracking engine could.

The SSRF guard (policy.py) is applied to the address actually connected to. A DNS name is resolved once per probe
(DNS may change), every address it resolves to is checked, and the probe then connects to exactly those addresses,
never to the name: a second lookup by the connection could answer an address nobody checked (DNS rebinding). The
name stays in the HTTP Host header, the TLS server name and the gRPC authority. A UDP probe sends to the first of
the checked addresses (a datagram that gets no answer says nothing that would make another address worth trying).

Verified TLS (a target's `Tls`): an SSLContext is made once per distinct CA bundle (and per verify flag), not per
probe, and kept while targets use it (the newest `_TLS_CACHE_SIZE` bundles); the server name goes in as SNI and is
the name checked. A certificate the handshake refuses becomes its own detail (`tls_detail`): expired, unknown
authority or name mismatch. aiohttp pools connections per SSLContext and server name, so a verified HTTPS target
reuses its keep-alive connection like an unverified one, and a rotated CA opens new ones. gRPC over TLS uses
`grpc.ssl_channel_credentials` (one per bundle) and `grpc.ssl_target_name_override` for the server name; grpc
reports a refused certificate only as UNAVAILABLE with BoringSSL's words in the message, which `grpc_tls_detail`
maps to the same details where the words say which (see there). A bundle that is missing (`Tls.problem`) or holds
no certificate fails the probe with that detail, without connecting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from beacon.httpprobe import (
    MAX_BODY,
    HttpProbeClient,
    ProbeError,
    Request,
    connect_first,
    host_for_url,
    nofile_limit,
)
from beacon.policy import ProbePolicy
from beacon.targets import (
    DnsQuery,
    GrpcCheck,
    HttpCheck,
    LeaseCheck,
    LeaseRecord,
    ProbeResult,
    Target,
    TcpCheck,
    Tls,
    UdpCheck,
)

__all__ = ["MAX_BODY", "Checker", "LeaseLookup", "grpc_tls_detail", "tls_detail"]

_GRPC_SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING
_CACHE_SIZE = 65536  # endpoints whose request bytes are remembered; the cache is emptied when it grows past this
_SHOWN = 40  # bytes of a UDP reply shown in a failure's detail
_DNS_ANSWERABLE_WITHOUT_QUESTION = frozenset({1, 2, 4, 5})  # FORMERR, SERVFAIL, NOTIMP, REFUSED (as dnspython allows)
FILES_KEPT_FREE = 1024  # open files never used for idle probe connections (API client, watches, listeners)
_TLS_CACHE_SIZE = 256  # distinct (verify, CA bundle) contexts kept; the oldest goes first past this

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) with a detail of their own
_EXPIRED = frozenset({10})  # CERT_HAS_EXPIRED
_NOT_YET_VALID = frozenset({9})  # CERT_NOT_YET_VALID
# UNABLE_TO_GET_ISSUER_CERT, DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN,
# UNABLE_TO_GET_ISSUER_CERT_LOCALLY, UNABLE_TO_VERIFY_LEAF_SIGNATURE
_UNKNOWN_AUTHORITY = frozenset({2, 18, 19, 20, 21})
_NAME_MISMATCH = frozenset({62, 64})  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
TLS_EXPIRED = "TLS: certificate expired"
TLS_NOT_YET_VALID = "TLS: certificate not yet valid"
TLS_UNKNOWN_AUTHORITY = "TLS: unknown certificate authority"


def tls_name_mismatch(wanted: str) -> str:
    return f"TLS: certificate name mismatch (wanted {wanted})"


def tls_detail(exc: ssl.SSLError, *, wanted: str) -> str:
    """The probe detail of a TLS handshake that failed with `exc`; `wanted`: the name the certificate must carry."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _EXPIRED:
            return TLS_EXPIRED
        if code in _NOT_YET_VALID:
            return TLS_NOT_YET_VALID
        if code in _UNKNOWN_AUTHORITY:
            return TLS_UNKNOWN_AUTHORITY
        if code in _NAME_MISMATCH:
            return tls_name_mismatch(wanted)
        return f"TLS: certificate refused: {exc.verify_message}"
    return f"TLS: handshake failed: {exc.reason or exc}"


def grpc_tls_detail(message: str, *, wanted: str) -> str | None:
    """The detail of a gRPC call that failed in its TLS handshake, from grpc's message (None: not a TLS failure).
    grpc carries no verification code out, only words, measured with grpcio 1.85 (BoringSSL): "Tls handshake
    failed ... CERTIFICATE_VERIFY_FAILED: certificate has expired" (or "unable to get local issuer certificate",
    "self signed certificate"), and "Hostname Verification Check failed" for a name mismatch, which grpc checks
    after the chain (an expired certificate for another name reads "expired"). A message without these words (a
    future grpc's) still gets a TLS detail when it names the handshake."""
    lowered = message.lower()
    if "hostname verification" in lowered or "not in peer certificate" in lowered:
        return tls_name_mismatch(wanted)
    if "certificate has expired" in lowered:
        return TLS_EXPIRED
    if "certificate is not yet valid" in lowered:
        return TLS_NOT_YET_VALID
    if "issuer certificate" in lowered or "self signed" in lowered or "self-signed" in lowered:
        return TLS_UNKNOWN_AUTHORITY
    if "certificate_verify_failed" in lowered:
        return "TLS: certificate refused"
    if "handshake failed" in lowered:
        return "TLS: handshake failed"
    return None


def _tls_context(tls: Tls) -> ssl.SSLContext | str:
    """A client context for `tls`, or the probe detail saying why there can be none (a bundle without a CA)."""
    if not tls.verify:  # what aiohttp's ssl=False does: encrypt, verify nothing
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cadata=tls.ca) if tls.ca is not None else ssl.create_default_context()
    except (ssl.SSLError, ValueError):
        return f"TLS: no CA certificate in {tls.source}"


LeaseLookup = Callable[[str, str], LeaseRecord | None]
HintSink = Callable[[str, int], None]  # (address, port) of an endpoint whose idle connection the peer closed

log = logging.getLogger("beacon.checks")


class _Held(asyncio.Protocol):
    """A TCP check's connection, kept open after the check to watch it for the peer's EOF/RST."""

    __slots__ = ("_checker", "closing", "endpoint", "held", "lost", "transport")

    def __init__(self, checker: Checker, endpoint: tuple[str, int]) -> None:
        self._checker = checker
        self.endpoint = endpoint
        self.transport: asyncio.BaseTransport | None = None
        self.held = False  # handed over by its probe: from now on a close by the peer is a hint
        self.closing = False  # closed by the checker: never a hint
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass  # a banner or anything else: nobody reads it

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._checker._held_lost(self)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class _DnsProbe:
    """What a DNS-mode UDP check needs per probe, made once per query: the query's wire form (its id replaced per
    probe), its question, the wanted rcode and its name."""

    __slots__ = ("question", "rcode", "rcode_text", "wire")

    def __init__(self, query: DnsQuery) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype

        message = dns.message.make_query(query.name, dns.rdatatype.from_text(query.rdtype))
        self.wire: bytes = message.to_wire()
        self.question: list[Any] = message.question
        rcode = dns.rcode.from_text(query.rcode)
        self.rcode = int(rcode)
        self.rcode_text = dns.rcode.to_text(rcode)


class _Channel:
    """The gRPC channel and stub of one endpoint, and what its watcher needs to tell a peer's close from a probe's
    failure."""

    __slots__ = ("busy", "channel", "closed", "peers", "saw_loss", "stub", "tls", "watcher")

    def __init__(self, channel: Any, stub: Any, peers: tuple[str, ...] | None, tls: Tls | None) -> None:
        self.channel = channel
        self.stub = stub
        self.peers = peers  # the addresses a name's channel connects to, None for an IP literal
        self.tls = tls  # what the channel's credentials were made from (None: plaintext)
        self.watcher: asyncio.Task[None] | None = None  # watches connectivity (only for targets that want hints)
        self.busy = 0  # RPCs in flight
        self.saw_loss = False  # a probe ended with the channel not READY: the loss was that probe's to report
        self.closed = False  # closed by the checker: its last state change is no hint


class Checker:
    """Runs single checks. Use as `async with Checker(...) as checker:` so connections are closed on exit."""

    def __init__(
        self,
        *,
        policy: ProbePolicy,
        leases: LeaseLookup,
        connection_limit: int = 256,
        wall_clock: Callable[[], float] = time.time,
        native_http: bool = True,
        max_idle: int | None = None,
        hint: HintSink | None = None,
    ) -> None:
        """`native_http=False` sends plain HTTP through aiohttp too (the path before httpprobe.py, kept for
        comparison). `max_idle` caps idle keep-alive connections (default: what the open-file limit leaves), and
        so do held TCP connections. `hint(address, port)`: told when the peer closes an idle connection (None: no
        hints, no gRPC watchers, no held TCP connections)."""
        self._hint = hint
        self._policy = policy
        self._leases = leases
        self._connection_limit = connection_limit
        self._wall_clock = wall_clock
        self._native_http = native_http
        self._max_idle = max(0, nofile_limit() - FILES_KEPT_FREE) if max_idle is None else max_idle
        self._session: aiohttp.ClientSession | None = None
        self._client: HttpProbeClient | None = None
        self._requests: dict[tuple[str, int], dict[HttpCheck, Request]] = {}  # per endpoint (address, port)
        # (grpc.aio, health_pb2, health_pb2_grpc, ChannelConnectivity.READY), imported with the first gRPC check
        self._grpc_modules: Any = None
        self._channels: dict[tuple[str, int], _Channel] = {}  # per endpoint
        self._held: dict[tuple[str, int], _Held] = {}  # held TCP connections, per endpoint
        self._closing: set[asyncio.Task[None]] = set()  # channels being closed
        self._grpc_requests: dict[str, Any] = {}
        self._grpc_details: dict[int, str] = {}
        # one SSLContext per (verify, CA bundle), or why there is none; gRPC credentials per CA bundle
        self._tls_contexts: dict[tuple[bool, str | None], ssl.SSLContext | str] = {}
        self._grpc_credentials: dict[str | None, Any] = {}
        self._dns_probes: dict[DnsQuery, _DnsProbe] = {}  # per query: its wire form, built once
        self._regexes: dict[str, Any] = {}  # RE2 pattern -> compiled, or the reason it does not compile

    async def __aenter__(self) -> Checker:
        connector = aiohttp.TCPConnector(
            limit=self._connection_limit,
            keepalive_timeout=60,
            ssl=False,  # like kubelet's probes: health endpoints are probed without verifying certificates
            use_dns_cache=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
        )
        if self._native_http:
            on_lost = self._hinted if self._hint is not None else None
            self._client = HttpProbeClient(max_idle=self._max_idle, on_lost=on_lost)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
        if self._session is not None:
            await self._session.close()
        for held in list(self._held.values()):
            held.close()
        self._held.clear()
        channels = list(self._channels.values())
        self._channels.clear()
        for cached in channels:
            self._unwatch(cached)
            await cached.channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def forget(self, address: str, port: int) -> None:
        """Drop the connection, channel and cached requests of an endpoint that is no longer probed."""
        if self._client is not None:
            self._client.forget(address, port)
        self._requests.pop((address, port), None)
        cached = self._channels.pop((address, port), None)
        if cached is not None:
            self._unwatch(cached)
            self._close_later(cached.channel.close())
        held = self._held.pop((address, port), None)
        if held is not None:
            held.close()

    # ------------------------------------------------------------------ connection-loss hints
    def _hinted(self, address: str, port: int) -> None:
        """The peer closed an idle connection to (address, port): tell the sink (which must not break a
        transport callback by raising)."""
        if self._hint is None:
            return
        try:
            self._hint(address, port)
        except Exception:
            log.exception("connection-loss hint for %s:%s failed", address, port)

    def _held_lost(self, held: _Held) -> None:
        if self._held.get(held.endpoint) is held:
            del self._held[held.endpoint]
        if held.held and not held.closing:
            self._hinted(*held.endpoint)

    def _unwatch(self, cached: _Channel) -> None:
        cached.closed = True
        if cached.watcher is not None:
            cached.watcher.cancel()
            cached.watcher = None

    def _watch(self, endpoint: tuple[str, int], cached: _Channel) -> None:
        task = asyncio.get_running_loop().create_task(self._watch_channel(endpoint, cached))
        cached.watcher = task

    async def _watch_channel(self, endpoint: tuple[str, int], cached: _Channel) -> None:
        """Hint when the channel leaves READY while no probe is on it (see the module docstring)."""
        import grpc

        ready, shutdown = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.SHUTDOWN
        channel = cached.channel
        try:
            state = channel.get_state()
            while True:
                await channel.wait_for_state_change(state)
                new = channel.get_state()
                if cached.closed or new is shutdown:
                    return
                if new is ready:
                    cached.saw_loss = False
                elif state is ready and not cached.busy and not cached.saw_loss:
                    self._hinted(*endpoint)
                state = new
        except Exception as exc:  # a channel grpc refuses to watch any more: no hints from it, nothing worse
            log.debug("stopped watching the gRPC channel to %s:%s: %s", *endpoint, exc)

    def _close_later(self, closing: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(closing)
        self._closing.add(task)  # a reference, so the task is not collected before it ran
        task.add_done_callback(self._closing.discard)

    async def _resolve(self, name: str, port: int, kind: type) -> tuple[tuple[str, ...], str | None]:
        """The addresses `name` resolves to (in the resolver's order) and the policy's reason to refuse the first
        refused one, if any. The probe connects to exactly these addresses: a name is never resolved twice."""
        try:
            socktype = socket.SOCK_DGRAM if kind is UdpCheck else socket.SOCK_STREAM
            infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socktype)
        except socket.gaierror as exc:  # a probe failure, not a refusal; worded as the connection would have
            if kind is HttpCheck:
                host = f"{host_for_url(name)}:{port}"
                raise ProbeError(
                    f"ClientConnectorDNSError: Cannot connect to host {host} ssl:default [{exc.strerror}]"
                ) from None
            raise ProbeError(f"gaierror: {exc}") from None
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise ProbeError(f"gaierror: {name} resolves to no address")
        verdict = self._policy.verdict
        for address in addresses:
            why = verdict(address)[1]
            if why is not None:
                return addresses, f"{name} resolves to {why}"
        return addresses, None

    async def run(self, target: Target) -> ProbeResult:
        start = time.perf_counter()
        check = target.check
        kind = type(check)
        try:
            async with asyncio.timeout(target.timeout):
                if kind is LeaseCheck:
                    ok, detail = self._lease(check)  # type: ignore[arg-type]
                else:
                    address = target.address
                    is_ip, why = self._policy.verdict(address)
                    peers: tuple[str, ...] | None = None  # None: `address` is an IP literal, connected to as it is
                    if why is None and not is_ip:
                        peers, why = await self._resolve(address, check.port, kind)  # type: ignore[union-attr]
                    if why is not None:
                        return ProbeResult(ok=False, detail=why, seconds=0.0, refused=True)
                    if kind is HttpCheck:
                        ok, detail = await self._http(address, peers, check)  # type: ignore[arg-type]
                    elif kind is TcpCheck:
                        ok, detail = await self._tcp(address, peers, check, target.hints)  # type: ignore[arg-type]
                    elif kind is UdpCheck:
                        ok, detail = await self._udp(address, peers, check)  # type: ignore[arg-type]
                    else:
                        ok, detail = await self._grpc(address, peers, check, target.hints)  # type: ignore[arg-type]
        except TimeoutError:
            if kind is UdpCheck:  # nothing came back: the datagram or its reply was dropped, or the server is silent
                ok, detail = False, f"no UDP reply within {target.timeout:g}s"
            else:
                ok, detail = False, f"timed out after {target.timeout:g}s"
        except ProbeError as exc:
            ok, detail = False, exc.detail[:200]
        except (OSError, aiohttp.ClientError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # grpc.aio.AioRpcError and anything a peer can provoke
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        return ProbeResult(ok=ok, detail=detail, seconds=time.perf_counter() - start)

    def ssl_context(self, tls: Tls) -> ssl.SSLContext:
        """The context of `tls`: made once per distinct (verify, CA bundle), then reused by every probe. Raises
        ProbeError with the detail when the bundle is missing or holds no certificate."""
        if tls.problem is not None:
            raise ProbeError(tls.problem)
        key = (tls.verify, tls.ca if tls.verify else None)
        context = self._tls_contexts.get(key)
        if context is None:
            if len(self._tls_contexts) >= _TLS_CACHE_SIZE:
                del self._tls_contexts[next(iter(self._tls_contexts))]  # the oldest made
            context = self._tls_contexts[key] = _tls_context(tls)
        if isinstance(context, str):
            raise ProbeError(context)
        return context

    async def _http(self, address: str, peers: tuple[str, ...] | None, check: HttpCheck) -> tuple[bool, str]:
        client = self._client
        if client is None or check.scheme.upper() == "HTTPS":
            tls = check.tls
            if tls is None:
                return await self._http_aiohttp(address, peers, check)
            context = self.ssl_context(tls)
            try:
                return await self._http_aiohttp(address, peers, check, context=context, server_name=tls.server_name)
            except aiohttp.ClientConnectorCertificateError as exc:
                wanted = tls.server_name or address
                error = exc.certificate_error
                if isinstance(error, ssl.SSLError):
                    raise ProbeError(tls_detail(error, wanted=wanted)) from None
                raise ProbeError(f"TLS: certificate refused: {error}") from None
            except aiohttp.ClientConnectorSSLError as exc:
                error = exc.os_error
                detail = tls_detail(error, wanted=address) if isinstance(error, ssl.SSLError) else str(error)
                raise ProbeError(detail) from None
        endpoint = (address, check.port)
        requests = self._requests.get(endpoint)
        request = None if requests is None else requests.get(check)
        if request is None:
            if requests is None:
                if len(self._requests) >= _CACHE_SIZE:
                    self._requests.clear()
                requests = self._requests[endpoint] = {}
            request = Request.build(address=address, port=check.port, path=check.path, headers=check.headers)
            requests[check] = request
        status, body = await client.get(request, peers)
        return _http_verdict(check, status, body)

    async def _http_aiohttp(
        self,
        address: str,
        peers: tuple[str, ...] | None,
        check: HttpCheck,
        *,
        context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> tuple[bool, str]:
        """GET over aiohttp; `context`: the target's TLS context (None: the session's, which verifies nothing);
        `server_name`: SNI and the name verified, in place of the endpoint's."""
        https = check.scheme.upper() == "HTTPS"
        scheme = "https" if https else "http"
        headers = {"User-Agent": "beacon-probe/1", **dict(check.headers)}
        if peers is None:
            return await self._aiohttp_get(
                f"{scheme}://{host_for_url(address)}:{check.port}{check.path}",
                headers,
                check,
                server_hostname=server_name if https else None,
                context=context,
            )
        # a name: connect to the addresses checked for it; the name goes in the Host header and the TLS server name
        if not any(name.lower() == "host" for name in headers):
            host = host_for_url(address)
            headers["Host"] = host if check.port == (443 if https else 80) else f"{host}:{check.port}"
        sni = (server_name or address) if https else None
        for peer in peers[:-1]:
            url = f"{scheme}://{host_for_url(peer)}:{check.port}{check.path}"
            try:
                return await self._aiohttp_get(url, headers, check, server_hostname=sni, context=context)
            except aiohttp.ClientConnectorError:
                continue  # the next address, as a connection to the name would
        url = f"{scheme}://{host_for_url(peers[-1])}:{check.port}{check.path}"
        return await self._aiohttp_get(url, headers, check, server_hostname=sni, context=context)

    async def _aiohttp_get(
        self,
        url: str,
        headers: dict[str, str],
        check: HttpCheck,
        *,
        server_hostname: str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> tuple[bool, str]:
        assert self._session is not None, "use Checker as an async context manager"
        async with self._session.get(
            url,
            headers=headers,
            allow_redirects=False,
            server_hostname=server_hostname,
            ssl=True if context is None else context,
        ) as resp:
            body = await resp.content.read(MAX_BODY)
            if not resp.content.at_eof():
                resp.close()  # a body larger than we read: do not keep a half-read connection
            return _http_verdict(check, resp.status, body)

    async def _tcp(self, address: str, peers: tuple[str, ...] | None, check: TcpCheck, hints: bool) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        addresses = (address,) if peers is None else peers
        if not (check.hold and hints and self._hint is not None):
            transport, _ = await connect_first(loop, _tcp_protocol, addresses, check.port)
            transport.close()
            return True, "TCP connect ok"
        endpoint = (address, check.port)
        transport, held = await connect_first(loop, lambda _peer: _Held(self, endpoint), addresses, check.port)
        previous = self._held.get(endpoint)
        if held.lost:
            pass  # accepted, then closed before the probe ended: the check passed, there is nothing to hold
        elif previous is None and len(self._held) >= self._max_idle:
            held.close()  # no file descriptors to spare
        else:
            held.held = True
            self._held[endpoint] = held
            if previous is not None:
                previous.close()  # the newest connection is the one watched
        return True, "TCP connect ok"

    async def _grpc(
        self, address: str, peers: tuple[str, ...] | None, check: GrpcCheck, hints: bool
    ) -> tuple[bool, str]:
        if self._grpc_modules is None:
            import grpc
            from grpc import aio
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            self._grpc_modules = (aio, health_pb2, health_pb2_grpc, grpc.ChannelConnectivity.READY)
        aio, health_pb2, health_pb2_grpc, ready = self._grpc_modules
        endpoint = (address, check.port)
        cached = self._channels.get(endpoint)
        tls = check.tls
        if cached is None or cached.peers != peers or cached.tls != tls:
            if cached is not None:  # the name resolves elsewhere now, or the TLS settings changed: a new channel
                self._unwatch(cached)
                self._close_later(cached.channel.close())
            options: list[tuple[str, str]] = []
            if peers is None:
                target = f"{host_for_url(address)}:{check.port}"
            else:  # the checked addresses, never the name (gRPC would resolve it again); the name as the authority
                target = _grpc_target(peers, check.port)
                options.append(("grpc.default_authority", f"{host_for_url(address)}:{check.port}"))
            if tls is None:
                channel = aio.insecure_channel(target, options=options)
            else:
                options.append(("grpc.ssl_target_name_override", tls.server_name or address))
                channel = aio.secure_channel(target, self._grpc_credentials_of(tls), options=options)
            cached = self._channels[endpoint] = _Channel(channel, health_pb2_grpc.HealthStub(channel), peers, tls)
        if hints and cached.watcher is None and self._hint is not None:
            self._watch(endpoint, cached)
        request = self._grpc_requests.get(check.service)
        if request is None:  # never mutated after this: one request object per service name is enough
            request = self._grpc_requests[check.service] = health_pb2.HealthCheckRequest(service=check.service)
        cached.busy += 1
        try:
            status = (await cached.stub.Check(request)).status
        except aio.AioRpcError as exc:
            detail = None if tls is None else grpc_tls_detail(exc.details() or "", wanted=tls.server_name or address)
            if detail is None:
                raise
            raise ProbeError(detail) from None
        finally:
            cached.busy -= 1
            if cached.watcher is not None and cached.channel.get_state() is not ready:
                cached.saw_loss = True  # the channel was lost under this probe, which reports it itself
        detail = self._grpc_details.get(status)
        if detail is None:
            detail = self._grpc_details[status] = f"gRPC {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        return status == _GRPC_SERVING, detail

    def _grpc_credentials_of(self, tls: Tls) -> Any:
        """Channel credentials trusting the target's CA bundle (None: grpc's default roots), one per bundle."""
        if tls.problem is not None:
            raise ProbeError(tls.problem)
        credentials = self._grpc_credentials.get(tls.ca)
        if credentials is None:
            import grpc

            if tls.ca is not None and isinstance(_tls_context(tls), str):  # grpc would only fail the handshake
                raise ProbeError(f"TLS: no CA certificate in {tls.source}")
            if len(self._grpc_credentials) >= _TLS_CACHE_SIZE:
                del self._grpc_credentials[next(iter(self._grpc_credentials))]
            roots = tls.ca.encode() if tls.ca is not None else None
            credentials = self._grpc_credentials[tls.ca] = grpc.ssl_channel_credentials(root_certificates=roots)
        return credentials

    async def _udp(self, address: str, peers: tuple[str, ...] | None, check: UdpCheck) -> tuple[bool, str]:
        dns_probe: _DnsProbe | None = None
        if check.dns is None:
            payload = check.payload
        else:
            dns_probe = self._dns_probes.get(check.dns)
            if dns_probe is None:
                if len(self._dns_probes) >= _CACHE_SIZE:
                    self._dns_probes.clear()
                dns_probe = self._dns_probes[check.dns] = _DnsProbe(check.dns)
            payload = os.urandom(2) + dns_probe.wire[2:]  # a random id per probe
        peer = address if peers is None else peers[0]
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in peer else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((peer, check.port))  # a connected socket: the only one the kernel tells about ICMP errors
            sock.send(payload)  # what comes back (a reply, an ICMP error) waits in the socket until it is read
            reply: asyncio.Future[bytes] = loop.create_future()
            fd = sock.fileno()
            loop.add_reader(fd, _receive, sock, reply)
            try:
                data = await reply
            finally:
                loop.remove_reader(fd)  # before the close: a reused descriptor number must find no stale reader
        except ConnectionRefusedError:
            return False, "UDP port unreachable (ICMP)"
        finally:
            sock.close()
        if dns_probe is not None:
            return _dns_verdict(dns_probe, payload, data)
        if check.prefix is not None:
            if data.startswith(check.prefix):
                return True, f"UDP reply, {len(data)} bytes"
            return False, f"UDP reply does not match the prefix: {data[:_SHOWN]!r}"
        if check.regex is not None:
            if self._regex(check.regex).search(data) is not None:
                return True, f"UDP reply, {len(data)} bytes"
            return False, f"UDP reply does not match the regex: {data[:_SHOWN]!r}"
        return True, f"UDP reply, {len(data)} bytes"

    def _regex(self, pattern: str) -> Any:
        """`pattern` compiled by RE2, once; raises ProbeError when it does not compile."""
        compiled = self._regexes.get(pattern)
        if compiled is None:
            import re2

            if len(self._regexes) >= _CACHE_SIZE:
                self._regexes.clear()
            try:
                compiled = re2.compile(pattern)
            except re2.error as exc:
                compiled = f"UDP expect.regex is not valid RE2: {exc}"
            self._regexes[pattern] = compiled
        if isinstance(compiled, str):
            raise ProbeError(compiled)
        return compiled

    def _lease(self, check: LeaseCheck) -> tuple[bool, str]:
        record = self._leases(check.namespace, check.name)
        if record is None:
            return False, f"Lease {check.name} not found"
        if record.renew_time is None or record.duration is None:
            return False, f"Lease {check.name} has no renewTime/leaseDurationSeconds"
        left = record.renew_time + record.duration - self._wall_clock()
        if left <= 0:
            return False, f"Lease {check.name} expired {abs(left):.1f}s ago"  # abs: never "-0.0s"
        return True, f"Lease {check.name} valid for {left:.1f}s"


def _receive(sock: socket.socket, reply: asyncio.Future[bytes]) -> None:
    """A UDP probe's socket is readable: its first datagram, or the error the kernel queued on it (on a connected
    socket an ICMP port unreachable arrives as ConnectionRefusedError), settles `reply`. A reader of the event loop
    and no transport: per probe that saves a transport, a protocol and two callbacks."""
    if reply.done():
        return
    try:
        data = sock.recv(65535)
    except (BlockingIOError, InterruptedError):
        return
    except OSError as exc:
        reply.set_exception(exc)
    else:
        reply.set_result(data)


def _tcp_protocol(_peer: str) -> asyncio.Protocol:
    return asyncio.Protocol()


def _grpc_target(peers: tuple[str, ...], port: int) -> str:
    """A gRPC target naming IP addresses, resolved by nobody: those of the first address's family (a target's
    addresses share one family), which the channel tries in order."""
    if ":" in peers[0]:
        return "ipv6:" + ",".join(f"[{peer}]:{port}" for peer in peers if ":" in peer)
    return "ipv4:" + ",".join(f"{peer}:{port}" for peer in peers if ":" not in peer)


def _dns_verdict(probe: _DnsProbe, query: bytes, data: bytes) -> tuple[bool, str]:
    """Whether `data` is a well-formed answer to `query` (its id and question) with the wanted rcode."""
    import dns.flags  # imported already by _DnsProbe: these are lookups in sys.modules
    import dns.message
    import dns.rcode

    try:
        reply = dns.message.from_wire(data)
    except Exception as exc:  # dns.exception.FormError and its kin, or anything else a peer's bytes provoke
        return False, f"malformed DNS reply ({type(exc).__name__}): {data[:_SHOWN]!r}"
    rcode = reply.rcode()
    if not reply.flags & dns.flags.QR or reply.id != int.from_bytes(query[:2], "big"):
        return False, f"DNS reply does not answer the query (id {reply.id}, flags {dns.flags.to_text(reply.flags)})"
    if reply.question != probe.question and not (rcode in _DNS_ANSWERABLE_WITHOUT_QUESTION and not reply.question):
        return False, "DNS reply is for another question"
    if rcode != probe.rcode:
        return False, f"DNS rcode {dns.rcode.to_text(rcode)}, wanted {probe.rcode_text}"
    answers = sum(len(rrset) for rrset in reply.answer)
    return True, f"DNS {probe.rcode_text}, {answers} answer{'' if answers == 1 else 's'}"


def _http_verdict(check: HttpCheck, status: int, body: bytes) -> tuple[bool, str]:
    for low, high in check.expected:
        if low <= status <= high:
            return True, f"HTTP {status}"
    return False, f"HTTP {status} {body[:60]!r}"
