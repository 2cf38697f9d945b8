"""What a probe is, as plain data: the checks, a target (endpoint + check + timing) and a result. Pure.

Why it exists: the models (which build targets from a ServiceEntry), the checker (which runs them) and the
scheduler (which orders them) all speak these types; keeping them in a module with no I/O lets the pure layers
use them without importing aiohttp or grpc.

Connection-loss hints (see prober.py): a Target carries what the prober needs to answer one, whether the entry
wants them (`hints`) and how many consecutive failures make the endpoint unhealthy (`unhealthy_threshold`: the
fast re-probes stop there); a TcpCheck says whether the checker keeps its connection open to watch it (`hold`);
and a ProbeResult says what triggered the probe (`trigger`), so a transition can name its cause. A UdpCheck has
no connection, so it never gives hints.

Verified TLS: an HttpCheck (scheme HTTPS) or a GrpcCheck may carry a `Tls`: whether the certificate is verified,
the server name (SNI, and the name verified), and the CA bundle's PEM text itself, read from its ConfigMap. The
bundle is part of the target, so a rotated CA is a changed target: the prober re-upserts it (equal targets keep
their schedule) and the checker builds (and caches) a context for the new bundle.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final, Literal

Trigger = Literal["interval", "connection-loss"]
INTERVAL: Final = "interval"  # the probe came due on the target's schedule (its first probe included)
CONNECTION_LOSS: Final = "connection-loss"  # the probe was run because the peer closed an idle probe connection


@dataclass(frozen=True, slots=True)
class Tls:
    """How a probe's TLS handshake is checked. `verify=False` accepts any certificate (kubelet's HTTPS probes do
    the same); `server_name` is sent as SNI and is the name the certificate must carry (None: the endpoint's
    address, or its DNS name); `ca` is the PEM text of the CA bundle to trust (None: the system's trust store).
    `problem`: why the configured bundle cannot be had (its ConfigMap or key is missing): the probe fails with it,
    without connecting. `source` names the bundle in details ("ConfigMap ca-bundle key ca.crt")."""

    verify: bool = False
    server_name: str | None = None
    ca: str | None = None
    source: str = ""
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class HttpCheck:
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    expected: tuple[tuple[int, int], ...] = ((200, 399),)
    tls: Tls | None = None  # HTTPS only; None: not verified, as before verified TLS existed


@dataclass(frozen=True, slots=True)
class TcpCheck:
    port: int
    hold: bool = False  # keep the connection open after the check and watch it for EOF/RST (a connection-loss hint)


@dataclass(frozen=True, slots=True)
class GrpcCheck:
    port: int
    service: str = ""
    tls: Tls | None = None  # None: plaintext (h2c); else TLS, always verified (grpc cannot skip verification)


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """A UDP check's DNS mode: query `name` for `rdtype` (a type name: A, AAAA, SRV, ...) and want `rcode`."""

    name: str
    rdtype: str = "A"
    rcode: str = "NOERROR"


@dataclass(frozen=True, slots=True)
class UdpCheck:
    """Send `payload` in one datagram and pass on a reply: any reply, or one that starts with `prefix` or in which
    `regex` (RE2 syntax) finds a match. With `dns` the payload is a DNS query built by the checker instead, and the
    reply must be a well-formed answer to it with the wanted rcode."""

    port: int
    payload: bytes = b""
    prefix: bytes | None = None
    regex: str | None = None
    dns: DnsQuery | None = None


@dataclass(frozen=True, slots=True)
class LeaseCheck:
    namespace: str
    name: str


Check = HttpCheck | TcpCheck | GrpcCheck | UdpCheck | LeaseCheck


@dataclass(frozen=True, slots=True)
class Target:
    """One endpoint and how to probe it. Equal targets keep their schedule when an entry is re-read."""

    address: str
    check: Check
    interval: float
    timeout: float
    hints: bool = (
        True  # answer connection-loss hints of this endpoint with probes (spec.healthCheck.connectionLossHints)
    )
    unhealthy_threshold: int = 3  # a hint's re-probes stop after this many consecutive failures


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float
    refused: bool = False  # the probe policy forbade it; nothing was sent
    trigger: Trigger = INTERVAL  # what made the prober run this probe (set by the prober, not by the checker)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    renew_time: float | None  # epoch seconds
    duration: float | None


def parse_micro_time(value: str | None) -> float | None:
    """Kubernetes MicroTime/Time (RFC 3339) to epoch seconds."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
