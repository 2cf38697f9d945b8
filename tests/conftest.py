"""Shared pytest fixtures: the real local control plane and per-test namespaces.

Why it exists: every integration test stands on the same real kube-apiserver, etcd, kube-controller-manager and
CoreDNS, started once per session by beacon.devcluster (never a mock), and each test gets its own namespace so
tests cannot see each other's objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from beacon.devcluster import DevCluster

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
