"""Tests for beacon_dev.testhosts: real servers on real 198.18.x addresses inside network namespaces.

Why it exists: every end-to-end test of beacon's health checking stands on these test hosts, so they must really
be reachable from the host, really refuse connections when stopped, and really leave nothing behind. These tests
need root and iproute2 but no Kubernetes cluster. Traffic only ever goes to our own 198.18.x addresses, never
through a proxy.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import dns.message
import dns.rcode
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from beacon_dev.netguard import guard_route_present
from beacon_dev.testhosts import (
    LOOPBACK_MAX_HOSTS,
    MAX_HOSTS,
    POOL,
    TestHostError,
    TestNetwork,
    cleanup_stale,
    unavailable_reason,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

# Generous: the machine running the suite may be busy; nothing here asserts on timing.
TIMEOUT = 20.0

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def http_status(url: str, *, timeout: float = TIMEOUT) -> int:
    try:
        with _opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def http_refused(url: str) -> bool:
    try:
        http_status(url)
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    return False


def tcp_connect(address: str, port: int) -> socket.socket:
    return socket.create_connection((address, port), timeout=TIMEOUT)


def grpc_check(target: str, service: str = "") -> str:
    """The serving status name, or the gRPC status code name if the call fails."""
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_names() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours is as good as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition: object, *, timeout: float = 30.0) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def assert_gone(name: str, server_pid: int | None) -> None:
    assert name not in netns_names()
    assert name not in link_names()
    if server_pid is not None:
        assert wait_for(lambda: not pid_alive(server_pid)), f"server process {server_pid} survived"


@pytest.fixture
def net() -> Iterator[TestNetwork]:
    with TestNetwork() as network:
        yield network


def test_layout(net: TestNetwork) -> None:
    assert net.network is not None
    assert net.network.subnet_of(POOL)
    assert net.network.prefixlen == 22
    hosts = [net.add_host(), net.add_host()]
    assert [h.address for h in hosts] == [str(net.network[10]), str(net.network[11])]
    assert net.addresses == [h.address for h in hosts]
    assert net.host_address == str(net.network[1])
    assert not ipaddress.ip_address(hosts[0].address).is_loopback
    assert not ipaddress.ip_address(hosts[0].address).is_link_local


def test_http_health_switch_stop_start(net: TestNetwork) -> None:
    srv = net.add_host().http(port=8080, path="/healthz")
    assert srv.url == f"http://{srv.address}:8080/healthz"
    assert http_status(srv.url) == 200

    srv.set_healthy(False)
    assert http_status(srv.url) == 503
    srv.set_healthy(True)
    assert http_status(srv.url) == 200
    srv.set_status(418)
    assert http_status(srv.url) == 418
    assert http_status(f"http://{srv.address}:8080/") == 200  # other paths just identify the server

    srv.stop()
    assert not srv.running
    assert http_refused(srv.url)
    srv.stop()  # idempotent

    srv.start()
    assert srv.info()["running"]
    assert http_status(srv.url) == 418  # settings survive a restart
    srv.set_healthy(True)
    assert http_status(srv.url) == 200
    assert srv.requests >= 6


def test_http_stop_closes_keepalive_connections(net: TestNetwork) -> None:
    srv = net.add_host().http(port=8080)
    conn = http.client.HTTPConnection(srv.address, 8080, timeout=TIMEOUT)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"200\n"
        srv.stop()

        def get() -> None:
            conn.request("GET", "/healthz")
            conn.getresponse()

        with pytest.raises(ConnectionError):
            get()
    finally:
        conn.close()


def test_http_keepalive_closes_idle_connections_and_counts_them(net: TestNetwork) -> None:
    srv = net.add_host().http(port=8080, keepalive=0.5)
    conn = http.client.HTTPConnection(srv.address, 8080, timeout=TIMEOUT)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"200\n"
        assert conn.sock is not None
        assert conn.sock.recv(1) == b""  # idle: the server closes it (FIN) after its keep-alive timeout
    finally:
        conn.close()
    assert wait_for(lambda: srv.counters() == {"requests": 1, "connections": 1, "closes": 1})
    conn = http.client.HTTPConnection(srv.address, 8080, timeout=TIMEOUT)
    try:
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    finally:
        conn.close()  # closed by the client: no close of the server's
    time.sleep(1.0)
    assert srv.counters() == {"requests": 2, "connections": 2, "closes": 1}


def test_crash_kills_only_its_own_process_and_revive_brings_its_servers_back(net: TestNetwork) -> None:
    shared = net.add_host()
    crashing, neighbour = net.add_hosts(2, own_process=True)
    shared_srv = shared.http(port=8080)
    srv = crashing.http(port=8080)
    neighbour.tcp(port=9000)
    srv.set_status(503)
    assert crashing.server_pid is not None
    assert crashing.server_pid == neighbour.server_pid != shared.server_pid
    with pytest.raises(TestHostError, match="own_process"):
        shared.crash()
    pid = crashing.server_pid
    held = tcp_connect(neighbour.address, 9000)  # an open connection: the crash closes it from the server's side
    try:
        before = time.monotonic()
        at = crashing.crash()
        assert before <= at <= time.monotonic()
        try:
            closed = held.recv(1) == b""  # FIN
        except ConnectionResetError:
            closed = True  # RST: the process died with something of this connection unread, a close all the same
        assert closed
    finally:
        held.close()
    assert not pid_alive(pid)
    assert crashing.server_pid is None
    assert http_refused(srv.url)
    assert http_status(shared_srv.url) == 200  # the other process serves on
    with pytest.raises(TestHostError, match="not running"):
        crashing.crash()

    crashing.revive()
    assert crashing.server_pid not in (None, pid)
    assert http_status(srv.url) == 503  # same port, same settings
    tcp_connect(neighbour.address, 9000).close()
    with pytest.raises(TestHostError, match="running"):
        neighbour.revive()


def test_http_delay(net: TestNetwork) -> None:
    srv = net.add_host().http(port=8080)
    srv.set_delay(30)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        http_status(srv.url, timeout=0.5)
    srv.set_delay(0)
    assert http_status(srv.url) == 200


def test_servers_bind_only_their_own_address(net: TestNetwork) -> None:
    a, b = net.add_hosts(2)
    srv_a, srv_b = a.http(port=8080), b.http(port=8080)
    srv_a.stop()
    assert http_refused(srv_a.url)
    assert http_status(srv_b.url) == 200
    assert http_refused(f"http://{net.add_host().address}:8080/healthz")  # no server on a fresh host


def test_tcp_connect_and_refused(net: TestNetwork) -> None:
    host = net.add_host()
    srv = host.tcp(port=9000)
    with tcp_connect(host.address, 9000) as conn:
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
    with tcp_connect(host.address, 9000) as conn:
        srv.stop()
        with contextlib.suppress(ConnectionResetError):
            assert conn.recv(1) == b""  # closed by the server
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(host.address, 9000)
    srv.start()
    with tcp_connect(host.address, 9000):
        pass
    assert srv.connections == 3


def test_port_zero_picks_a_port(net: TestNetwork) -> None:
    host = net.add_host()
    srv = host.tcp(port=0)
    assert srv.port > 0
    srv.stop()
    srv.start()
    with tcp_connect(host.address, srv.port):
        pass


def test_grpc_health(net: TestNetwork) -> None:
    srv = net.add_host().grpc(port=50051)
    assert srv.target.endswith(":50051")
    assert grpc_check(srv.target) == "SERVING"
    assert grpc_check(srv.target, "payments") == "NOT_FOUND"

    srv.set_status("", "NOT_SERVING")
    srv.set_status("payments", "SERVING")
    assert grpc_check(srv.target) == "NOT_SERVING"
    assert grpc_check(srv.target, "payments") == "SERVING"

    srv.stop()
    assert grpc_check(srv.target) == "UNAVAILABLE"
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(srv.address, 50051)

    srv.start()
    assert grpc_check(srv.target) == "NOT_SERVING"  # statuses survive a restart
    srv.set_serving(True)
    assert grpc_check(srv.target) == "SERVING"


def udp_exchange(address: str, port: int, payload: bytes, *, timeout: float = TIMEOUT) -> bytes:
    """One datagram out and its reply back, on a connected socket (ConnectionRefusedError: ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.send(payload)
        return sock.recv(65535)


def test_udp_echo_and_port_unreachable_when_stopped(net: TestNetwork) -> None:
    host = net.add_host()
    srv = host.udp(port=9053)
    assert udp_exchange(host.address, 9053, b"ping\x00") == b"ping\x00"
    assert udp_exchange(host.address, 9053, b"") == b""  # an empty datagram is echoed too
    srv.stop()
    with pytest.raises(ConnectionRefusedError):  # the host is there, the port is closed: ICMP port unreachable
        udp_exchange(host.address, 9053, b"ping")
    srv.start()
    assert udp_exchange(host.address, 9053, b"again") == b"again"
    assert srv.datagrams == 3
    host.tcp(port=9053)  # a TCP listener may share the number
    with pytest.raises(TestHostError, match="already has"):
        host.udp(port=9053)


def test_udp_port_blocked_is_silent(net: TestNetwork) -> None:
    host = net.add_host()
    host.udp(port=9053)
    host.block()
    with pytest.raises(TimeoutError):
        udp_exchange(host.address, 9053, b"ping", timeout=0.5)
    host.unblock()
    assert udp_exchange(host.address, 9053, b"ping") == b"ping"


def test_dns_answers_its_name_and_a_settable_rcode_otherwise(net: TestNetwork) -> None:
    host = net.add_host()
    srv = host.dns(port=5353, name="db.beacon.test", answer="198.18.0.53")

    def ask(name: str, rdtype: str = "A") -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        reply = dns.message.from_wire(udp_exchange(host.address, 5353, query.to_wire()))
        assert query.is_response(reply)
        return reply

    found = ask("db.beacon.test")
    assert found.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rrset in found.answer for rr in rrset] == ["198.18.0.53"]
    no_data = ask("db.beacon.test", "AAAA")
    assert (no_data.rcode(), no_data.answer) == (dns.rcode.NOERROR, [])
    assert ask("other.beacon.test").rcode() == dns.rcode.NXDOMAIN
    srv.set_rcode("SERVFAIL")
    assert ask("other.beacon.test").rcode() == dns.rcode.SERVFAIL
    srv.stop()
    with pytest.raises(ConnectionRefusedError):
        ask("db.beacon.test")
    srv.start()
    assert ask("other.beacon.test").rcode() == dns.rcode.SERVFAIL  # settings survive a restart


