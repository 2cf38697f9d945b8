"""Probe policy: which addresses beacon may send probes to (the SSRF guard).

Why it exists: anyone who can create a ServiceEntry can make the operator send HTTP requests from inside the
cluster. Without a guard, that is a way to reach the cloud metadata service (169.254.169.254, fd00:ec2::254) or
the operator's own loopback. By default beacon refuses loopback, link-local (which holds every metadata
endpoint), the unspecified address and multicast; operators can allow ranges explicitly. Refusal is reported on
the entry with a clear reason instead of a silent failure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
VERDICT_CACHE_SIZE = 65536  # addresses whose verdict is remembered (more than the endpoints one operator probes)

REFUSED_BY_DEFAULT: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata lives here)"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
)


@dataclass(frozen=True)
class ProbePolicy:
    """Addresses in `allowed` are probed even when a refused range contains them (most specific wins)."""

    refused: tuple[tuple[IPNetwork, str], ...] = field(
        default_factory=lambda: tuple((ipaddress.ip_network(net), why) for net, why in REFUSED_BY_DEFAULT)
    )
    allowed: tuple[IPNetwork, ...] = ()
    _verdicts: dict[str, tuple[bool, str | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def with_allowed(cls, cidrs: Iterable[str]) -> ProbePolicy:
        return cls(allowed=tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))

    def verdict(self, address: str) -> tuple[bool, str | None]:
        """(whether `address` is an IP literal, `refusal(address)`), cached per address: the probe path asks on
        every probe, and parsing the same address and walking the ranges each time is wasted work."""
        cached = self._verdicts.get(address)
        if cached is None:
            if len(self._verdicts) >= VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            cached = self._verdicts[address] = (_is_ip(address), self.refusal(address))
        return cached

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be probed, or None if it may. Names (FQDNs) are checked after resolution."""
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed):
            return None
        for net, why in self.refused:
            if ip.version == net.version and ip in net:
                return f"{address} is {why} ({net}); the operator's probe policy refuses it (--allow-probe-cidr)"
        return None


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def kubernetes_accepts(address: str) -> bool:
    """Whether the API server accepts `address` in Endpoints/EndpointSlices: it rejects the unspecified,
    loopback and link-local addresses (and link-local multicast), so such endpoints are never published."""
    try:
        ip: IPAddress = ipaddress.ip_address(address)
    except ValueError:
        return True  # a DNS name (FQDN slices only)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_unspecified or ip.is_loopback or ip.is_link_local or (ip.is_multicast and _link_local_multicast(ip))
    )


def _link_local_multicast(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in ipaddress.ip_network("224.0.0.0/24")
    return ip in ipaddress.ip_network("ff02::/16")
