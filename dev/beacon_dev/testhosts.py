"""Real endpoint servers on real, non-loopback addresses, for beacon's tests and the `make run` demo.

Why this exists: Kubernetes rejects loopback and link-local addresses in Endpoints/EndpointSlices, so tests that
exercise beacon's health checking end to end need servers the operator can reach on ordinary addresses. This
module builds them out of Linux network namespaces (it needs root, or at least CAP_NET_ADMIN + CAP_SYS_ADMIN,
and the `ip` tool from iproute2)::

    with TestNetwork() as net:
        host = net.add_host()                 # host.address == "198.18.4.10", say
        srv = host.http(port=8080, path="/healthz")
        srv.set_healthy(False)                # GET /healthz -> 503
        srv.stop()                            # connection refused
        echo = host.udp(port=9053)            # UDP echo; stopped: ICMP port unreachable
        dns = host.dns(port=5353, name="db.beacon.test", answer=host.address)   # other names: NXDOMAIN
        hosts = net.add_hosts(250)            # one `ip -batch` call
        crashy = net.add_hosts(20, own_process=True)  # served by a server process of their own
        crashy[0].crash()                     # SIGKILL that process: the kernel closes its sockets
        crashy[0].revive()                    # a new process; the same servers listen again

    with TestNetwork(loopback=True) as big:   # a /18: up to LOOPBACK_MAX_HOSTS (16,373) test hosts
        hosts = big.add_hosts(10_000)

Layout. Every `TestNetwork` (but a loopback-mode one, below) takes one /22 out of 198.18.0.0/16 (reserved for
benchmarking, RFC 2544), so up to 64 networks can exist at once and each holds up to `MAX_HOSTS` (1013) test hosts.
For slot N the /22 starts at B = 198.18.0.0 + N * 1024 and:

* B+1    is the host side of a veth pair (interface `bcn-<pid>-<n>` in the caller's namespace, address B+1/32);
* B+2    is the namespace side (`veth0` in namespace `bcn-<pid>-<n>`, address B+2/22, default route via B+1);
* B+10 .. B+1022 are test-host addresses, added as /32s on `veth0`.

The host routes the whole /22 *via* B+2 instead of on-link, so however many test hosts there are, the host's
neighbour (ARP) table only ever holds one entry per network.

Loopback mode (`TestNetwork(loopback=True)`, for the benchmarks' 10,000+ endpoints): the network takes a /18
(`LOOPBACK_PREFIXLEN`; any `prefixlen` from /16 to /22 can be asked for) and its test hosts' /32s go on the
namespace's `lo` instead of `veth0`. `veth0` then carries only B+2/32, the gateway: the namespace answers for the
pool's addresses from its local table and never resolves them on a link, and the host reaches the whole pool
through that one gateway, so each side keeps a single neighbour entry however many thousand addresses there are.
The same slot rules apply (a /18 is free only when nothing of /16 or longer on the host overlaps it), and the
network still lies inside 198.18.0.0/16. A slot is free when no address or route of /16 or
longer on the host overlaps it; the choice is made under an flock (/run/beacon-testhosts.lock) so that parallel
test runs never collide. IPv6 address generation is off on both veth ends, so the pair carries no IPv6 chatter.

Servers run inside the namespace, in helper processes (`beacon_dev._testhost_server`, started lazily with the first
server) that manage any number of HTTP / TCP / gRPC-health / UDP-echo / DNS listeners, each bound to exactly one test
host's address. Each helper serves at most `HOSTS_PER_SERVER_PROCESS` hosts: a host costs its helper a listening socket
plus a connection per client, and a process cannot hold more descriptors than its hard limit (often 20,000, and
only CAP_SYS_RESOURCE raises it). At that limit accept() fails with EMFILE and asyncio stops accepting on the
socket for a second, so probes would time out for reasons that have nothing to do with the endpoint. This side
talks to them with blocking request/response calls over their stdin/stdout; a helper exits by itself if this
process dies. Hosts added with `own_process=True` get a helper of their own (one per `add_hosts` call), so a
test can crash their server the way a real backend crashes (`TestHost.crash()`: SIGKILL, and the kernel closes
every socket the process held, sending FIN or RST to its clients) without touching any other host, and bring it
back (`TestHost.revive()`: a new process whose servers listen again on the same ports with the same settings).
On exit from the `with` block (also on exceptions and Ctrl-C) the helpers and anything else left in the
namespace are killed and the veth pair and namespace are deleted.

Nothing leaves the machine. A test host's routes vanish with its veth, so `open()` first makes sure the guard route
(`beacon_dev.netguard`: a blackhole for 198.18.0.0/15 with a high metric) exists: a probe still in flight towards a
removed test host dies here instead of following the default route. Stop whatever probes a network before closing
it, and break paths with `block()` (DROP rules inside the namespace), never by taking a link down.
`cleanup_stale()` removes what crashed runs left behind (the owning pid is in every name) and runs whenever a
network is created.

HTTP and gRPC servers serve TLS when given a certificate (`tls=`, a `beacon_dev.devcluster.pki.KeyPair`: the
PEM files are read here and sent to the helper); `set_certificate()` swaps it (the server restarts with it,
closing its connections). The tests of beacon's verified TLS checks make their CAs and certificates with
`beacon_dev.devcluster.pki.Pki`.

This module imports nothing heavy (no aiohttp, no grpc, no cryptography); the server process does.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Self

from beacon_dev.netguard import ensure_guard_route, pid_alive

if TYPE_CHECKING:
    from beacon_dev.devcluster.pki import KeyPair


def _tls_fields(pair: KeyPair | None) -> dict[str, str] | None:
    """What the helper gets of a certificate: its PEM text and its key's."""
    return None if pair is None else {"cert": pair.cert.read_text(), "key": pair.key.read_text()}