def test_mixed_servers_on_one_host(net: TestNetwork) -> None:
    host = net.add_host()
    web, tcp, rpc = host.http(port=8080), host.tcp(port=9000), host.grpc(port=50051)
    assert host.servers == [web, tcp, rpc]
    with pytest.raises(TestHostError, match="already has"):
        host.tcp(port=8080)
    web.remove()
    host.tcp(port=8080)
    with tcp_connect(host.address, 8080):
        pass
    assert grpc_check(rpc.target) == "SERVING"


def test_250_hosts(net: TestNetwork) -> None:
    hosts = net.add_hosts(250)
    assert len(hosts) == 250
    assert len(set(net.addresses)) == 250
    first, last = hosts[0].http(port=8080), hosts[-1].http(port=8080)
    assert http_status(last.url) == 200
    assert http_status(first.url) == 200


def test_max_hosts(net: TestNetwork) -> None:
    hosts = net.add_hosts(MAX_HOSTS)
    assert len(hosts) == MAX_HOSTS
    srv = hosts[-1].tcp(port=9000)
    with tcp_connect(srv.address, 9000):
        pass
    with pytest.raises(TestHostError, match="at most"):
        net.add_host()


def neighbours(*, netns: str | None = None, dev: str | None = None) -> list[str]:
    """The IPv4 neighbour entries (destination addresses) of a namespace or device, failed ones aside."""
    argv = ["ip", *(["-n", netns] if netns else []), "-4", "-j", "neigh", "show", *(["dev", dev] if dev else [])]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [n["dst"] for n in json.loads(out.stdout or "[]") if "FAILED" not in n.get("state", [])]


