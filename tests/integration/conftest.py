"""Integration fixtures: the operator as a real process, test hosts, DNS, and counting the operator's API writes.

Why it exists: beacon is proven the way users run it: `python -m beacon operator` as its own process (so tests
can SIGTERM or SIGKILL it), talking to the real apiserver under its own identity (so the audit log can attribute
every write to it), probing real servers on network-namespace test hosts, and answering through real CoreDNS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import (
    OPERATOR_USER,
    Audit,
    OperatorProcess,
    install_operator_identity,
    resolver_for,
    stop_probing,
)


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: DevCluster, crds: None, repo: Path) -> Path:
    """The operator's own identity: a token of the ServiceAccount that manifests/ ships, whose rights come only
    from the shipped ClusterRole (so every test below also proves the RBAC), attributed in the audit log."""
    return install_operator_identity(cluster, manifests=repo / "manifests" / "default")


@pytest.fixture(scope="session")
def beacon_operator(
    cluster: DevCluster, crds: None, operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    # the periodic resync off: whatever the tests see repaired or published, the watches did (tests that need a
    # resync start their own operator)
    op = OperatorProcess(
        cluster=cluster,
        kubeconfig=operator_kubeconfig,
        log_dir=tmp_path_factory.mktemp("operator-logs"),
        extra_args=("--resync-seconds=0",),
    )
    op.start()
    _SESSION_OPERATORS.append(op)
    yield op
    op.stop()


_SESSION_OPERATORS: list[OperatorProcess] = []  # the session's operator, once a test started it


@pytest.fixture
def operator_stopped() -> None:
    """For a test that writes what the operator owns (an entry's status, say): the session's operator, if a test
    started it, is stopped first, so it cannot write over the test (the next `operator_running` starts it again)."""
    for op in _SESSION_OPERATORS:
        if op.proc is not None and op.proc.poll() is None:
            op.stop()


@pytest.fixture
def operator_running(beacon_operator: OperatorProcess) -> OperatorProcess:
    """The session's operator, started again if a test stopped it."""
    if beacon_operator.proc is None or beacon_operator.proc.poll() is not None:
        beacon_operator.start()
    return beacon_operator


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Iterator[TestNetwork]:
    """A test network, closed only after the session's operator has stopped probing it (the guard route catches
    what a test's own operator process might still send; those are stopped by their tests)."""
    with TestNetwork() as network:
        yield network
        if "beacon_operator" in request.fixturenames:
            stop_probing(request.getfixturevalue("cluster"), request.getfixturevalue("beacon_operator"))


@pytest.fixture(scope="session")
def audit(cluster: DevCluster) -> Audit:
    return Audit(cluster, OPERATOR_USER)


@pytest.fixture(scope="session")
def resolve(cluster: DevCluster) -> Callable[[str], set[str]]:
    return resolver_for(cluster)