__all__ = [
    "LOOPBACK_MAX_HOSTS",
    "LOOPBACK_PREFIXLEN",
    "MAX_HOSTS",
    "MAX_NETWORKS",
    "POOL",
    "DnsRcode",
    "DnsServer",
    "GrpcServer",
    "GrpcStatus",
    "HttpServer",
    "TcpServer",
    "TestHost",
    "TestHostError",
    "TestNetwork",
    "TestServer",
    "UdpServer",
    "cleanup_stale",
    "unavailable_reason",
]

POOL: Final = ipaddress.IPv4Network("198.18.0.0/16")
"""All test networks live in here: the lower half of the RFC 2544 benchmarking range 198.18.0.0/15, whose upper
half holds the local control plane's Service range and the kind/Docker networks (see hack/kind/lib.sh)."""
NETWORK_PREFIXLEN: Final = 22
MAX_NETWORKS: Final = 2 ** (NETWORK_PREFIXLEN - POOL.prefixlen)  # 64
FIRST_HOST_OFFSET: Final = 10
MAX_HOSTS: Final = 2 ** (32 - NETWORK_PREFIXLEN) - 1 - FIRST_HOST_OFFSET  # 1013: B+10 .. B+1022
LOOPBACK_PREFIXLEN: Final = 18
# hosts per server process: a listener and (say) two connections each stays far below a 20,000-descriptor limit
HOSTS_PER_SERVER_PROCESS: Final = 4000
LOOPBACK_MAX_HOSTS: Final = 2 ** (32 - LOOPBACK_PREFIXLEN) - 1 - FIRST_HOST_OFFSET  # 16373
NS_INTERFACE: Final = "veth0"
NAME_PREFIX: Final = "bcn"
_NAME_RE: Final = re.compile(rf"^{NAME_PREFIX}-(\d+)-(\d+)$")
_SERVER_SCRIPT: Final = Path(__file__).with_name("_testhost_server.py")
_LOCK_FILE: Final = "beacon-testhosts.lock"

