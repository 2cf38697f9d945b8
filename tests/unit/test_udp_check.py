"""UDP checks against real datagram sockets on the loopback interface (allowed by an explicit probe policy): an echo
passes, a reply that misses the prefix or the regex fails with the reply shown, a silent port times out and a closed
one answers ICMP port unreachable (each with its own detail, on asyncio's loop and on uvloop); DNS mode against a
small dnspython responder passes on the wanted rcode and fails on another rcode, a malformed reply, a wrong id or a
wrong question; the probe policy refuses before anything is sent, also to a name that resolves to an allowed address
first and a refused one next; every probe closes its socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from beacon import metrics
from beacon.checks import Checker
from beacon.failsafe import check_kind
from beacon.policy import ProbePolicy
from beacon.targets import DnsQuery, ProbeResult, Target, UdpCheck

LOOPBACK_ALLOWED = ProbePolicy.with_allowed(["127.0.0.0/8", "::1/128"])
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {"asyncio": None, "uvloop": uvloop.new_event_loop}
Answer = Callable[[bytes], bytes | None]  # a request's datagram -> the reply (None: stay silent)


def run(loop: str, test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(test())


class _Server(asyncio.DatagramProtocol):
    def __init__(self, answer: Answer, sock: socket.socket) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.sock = sock  # replies go out through it: asyncio's transport would not send an empty one

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        reply = self.answer(data)
        if reply is not None:
            self.sock.sendto(reply, addr)


@contextlib.asynccontextmanager
async def udp_server(answer: Answer, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[tuple[int, _Server]]:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(lambda: _Server(answer, sock), sock=sock)
    try:
        yield int(sock.getsockname()[1]), server
    finally:
        transport.close()


def echo(data: bytes) -> bytes:
    return data


def closed_port(host: str = "127.0.0.1") -> int:
    """A UDP port nothing listens on (bound, then closed: the kernel answers ICMP port unreachable)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def target(check: UdpCheck, *, address: str = "127.0.0.1", timeout: float = 2.0) -> Target:
    return Target(address=address, check=check, interval=10.0, timeout=timeout, hints=False)


@contextlib.asynccontextmanager
async def checker(policy: ProbePolicy = LOOPBACK_ALLOWED) -> AsyncIterator[Checker]:
    async with Checker(policy=policy, leases=lambda ns, name: None) as c:
        yield c


async def probe(check: UdpCheck, **kw: Any) -> ProbeResult:
    async with checker() as c:
        return await c.run(target(check, **kw))


# ------------------------------------------------------------------------------------------------ payload checks
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_echo_passes_and_the_server_gets_the_payload(loop: str) -> None:
    async def test() -> None:
        async with udp_server(echo) as (port, server):
            result = await probe(UdpCheck(port=port, payload=b"ping\x00", prefix=b"ping"))
        assert (result.ok, result.detail, result.refused) == (True, "UDP reply, 5 bytes", False)
        assert server.received == [b"ping\x00"]

    run(loop, test)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_closed_port_fails_at_once_with_the_icmp_detail(loop: str) -> None:
    async def test() -> None:
        result = await probe(UdpCheck(port=closed_port(), payload=b"ping"), timeout=5.0)
        assert (result.ok, result.detail, result.refused) == (False, "UDP port unreachable (ICMP)", False)
        assert result.seconds < 1.0, "the ICMP error ends the probe, not the timeout"

    run(loop, test)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_silent_port_fails_at_the_timeout_with_its_own_detail(loop: str) -> None:
    async def test() -> None:
        async with udp_server(lambda data: None) as (port, server):
            result = await probe(UdpCheck(port=port, payload=b"ping"), timeout=0.3)
        assert (result.ok, result.detail) == (False, "no UDP reply within 0.3s")
        assert 0.25 < result.seconds < 1.5
        assert server.received == [b"ping"]

    run(loop, test)


@pytest.mark.parametrize(
    ("check", "reply", "ok", "detail"),
    [
        (UdpCheck(port=0, payload=b"x"), b"", True, "UDP reply, 0 bytes"),  # any reply, even an empty one
        (UdpCheck(port=0, payload=b"x", prefix=b"PONG"), b"PONG 7", True, "UDP reply, 6 bytes"),
        (UdpCheck(port=0, payload=b"x", prefix=b"PONG"), b"PANG 7", False, "UDP reply does not match the prefix: "),
        (UdpCheck(port=0, payload=b"x", prefix=b"\xca\xfe"), b"\xca\xfe\x00", True, "UDP reply, 3 bytes"),
        (UdpCheck(port=0, payload=b"x", regex=r"^OK v[0-9]+$"), b"OK v12", True, "UDP reply, 6 bytes"),
        (UdpCheck(port=0, payload=b"x", regex=r"^OK v[0-9]+$"), b"OK vX", False, "UDP reply does not match the regex"),
        (UdpCheck(port=0, payload=b"x", regex="caf\u00e9"), "un café".encode(), True, "UDP reply, 8 bytes"),  # UTF-8
    ],
)
async def test_the_reply_must_match_the_expectation(check: UdpCheck, reply: bytes, ok: bool, detail: str) -> None:
    async with udp_server(lambda data: reply) as (port, _):
        result = await probe(UdpCheck(port=port, payload=check.payload, prefix=check.prefix, regex=check.regex))
    assert result.ok is ok
    assert result.detail.startswith(detail), result.detail
    if not ok:
        assert repr(reply) in result.detail  # the reply is shown


