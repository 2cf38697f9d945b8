"""What a probe is, as plain data: the checks, a target (endpoint + check + timing) and a result. Pure.

Why it exists: the models (which build targets from a ServiceEntry), the checker (which runs them) and the
scheduler (which orders them) all speak these types; keeping them in a module with no I/O lets the pure layers
use them without importing aiohttp or grpc.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpCheck:
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    expected: tuple[tuple[int, int], ...] = ((200, 399),)


@dataclass(frozen=True, slots=True)
class TcpCheck:
    port: int


@dataclass(frozen=True, slots=True)
class GrpcCheck:
    port: int
    service: str = ""


@dataclass(frozen=True, slots=True)
class LeaseCheck:
    namespace: str
    name: str


Check = HttpCheck | TcpCheck | GrpcCheck | LeaseCheck


@dataclass(frozen=True, slots=True)
class Target:
    """One endpoint and how to probe it. Equal targets keep their schedule when an entry is re-read."""

    address: str
    check: Check
    interval: float
    timeout: float


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float
    refused: bool = False  # the probe policy forbade it; nothing was sent


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    renew_time: float | None  # epoch seconds
    duration: float | None


def parse_micro_time(value: str | None) -> float | None:
    """Kubernetes MicroTime/Time (RFC 3339) to epoch seconds."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