def test_loopback_network_reaches_thousands_of_hosts_through_one_neighbour_entry() -> None:
    with TestNetwork(loopback=True) as net, TestNetwork() as small:
        assert net.network is not None
        assert small.network is not None
        assert net.network.prefixlen == 18
        assert net.network.subnet_of(POOL)
        assert not net.network.overlaps(small.network)  # the slot checks still see the other networks
        hosts = net.add_hosts(2000)  # more than a /22 holds, and more than the default neighbour table's gc_thresh1
        assert len(set(net.addresses)) == 2000
        picked = [hosts[0], hosts[1], hosts[999], hosts[1500], hosts[-1]]
        servers = [h.http(port=8080) for h in picked]
        for server in servers:
            assert http_status(server.url) == 200
        server = servers[-1]
        server.set_healthy(False)
        assert http_status(server.url) == 503
        # the host reached five addresses through one gateway (B+2); the namespace sees only the host's end
        assert neighbours(dev=net.name) == [str(net.network[2])]
        assert neighbours(netns=net.name) == [net.host_address]
        # each answer to the health path is logged with its time and status
        log = net.probe_log(since=0.0)
        assert {a for _, a, _ in log} == {s.address for s in servers}
        assert [st for _, a, st in log if a == server.address] == [200, 503]
        assert [a for _, a, _ in net.probe_log(since=0.0, not_status=200)] == [server.address]
        assert len(net.probe_log(since=time.monotonic() + 60)) == 0
        with pytest.raises(TestHostError, match="at most"):
            net.add_hosts(LOOPBACK_MAX_HOSTS)