async def test_a_long_mismatching_reply_is_shown_truncated() -> None:
    async with udp_server(lambda data: b"A" * 2000) as (port, _):
        result = await probe(UdpCheck(port=port, payload=b"x", prefix=b"B"))
    assert not result.ok
    assert result.detail == f"UDP reply does not match the prefix: {b'A' * 40!r}"


async def test_the_regex_is_re2_linear_in_the_reply_and_a_bad_one_is_a_clear_failure() -> None:
    """A backtracking engine needs about 2^n steps for (a+)+$ against n a's and a b: RE2 needs n."""
    reply = b"a" * 5000 + b"b"
    async with udp_server(lambda data: reply) as (port, _), checker() as c:
        started = time.perf_counter()
        slow = await c.run(target(UdpCheck(port=port, payload=b"x", regex=r"(a+)+$")))
        elapsed = time.perf_counter() - started
        bad = await c.run(target(UdpCheck(port=port, payload=b"x", regex=r"(unclosed")))
        again = await c.run(target(UdpCheck(port=port, payload=b"x", regex=r"(unclosed")))
    assert not slow.ok
    assert elapsed < 0.5
    assert not bad.ok
    assert bad.detail.startswith("UDP expect.regex is not valid RE2: "), bad.detail
    assert again.detail == bad.detail  # compiled (and refused) once


