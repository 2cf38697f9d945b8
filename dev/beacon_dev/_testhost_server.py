"""The endpoint-server process that `beacon_dev.testhosts` runs inside a test network namespace.

Why this exists: Kubernetes refuses loopback and link-local addresses in Endpoints/EndpointSlices, so beacon's
tests and demo need real servers on real (198.18.0.0/15) addresses. Those addresses live inside a network
namespace, and a socket can only bind them from a process inside that namespace. `beacon_dev.testhosts` therefore
starts this program with `ip netns exec <ns> python -P .../_testhost_server.py` (one process per test network)
and drives it over a line protocol on stdin/stdout:

* request:  one JSON object per line, `{"id": 1, "op": "create", ...}`
* response: one JSON object per line, `{"id": 1, "ok": true, ...}` or `{"id": 1, "ok": false, "error": "..."}`
* the first line the process writes is `{"ready": true, "pid": ...}`

Each listener (HTTP via aiohttp, plain TCP via asyncio, gRPC health via grpc.aio + grpcio-health-checking, UDP
echo via asyncio, DNS via dnspython over asyncio) binds exactly one address:port, so stopping one test host's server
leaves the others untouched. Stopping a listener really closes its listening socket and its connections (clients then
see "connection refused"; a UDP client gets ICMP port unreachable, since the host stays up). A UDP and a TCP listener
may share a port number.

An HTTP listener can close every connection that sits idle for `keepalive` seconds (aiohttp's keep-alive timeout;
by default aiohttp's own, about an hour), as servers with a short keep-alive timeout do, and it counts the
connections it accepted and the ones it closed itself (`connections`, `closes` in `info`): what a test of beacon's
connection-loss hints needs to see from the server's side.

An HTTP or gRPC listener serves TLS when created with `tls: {"cert": PEM, "key": PEM}` (the caller makes the
certificates; this process only loads them). Configuring another `tls` restarts the listener with it, closing the
open connections, as a server restarted with a rotated certificate does: a client's next handshake sees the new one.

HTTP listeners log every request to their health path in one ring buffer of the process (`PROBE_LOG`: the
CLOCK_MONOTONIC time the answer was made, the address and the status; one deque append per request, the newest
`PROBE_LOG_SIZE` kept). The `probe_log` op returns it since a given time, so a benchmark knows exactly when each
probe reached its server, e.g. the decisive failing one. CLOCK_MONOTONIC is the same clock in every process of
the machine, so the times compare with the caller's `time.monotonic()`.

The process exits when its stdin reaches EOF, so it never outlives the process that controls it. It ignores
SIGINT (Ctrl-C reaches the whole foreground process group; the controlling side does the cleanup) and exits
cleanly on SIGTERM. Heavy imports (aiohttp, grpc, dnspython) happen here and only here, and gRPC and dnspython only
once a listener of theirs is asked for. This file is run as a script, so it must not use relative imports or import
`beacon`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

# gRPC serving-status names accepted by the control protocol (grpc.health.v1.HealthCheckResponse.ServingStatus).
GRPC_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")

# DNS rcodes a DNS listener may answer with (dns.rcode names), for names other than its own.
DNS_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")

# How long a stopping HTTP listener waits for in-flight requests before cancelling them.
HTTP_SHUTDOWN_TIMEOUT = 0.5

# When each health-path request was answered: (time.monotonic(), address, status), the newest PROBE_LOG_SIZE.
PROBE_LOG_SIZE = 1_000_000
PROBE_LOG: deque[tuple[float, str, int]] = deque(maxlen=PROBE_LOG_SIZE)


class ControlError(Exception):
    """A control request that cannot be honoured; reported back to the caller as `error`."""


def _tls_material(value: Any) -> dict[str, str] | None:
    """A listener's `tls` field: None, or {"cert": PEM, "key": PEM}."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in ("cert", "key")):
        raise ControlError(f"tls must be null or {{cert: PEM, key: PEM}}, not {value!r}")
    return {"cert": value["cert"], "key": value["key"]}


