"""Sharded, active-active beacon on the real control plane: three operator processes (`--shard`), each under its
own ServiceAccount token so that the audit log tells their writes apart, serving twelve namespaces of entries
whose endpoints are real HTTP servers on test hosts.

Proven here: every entry is served by exactly one replica; a SIGKILLed replica's namespaces are probed and
published by the survivors within Lease duration + one interval, with no healthy endpoint turned not-ready; a
fourth replica takes over at most 35% of the namespaces, again without a flip; and no object (a registry
included) is ever written by two replicas in turn and back again.
"""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beacon.sharding import moved
from beacon_dev.devcluster import DevCluster
from beacon_dev.testhosts import HttpServer, TestNetwork
from beacon_dev.testing import OPERATOR_NAMESPACE, OperatorProcess, apply, eventually, get_json

pytestmark = [pytest.mark.integration, pytest.mark.netns]

LEASE_SECONDS = 6
RENEW_SECONDS = 1
INTERVAL = 2
NAMESPACES = 16  # fixed names below: which replica serves which is then the same in every run


def _identity(cluster: DevCluster, repo: Path, name: str) -> Path:
    """A ServiceAccount of its own, with the shipped ClusterRole and the sharded overlay's Lease Role."""
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": OPERATOR_NAMESPACE},
    }
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": OPERATOR_NAMESPACE}]
    bindings = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{name}-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "beacon-operator"},
            "subjects": subject,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{name}-leases", "namespace": OPERATOR_NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "beacon-shard-leases"},
            "subjects": subject,
        },
    ]
    for obj in [account, *bindings]:
        apply(cluster, obj)
    token = cluster.kubectl("create", "token", name, "-n", OPERATOR_NAMESPACE, "--duration=2h").stdout.strip()
    path = cluster.workdir / f"{name}.kubeconfig"
    cluster.write_kubeconfig(path, user=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{name}", token=token)
    return path


def _user(name: str) -> str:
    return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{name}"


@pytest.fixture
def shard_group(
    cluster: DevCluster, repo: Path, operator_kubeconfig: Path, beacon_operator: OperatorProcess, tmp_path: Path
) -> Iterator[dict[str, OperatorProcess]]:
    """Replicas shard-0..2 (shard-3 is made but not started); the session's operator is stopped meanwhile."""
    beacon_operator.stop()
    cluster.kubectl("apply", "--server-side", "-f", str(repo / "manifests" / "sharded" / "shard_role.yaml"))
    replicas = {}
    for i in range(4):
        name = f"shard-{i}"
        replicas[name] = OperatorProcess(
            cluster=cluster,
            kubeconfig=_identity(cluster, repo, name),
            log_dir=tmp_path / name,
            extra_args=(
                "--shard",
                f"--shard-identity={name}",
                f"--shard-namespace={OPERATOR_NAMESPACE}",
                f"--shard-lease-seconds={LEASE_SECONDS}",
                f"--shard-renew-seconds={RENEW_SECONDS}",
                "--resync-seconds=0",
            ),
        )
        (tmp_path / name).mkdir()
    yield replicas
    for replica in replicas.values():
        replica.stop()


def _served_by(cluster: DevCluster, namespaces: list[str]) -> dict[str, str | None]:
    listed = get_json(cluster, "serviceentries", "-A") or {}
    out: dict[str, str | None] = dict.fromkeys(namespaces)
    for item in listed.get("items", []):
        if item["metadata"]["namespace"] in out:
            out[item["metadata"]["namespace"]] = (item.get("status") or {}).get("servedBy")
    return out


def _readiness(cluster: DevCluster, namespaces: list[str]) -> dict[tuple[str, str], bool]:
    """Every published endpoint of the test's namespaces: (namespace, address) -> ready, in one request."""
    listed = get_json(
        cluster, "endpointslices", "-A", "-l", "endpointslice.kubernetes.io/managed-by=operator.beacon.dev"
    )
    out = {}
    for item in (listed or {}).get("items", []):
        namespace = item["metadata"]["namespace"]
        if namespace not in namespaces:
            continue
        for ep in item.get("endpoints") or []:
            for address in ep["addresses"]:
                out[(namespace, address)] = bool(ep["conditions"].get("ready"))
    return out


def _watch_for_flips(cluster: DevCluster, namespaces: list[str], healthy: set[tuple[str, str]], seconds: float) -> None:
    """For `seconds`, no healthy endpoint may be published not-ready (or disappear)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readiness = _readiness(cluster, namespaces)
        flipped = sorted(key for key in healthy if not readiness.get(key, False))
        assert not flipped, f"healthy endpoints published not ready during a handover: {flipped}"
        time.sleep(0.2)


def _writers(
    cluster: DevCluster, users: set[str], since: float, until: float, *, by_namespace: bool = False
) -> dict[tuple[str, ...], list[str]]:
    """The replicas that wrote each object (or each namespace) between `since` and `until`, in the order they
    took turns: [A, B] is one handover, [A, B, A] two writers at once. Leases and Events are left out."""
    timeline: dict[tuple[str, ...], list[str]] = {}
    for event in cluster.audit_events():
        if event.get("stage") != "ResponseComplete":
            continue
        user = (event.get("user") or {}).get("username")
        if user not in users or (event.get("responseStatus") or {}).get("code", 200) >= 400:
            continue
        stamp = dt_epoch(str(event.get("requestReceivedTimestamp", "")))
        ref = event.get("objectRef") or {}
        if not since <= stamp < until or ref.get("resource") in ("leases", "events"):
            continue
        key: tuple[str, ...] = (
            (ref.get("namespace", ""),)
            if by_namespace
            else (ref.get("resource", ""), ref.get("namespace", ""), ref.get("name", ""))
        )
        writers = timeline.setdefault(key, [])
        if not writers or writers[-1] != user:
            writers.append(str(user))
    return timeline


def _writers_interleave(cluster: DevCluster, users: set[str], since: float, until: float) -> list[str]:
    """Objects written, between `since` and `until` (one handover window), by one replica, then another, then
    the first again: two writers at once."""
    timeline = _writers(cluster, users, since, until)
    return [f"{key}: {' -> '.join(w)}" for key, w in timeline.items() if len(w) != len(set(w))]


def dt_epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_sharded_replicas_serve_each_namespace_once_and_hand_over_without_flips(
    cluster: DevCluster, net: TestNetwork, shard_group: dict[str, OperatorProcess]
) -> None:
    namespaces = [f"t-shard-{i:02d}" for i in range(NAMESPACES)]
    servers: dict[tuple[str, str], HttpServer] = {}
    started = time.time()
    for namespace in namespaces:
        cluster.kubectl("create", "namespace", namespace)
        hosts = net.add_hosts(2)
        for host in hosts:
            servers[(namespace, host.address)] = host.http(port=8080, path="/healthz")
        body: dict[str, Any] = {
            "apiVersion": "beacon.dev/v1alpha1",
            "kind": "ServiceEntry",
            "metadata": {"name": "api", "namespace": namespace},
            "spec": {
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"address": h.address} for h in hosts],
                "healthCheck": {
                    "http": {"path": "/healthz", "port": "http"},
                    "intervalSeconds": INTERVAL,
                    "timeoutSeconds": 1,
                    "unhealthyThreshold": 2,
                },
            },
        }
        apply(cluster, body)
    three = {name: shard_group[name] for name in ("shard-0", "shard-1", "shard-2")}
    users = {_user(name) for name in shard_group}
    try:
        for replica in three.values():  # started together, as a Deployment's replicas are
            replica.launch()
        for replica in three.values():
            replica.wait_live()
        healthy = set(servers)
        eventually(
            lambda: _readiness(cluster, namespaces) == dict.fromkeys(healthy, True), timeout=60, what="all ready"
        )

        def all_named() -> dict[str, str | None] | None:
            now = _served_by(cluster, namespaces)
            return now if all(now.values()) else None

        served = eventually(all_named, timeout=30, what="every entry names its replica")
        # exactly one replica serves each namespace, and each of the three serves some. Replicas start a moment
        # apart, so a group of two may settle before the third joins: a namespace may then move once, to the
        # replica that serves it now, and never back
        assert set(served.values()) == set(three), served
        turns = _writers(cluster, users, started, time.time() + 1, by_namespace=True)
        for namespace in namespaces:
            writers = turns.get((namespace,), [])
            assert writers[-1:] == [_user(str(served[namespace]))], (namespace, writers)
            assert len(writers) == len(set(writers)), (namespace, writers)

        # a ConfigEntry is materialised by the replica that serves its namespace
        config = {
            "apiVersion": "beacon.dev/v1alpha1",
            "kind": "ConfigEntry",
            "metadata": {"name": "settings", "namespace": namespaces[0]},
            "spec": {"data": {"greeting": "hello"}},
        }
        apply(cluster, config)
        eventually(
            lambda: (
                (get_json(cluster, "configentry", "-n", namespaces[0], "settings") or {})
                .get("status", {})
                .get("servedBy")
                == served[namespaces[0]]
            ),
            timeout=20,
            what="the ConfigEntry served by its namespace's replica",
        )
        assert get_json(cluster, "configmap", "-n", namespaces[0], "settings")["data"] == {"greeting": "hello"}

        # SIGKILL one: the survivors take its namespaces over, with no healthy endpoint turned not ready
        victim = "shard-1"
        theirs = [ns for ns, by in served.items() if by == victim]
        windows = [started]
        three[victim].stop(signal.SIGKILL)
        windows.append(time.time())
        killed = time.monotonic()
        _watch_for_flips(cluster, namespaces, healthy, LEASE_SECONDS + INTERVAL + 2)
        eventually(
            lambda: all(by in ("shard-0", "shard-2") for by in _served_by(cluster, namespaces).values()),
            timeout=30,
            what="the survivors serve every namespace",
        )
        # ... and probe them: a backend of the victim's namespaces that dies now is withdrawn by a survivor
        dying = next(key for key in servers if key[0] == theirs[0])
        servers[dying].set_healthy(False)
        healthy.discard(dying)
        eventually(lambda: _readiness(cluster, namespaces).get(dying) is False, timeout=INTERVAL * 2 + 8)
        took_over = time.monotonic() - killed
        assert took_over <= LEASE_SECONDS + INTERVAL * 3 + 10, took_over

        # the victim comes back: it serves its namespaces again, without a flip
        windows.append(time.time())
        three[victim].start()
        _watch_for_flips(cluster, namespaces, healthy, 4 * RENEW_SECONDS + 4)
        eventually(lambda: _served_by(cluster, namespaces) == served, timeout=30, what="shard-1 serving again")

        # a fourth replica: it takes at most 35% of the namespaces (exactly those hashing moves), with no flip
        before = _served_by(cluster, namespaces)
        windows.append(time.time())
        shard_group["shard-3"].start()
        _watch_for_flips(cluster, namespaces, healthy, 4 * RENEW_SECONDS + 6)

        def newcomer_serves() -> dict[str, str | None] | None:
            now = _served_by(cluster, namespaces)
            return now if "shard-3" in now.values() else None

        after = eventually(newcomer_serves, timeout=30, what="the fourth replica serves some namespaces")

        def as_hashing_says() -> bool:
            after.update(_served_by(cluster, namespaces))
            return set(moved(namespaces, three, shard_group)) == {n for n in namespaces if before[n] != after[n]}

        eventually(as_hashing_says, timeout=20, what="the namespaces hashing moves, and only those, on shard-3")
        changed = [n for n in namespaces if before[n] != after[n]]
        assert all(after[n] == "shard-3" for n in changed), "namespaces move only to the newcomer"
        assert 0 < len(changed) <= 0.35 * NAMESPACES, changed

        # in no handover window was an object, registries included, written by one replica, then another, then
        # the first again
        windows.append(time.time() + 1)
        for since, until in itertools.pairwise(windows):
            assert _writers_interleave(cluster, users, since, until) == [], (since, until)
    finally:
        for namespace in namespaces:  # nothing probes the test hosts once the entries are gone
            cluster.kubectl("delete", "serviceentries", "--all", "-n", namespace, "--wait=true", check=False)
        for replica in shard_group.values():
            replica.stop()
        for namespace in namespaces:
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