GrpcStatus = Literal["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]
DnsRcode = Literal["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"]


class TestHostError(RuntimeError):
    """Setting up, driving or tearing down a test network failed."""

    __test__ = False  # not a pytest test class, despite the name


# --------------------------------------------------------------------------------------------------------------
# `ip` plumbing


def unavailable_reason() -> str | None:
    """Why test networks cannot be created here (None if they can): handy for `pytest.skip`."""
    if sys.platform != "linux":
        return "test networks need Linux network namespaces"
    if shutil.which("ip") is None:
        return "test networks need the `ip` command (iproute2), which is not on PATH"
    if os.geteuid() != 0:
        return "test networks need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"
    return None


def _require_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise TestHostError(reason)


def _ip(*args: str, netns: str | None = None, batch: Sequence[str] | None = None, check: bool = True) -> str:
    """Run `ip [-n netns] args...` (or `ip -batch -` fed with `batch`) and return its stdout."""
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    argv += ["-batch", "-"] if batch is not None else list(args)
    stdin = "".join(line + "\n" for line in batch) if batch is not None else None
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise TestHostError("the `ip` command (iproute2) is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise TestHostError(f"`{' '.join(argv)}` timed out") from None
    if check and result.returncode != 0:
        what = " ".join(argv) if batch is None else f"{' '.join(argv)} <<< {batch[:3]}{'...' if len(batch) > 3 else ''}"
        raise TestHostError(f"`{what}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _ip("-j", *args).strip()
    data = json.loads(out) if out else []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _netns_names() -> list[str]:
    # `ip netns list` prints "name" or "name (id: N)"
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _link_names() -> list[str]:
    return [str(link["ifname"]) for link in _ip_json("link", "show") if "ifname" in link]


def _kill_netns_processes(name: str) -> None:
    """SIGKILL every process still inside namespace `name` and wait (briefly) for them to go."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _delete_network_objects(name: str) -> None:
    """Kill what runs in namespace `name`, delete the host-side veth `name` and the namespace; missing is fine."""
    if name in _netns_names():
        _kill_netns_processes(name)
    if name in _link_names():
        _ip("link", "del", name, check=False)
    if name in _netns_names():
        _ip("netns", "del", name, check=False)
    leftovers = [what for what, names in (("veth", _link_names()), ("namespace", _netns_names())) if name in names]
    if leftovers:
        raise TestHostError(f"could not delete {' and '.join(leftovers)} {name}")


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    """Serialise slot allocation and stale-object cleanup between processes (flock; released if we die)."""
    directory = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    fd = os.open(os.path.join(directory, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _cleanup_stale_locked() -> list[str]:
    stale: set[str] = set()
    for name in _netns_names() + _link_names():
        match = _NAME_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            stale.add(name)
    for name in sorted(stale):
        _delete_network_objects(name)
    return sorted(stale)


def cleanup_stale() -> list[str]:
    """Delete `bcn-<pid>-<n>` namespaces and veths whose owning process is gone; return the names deleted."""
    _require_available()
    with _global_lock():
        return _cleanup_stale_locked()


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Addresses and routes on this host that a new test network must not overlap.

    Routes shorter than /16 (default routes, a VPN's 198.0.0.0/8, ...) do not count: our /22 is more specific
    and wins for its own range, which is what matters.
    """
    used: list[ipaddress.IPv4Network] = []
    for link in _ip_json("-4", "address", "show"):
        for info in link.get("addr_info", []):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                iface = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
                used.append(ipaddress.IPv4Network(iface.ip))
                if iface.network.prefixlen >= 16:
                    used.append(iface.network)
    for route in _ip_json("-4", "route", "show", "table", "all"):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            net = ipaddress.IPv4Network(str(route["dst"]), strict=False)
            if net.prefixlen >= 16:
                used.append(net)
    return used


def _pick_slot(prefixlen: int = NETWORK_PREFIXLEN) -> ipaddress.IPv4Network:
    used = [net for net in _used_networks() if net.overlaps(POOL)]
    for candidate in POOL.subnets(new_prefix=prefixlen):
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise TestHostError(f"no free /{prefixlen} left in {POOL} (all {2 ** (prefixlen - POOL.prefixlen)} overlap)")


def _ipv6_available() -> bool:
    return os.path.isdir("/proc/sys/net/ipv6")


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C while tearing down (re-raised afterwards), so cleanup is not cut short half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


# --------------------------------------------------------------------------------------------------------------
# The server process inside the namespace


class _ServerProcess:
    """The `_testhost_server` process in a namespace and the blocking request/response channel to it."""

    def __init__(self, netns: str, *, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._buffer = b""
        self._next_id = 1
        self._closed = False
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        argv = ["ip", "netns", "exec", netns, sys.executable, "-P", str(_SERVER_SCRIPT)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # Ctrl-C goes to us; we clean up
        )
        assert self.proc.stdout is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            ready = self._read_message(time.monotonic() + max(timeout, 60.0))
            if not ready.get("ready"):
                raise TestHostError(f"test host server said {ready!r} instead of being ready")
        except BaseException:
            self.close()
            raise

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; its stderr ends with:\n{text[-2000:]}" if text else ""

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestHostError(f"test host server (pid {self.proc.pid}) did not answer in time")
            if not self._selector.select(remaining):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(timeout=5)
                raise TestHostError(
                    f"test host server (pid {self.proc.pid}) exited with {self.proc.returncode}{self._stderr_tail()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise TestHostError(f"test host server sent {message!r}")
        return message

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None or self.proc.stdin.closed:
                raise TestHostError(f"test host server (pid {self.proc.pid}) is not running{self._stderr_tail()}")
            request_id = self._next_id
            self._next_id += 1
            data = json.dumps({"id": request_id, "op": op, **fields}).encode() + b"\n"
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except BrokenPipeError:
                raise TestHostError(f"test host server (pid {self.proc.pid}) went away{self._stderr_tail()}") from None
            response = self._read_message(time.monotonic() + self.timeout)
        if response.get("id") != request_id:
            raise TestHostError(f"test host server answered {response!r} to request {request_id}")
        if not response.pop("ok", False):
            raise TestHostError(f"{op} failed: {response.get('error')}")
        del response["id"]
        return response

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int) -> None:
        """Send `sig` to the process (a crash when it is SIGKILL), wait for it to end and close the channel."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.close()

    def close(self) -> None:
        """Ask the process to exit (closing its stdin), then kill it if it does not. Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._selector.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


# --------------------------------------------------------------------------------------------------------------
# Public API


class TestServer:
    """Handle on one server (listener) on one test host; `stop()` closes its socket, `start()` reopens it."""

    __test__ = False
    kind: ClassVar[str] = ""

    def __init__(self, host: TestHost, listener: int, port: int, fields: dict[str, Any]) -> None:
        self.host = host
        self.port = port
        self._listener = listener
        self._running = True
        self._fields = fields  # what it was created with, kept up to date by its setters: what revive() replays
        self._options: dict[str, Any] = {}  # settings made after creation that creation cannot take (configure)

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def running(self) -> bool:
        return self._running

    def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.host.network._server(self.host.shard).request(op, listener=self._listener, **fields)

    def _recreate(self, process: _ServerProcess) -> None:
        """Create this server again in `process` (a revived one), as it is now: same port, settings, running or not."""
        response = process.request(
            "create", kind=self.kind, address=self.address, port=self.port, start=self._running, **self._fields
        )
        self._listener = int(response["listener"])
        if self._options:
            process.request("configure", listener=self._listener, options=self._options)

    def start(self) -> None:
        """Listen again (on the same port); a no-op if running."""
        self._request("start")
        self._running = True

    def stop(self) -> None:
        """Close the listening socket and every open connection: clients get "connection refused"."""
        self._request("stop")
        self._running = False

    def remove(self) -> None:
        """Stop for good and free the port for another server on this host."""
        self._request("remove")
        self._running = False
        if self in self.host.servers:
            self.host.servers.remove(self)

    def info(self) -> dict[str, Any]:
        """The server's own view of itself (running, counters, current settings)."""
        return self._request("info")

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<{type(self).__name__} {self.address}:{self.port} {state}>"


class HttpServer(TestServer):
    """HTTP server: `path` answers with a settable status (200 when healthy), other paths 200 "address:port"."""

    kind = "http"

    def __init__(self, host: TestHost, listener: int, port: int, fields: dict[str, Any]) -> None:
        super().__init__(host, listener, port, fields)
        self.path = str(fields["path"])

    @property
    def url(self) -> str:
        """The health URL, e.g. http://198.18.4.10:8080/healthz (https:// when it serves TLS)."""
        scheme = "https" if self._fields.get("tls") else "http"
        return f"{scheme}://{self.address}:{self.port}{self.path}"

    def set_certificate(self, pair: KeyPair) -> None:
        """Serve this certificate from now on (the server restarts with it: open connections are closed)."""
        _set_certificate(self, pair)

    def set_status(self, status: int) -> None:
        """Answer `path` with this HTTP status from now on."""
        self._request("configure", options={"status": status})
        self._fields["status"] = status

    def set_healthy(self, healthy: bool) -> None:
        """200 if healthy, else 503."""
        self.set_status(200 if healthy else 503)

    def set_cycle(self, statuses: Sequence[int]) -> None:
        """Answer `path` with these statuses in turn, one per request (a flapping backend: [200, 503]); an empty
        sequence goes back to the single status."""
        self._request("configure", options={"cycle": list(statuses)})
        self._options["cycle"] = list(statuses)

    def set_delay(self, seconds: float) -> None:
        """Wait this long before answering `path` (for probe-timeout tests); 0 to answer at once."""
        self._request("configure", options={"delay": seconds})
        self._options["delay"] = seconds

    @property
    def requests(self) -> int:
        """How many requests (any path) this server has answered."""
        return int(self.info()["requests"])

    def counters(self) -> dict[str, int]:
        """`requests` answered, `connections` accepted and `closes` (connections this server closed itself: its
        keep-alive timeout, a stop), read at once. Counted per process: a revived server starts from 0."""
        info = self.info()
        return {name: int(info[name]) for name in ("requests", "connections", "closes")}


class TcpServer(TestServer):
    """TCP server that accepts connections and echoes what it receives."""

    kind = "tcp"

    @property
    def connections(self) -> int:
        """How many connections this server has accepted."""
        return int(self.info()["connections"])


class GrpcServer(TestServer):
    """gRPC server with the standard grpc.health.v1.Health service (grpcio-health-checking)."""

    kind = "grpc"

    @property
    def target(self) -> str:
        """What to hand to `grpc.insecure_channel`, e.g. "198.18.4.10:50051"."""
        return f"{self.address}:{self.port}"

    def set_status(self, service: str, status: GrpcStatus) -> None:
        """Set the serving status of `service` ("" is the whole server); it survives stop()/start()."""
        self._request("grpc_status", service=service, status=status)
        self._fields["statuses"] = {**self._fields["statuses"], service: status}

    def set_serving(self, serving: bool, *, service: str = "") -> None:
        """SERVING or NOT_SERVING."""
        self.set_status(service, "SERVING" if serving else "NOT_SERVING")

    def set_certificate(self, pair: KeyPair) -> None:
        """Serve this certificate from now on (the server restarts with it: open connections are closed)."""
        _set_certificate(self, pair)


def _set_certificate(server: TestServer, pair: KeyPair) -> None:
    if not server._fields.get("tls"):
        raise TestHostError(f"{server!r} was created without TLS")
    fields = _tls_fields(pair)
    server._request("configure", options={"tls": fields})
    server._fields["tls"] = fields


class UdpServer(TestServer):
    """UDP echo server: every datagram goes back to its sender. `stop()` closes its socket, and the test host then
    answers datagrams to the port with ICMP port unreachable."""

    kind = "udp"

    @property
    def datagrams(self) -> int:
        """How many datagrams this server has received (counted per process: a revived server starts from 0)."""
        return int(self.info()["datagrams"])


class DnsServer(UdpServer):
    """DNS server (dnspython) for one name: A `name` answers `answer`; other names get `rcode` (NXDOMAIN unless set)."""

    kind = "dns"

    @property
    def name(self) -> str:
        return str(self._fields["name"])

    def set_rcode(self, rcode: DnsRcode) -> None:
        """Answer queries for names other than `name` with this rcode from now on."""
        self._request("configure", options={"rcode": rcode})
        self._fields["rcode"] = rcode


class TestHost:
    """One address inside a `TestNetwork`; start servers on it with `http()`, `tcp()`, `grpc()`, `udp()`, `dns()`."""

    __test__ = False

    def __init__(self, network: TestNetwork, address: str, index: int, *, shard: int | None = None) -> None:
        self.network = network
        self.address = address
        # which of the network's server processes serves it: hosts share them by index, unless they have their own
        # (a negative key, one per `add_hosts(..., own_process=True)` call)
        self.shard = index // HOSTS_PER_SERVER_PROCESS if shard is None else shard
        self.servers: list[TestServer] = []

    def _create(self, kind: str, port: int, **fields: Any) -> tuple[int, int]:
        server = self.network._server(self.shard)
        response = server.request("create", kind=kind, address=self.address, port=port, **fields)
        return int(response["listener"]), int(response["port"])

    def http(
        self,
        *,
        port: int = 8080,
        path: str = "/healthz",
        status: int = 200,
        keepalive: float | None = None,
        tls: KeyPair | None = None,
    ) -> HttpServer:
        """Start an HTTP server on this host's address (port 0: pick a free port; see `.port`). `keepalive`: close
        every connection idle for that many seconds, as a server with a short keep-alive timeout does (None:
        aiohttp's default, about an hour). `tls`: serve HTTPS with this certificate."""
        fields: dict[str, Any] = {"path": path, "status": status, "keepalive": keepalive}
        if tls is not None:
            fields["tls"] = _tls_fields(tls)
        listener, bound = self._create("http", port, **fields)
        server = HttpServer(self, listener, bound, fields)
        self.servers.append(server)
        return server

    def tcp(self, *, port: int = 9000) -> TcpServer:
        """Start a TCP (echo) server on this host's address."""
        listener, bound = self._create("tcp", port)
        server = TcpServer(self, listener, bound, {})
        self.servers.append(server)
        return server

    def grpc(self, *, port: int = 50051, status: GrpcStatus = "SERVING", tls: KeyPair | None = None) -> GrpcServer:
        """Start a gRPC health server on this host's address; the overall ("") service starts as `status`. `tls`:
        serve over TLS with this certificate."""
        fields: dict[str, Any] = {"statuses": {"": status}}
        if tls is not None:
            fields["tls"] = _tls_fields(tls)
        listener, bound = self._create("grpc", port, **fields)
        server = GrpcServer(self, listener, bound, fields)
        self.servers.append(server)
        return server

    def udp(self, *, port: int = 9053) -> UdpServer:
        """Start a UDP echo server on this host's address (port 0: pick a free port; see `.port`)."""
        listener, bound = self._create("udp", port)
        server = UdpServer(self, listener, bound, {})
        self.servers.append(server)
        return server

    def dns(
        self, *, port: int = 5353, name: str = "db.beacon.test", answer: str | None = None, rcode: DnsRcode = "NXDOMAIN"
    ) -> DnsServer:
        """Start a DNS server on this host's address (UDP): an A query for `name` answers `answer` (default: this
        host's address), a query for any other name answers `rcode`."""
        fields: dict[str, Any] = {"name": name, "answer": answer or self.address, "rcode": rcode}
        listener, bound = self._create("dns", port, **fields)
        server = DnsServer(self, listener, bound, fields)
        self.servers.append(server)
        return server

    @property
    def server_pid(self) -> int | None:
        """The pid of the process serving this host (None until its first server exists, or once it crashed)."""
        process = self.network._processes.get(self.shard)
        return process.proc.pid if process is not None and process.alive else None

    def crash(self, sig: int = signal.SIGKILL) -> float:
        """Kill the server process of this host, which must have been added with `own_process=True`, with `sig`:
        a crash (with SIGKILL the kernel closes every socket the process held: its clients get FIN, or RST where
        data was unread, and connecting is refused). Every host of that process goes with it. Returns
        `time.monotonic()` just before the signal was sent; returns when the process is gone."""
        return self.network._crash(self.shard, sig)

    def revive(self) -> None:
        """Start a new server process for the hosts of a crashed one, with their servers listening again on the
        same ports and with the same settings (health status, delay, keep-alive; stopped ones stay stopped)."""
        self.network._revive(self.shard)

    def block(self) -> None:
        """Drop every packet to this host, inside its namespace (a broken path: probes time out). The link stays
        up, so the host's route stays and nothing is sent elsewhere."""
        self.network._filter(self.address, drop=True)

    def unblock(self) -> None:
        """Undo `block()`."""
        self.network._filter(self.address, drop=False)

    def __repr__(self) -> str:
        return f"<TestHost {self.address} in {self.network.name}>"


_open_networks: weakref.WeakSet[TestNetwork] = weakref.WeakSet()
_names_in_use: set[int] = set()
_names_lock = threading.Lock()


class TestNetwork:
    """A network namespace reachable from this host over a veth pair, holding up to `MAX_HOSTS` test hosts.

    Use as a context manager (or call `open()` / `close()` yourself). Nothing touches the system before
    `open()`. `timeout` bounds every control call to the server process. `loopback=True` puts the test hosts on
    the namespace's `lo` behind one gateway address and takes a /`prefixlen` (default /18: `LOOPBACK_MAX_HOSTS`).
    """

    __test__ = False

    def __init__(self, *, timeout: float = 30.0, loopback: bool = False, prefixlen: int | None = None) -> None:
        if prefixlen is None:
            prefixlen = LOOPBACK_PREFIXLEN if loopback else NETWORK_PREFIXLEN
        if not POOL.prefixlen <= prefixlen <= NETWORK_PREFIXLEN:
            raise ValueError(f"prefixlen must be in {POOL.prefixlen}..{NETWORK_PREFIXLEN}, not {prefixlen}")
        if prefixlen != NETWORK_PREFIXLEN and not loopback:
            raise ValueError(
                "only a loopback network can be bigger than a /22 (on veth0 every host would need an ARP entry)"
            )
        self.timeout = timeout
        self.loopback = loopback
        self.prefixlen = prefixlen
        self.max_hosts = 2 ** (32 - prefixlen) - 1 - FIRST_HOST_OFFSET
        self.name = ""
        self.network: ipaddress.IPv4Network | None = None
        self.hosts: list[TestHost] = []
        self._n: int | None = None
        self._next_offset = FIRST_HOST_OFFSET
        self._lock = threading.RLock()
        self._processes: dict[int, _ServerProcess] = {}  # by shard: hosts [shard * HOSTS_PER_SERVER_PROCESS, ...)
        self._own_processes = 0  # shards -1, -2, ...: hosts with a server process of their own
        self._closed = False
        self._blocked: set[str] = set()

    # -- lifecycle

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:  # do not hide the exception that got us here
            warnings.warn(f"cleaning up test network {self.name} failed: {close_exc}", RuntimeWarning, stacklevel=2)

    def open(self) -> None:
        """Create the namespace and veth pair (cleaning up stale ones from dead processes first)."""
        if self.network is not None or self._closed:
            raise TestHostError("a TestNetwork can be opened only once")
        _require_available()
        ensure_guard_route()  # before any route of ours exists, so no packet can ever miss both
        pid = os.getpid()
        if pid >= 10**7:
            raise TestHostError(f"pid {pid} is too long for an interface name")
        with _names_lock:
            self._n = next(n for n in range(1000) if n not in _names_in_use)
            _names_in_use.add(self._n)
        self.name = f"{NAME_PREFIX}-{pid}-{self._n}"  # at most 15 characters: fits IFNAMSIZ
        try:
            with _global_lock():
                _cleanup_stale_locked()
                if self.name in _netns_names() or self.name in _link_names():
                    _delete_network_objects(self.name)  # a leftover of ours from a failed close()
                network = _pick_slot(self.prefixlen)
                self.network = network
                _open_networks.add(self)
                host_ip, ns_ip = network[1], network[2]
                noipv6 = _ipv6_available()
                _ip(
                    batch=[
                        f"netns add {self.name}",
                        f"link add {self.name} type veth peer name {NS_INTERFACE} netns {self.name}",
                        *([f"link set {self.name} addrgenmode none"] if noipv6 else []),
                        f"address add {host_ip}/32 dev {self.name}",
                        f"link set {self.name} up",
                    ]
                )
                _ip(
                    netns=self.name,
                    batch=[
                        "link set lo up",
                        *([f"link set {NS_INTERFACE} addrgenmode none"] if noipv6 else []),
                        f"address add {ns_ip}/{32 if self.loopback else network.prefixlen} dev {NS_INTERFACE}",
                        f"link set {NS_INTERFACE} up",
                        *([f"route add {host_ip} dev {NS_INTERFACE}"] if self.loopback else []),
                        f"route add default via {host_ip} dev {NS_INTERFACE}",
                    ],
                )
                _ip("route", "add", str(ns_ip), "dev", self.name, "src", str(host_ip))
                _ip("route", "add", str(network), "via", str(ns_ip), "dev", self.name, "src", str(host_ip))
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def close(self) -> None:
        """Kill the servers and everything else in the namespace, delete the veth pair and the namespace."""
        with self._lock, _deferred_sigint():
            if self._closed:
                return
            self._closed = True
            _open_networks.discard(self)
            errors: list[str] = []
            for process in self._processes.values():
                try:
                    process.close()
                except Exception as exc:
                    errors.append(f"stopping a server process: {exc}")
            self._processes.clear()
            if self.name:
                try:
                    _delete_network_objects(self.name)
                except Exception as exc:
                    errors.append(str(exc))
            if self._n is not None:
                with _names_lock:
                    _names_in_use.discard(self._n)
            if errors:
                raise TestHostError(f"cleaning up test network {self.name}: {'; '.join(errors)}")

    @property
    def closed(self) -> bool:
        return self._closed

    # -- addresses

    def _require_open(self) -> ipaddress.IPv4Network:
        if self.network is None or self._closed:
            raise TestHostError("the test network is not open (use `with TestNetwork() as net:`)")
        return self.network

    @property
    def host_address(self) -> str:
        """This host's end of the veth pair (the source address of connections to test hosts)."""
        return str(self._require_open()[1])

    @property
    def addresses(self) -> list[str]:
        """The test hosts' addresses, in allocation order."""
        return [host.address for host in self.hosts]

    def add_host(self) -> TestHost:
        """Allocate the next address (B+10, B+11, ...) in the namespace."""
        return self.add_hosts(1)[0]

    def add_hosts(self, count: int, *, own_process: bool = False) -> list[TestHost]:
        """Allocate `count` addresses at once (a single `ip -batch` call). `own_process`: their servers run in a
        server process of their own, shared with no other host, which `TestHost.crash()` can kill."""
        with self._lock:
            network = self._require_open()
            if count < 0:
                raise ValueError("count must not be negative")
            if self._next_offset + count - 1 > FIRST_HOST_OFFSET + self.max_hosts - 1:
                raise TestHostError(
                    f"a test network holds at most {self.max_hosts} hosts; {len(self.hosts)} are allocated already"
                )
            if count == 0:
                return []
            addresses = [str(network[self._next_offset + i]) for i in range(count)]
            device = "lo" if self.loopback else NS_INTERFACE
            _ip(netns=self.name, batch=[f"address add {a}/32 dev {device}" for a in addresses])
            self._next_offset += count
            first = self._next_offset - count - FIRST_HOST_OFFSET
            shard: int | None = None
            if own_process:
                self._own_processes += 1
                shard = -self._own_processes
            hosts = [TestHost(self, a, first + i, shard=shard) for i, a in enumerate(addresses)]
            self.hosts.extend(hosts)
            return hosts

    def partition(self) -> None:
        """Drop every packet to every host of this network, inside its namespace, with one rule: the path to all
        of them breaks at once (probes time out), links and routes stay as they are."""
        self._filter(str(self._require_open()), drop=True)

    def heal(self) -> None:
        """Undo `partition()` (hosts blocked on their own stay blocked)."""
        self._filter(str(self._require_open()), drop=False)

    def _filter(self, address: str, *, drop: bool) -> None:
        """Add or remove a DROP rule for `address` in the namespace's own nftables input chain."""
        with self._lock:
            self._require_open()
            if shutil.which("nft") is None:
                raise TestHostError("blocking a test host needs `nft` (Debian package nftables)")
            table = "inet beacon_testhost"
            script = [f"add table {table}", f"add chain {table} input {{ type filter hook input priority 0; }}"]
            if drop and address not in self._blocked:
                script.append(f'add rule {table} input ip daddr {address} drop comment "{address}"')
                self._blocked.add(address)
            elif not drop and address in self._blocked:
                self._blocked.discard(address)
                script.append(f"flush chain {table} input")
                script += [f'add rule {table} input ip daddr {a} drop comment "{a}"' for a in sorted(self._blocked)]
            result = subprocess.run(
                ["ip", "netns", "exec", self.name, "nft", "-f", "-"],
                input="\n".join(script) + "\n",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                raise TestHostError(f"nft in {self.name} failed: {result.stderr.strip()}")

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so that it runs inside the namespace (killed on close() like everything in there)."""
        self._require_open()
        return ["ip", "netns", "exec", self.name, *argv]

    # -- the server process

    def _server(self, shard: int = 0) -> _ServerProcess:
        with self._lock:
            self._require_open()
            process = self._processes.get(shard)
            if process is None:
                process = self._processes[shard] = _ServerProcess(self.name, timeout=self.timeout)
            return process

    def _crash(self, shard: int, sig: int) -> float:
        if shard >= 0:
            raise TestHostError("only hosts added with own_process=True can crash (their process serves no other)")
        with self._lock:
            self._require_open()
            process = self._processes.get(shard)
            if process is None or not process.alive:
                raise TestHostError("the host's server process is not running (no server yet, or crashed already)")
            at = time.monotonic()
            process.kill(sig)
            return at

    def _revive(self, shard: int) -> None:
        with self._lock:
            self._require_open()
            process = self._processes.get(shard)
            if process is not None and process.alive:
                raise TestHostError("the host's server process is running: crash() it first")
            if process is not None:
                process.close()  # one that died by itself, not through crash()
            process = self._processes[shard] = _ServerProcess(self.name, timeout=self.timeout)
            for host in self.hosts:
                if host.shard == shard:
                    for server in host.servers:
                        server._recreate(process)

    def probe_log(
        self, *, since: float = 0.0, first_only: bool = False, not_status: int | None = None
    ) -> list[tuple[float, str, int]]:
        """When this network's HTTP servers answered their health path since `since` (`time.monotonic()` seconds:
        the same clock here and in the server process): `(time, address, status)`, oldest first (what a crashed
        server process logged is gone with it; a revived one logs afresh). `first_only`:
        each address's first answer only; `not_status`: leave out answers with that status."""
        with self._lock:
            processes = [p for p in self._processes.values() if p.alive]  # a crashed process's log went with it
        processes = processes or [self._server()]
        entries: list[tuple[float, str, int]] = []
        for process in processes:  # an address lives in one process: its first answer is in that one's log
            response = process.request("probe_log", since=since, first_only=first_only, not_status=not_status)
            entries += [(float(t), str(a), int(st)) for t, a, st in response["entries"]]
        return sorted(entries)

    @property
    def server_pid(self) -> int | None:
        """The pid of the process serving this network's first test hosts (None until their first server exists)."""
        process = self._processes.get(0)
        return process.proc.pid if process is not None else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self.network is not None else "new")
        return f"<TestNetwork {self.name or '?'} {self.network or ''} {state}, {len(self.hosts)} hosts>"


@atexit.register
def _close_open_networks() -> None:
    for network in list(_open_networks):
        with contextlib.suppress(Exception):
            network.close()