def _server_context(tls: dict[str, str]) -> ssl.SSLContext:
    """A server context serving `tls`'s certificate (ssl loads a chain only from files: written, loaded, gone)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as directory:
        cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
        for path, data in ((cert, tls["cert"]), (key, tls["key"])):
            with open(path, "w") as file:
                file.write(data)
        context.load_cert_chain(cert, key)
    return context


class Listener:
    """One server bound to one address:port that can be stopped and started again."""

    kind = ""
    transport = "tcp"  # what a port number is of: a UDP and a TCP listener may share one

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.running = False

    async def start(self) -> None:
        if not self.running:
            await self._start()
            self.running = True

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self._stop()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def configure(self, options: dict[str, Any]) -> None:
        if options:
            raise ControlError(f"{self.kind} listener has no options {sorted(options)}")

    async def restart(self) -> None:
        """Stop and start again (if running): open connections are closed, new ones see the new settings."""
        if self.running:
            await self.stop()
            await self.start()

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.address, "port": self.port, "running": self.running}


class _CountingServer(web.Server):
    """aiohttp's low-level server, counting the connections it accepts and those it closes itself (its keep-alive
    timeout, a stop) apart from those the client closes."""

    def __init__(self, handler: Any, *, listener: HttpListener, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._listener = listener

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        self._listener.connections += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        # aiohttp marks a connection it closes itself (force_close) before the transport goes; a client's close
        # reaches here first, unmarked
        if getattr(handler, "_force_close", False):
            self._listener.closes += 1
        super().connection_lost(handler, exc)


class HttpListener(Listener):
    """HTTP server: `path` answers with the configured status; every other path answers 200 with address:port.
    `keepalive`: close a connection idle for this many seconds (None: aiohttp's default)."""

    kind = "http"

    def __init__(
        self,
        address: str,
        port: int,
        *,
        path: str,
        status: int,
        keepalive: float | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        super().__init__(address, port)
        self.tls = tls
        self.path = path
        self.status = status
        self.keepalive = keepalive
        self.delay = 0.0
        self.cycle: list[int] = []  # statuses answered in turn, one per request of `path` (empty: `status`)
        self._turn = 0
        self.requests = 0
        self.connections = 0  # accepted
        self.closes = 0  # closed by this server (keep-alive timeout, stop), not by the client
        self._runner: web.ServerRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        if request.path != self.path:
            return web.Response(text=f"{self.address}:{self.port}\n")
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        status = self.status
        if self.cycle:
            status = self.cycle[self._turn % len(self.cycle)]
            self._turn += 1
        PROBE_LOG.append((time.monotonic(), self.address, status))
        return web.Response(status=status, text=f"{status}\n")

    async def _start(self) -> None:
        options: dict[str, Any] = {"access_log": None}
        if self.keepalive is not None:
            options["keepalive_timeout"] = self.keepalive
        runner = web.ServerRunner(
            _CountingServer(self._handle, listener=self, **options),
            handle_signals=False,
            shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            context = _server_context(self.tls) if self.tls is not None else None
            site = web.TCPSite(runner, self.address, self.port, reuse_address=True, ssl_context=context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = _bound_port(runner.addresses, self.port)
        self._runner = runner

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def configure(self, options: dict[str, Any]) -> None:
        options = dict(options)
        if "status" in options:
            status = options.pop("status")
            if not isinstance(status, int) or not 100 <= status <= 599:
                raise ControlError(f"HTTP status must be an int in 100..599, not {status!r}")
            self.status = status
        if "cycle" in options:
            cycle = options.pop("cycle")
            if not isinstance(cycle, list) or not all(isinstance(c, int) and 100 <= c <= 599 for c in cycle):
                raise ControlError(f"cycle must be a list of HTTP statuses in 100..599, not {cycle!r}")
            self.cycle, self._turn = cycle, 0
        if "delay" in options:
            delay = options.pop("delay")
            if not isinstance(delay, int | float) or delay < 0:
                raise ControlError(f"delay must be a non-negative number, not {delay!r}")
            self.delay = float(delay)
        super().configure(options)

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "path": self.path,
            "status": self.status,
            "delay": self.delay,
            "cycle": self.cycle,
            "requests": self.requests,
            "keepalive": self.keepalive,
            "connections": self.connections,
            "closes": self.closes,
            "tls": self.tls is not None,
        }


class TcpListener(Listener):
    """Plain TCP server that accepts connections and echoes whatever it receives."""

    kind = "tcp"

    def __init__(self, address: str, port: int) -> None:
        super().__init__(address, port)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.address, self.port, reuse_address=True)
        self.port = _bound_port([s.getsockname() for s in self._server.sockets], self.port)

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if server is not None:
            await server.wait_closed()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "connections": self.connections}


class GrpcListener(Listener):
    """gRPC server with the standard grpc.health.v1.Health service; statuses survive stop()/start()."""

    kind = "grpc"

    def __init__(self, address: str, port: int, *, statuses: dict[str, str], tls: dict[str, str] | None = None) -> None:
        super().__init__(address, port)
        self.tls = tls
        self.statuses = dict(statuses)
        self._server: Any = None
        self._servicer: Any = None

    async def _start(self) -> None:
        import grpc.aio
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        # The asyncio servicer (grpc_health.v1.health.aio) is missing from grpc_health's type stubs.
        aio_health: Any = importlib.import_module("grpc_health.v1._async")
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        servicer = aio_health.HealthServicer()
        for service, status in self.statuses.items():
            await servicer.set(service, health_pb2.HealthCheckResponse.ServingStatus.Value(status))
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        try:
            if self.tls is None:
                self.port = server.add_insecure_port(f"{self.address}:{self.port}")
            else:
                pair = (self.tls["key"].encode(), self.tls["cert"].encode())
                self.port = server.add_secure_port(f"{self.address}:{self.port}", grpc.ssl_server_credentials([pair]))
            await server.start()
        except BaseException:
            await server.stop(None)
            raise
        self._server, self._servicer = server, servicer

    async def _stop(self) -> None:
        server, self._server, self._servicer = self._server, None, None
        if server is not None:
            await server.stop(None)

    async def set_status(self, service: str, status: str) -> None:
        self.statuses[service] = status
        if self._servicer is not None:
            from grpc_health.v1 import health_pb2

            await self._servicer.set(service, health_pb2.HealthCheckResponse.ServingStatus.Value(status))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "statuses": dict(self.statuses), "tls": self.tls is not None}


