"""The probes themselves: one HTTP, TCP, gRPC-health or Lease check against one endpoint, with a hard timeout.

Why it exists: the scheduler (prober.py) decides *when*; this module decides *how*, and owns the long-lived
resources that make probing 10,000 endpoints cheap: plain HTTP goes over beacon's own keep-alive client
(httpprobe.py: one idle connection per endpoint, request bytes built once per target, response bodies read only
up to `MAX_BODY` bytes), HTTPS over one aiohttp session, gRPC over one channel and stub per target reused across
probes. Per probe it does no work that could be done once: policy verdicts are cached per address (names are
resolved and checked on every probe, as DNS may change), gRPC requests per service. It makes no Kubernetes API
calls: Lease checks read a cache that the Lease watch fills.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from beacon.httpprobe import (
    MAX_BODY,
    HttpProbeClient,
    ProbeError,
    Request,
    connect_error,
    host_for_url,
    nofile_limit,
)
from beacon.policy import ProbePolicy
from beacon.targets import GrpcCheck, HttpCheck, LeaseCheck, LeaseRecord, ProbeResult, Target, TcpCheck

__all__ = ["MAX_BODY", "Checker", "LeaseLookup"]

_GRPC_SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING
_CACHE_SIZE = 65536  # request bytes remembered (targets); the cache is emptied when it grows past this
FILES_KEPT_FREE = 1024  # open files never used for idle probe connections (API client, watches, listeners)

LeaseLookup = Callable[[str, str], LeaseRecord | None]


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
    ) -> None:
        """`native_http=False` sends plain HTTP through aiohttp too (the path before httpprobe.py, kept for
        comparison). `max_idle` caps idle keep-alive connections (default: what the open-file limit leaves)."""
        self._policy = policy
        self._leases = leases
        self._connection_limit = connection_limit
        self._wall_clock = wall_clock
        self._native_http = native_http
        self._max_idle = max(0, nofile_limit() - FILES_KEPT_FREE) if max_idle is None else max_idle
        self._session: aiohttp.ClientSession | None = None
        self._client: HttpProbeClient | None = None
        self._requests: dict[tuple[str, HttpCheck], Request] = {}
        self._grpc_modules: Any = None  # (grpc.aio, health_pb2, health_pb2_grpc), imported with the first gRPC check
        self._channels: dict[tuple[str, int], tuple[Any, Any]] = {}  # (channel, stub) per target
        self._grpc_requests: dict[str, Any] = {}
        self._grpc_details: dict[int, str] = {}

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
            self._client = HttpProbeClient(max_idle=self._max_idle)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
        if self._session is not None:
            await self._session.close()
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()

    def forget(self, address: str, port: int) -> None:
        """Drop the connections and cached requests of a target that is no longer probed."""
        if self._client is not None:
            self._client.forget(address, port)
        for key in [k for k in self._requests if k[0] == address and k[1].port == port]:
            del self._requests[key]
        cached = self._channels.pop((address, port), None)
        if cached is not None:
            asyncio.get_running_loop().create_task(cached[0].close())

    async def refusal(self, address: str) -> str | None:
        """The policy's reason to refuse `address`, resolving DNS names and checking every resolved address."""
        is_ip, why = self._policy.verdict(address)
        if why is None and not is_ip:
            why = await self._name_refusal(address)
        return why

    async def _name_refusal(self, address: str) -> str | None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(address, None, type=socket.SOCK_STREAM)
        except OSError:
            return None  # resolution failure is a probe failure, reported by the probe itself
        for info in infos:
            why = self._policy.verdict(str(info[4][0]))[1]
            if why is not None:
                return f"{address} resolves to {why}"
        return None

    async def run(self, target: Target) -> ProbeResult:
        start = time.perf_counter()
        check = target.check
        kind = type(check)
        if kind is not LeaseCheck:
            is_ip, why = self._policy.verdict(target.address)
            if why is None and not is_ip:
                why = await self._name_refusal(target.address)
            if why is not None:
                return ProbeResult(ok=False, detail=why, seconds=0.0, refused=True)
        try:
            async with asyncio.timeout(target.timeout):
                if kind is HttpCheck:
                    ok, detail = await self._http(target.address, check)  # type: ignore[arg-type]
                elif kind is TcpCheck:
                    ok, detail = await self._tcp(target.address, check)  # type: ignore[arg-type]
                elif kind is GrpcCheck:
                    ok, detail = await self._grpc(target.address, check)  # type: ignore[arg-type]
                else:
                    ok, detail = self._lease(check)  # type: ignore[arg-type]
        except TimeoutError:
            ok, detail = False, f"timed out after {target.timeout:g}s"
        except ProbeError as exc:
            ok, detail = False, exc.detail[:200]
        except (OSError, aiohttp.ClientError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # grpc.aio.AioRpcError and anything a peer can provoke
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        return ProbeResult(ok=ok, detail=detail, seconds=time.perf_counter() - start)

    async def _http(self, address: str, check: HttpCheck) -> tuple[bool, str]:
        client = self._client
        if client is None or check.scheme.upper() == "HTTPS":
            return await self._http_aiohttp(address, check)
        request = self._requests.get((address, check))
        if request is None:
            if len(self._requests) >= _CACHE_SIZE:
                self._requests.clear()
            request = Request.build(address=address, port=check.port, path=check.path, headers=check.headers)
            self._requests[(address, check)] = request
        status, body = await client.get(request)
        return _http_verdict(check, status, body)

    async def _http_aiohttp(self, address: str, check: HttpCheck) -> tuple[bool, str]:
        assert self._session is not None, "use Checker as an async context manager"
        scheme = "https" if check.scheme.upper() == "HTTPS" else "http"
        url = f"{scheme}://{host_for_url(address)}:{check.port}{check.path}"
        headers = {"User-Agent": "beacon-probe/1", **dict(check.headers)}
        async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
            body = await resp.content.read(MAX_BODY)
            if not resp.content.at_eof():
                resp.close()  # a body larger than we read: do not keep a half-read connection
            return _http_verdict(check, resp.status, body)

    async def _tcp(self, address: str, check: TcpCheck) -> tuple[bool, str]:
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, address, check.port)
        except OSError as exc:
            raise connect_error(exc, address, check.port) from None
        transport.close()
        return True, "TCP connect ok"

    async def _grpc(self, address: str, check: GrpcCheck) -> tuple[bool, str]:
        if self._grpc_modules is None:
            from grpc import aio
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            self._grpc_modules = (aio, health_pb2, health_pb2_grpc)
        aio, health_pb2, health_pb2_grpc = self._grpc_modules
        cached = self._channels.get((address, check.port))
        if cached is None:
            channel = aio.insecure_channel(f"{host_for_url(address)}:{check.port}")
            cached = self._channels[(address, check.port)] = (channel, health_pb2_grpc.HealthStub(channel))
        request = self._grpc_requests.get(check.service)
        if request is None:  # never mutated after this: one request object per service name is enough
            request = self._grpc_requests[check.service] = health_pb2.HealthCheckRequest(service=check.service)
        status = (await cached[1].Check(request)).status
        detail = self._grpc_details.get(status)
        if detail is None:
            detail = self._grpc_details[status] = f"gRPC {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        return status == _GRPC_SERVING, detail

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


def _http_verdict(check: HttpCheck, status: int, body: bytes) -> tuple[bool, str]:
    for low, high in check.expected:
        if low <= status <= high:
            return True, f"HTTP {status}"
    return False, f"HTTP {status} {body[:60]!r}"
