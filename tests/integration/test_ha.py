"""High availability: two operator replicas with kopf peering, as the shipped Deployment runs them.

Why it exists: the Deployment runs two replicas of an operator that is not safe to run twice at once (both would
probe, patch status and rewrite registries). kopf peering makes exactly one replica active; these tests prove it
on the real apiserver with the shipped RBAC: only the active replica writes (each replica has its own
/metrics, and beacon_api_writes_total counts every write beacon makes), the standby stays silent, and after the
active replica is SIGKILLed the standby takes over within the peering lifetime (documented in the README).
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beacon.operator_runtime import PEERING_LIFETIME
from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import OperatorProcess, apply, eventually, get_json

pytestmark = pytest.mark.integration

# The floor is the keep-alive's remaining lifetime (at most PEERING_LIFETIME after the last renewal); the slack
# covers kopf's re-list of every watched resource and a busy 2-core machine.
TAKEOVER_BUDGET = PEERING_LIFETIME + 15


def entry(name: str, namespace: str) -> dict[str, Any]:
    """An entry whose single endpoint never answers: reconciling it still writes (Service, slices, status)."""
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ports": [{"name": "tcp", "port": 7000}],
            "endpoints": [{"address": "198.18.255.254"}],
            "healthCheck": {"tcp": {"port": "tcp"}, "intervalSeconds": 5, "timeoutSeconds": 1},
        },
    }


def reconciled(cluster: DevCluster, namespace: str, name: str) -> bool:
    body = get_json(cluster, "serviceentry", "-n", namespace, name) or {}
    status = body.get("status") or {}
    return bool(status.get("observedGeneration")) and get_json(cluster, "service", "-n", namespace, name) is not None


def api_writes(op: OperatorProcess) -> float:
    """The sum of beacon_api_writes_total over every verb and kind (0 before the first write)."""
    total = 0.0
    for line in op.metrics().splitlines():
        if line.startswith("beacon_api_writes_total{"):
            total += float(line.split()[-1])
    return total


def live_peers(cluster: DevCluster) -> dict[str, dict[str, Any]]:
    """The replicas whose keep-alive in the ClusterKopfPeering is still valid, by kopf identity."""
    body = get_json(cluster, "clusterkopfpeering", "beacon") or {}
    now = dt.datetime.now(dt.UTC)
    return {
        identity: info
        for identity, info in (body.get("status") or {}).items()
        if info and dt.datetime.fromisoformat(info["lastseen"]) + dt.timedelta(seconds=info["lifetime"]) > now
    }


@pytest.fixture
def replicas(
    cluster: DevCluster, beacon_operator: OperatorProcess, operator_kubeconfig: Path, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """Two `--peering` operators; the session's standalone operator is stopped meanwhile (the next test that
    needs it starts it again through the operator_running fixture)."""
    beacon_operator.stop()
    made = [
        OperatorProcess(
            cluster=cluster, kubeconfig=operator_kubeconfig, log_dir=tmp_path / name, extra_args=("--peering",)
        )
        for name in ("first", "second")
    ]
    for op in made:
        op.log_dir.mkdir()
    try:
        yield made[0], made[1]
    finally:
        for op in made:
            op.stop()


def test_one_replica_is_active_and_the_standby_takes_over_after_sigkill(
    cluster: DevCluster, namespace: str, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    first, second = replicas
    first.start()
    apply(cluster, entry("before", namespace))
    eventually(lambda: reconciled(cluster, namespace, "before"), timeout=30, what="the first replica reconciling")

    second.start()
    # both keep-alives are in the peering object, with distinct priorities (equal ones would pause both)
    live = eventually(lambda: len(p := live_peers(cluster)) == 2 and p, timeout=20, what="two live peers")
    assert len({info["priority"] for info in live.values()}) == 2

    # while both run, every write comes from the first replica: the second stays silent
    writes_before = api_writes(first)
    apply(cluster, entry("during", namespace))
    eventually(lambda: reconciled(cluster, namespace, "during"), timeout=30, what="'during' reconciled")
    time.sleep(3)
    assert api_writes(first) > writes_before
    assert api_writes(second) == 0, f"the standby wrote:\n{second.metrics()}"
    assert "beacon is active" in first.logs()
    assert "beacon is active" not in second.logs()

    # SIGKILL the active replica: no clean hand-over, the standby waits for its keep-alive to expire
    killed_at = time.monotonic()
    first.stop(signal.SIGKILL)
    apply(cluster, entry("after", namespace))
    eventually(lambda: reconciled(cluster, namespace, "after"), timeout=TAKEOVER_BUDGET, what="the standby taking over")
    takeover = time.monotonic() - killed_at
    print(f"\ntakeover after SIGKILL of the active replica: {takeover:.1f}s (lifetime {PEERING_LIFETIME}s)")
    assert "beacon is active" in second.logs()
    assert api_writes(second) > 0
    assert takeover <= TAKEOVER_BUDGET


def test_clean_exit_of_the_active_replica_hands_over_at_once(
    cluster: DevCluster, namespace: str, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    """SIGTERM (a rolling update, a drain): kopf removes the replica's keep-alive on exit, so the standby does not
    wait for the lifetime to run out."""
    first, second = replicas
    first.start()
    apply(cluster, entry("before", namespace))
    eventually(lambda: reconciled(cluster, namespace, "before"), timeout=30, what="the first replica reconciling")
    second.start()
    eventually(lambda: len(live_peers(cluster)) == 2, timeout=20, what="both keep-alives")
    time.sleep(2)
    assert api_writes(second) == 0

    stopped_at = time.monotonic()
    first.stop(signal.SIGTERM)
    apply(cluster, entry("after", namespace))
    eventually(lambda: reconciled(cluster, namespace, "after"), timeout=PEERING_LIFETIME, what="a prompt hand-over")
    print(f"\nhand-over after SIGTERM of the active replica: {time.monotonic() - stopped_at:.1f}s")