class _Datagrams(asyncio.DatagramProtocol):
    """Hands every datagram of a UDP listener's socket to the listener."""

    def __init__(self, listener: UdpListener) -> None:
        self.listener = listener

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.listener.received(data, addr)


class UdpListener(Listener):
    """UDP echo server: every datagram goes back to its sender as it came (an empty one too). Stopped, its socket is
    closed and the kernel answers ICMP port unreachable."""

    kind = "udp"
    transport = "udp"

    def __init__(self, address: str, port: int) -> None:
        super().__init__(address, port)
        self.datagrams = 0
        self._sock: socket.socket | None = None
        self._transport: asyncio.BaseTransport | None = None

    def answer(self, data: bytes) -> bytes | None:
        return data

    def received(self, data: bytes, addr: Any) -> None:
        self.datagrams += 1
        reply = self.answer(data)
        if reply is not None and self._sock is not None:
            # through the socket itself: asyncio's transport drops an empty datagram
            with contextlib.suppress(OSError):  # a full buffer, a sender gone: UDP loses it
                self._sock.sendto(reply, addr)

    async def _start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.address else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self.address, self.port))
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port = int(sock.getsockname()[1])

    async def _stop(self) -> None:
        transport, self._transport, self._sock = self._transport, None, None
        if transport is not None:
            transport.close()
            await asyncio.sleep(0)  # the transport closes its socket on the next loop iteration

    def info(self) -> dict[str, Any]:
        return {**super().info(), "datagrams": self.datagrams}


class DnsListener(UdpListener):
    """A DNS server (dnspython) for one name: an A query for `name` answers `address`, any other query for `name`
    answers NOERROR with no records, and a query for any other name answers `rcode` (NXDOMAIN unless set). What
    does not parse as a query gets no answer."""

    kind = "dns"

    def __init__(self, address: str, port: int, *, name: str, answer: str, rcode: str) -> None:
        super().__init__(address, port)
        import ipaddress

        import dns.exception
        import dns.name

        try:
            self.name = dns.name.from_text(name)
            self.answer_address = str(ipaddress.IPv4Address(answer))
        except (dns.exception.DNSException, ValueError) as exc:
            raise ControlError(f"a dns listener needs a DNS name and an IPv4 address to answer: {exc}") from None
        self.rcode = rcode

    def answer(self, data: bytes) -> bytes | None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        reply = dns.message.make_response(query)
        question = query.question[0] if query.question else None
        if question is None or question.name != self.name:
            reply.set_rcode(dns.rcode.from_text(self.rcode))
        elif question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(self.name, 30, "IN", "A", self.answer_address))
        return bytes(reply.to_wire())

    def configure(self, options: dict[str, Any]) -> None:
        options = dict(options)
        if "rcode" in options:
            self.rcode = _dns_rcode(options.pop("rcode"))
        super().configure(options)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "name": self.name.to_text(), "answer": self.answer_address, "rcode": self.rcode}