def test_only_a_loopback_network_is_bigger_than_a_22() -> None:
    with pytest.raises(ValueError, match="loopback"):
        TestNetwork(prefixlen=18)
    with pytest.raises(ValueError, match="prefixlen"):
        TestNetwork(loopback=True, prefixlen=15)


def test_parallel_networks_do_not_collide() -> None:
    with TestNetwork() as one, TestNetwork() as two:
        assert one.name != two.name
        assert one.network is not None
        assert two.network is not None
        assert not one.network.overlaps(two.network)
        srv_one, srv_two = one.add_host().http(port=8080), two.add_host().http(port=8080)
        assert http_status(srv_one.url) == 200
        assert http_status(srv_two.url) == 200


def test_cleanup_after_with() -> None:
    with TestNetwork() as net:
        name = net.name
        net.add_host().http(port=8080)
        server_pid = net.server_pid
        assert server_pid is not None
        assert name in netns_names()
        assert name in link_names()
    assert net.closed
    assert_gone(name, server_pid)
    net.close()  # idempotent


class BoomError(Exception):
    pass


def test_cleanup_when_body_raises() -> None:
    seen: dict[str, object] = {}

    def body() -> None:
        with TestNetwork() as net:
            net.add_host().tcp(port=9000)
            seen.update(name=net.name, server_pid=net.server_pid)
            raise BoomError

    with pytest.raises(BoomError):
        body()
    name, server_pid = seen["name"], seen["server_pid"]
    assert isinstance(name, str)
    assert isinstance(server_pid, int)
    assert_gone(name, server_pid)


def test_use_after_close_is_an_error() -> None:
    with TestNetwork() as net:
        pass
    with pytest.raises(TestHostError, match="not open"):
        net.add_host()


_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from beacon_dev.testhosts import TestNetwork
    # Ctrl-C as at a terminal, even when this test runs under something that ignores SIGINT (a job started in
    # the background by a non-interactive shell, nohup): an ignored SIGINT is inherited and Python keeps it so
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with TestNetwork() as net:
        net.add_host().http(port=8080)
        print(net.name, net.server_pid, flush=True)
        time.sleep(600)
    """
)


def _start_child() -> tuple[subprocess.Popen[str], str, int]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline().split()
    assert len(line) == 2, f"child printed {line!r}"
    return child, line[0], int(line[1])


def test_cleanup_on_sigint() -> None:
    child, name, server_pid = _start_child()
    try:
        assert name in netns_names()
        child.send_signal(signal.SIGINT)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0  # KeyboardInterrupt propagated after the cleanup
    assert_gone(name, server_pid)


def test_cleanup_stale_after_owner_was_killed() -> None:
    child, name, server_pid = _start_child()
    child.kill()  # no chance to clean up
    child.wait()
    assert name in netns_names()
    # the server process notices its owner is gone and exits by itself
    assert wait_for(lambda: not pid_alive(server_pid)), "server process outlived its owner"
    removed = cleanup_stale()
    # (a concurrent test run may have beaten us to it: its TestNetwork() cleans up stale networks too)
    assert name in removed or name not in netns_names()
    assert_gone(name, server_pid)


def test_block_drops_packets_inside_the_namespace_and_keeps_the_route(net: TestNetwork) -> None:
    host, other = net.add_hosts(2)
    srv = host.tcp(port=9000)
    other.tcp(port=9000)
    host.block()
    with pytest.raises((TimeoutError, socket.timeout)):
        socket.create_connection((host.address, 9000), timeout=1.0)
    with tcp_connect(other.address, 9000):  # only the blocked host is cut off
        pass
    routes = subprocess.run(["ip", "-j", "route", "get", host.address], capture_output=True, text=True, check=True)
    assert net.name in routes.stdout  # still routed to the namespace: a broken path, not a vanished host
    host.unblock()
    with tcp_connect(host.address, 9000):
        pass
    assert srv.connections == 1


def test_a_removed_host_is_unreachable_here_not_routed_away() -> None:
    """Once a network is gone, its addresses hit the guard route (a blackhole on this machine); they never follow
    the default route. The kernel answers at once: nothing is sent."""
    with TestNetwork() as gone:
        address = gone.add_host().address
    assert guard_route_present()
    route = subprocess.run(["ip", "-j", "route", "get", address], capture_output=True, text=True, check=False)
    assert route.returncode != 0 or '"blackhole"' in route.stdout, route.stdout  # `ip route get`: EINVAL
    with pytest.raises(OSError, match="Invalid argument") as failure:  # a blackhole route's EINVAL, at once
        socket.create_connection((address, 9000), timeout=5.0)
    assert failure.value.errno == errno.EINVAL
