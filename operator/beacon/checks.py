"""The probes themselves: one HTTP, TCP, gRPC-health or Lease check against one endpoint, with a hard timeout.

Why it exists: the scheduler (prober.py) decides *when*; this module decides *how*, and owns the long-lived
resources that make probing 10,000 endpoints cheap: one aiohttp session with keep-alive connections, one gRPC
channel per target reused across probes, and response bodies read only up to `MAX_BODY` bytes. It makes no
Kubernetes API calls: Lease checks read a cache that the Lease watch fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable

import aiohttp

from beacon.policy import ProbePolicy
from beacon.targets import GrpcCheck, HttpCheck, LeaseCheck, LeaseRecord, ProbeResult, Target, TcpCheck

MAX_BODY = 4096  # bytes of a health response we read at most; the status code decides
_GRPC_SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING


LeaseLookup = Callable[[str, str], LeaseRecord | None]


def _host_for_url(address: str) -> str:
    try:
        return f"[{address}]" if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address) else address
    except ValueError:
        return address


class Checker:
    """Runs single checks. Use as `async with Checker(...) as checker:` so connections are closed on exit."""

    def __init__(
        self,
        *,
        policy: ProbePolicy,
        leases: LeaseLookup,
        connection_limit: int = 256,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._leases = leases
        self._connection_limit = connection_limit
        self._wall_clock = wall_clock
        self._session: aiohttp.ClientSession | None = None
        self._channels: dict[str, object] = {}

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
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        for channel in self._channels.values():
            await channel.close()  # type: ignore[attr-defined]
        self._channels.clear()

    def forget(self, address: str, port: int) -> None:
        """Drop the cached gRPC channel of a target that is no longer probed."""
        channel = self._channels.pop(f"{address}:{port}", None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())  # type: ignore[attr-defined]

    async def refusal(self, address: str) -> str | None:
        """The policy's reason to refuse `address`, resolving DNS names and checking every resolved address."""
        why = self._policy.refusal(address)
        if why is not None:
            return why
        try:
            ipaddress.ip_address(address)
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(address, None, type=socket.SOCK_STREAM)
            except OSError:
                return None  # resolution failure is a probe failure, reported by the probe itself
            for info in infos:
                resolved = str(info[4][0])
                why = self._policy.refusal(resolved)
                if why is not None:
                    return f"{address} resolves to {why}"
        return None

    async def run(self, target: Target) -> ProbeResult:
        start = time.perf_counter()
        check = target.check
        if not isinstance(check, LeaseCheck):
            why = await self.refusal(target.address)
            if why is not None:
                return ProbeResult(ok=False, detail=why, seconds=0.0, refused=True)
        try:
            async with asyncio.timeout(target.timeout):
                if isinstance(check, HttpCheck):
                    ok, detail = await self._http(target.address, check)
                elif isinstance(check, TcpCheck):
                    ok, detail = await self._tcp(target.address, check)
                elif isinstance(check, GrpcCheck):
                    ok, detail = await self._grpc(target.address, check)
                else:
                    ok, detail = self._lease(check)
        except TimeoutError:
            ok, detail = False, f"timed out after {target.timeout:g}s"
        except (OSError, aiohttp.ClientError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # grpc.aio.AioRpcError and anything a peer can provoke
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        return ProbeResult(ok=ok, detail=detail, seconds=time.perf_counter() - start)

    async def _http(self, address: str, check: HttpCheck) -> tuple[bool, str]:
        assert self._session is not None, "use Checker as an async context manager"
        scheme = "https" if check.scheme.upper() == "HTTPS" else "http"
        url = f"{scheme}://{_host_for_url(address)}:{check.port}{check.path}"
        headers = {"User-Agent": "beacon-probe/1", **dict(check.headers)}
        async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
            body = await resp.content.read(MAX_BODY)
            if not resp.content.at_eof():
                resp.close()  # a body larger than we read: do not keep a half-read connection
            ok = any(low <= resp.status <= high for low, high in check.expected)
            return ok, f"HTTP {resp.status}" + ("" if ok else f" {body[:60]!r}")

    async def _tcp(self, address: str, check: TcpCheck) -> tuple[bool, str]:
        _, writer = await asyncio.open_connection(address, check.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, "TCP connect ok"

    async def _grpc(self, address: str, check: GrpcCheck) -> tuple[bool, str]:
        from grpc import aio
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        key = f"{address}:{check.port}"
        channel = self._channels.get(key)
        if channel is None:
            channel = aio.insecure_channel(f"{_host_for_url(address)}:{check.port}")
            self._channels[key] = channel
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=check.service))
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return response.status == _GRPC_SERVING, f"gRPC {status}"

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