def _dns_rcode(value: Any) -> str:
    if value not in DNS_RCODES:
        raise ControlError(f"DNS rcode must be one of {', '.join(DNS_RCODES)}, not {value!r}")
    return str(value)


def _bound_port(sockets: list[Any], requested: int) -> int:
    """The port a listener really got (differs from `requested` only when that was 0)."""
    for sockname in sockets:
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            return int(sockname[1])
    return requested


def _grpc_status(value: Any) -> str:
    if value not in GRPC_STATUSES:
        raise ControlError(f"gRPC status must be one of {', '.join(GRPC_STATUSES)}, not {value!r}")
    return str(value)


def _str(request: dict[str, Any], key: str, default: str | None = None) -> str:
    value = request.get(key, default)
    if not isinstance(value, str):
        raise ControlError(f"{key!r} must be a string, not {value!r}")
    return value


def _int(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(f"{key!r} must be an integer, not {value!r}")
    return value


class Controller:
    """Holds the listeners and executes control requests, one at a time."""

    def __init__(self) -> None:
        self.listeners: dict[int, Listener] = {}
        self._next_id = 1
        self.shutdown_requested = False

    def _listener(self, request: dict[str, Any]) -> Listener:
        lid = _int(request, "listener")
        try:
            return self.listeners[lid]
        except KeyError:
            raise ControlError(f"no listener {lid}") from None

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "ping": self._ping,
            "create": self._create,
            "start": self._start,
            "stop": self._stop,
            "remove": self._remove,
            "configure": self._configure,
            "grpc_status": self._grpc_status,
            "info": self._info,
            "probe_log": self._probe_log,
            "shutdown": self._shutdown,
        }
        if not isinstance(op, str) or op not in handlers:
            raise ControlError(f"unknown op {op!r}")
        return await handlers[op](request)

    async def _ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def _create(self, request: dict[str, Any]) -> dict[str, Any]:
        kind = _str(request, "kind")
        address = _str(request, "address")
        port = _int(request, "port")
        if not 0 <= port <= 65535:
            raise ControlError(f"port must be in 0..65535, not {port}")
        transport = "udp" if kind in ("udp", "dns") else "tcp"
        for other in self.listeners.values():
            if other.address == address and port != 0 and other.port == port and other.transport == transport:
                raise ControlError(f"{address}:{port} already has a {other.kind} server")
        listener: Listener
        if kind == "http":
            path = _str(request, "path", "/healthz")
            if not path.startswith("/"):
                raise ControlError(f"HTTP path must start with '/', not {path!r}")
            keepalive = request.get("keepalive")
            if keepalive is not None and (
                isinstance(keepalive, bool) or not isinstance(keepalive, int | float) or keepalive <= 0
            ):
                raise ControlError(f"keepalive must be a positive number of seconds or null, not {keepalive!r}")
            listener = HttpListener(
                address,
                port,
                path=path,
                status=_int(request, "status"),
                keepalive=None if keepalive is None else float(keepalive),
                tls=_tls_material(request.get("tls")),
            )
        elif kind == "tcp":
            listener = TcpListener(address, port)
        elif kind == "grpc":
            statuses = request.get("statuses", {"": "SERVING"})
            if not isinstance(statuses, dict) or not all(isinstance(k, str) for k in statuses):
                raise ControlError(f"statuses must map service names to statuses, not {statuses!r}")
            listener = GrpcListener(
                address,
                port,
                statuses={k: _grpc_status(v) for k, v in statuses.items()},
                tls=_tls_material(request.get("tls")),
            )
        elif kind == "udp":
            listener = UdpListener(address, port)
        elif kind == "dns":
            rcode = _dns_rcode(request.get("rcode", "NXDOMAIN"))
            listener = DnsListener(
                address, port, name=_str(request, "name"), answer=_str(request, "answer"), rcode=rcode
            )
        else:
            raise ControlError(f"unknown listener kind {kind!r}")
        if request.get("start", True):
            await listener.start()
        lid = self._next_id
        self._next_id += 1
        self.listeners[lid] = listener
        return {"listener": lid, **listener.info()}

    async def _start(self, request: dict[str, Any]) -> dict[str, Any]:
        listener = self._listener(request)
        await listener.start()
        return listener.info()

    async def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        listener = self._listener(request)
        await listener.stop()
        return listener.info()

    async def _remove(self, request: dict[str, Any]) -> dict[str, Any]:
        listener = self._listener(request)
        await listener.stop()
        del self.listeners[_int(request, "listener")]
        return listener.info()

    async def _configure(self, request: dict[str, Any]) -> dict[str, Any]:
        listener = self._listener(request)
        options = request.get("options", {})
        if not isinstance(options, dict):
            raise ControlError(f"options must be an object, not {options!r}")
        if "tls" in options:  # a new certificate: served from a restart on (HTTP and gRPC listeners)
            options = dict(options)
            tls = _tls_material(options.pop("tls"))
            if not isinstance(listener, HttpListener | GrpcListener):
                raise ControlError(f"{listener.kind} listener has no tls")
            listener.tls = tls
            await listener.restart()
        listener.configure(options)
        return listener.info()

    async def _grpc_status(self, request: dict[str, Any]) -> dict[str, Any]:
        listener = self._listener(request)
        if not isinstance(listener, GrpcListener):
            raise ControlError(f"listener {request['listener']} is {listener.kind}, not grpc")
        await listener.set_status(_str(request, "service"), _grpc_status(request.get("status")))
        return listener.info()

    async def _info(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._listener(request).info()

    async def _probe_log(self, request: dict[str, Any]) -> dict[str, Any]:
        """Health-path requests answered at or after `since` (monotonic seconds), oldest first; `first_only`: only
        each address's first; `not_status`: leave out answers with this status (e.g. 200, to see only failures)."""
        since = request.get("since", 0.0)
        if not isinstance(since, int | float):
            raise ControlError(f"since must be a number, not {since!r}")
        first_only = bool(request.get("first_only", False))
        not_status = request.get("not_status")
        entries: list[tuple[float, str, int]] = []
        seen: set[str] = set()
        for entry in list(PROBE_LOG):  # a snapshot: the listeners append while we look
            if entry[0] < since or entry[2] == not_status:
                continue
            if first_only:
                if entry[1] in seen:
                    continue
                seen.add(entry[1])
            entries.append(entry)
        oldest = PROBE_LOG[0][0] if PROBE_LOG else None
        return {"entries": entries, "oldest": oldest}

    async def _shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        self.shutdown_requested = True
        return {}

    async def close(self) -> None:
        for listener in self.listeners.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.stop(), timeout=5)
        self.listeners.clear()


def _write_line(fd: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    while data:
        written = os.write(fd, data)
        data = data[written:]


async def serve(out_fd: int) -> None:
    """Read control requests from stdin until EOF (or a shutdown request, or SIGTERM) and answer on `out_fd`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    controller = Controller()
    _write_line(out_fd, {"ready": True, "pid": os.getpid()})
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not controller.shutdown_requested:
            line_task = asyncio.ensure_future(reader.readline())
            await asyncio.wait({line_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not line_task.done():
                line_task.cancel()
                break
            line = line_task.result()
            if not line:
                break  # EOF: whoever controls us is gone
            response: dict[str, Any]
            request_id: Any = None
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ControlError("request must be a JSON object")
                request_id = request.get("id")
                response = {"id": request_id, "ok": True, **await controller.handle(request)}
            except (ControlError, OSError, RuntimeError, ValueError) as exc:
                response = {"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            _write_line(out_fd, response)
    finally:
        stopped.cancel()
        await controller.close()


def main() -> None:
    # The control channel is the original stdout; anything else that writes to fd 1 (a library printing,
    # for instance) lands on stderr instead of corrupting the protocol.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(serve(out_fd))


if __name__ == "__main__":
    main()
