"""The deployment manifests against the real apiserver: they build, the server accepts them, and the RBAC is tight.

Why it exists: `make deploy` must work on a real cluster, and least privilege is only a claim until something
checks both sides of it. The whole integration suite already runs the operator with a token of the shipped
ServiceAccount (see conftest.py), which proves the ClusterRole grants enough; the tests here prove it grants
nothing the operator does not use, and that the hardened Deployment passes the API server's validation and the
"restricted" Pod Security Standard.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from beacon_dev.devcluster import DevCluster
from beacon_dev.testing import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(cluster: DevCluster, repo: Path) -> list[dict[str, Any]]:
    out = cluster.kubectl("kustomize", str(repo / "manifests" / "default")).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def as_operator(cluster: DevCluster, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """kubectl with the operator's ServiceAccount token and nothing else."""
    return subprocess.run(
        [cluster.kubectl_path, f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_default_builds_everything(built: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in built}
    assert kinds >= {
        ("Namespace", OPERATOR_NAMESPACE),
        ("CustomResourceDefinition", "serviceentries.beacon.dev"),
        ("CustomResourceDefinition", "configentries.beacon.dev"),
        ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
        ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
        ("ServiceAccount", OPERATOR_SERVICE_ACCOUNT),
        ("ClusterRole", "beacon-operator"),
        ("ClusterRoleBinding", "beacon-operator"),
        ("Deployment", "beacon-operator"),
        ("ClusterKopfPeering", "beacon"),
        ("PodDisruptionBudget", "beacon-operator"),
        ("NetworkPolicy", "beacon-operator"),
        ("Service", "beacon-operator-metrics"),
    }
    assert "namespace" not in one(built, "ClusterKopfPeering", "beacon")["metadata"], "cluster-scoped"
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    cluster_scoped.add("ClusterKopfPeering")
    for doc in built:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"]["namespace"] == OPERATOR_NAMESPACE, doc["metadata"]


def test_deployment_is_hardened_and_highly_available(built: list[dict[str, Any]]) -> None:
    deployment = one(built, "Deployment", "beacon-operator")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    assert container["args"] == ["--peering"]
    assert pod["serviceAccountName"] == OPERATOR_SERVICE_ACCOUNT
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert "readinessProbe" in container
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9090, "healthz": 8081}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "kopf's peering identity"
    policy = one(built, "NetworkPolicy", "beacon-operator")["spec"]
    assert policy["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]


def test_server_accepts_the_manifests_and_pod_security_restricted(
    cluster: DevCluster, repo: Path, operator_kubeconfig: Path
) -> None:
    """Server-side dry run of everything `make deploy` applies (the CRDs are installed by the fixtures, so the
    ClusterKopfPeering kind resolves). The namespace enforces the restricted Pod Security Standard, and the
    apiserver warns about any workload that would violate it."""
    proc = cluster.kubectl("apply", "--dry-run=server", "-k", str(repo / "manifests" / "default"), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "PodSecurity" not in proc.stderr, proc.stderr
    assert "deployment.apps/beacon-operator" in proc.stdout
    assert "clusterkopfpeering.kopf.dev/beacon" in proc.stdout


def test_samples_build_from_the_examples(cluster: DevCluster, repo: Path) -> None:
    out = cluster.kubectl("kustomize", str(repo / "manifests" / "samples")).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out) if d)
    assert kinds == ["ConfigEntry", "ConfigEntry", "Namespace", "ServiceEntry"]


def test_the_sharded_overlay_runs_three_active_replicas_with_their_lease_role(
    cluster: DevCluster, repo: Path, operator_kubeconfig: Path
) -> None:
    """(`operator_kubeconfig`: the namespace and kopf's CRDs are installed, so the dry run below can resolve.)"""
    built = [
        d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(repo / "manifests" / "sharded")).stdout) if d
    ]
    deployment = one(built, "Deployment", "beacon-operator")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 3
    assert container["args"] == ["--shard"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert env["POD_NAME"] == "metadata.name"
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    role = one(built, "Role", "beacon-shard-leases")
    assert role["metadata"]["namespace"] == OPERATOR_NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        }
    ]
    binding = one(built, "RoleBinding", "beacon-shard-leases")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": OPERATOR_SERVICE_ACCOUNT, "namespace": OPERATOR_NAMESPACE}
    ]
    # it applies as a whole (server-side dry run): the overlay is valid against the API
    cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(repo / "manifests" / "sharded"))


