"""Keeps every packet for beacon's test range on this machine, and counts any that would leave it.

Why it exists: beacon's tests, demo and benchmarks put real servers on test hosts (network namespaces behind veths,
see `beacon_dev.testhosts`) in 198.18.0.0/15. A test host's routes vanish with its veth, and a probe that is still in
flight then follows the default route off the machine, to a gateway that has nothing to do with us. Two guards:

* **The guard route**: a blackhole route for the whole range with a high metric. Every test network's own /22 route
  is more specific and wins while it exists; once it is gone, a packet for one of its addresses dies here with
  EINVAL/unreachable instead of leaving. `TestNetwork.open()` makes sure it exists; the pytest session, `make run`'s
  demo and `make bench` hold it for their whole run. It is removed only by the process that added it, and only
  when no other live process still has a test network.
`python -m beacon_dev.netguard run -- CMD` holds the guard route while CMD runs (`make kind-e2e` does).

* **The egress counter** (`python -m beacon_dev.netguard egress-start|egress-count|egress-stop`, used by `make test`
  under CI=true and by `make bench`): an nftables table of its own with a counting DROP rule for the range on the
  interface that carries the default route, the way off the machine. Its own table, hooked at postrouting, sees
  locally generated and forwarded packets (a kind pod's too) after routing, whatever Docker does to iptables'
  FORWARD chain. Any packet it counts is a bug; `egress-stop` fails then.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = [
    "GUARDED",
    "GUARD_METRIC",
    "EgressCounter",
    "GuardRoute",
    "ensure_guard_route",
    "guard_route_present",
    "pid_alive",
]

GUARDED: Final = ipaddress.IPv4Network("198.18.0.0/15")
"""Every address beacon's tests, demo, benchmarks and kind runs use lies in here (RFC 2544 benchmarking range)."""
GUARD_METRIC: Final = 4242
"""High enough that no real route for the same prefix loses to the blackhole."""
NFT_TABLE: Final = "beacon_egress_guard"
_STATE: Final = Path("/run/beacon-egress-guard.json")
_TESTNET_NAME: Final = re.compile(r"^bcn-(\d+)-\d+$")


class GuardError(RuntimeError):
    """The guard could not be set up or read."""