async def test_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = udp_server(echo, host="::1")
        async with server as (port, _):
            result = await probe(UdpCheck(port=port, payload=b"six"), address="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    assert (result.ok, result.detail) == (True, "UDP reply, 3 bytes")
    result = await probe(UdpCheck(port=closed_port("::1"), payload=b"six"), address="::1")
    assert result.detail == "UDP port unreachable (ICMP)"


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_empty_payload_is_sent(loop: str) -> None:
    async def test() -> None:
        async with udp_server(lambda data: b"pong") as (port, server):
            result = await probe(UdpCheck(port=port, payload=b""), timeout=1.0)
        assert (result.ok, result.detail) == (True, "UDP reply, 4 bytes")
        assert server.received == [b""]

    run(loop, test)


async def test_every_probe_closes_its_socket() -> None:
    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with udp_server(echo) as (port, _), checker() as c:
        await c.run(target(UdpCheck(port=port, payload=b"warm-up")))
        await asyncio.sleep(0.01)
        before = open_files()
        dead = closed_port()
        for i in range(50):
            await c.run(target(UdpCheck(port=port, payload=b"%d" % i)))
            await c.run(target(UdpCheck(port=dead, payload=b"x")))
        await asyncio.sleep(0.05)  # transports close their sockets on the next loop iteration
        assert open_files() == before


# ------------------------------------------------------------------------------------------------ DNS mode
def dns_server(
    *, name: str = "db.beacon.test.", address: str = "198.18.0.53", other: int = dns.rcode.NXDOMAIN
) -> Callable[[bytes], bytes]:
    """Answers A `name` with `address`; any other question with rcode `other`."""

    def answer(data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        if question.name == dns.name.from_text(name) and question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(name, 30, "IN", "A", address))
        else:
            reply.set_rcode(other)
        return reply.to_wire()  # type: ignore[no-any-return]

    return answer


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_dns_passes_on_the_wanted_rcode(loop: str) -> None:
    async def test() -> None:
        async with udp_server(dns_server()) as (port, server):
            found = await probe(UdpCheck(port=port, dns=DnsQuery(name="db.beacon.test")))
            missing = await probe(UdpCheck(port=port, dns=DnsQuery(name="nope.beacon.test", rcode="NXDOMAIN")))
        assert (found.ok, found.detail) == (True, "DNS NOERROR, 1 answer")
        assert (missing.ok, missing.detail) == (True, "DNS NXDOMAIN, 0 answers")
        query = dns.message.from_wire(server.received[0])
        assert str(query.question[0].name) == "db.beacon.test."  # a relative name is asked as absolute
        assert query.question[0].rdtype == dns.rdatatype.A
        assert query.flags & dns.flags.RD

    run(loop, test)


@pytest.mark.parametrize(
    ("query", "other", "detail"),
    [
        (
            DnsQuery(name="nope.beacon.test", rcode="SERVFAIL"),
            dns.rcode.NXDOMAIN,
            "DNS rcode NXDOMAIN, wanted SERVFAIL",
        ),
        (DnsQuery(name="nope.beacon.test"), dns.rcode.SERVFAIL, "DNS rcode SERVFAIL, wanted NOERROR"),
        (DnsQuery(name="db.beacon.test", rdtype="AAAA"), dns.rcode.REFUSED, "DNS rcode REFUSED, wanted NOERROR"),
    ],
)
async def test_dns_fails_on_another_rcode(query: DnsQuery, other: int, detail: str) -> None:
    async with udp_server(dns_server(other=other)) as (port, _):
        result = await probe(UdpCheck(port=port, dns=query))
    assert (result.ok, result.detail) == (False, detail)


def _flip_id(data: bytes) -> bytes:
    reply = bytearray(dns_server()(data))
    reply[0] ^= 0xFF
    return bytes(reply)


def _other_question(data: bytes) -> bytes:
    query = dns.message.from_wire(data)
    other = dns.message.make_query("other.beacon.test", "A")
    other.id = query.id
    return dns.message.make_response(other).to_wire()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (lambda data: b"\x12", "malformed DNS reply (ShortHeader): b'\\x12'"),
        (lambda data: data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x07", "malformed DNS reply ("),
        (echo, "DNS reply does not answer the query (id "),  # the query itself comes back: no QR flag
        (_flip_id, "DNS reply does not answer the query (id "),
        (_other_question, "DNS reply is for another question"),
    ],
)
async def test_dns_fails_on_a_malformed_or_foreign_reply(answer: Answer, detail: str) -> None:
    async with udp_server(answer) as (port, _):
        result = await probe(UdpCheck(port=port, dns=DnsQuery(name="db.beacon.test")))
    assert not result.ok
    assert result.detail.startswith(detail), result.detail


async def test_dns_ids_vary_per_probe_and_the_query_is_otherwise_the_same() -> None:
    async with udp_server(dns_server()) as (port, server), checker() as c:
        for _ in range(20):
            result = await c.run(target(UdpCheck(port=port, dns=DnsQuery(name="db.beacon.test"))))
            assert result.ok, result.detail
    assert len({data[:2] for data in server.received}) > 10
    assert len({data[2:] for data in server.received}) == 1


async def test_dns_server_stopped_is_port_unreachable() -> None:
    result = await probe(UdpCheck(port=closed_port(), dns=DnsQuery(name="db.beacon.test")))
    assert (result.ok, result.detail) == (False, "UDP port unreachable (ICMP)")


# ------------------------------------------------------------------------------------------------ policy
@pytest.mark.parametrize("address", ["127.0.0.1", "localhost"])
async def test_policy_refusal_sends_nothing(address: str) -> None:
    async with udp_server(echo) as (port, server), checker(policy=ProbePolicy()) as c:
        results = [
            await c.run(target(UdpCheck(port=port, payload=b"x"), address=address)),
            await c.run(target(UdpCheck(port=port, dns=DnsQuery(name="db.beacon.test")), address=address)),
        ]
        await asyncio.sleep(0.05)
    assert server.received == []
    for result in results:
        assert (result.ok, result.refused) == (False, True)
        assert "loopback" in result.detail
    if address == "localhost":
        assert results[0].detail.startswith("localhost resolves to")


CHECKED = "127.0.0.2"  # what "localhost" answers to the first lookup: allowed by REBINDING_POLICY
REBOUND = "127.0.0.1"  # what it answers to every later lookup: loopback, refused
REBINDING_POLICY = ProbePolicy.with_allowed([f"{CHECKED}/32"])


async def test_a_name_is_resolved_once_per_probe_and_only_the_checked_address_gets_datagrams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with udp_server(echo, host=REBOUND) as (port, refused_server):
        loop = asyncio.get_running_loop()
        lookups: list[dict[str, Any]] = []

        async def getaddrinfo(host: object, port_: object, **kw: Any) -> list[Any]:
            assert host == "localhost"
            lookups.append(kw)
            answer = CHECKED if len(lookups) == 1 else REBOUND
            return [(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", (answer, port_ or 0))]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        async with udp_server(echo, host=CHECKED, port=port) as (_, checked_server), checker(REBINDING_POLICY) as c:
            first = await c.run(target(UdpCheck(port=port, payload=b"one"), address="localhost", timeout=1.0))
            second = await c.run(target(UdpCheck(port=port, payload=b"two"), address="localhost", timeout=1.0))
            await asyncio.sleep(0.05)
    assert (first.ok, first.refused) == (True, False), first.detail
    assert checked_server.received == [b"one"]
    assert refused_server.received == [], "a probe reached the address the policy refuses"
    assert (second.ok, second.refused) == (False, True)
    assert second.detail.startswith(f"localhost resolves to {REBOUND} is loopback")
    assert [kw.get("type") for kw in lookups] == [socket.SOCK_DGRAM] * 2


# ------------------------------------------------------------------------------------------------ labels
def test_udp_checks_have_their_own_kind_and_metric_label() -> None:
    check = UdpCheck(port=53, dns=DnsQuery(name="db.beacon.test"))
    assert check_kind(check) == "udp"
    before = metrics.PROBES.labels(check="udp", result="fail")._value.get()
    metrics.record_probe(check, ok=False, seconds=0.01)
    assert metrics.PROBES.labels(check="udp", result="fail")._value.get() == before + 1