# What the operator does (each backed by code; see the comments in manifests/rbac/role.yaml) ...
NEEDED = [
    ("list", "serviceentries.beacon.dev", None),
    ("watch", "serviceentries.beacon.dev", None),
    ("patch", "serviceentries.beacon.dev", "status"),
    ("list", "configentries.beacon.dev", None),
    ("watch", "configentries.beacon.dev", None),
    ("patch", "configentries.beacon.dev", "status"),
    ("get", "services", None),
    ("list", "services", None),
    ("watch", "services", None),
    ("watch", "endpoints", None),
    ("watch", "endpointslices.discovery.k8s.io", None),
    ("watch", "configmaps", None),
    ("watch", "controllerrevisions.apps", None),
    ("create", "services", None),
    ("patch", "services", None),
    ("patch", "endpoints", None),
    ("delete", "endpointslices.discovery.k8s.io", None),
    ("list", "configmaps", None),
    ("delete", "configmaps", None),
    ("create", "events", None),
    ("watch", "pods", None),
    ("watch", "leases.coordination.k8s.io", None),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("patch", "clusterkopfpeerings.kopf.dev", None),
]
# ... and a sample of what it never does.
FORBIDDEN = [
    ("get", "secrets", None),
    ("list", "secrets", None),
    ("create", "pods", None),
    ("delete", "pods", None),
    ("get", "pods", "exec"),
    ("delete", "services", None),
    ("update", "configmaps", None),
    ("patch", "serviceentries.beacon.dev", None),  # the spec is the user's; only status is written
    ("delete", "serviceentries.beacon.dev", None),
    ("update", "serviceentries.beacon.dev", "status"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
    ("impersonate", "serviceaccounts", None),
    ("create", "serviceaccounts", "token"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("create", "clusterkopfpeerings.kopf.dev", None),
    ("delete", "namespaces", None),
    ("get", "nodes", None),
]


def _can(cluster: DevCluster, kubeconfig: Path, verb: str, resource: str, sub: str | None, ns: str) -> bool:
    args = ["auth", "can-i", verb, resource, "-n", ns]
    if sub:
        args.append(f"--subresource={sub}")
    proc = as_operator(cluster, kubeconfig, *args)
    assert proc.stdout.strip() in ("yes", "no"), proc.stderr
    return proc.stdout.strip() == "yes"


def test_operator_token_can_do_what_the_operator_needs(cluster: DevCluster, operator_kubeconfig: Path) -> None:
    denied = [
        (verb, res, sub)
        for verb, res, sub in NEEDED
        if not _can(cluster, operator_kubeconfig, verb, res, sub, "some-namespace")
    ]
    assert denied == []


def test_operator_token_cannot_do_anything_else(cluster: DevCluster, operator_kubeconfig: Path) -> None:
    allowed = [
        (verb, res, sub)
        for verb, res, sub in FORBIDDEN
        if _can(cluster, operator_kubeconfig, verb, res, sub, "kube-system")
    ]
    assert allowed == []


def test_reading_secrets_is_forbidden_for_real(cluster: DevCluster, operator_kubeconfig: Path) -> None:
    """Not only `can-i`: an actual request with the token is refused by the apiserver."""
    proc = as_operator(cluster, operator_kubeconfig, "get", "secrets", "-A")
    assert proc.returncode != 0
    assert "Forbidden" in proc.stderr or "forbidden" in proc.stderr, proc.stderr
    assert OPERATOR_SERVICE_ACCOUNT in proc.stderr, "the refusal names the operator's ServiceAccount"


def test_make_deploy_and_undeploy_on_a_fresh_cluster(repo: Path) -> None:
    """`make deploy` on a cluster that has never seen beacon (the CRDs go first, so the peering object of a kind
    the same apply would define resolves), with IMG honoured; `make undeploy` removes the operator but keeps the
    CRDs and with them the users' entries. A cluster of its own: undeploy must not touch the session's."""
    with DevCluster(log=False) as fresh:
        kubectl = f"{fresh.kubectl_path} --kubeconfig={fresh.kubeconfig}"
        img = "registry.example.com/beacon:1.2.3"

        def make(target: str) -> None:
            proc = subprocess.run(
                ["make", "--no-print-directory", target, f"KUBECTL={kubectl}", f"IMG={img}"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr

        make("deploy")
        deployment = json.loads(
            fresh.kubectl("get", "deployment", "beacon-operator", "-n", "beacon-system", "-o", "json").stdout
        )
        assert [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]] == [img]
        fresh.kubectl("get", "clusterkopfpeering", "beacon")
        fresh.kubectl("get", "clusterrolebinding", "beacon-operator")
        make("deploy")  # idempotent

        make("undeploy")
        assert fresh.kubectl("get", "clusterrole", "beacon-operator", check=False).returncode != 0
        assert fresh.kubectl("get", "clusterkopfpeering", "beacon", check=False).returncode != 0
        fresh.kubectl("get", "crd", "serviceentries.beacon.dev", "clusterkopfpeerings.kopf.dev")