def _run(argv: list[str], *, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise GuardError(f"`{argv[0]}` is not installed") from None
    if check and proc.returncode != 0:
        raise GuardError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


# ---------------------------------------------------------------------------------------------------- guard route


def guard_route_present() -> bool:
    """Is there a blackhole route for the whole guarded range (ours or anyone's)?"""
    out = _run(["ip", "-j", "-4", "route", "show", "type", "blackhole", str(GUARDED)], check=False).stdout.strip()
    return bool(out) and bool(json.loads(out))


def pid_alive(pid: int) -> bool:
    """Is process `pid` alive (root or not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _other_live_test_networks() -> list[str]:
    """Test network namespaces (`bcn-<pid>-<n>`) of other processes that are still alive."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    live = []
    for name in names:
        match = _TESTNET_NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and pid_alive(int(match.group(1))):
            live.append(name)
    return live


_lock = threading.Lock()
_owned = False  # did this process add the route?
_holders = 0


def ensure_guard_route() -> bool:
    """Add the guard route if it is missing (needs CAP_NET_ADMIN); True if this call added it. Idempotent."""
    global _owned
    with _lock:
        if guard_route_present():
            return False
        proc = _run(["ip", "route", "add", "blackhole", str(GUARDED), "metric", str(GUARD_METRIC)], check=False)
        if proc.returncode != 0 and not guard_route_present():
            raise GuardError(f"could not add the guard route (blackhole {GUARDED}): {proc.stderr.strip()}")
        _owned = proc.returncode == 0
        return _owned


def _release_guard_route() -> None:
    """Remove the guard route if this process added it and no other live process has a test network."""
    global _owned
    with _lock:
        if not _owned or _holders > 0:
            return
        if _other_live_test_networks():
            return  # theirs now: harmless to leave, dangerous to remove
        _run(["ip", "route", "del", "blackhole", str(GUARDED), "metric", str(GUARD_METRIC)], check=False)
        _owned = False


class GuardRoute:
    """Holds the guard route for a `with` block (nestable); the outermost holder that added it removes it."""

    def __enter__(self) -> GuardRoute:
        global _holders
        ensure_guard_route()
        with _lock:
            _holders += 1
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _holders
        with _lock:
            _holders -= 1
        _release_guard_route()


# -------------------------------------------------------------------------------------------------- egress counter


def default_route_interface() -> str | None:
    """The interface that carries the IPv4 default route: the way off this machine (None without one)."""
    out = _run(["ip", "-j", "-4", "route", "show", "default"], check=False).stdout.strip()
    routes: list[dict[str, Any]] = json.loads(out) if out else []
    for route in routes:
        if route.get("dev") and route.get("type", "unicast") == "unicast":
            return str(route["dev"])
    return None


class EgressCounter:
    """The counting DROP rule for the guarded range on the way off the machine, in an nftables table of its own."""

    def __init__(self, table: str = NFT_TABLE) -> None:
        self.table = table

    @staticmethod
    def available() -> bool:
        return shutil.which("nft") is not None

    def installed(self) -> bool:
        return _run(["nft", "list", "table", "inet", self.table], check=False).returncode == 0

    def install(self) -> str:
        """Create the table (replacing a leftover one) and return the interface it watches."""
        if not self.available():
            raise GuardError("the egress guard needs `nft` (Debian package nftables)")
        interface = default_route_interface()
        if interface is None:
            raise GuardError("no IPv4 default route: nothing can leave this machine, so there is nothing to count")
        _run(["nft", "delete", "table", "inet", self.table], check=False)
        ruleset = (
            f"table inet {self.table} {{\n"
            f"  chain egress {{\n"
            f"    type filter hook postrouting priority -150; policy accept;\n"
            f'    oifname "{interface}" ip daddr {GUARDED} counter drop comment "beacon: test range leaving"\n'
            f"  }}\n"
            f"}}\n"
        )
        _run(["nft", "-f", "-"], stdin=ruleset)
        return interface

    def count(self) -> int:
        """Packets dropped so far (the rule's counter)."""
        proc = _run(["nft", "-j", "list", "table", "inet", self.table])
        data = json.loads(proc.stdout)
        for item in data.get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and "counter" in expr:
                    return int(expr["counter"]["packets"])
        raise GuardError(f"no counter in nftables table inet {self.table}")

    def remove(self) -> None:
        _run(["nft", "delete", "table", "inet", self.table], check=False)


# ------------------------------------------------------------------------------------------------------------ CLI


def _save_state(state: dict[str, Any]) -> None:
    _STATE.write_text(json.dumps(state))


def _load_state() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(_STATE.read_text())
        if isinstance(data, dict):
            return data
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beacon_dev.netguard", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("egress-start", help="add the guard route (if missing) and the counting DROP rule")
    sub.add_parser("egress-count", help="print the packets counted so far")
    stop = sub.add_parser("egress-stop", help="print the count, remove what egress-start added; exit 1 if count > 0")
    stop.add_argument("--what", default="this run", help="what the count covers, for the message")
    run = sub.add_parser("run", help="hold the guard route while a command runs (e.g. the kind e2e)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            parser.error("run needs a command")
        with GuardRoute():
            return subprocess.call(command)
    counter = EgressCounter()
    try:
        if args.command == "egress-start":
            added = ensure_guard_route()
            interface = counter.install()
            _save_state({"route_added": added, "interface": interface})
            print(f"[egress-guard] counting packets for {GUARDED} that leave by {interface}; guard route present")
            return 0
        if args.command == "egress-count":
            print(counter.count())
            return 0
        state = _load_state()
        packets = counter.count()
        counter.remove()
        if state.get("route_added"):
            global _owned
            _owned = True
            _release_guard_route()
        with contextlib.suppress(OSError):
            _STATE.unlink()
        where = state.get("interface", "?")
        print(
            f"[egress-guard] {packets} packets for {GUARDED} tried to leave this machine by {where} during {args.what}"
        )
        return 1 if packets else 0
    except GuardError as exc:
        print(f"[egress-guard] error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
