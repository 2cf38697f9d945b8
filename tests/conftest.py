"""Shared pytest fixtures: the real local control plane, per-test namespaces, and the network guards.

Why it exists: every integration test stands on the same real kube-apiserver, etcd, kube-controller-manager and
CoreDNS, started once per session by beacon_dev.devcluster (never a mock), and each test gets its own namespace so
tests cannot see each other's objects. The session holds the guard route (beacon_dev.netguard) from its first test to
its very end, after every operator has stopped; and when the egress counter is installed (`make test` under
CI=true), every test is checked against it, so a packet that tries to leave the machine names its test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.netguard import EgressCounter, GuardRoute

REPO = Path(__file__).resolve().parents[1]
CRD_NAMES = ("crd/serviceentries.beacon.dev", "crd/configentries.beacon.dev")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    with DevCluster() as running:
        yield running


@pytest.fixture(scope="session")
def crds(cluster: DevCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-k", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *CRD_NAMES)


@pytest.fixture
def namespace(cluster: DevCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session", autouse=True)
def guard_route() -> Iterator[None]:
    """The blackhole route for 198.18.0.0/15 for the whole session (needs root; test hosts need it anyway)."""
    if os.geteuid() != 0:
        yield
        return
    with GuardRoute():
        yield


class EgressWatch:
    """Reads the egress counter around every test and remembers the tests during which it rose."""

    def __init__(self) -> None:
        self.counter = EgressCounter()
        self.active = self.counter.available() and os.geteuid() == 0 and self.counter.installed()
        self.offenders: list[tuple[str, int]] = []
        self.last = self.counter.count() if self.active else 0

    def check(self, what: str) -> None:
        if not self.active:
            return
        now = self.counter.count()
        if now > self.last:
            self.offenders.append((what, now - self.last))
        self.last = now


_watch: EgressWatch | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _watch
    _watch = EgressWatch()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    yield
    if _watch is not None:
        _watch.check(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _watch is None or not _watch.active:
        return
    _watch.check("session teardown")
    if _watch.offenders:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _watch is None or not _watch.active:
        return
    total = sum(n for _, n in _watch.offenders)
    terminalreporter.write_sep("-", f"egress guard: {total} packets for 198.18.0.0/15 tried to leave this machine")
    for what, packets in _watch.offenders:
        terminalreporter.write_line(f"  {packets} packets while running {what}")
