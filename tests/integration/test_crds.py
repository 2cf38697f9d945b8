"""A real kube-apiserver accepts the CRDs, serves the promised `kubectl get` UX, and rejects bad objects with
the messages the CRDs promise.

Why it exists: structural-schema rules, CEL syntax, CEL cost budgets and defaulting are only really checked by the
apiserver; tests/unit/test_crds.py checks the YAML, this checks what the apiserver does with it. Invalid objects
are sent with `--dry-run=server`, which runs defaulting and every validation without storing anything.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("crds")]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

Doc = dict[str, Any]


def _example(name: str) -> Doc:
    doc: Doc = yaml.safe_load((EXAMPLES / name).read_text())
    del doc["metadata"]["namespace"]  # each test applies into its own namespace with -n
    return doc


def _apply(cluster: Any, namespace: str, *docs: Doc, dry_run: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["apply", "-n", namespace, "-f", "-"]
    if dry_run:
        args.append("--dry-run=server")
    return cluster.kubectl(*args, input=yaml.safe_dump_all(docs), check=False)  # type: ignore[no-any-return]


def _accepted(cluster: Any, namespace: str, *docs: Doc, dry_run: bool = False) -> None:
    proc = _apply(cluster, namespace, *docs, dry_run=dry_run)
    assert proc.returncode == 0, proc.stderr


def _rejected(cluster: Any, namespace: str, doc: Doc) -> str:
    proc = _apply(cluster, namespace, doc, dry_run=True)
    assert proc.returncode != 0, f"accepted:\n{yaml.safe_dump(doc)}"
    assert "is invalid" in proc.stderr or "Error from server" in proc.stderr, proc.stderr
    return proc.stderr


def _get_json(cluster: Any, namespace: str, what: str) -> Doc:
    return json.loads(cluster.kubectl("get", "-n", namespace, what, "-o", "json").stdout)  # type: ignore[no-any-return]


def _patch_status(
    cluster: Any, namespace: str, what: str, status: Doc, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    patch = json.dumps({"status": status})
    args = ("patch", "-n", namespace, what, "--subresource=status", "--type=merge", "-p", patch)
    return cluster.kubectl(*args, check=check)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------- the UX
def test_examples_apply_and_kubectl_get_shows_the_columns(cluster: Any, namespace: str) -> None:
    _accepted(
        cluster,
        namespace,
        _example("serviceentry-payments.yaml"),
        _example("configentry-defaults.yaml"),
        _example("configentry-payments.yaml"),
    )

    header = cluster.kubectl("get", "serviceentries", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "HEALTH", "AGE"]
    assert cluster.kubectl("get", "bse", "-n", namespace, "-o", "name").stdout.split() == [
        "serviceentry.beacon.dev/payments"
    ]

    header = cluster.kubectl("get", "configentries", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "REVISION", "HASH", "ADOPTED", "PHASE", "READY", "AGE"]
    wide = cluster.kubectl("get", "bce", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert wide == ["NAME", "SERVICE", "PRIORITY", "REVISION", "HASH", "ADOPTED", "PHASE", "READY", "AGE"]

    listed = cluster.kubectl("get", "beacon", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == [
        "configentry.beacon.dev/defaults",
        "configentry.beacon.dev/payments",
        "serviceentry.beacon.dev/payments",
    ]


def test_defaults_are_applied(cluster: Any, namespace: str) -> None:
    _accepted(cluster, namespace, _example("serviceentry-payments.yaml"), _example("configentry-defaults.yaml"))
    spec = _get_json(cluster, namespace, "serviceentry/payments")["spec"]
    assert spec["headless"] is True
    assert spec["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert spec["healthCheck"] == {
        "http": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
        "intervalSeconds": 5,
        "healthyThreshold": 1,
        "unhealthyThreshold": 2,
    }
    spec = _get_json(cluster, namespace, "configentry/defaults")["spec"]
    assert (spec["priority"], spec["revisionHistoryLimit"]) == (0, 10)
    assert "rollout" not in spec  # untracked unless asked for
    assert "canary" not in spec

    tracked = _example("configentry-payments.yaml")
    tracked["spec"]["rollout"] = {}
    tracked["spec"]["canary"] = {"selector": {"matchLabels": {"tier": "canary"}}}
    _accepted(cluster, namespace, tracked)
    spec = _get_json(cluster, namespace, "configentry/payments")["spec"]
    assert spec["rollout"] == {"rolloutTimeoutSeconds": 600, "autoRollback": True}  # no waveSize: one wave
    assert spec["canary"] == {"selector": {"matchLabels": {"tier": "canary"}}, "holdSeconds": 60, "promotion": "Auto"}


def test_status_feeds_the_printer_columns(cluster: Any, namespace: str, operator_stopped: None) -> None:
    _accepted(cluster, namespace, _example("serviceentry-payments.yaml"), _example("configentry-payments.yaml"))
    condition = {
        "type": "Ready",
        "status": "True",
        "reason": "Degraded",
        "message": "1 of 2 endpoints healthy",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 1,
    }
    status = {
        "observedGeneration": 1,
        "readyEndpoints": 1,
        "healthyEndpoints": 1,
        "totalEndpoints": 2,
        "readySummary": "1/2",
        "conditions": [condition],
        "endpoints": [{"address": "198.18.0.10", "state": "Healthy"}, {"address": "198.18.0.11", "state": "Unhealthy"}],
    }
    _patch_status(cluster, namespace, "serviceentry/payments", status)
    row = cluster.kubectl("get", "-n", namespace, "serviceentry/payments", "--no-headers").stdout.split()
    assert row[:3] == ["payments", "1/2", "Degraded"]
    assert _get_json(cluster, namespace, "serviceentry/payments")["status"] == status  # nothing pruned

    condition = {**condition, "reason": "Materialised", "message": "revision 3"}
    adoption = {
        "summary": "2/3 workloads",
        "revision": 3,
        "workloads": 3,
        "adoptedWorkloads": 2,
        "baselinePods": 1,
        "unknownPods": 0,
        "revisions": [
            {"revision": 3, "workloads": 2, "pods": 4, "readyPods": 4},
            {"revision": 1, "pruned": True, "workloads": 0, "pods": 1, "readyPods": 1},
        ],
    }
    status = {
        "observedGeneration": 1,
        "currentRevision": 3,
        "hash": "5f2c9a1b7e",
        "conditions": [condition],
        "adoption": adoption,
    }
    _patch_status(cluster, namespace, "configentry/payments", status)
    row = cluster.kubectl("get", "-n", namespace, "configentry/payments", "--no-headers").stdout.split()
    # PHASE is empty without a tracked rollout: kubectl prints nothing there
    assert row[:6] == ["payments", "3", "5f2c9a1b7e", "2/3", "workloads", "True"]
    assert _get_json(cluster, namespace, "configentry/payments")["status"] == status  # nothing pruned

    rollout = {
        "revision": 4,
        "hash": "0123456789abcdef",
        "phase": "Waves",
        "wave": 2,
        "members": ["Deployment/w05", "StatefulSet/w06"],
        "restarted": ["Deployment/w05"],
        "stepStarted": "2026-12-02T07:00:00Z",
        "readySince": "2026-12-02T06:59:00Z",
        "message": "wave 2 of 3: 2 workloads",
    }
    rollback = {
        "failedRevision": 2,
        "restoredRevision": 1,
        "revision": 3,
        "dataHash": "fedcba9876543210",
        "message": "Deployment/canary: new pods not Ready within 60s",
    }
    rolled = {
        "type": "Rollout",
        "status": "True",
        "reason": "Progressing",
        "message": "wave 2 of 3",
        "lastTransitionTime": "2026-12-02T07:00:00Z",
        "observedGeneration": 1,
    }
    status = {**status, "rollout": rollout, "rollback": rollback, "conditions": [condition, rolled]}
    _patch_status(cluster, namespace, "configentry/payments", status)
    row = cluster.kubectl("get", "-n", namespace, "configentry/payments", "--no-headers").stdout.split()
    assert row[:7] == ["payments", "3", "5f2c9a1b7e", "2/3", "workloads", "Waves", "True"]
    assert _get_json(cluster, namespace, "configentry/payments")["status"] == status  # nothing pruned
    bad = {"rollout": {**rollout, "phase": "Paused"}}
    proc = _patch_status(cluster, namespace, "configentry/payments", bad, check=False)
    assert proc.returncode != 0
    assert 'Unsupported value: "Paused"' in proc.stderr, proc.stderr


# The smallest spec for each field that a CEL rule ties to another one: set alone, at every bound, it is valid (the
# operator derives the other field, see HealthCheck.interval/.timeout). Applied for real, not as a dry run, and read
# back, so a default that the apiserver fills in would show up here.
TIED_FIELDS_ALONE = [
    {"intervalSeconds": 2},
    {"intervalSeconds": 3},
    {"intervalSeconds": 3600},
    {"timeoutSeconds": 1},
    {"timeoutSeconds": 10},
    {"timeoutSeconds": 3599},
    {"http": {"path": "/healthz", "expectedStatuses": [{"min": 204}]}},  # expectedStatuses[].min without max
]


def test_tied_fields_are_valid_alone(cluster: Any, namespace: str) -> None:
    docs = []
    for i, check in enumerate(TIED_FIELDS_ALONE):
        health = check if "http" in check else {"tcp": {}, **check}
        docs.append(
            {
                "apiVersion": "beacon.dev/v1alpha1",
                "kind": "ServiceEntry",
                "metadata": {"name": f"alone-{i}", "namespace": namespace},
                "spec": {
                    "ports": [{"name": "tcp", "port": 9000}],
                    "selector": {"matchLabels": {"app": "alone"}},
                    "healthCheck": health,
                },
            }
        )
    _accepted(cluster, namespace, *docs)
    for i, check in enumerate(TIED_FIELDS_ALONE):
        stored = _get_json(cluster, namespace, f"serviceentry/alone-{i}")["spec"]["healthCheck"]
        for key in ("intervalSeconds", "timeoutSeconds"):
            assert stored.get(key) == check.get(key), (key, stored)


def test_valid_variants_are_accepted(cluster: Any, namespace: str) -> None:
    base = _example("serviceentry-payments.yaml")
    variants: list[Doc] = []

    def variant(name: str, change: Callable[[Doc], None]) -> None:
        doc = copy.deepcopy(base)
        doc["metadata"]["name"] = name
        change(doc["spec"])
        variants.append(doc)

    def addresses(spec: Doc) -> None:
        spec["endpoints"] = [
            {"address": "2001:db8::10", "hostname": "pay-0", "labels": {"version": "v2", "example.com/tier": "gold"}},
            {"address": "payments.example.com", "ports": [{"name": "http", "port": 9090}]},
            {"address": "db1"},
        ]

    def selector_only(spec: Doc) -> None:
        del spec["endpoints"]
        spec["selector"] = {"matchLabels": {"app.kubernetes.io/name": "payments"}}

    def tcp(spec: Doc) -> None:
        spec["healthCheck"] = {"tcp": {"port": 8080}, "intervalSeconds": 2, "timeoutSeconds": 1}

    def grpc(spec: Doc) -> None:
        spec["ports"].append({"name": "grpc", "port": 9000, "appProtocol": "kubernetes.io/h2c"})
        spec["healthCheck"] = {"grpc": {"port": "grpc", "service": "payments.v1.Payments"}}

    def udp_echo(spec: Doc) -> None:
        spec["ports"].append({"name": "echo", "port": 9053, "protocol": "UDP"})
        spec["healthCheck"] = {"udp": {"port": "echo", "send": "ping", "expect": {"prefix": "ping"}}}

    def udp_hex_regex(spec: Doc) -> None:
        spec["healthCheck"] = {"udp": {"port": 9053, "sendHex": "00ff0D0a", "expect": {"regex": "^OK v[0-9]+$"}}}

    def udp_hex_prefix(spec: Doc) -> None:
        spec["healthCheck"] = {"udp": {"send": "", "expect": {"prefixHex": "CAFE"}}}

    def udp_port_check(spec: Doc) -> None:
        own = {"udp": {"dns": {"name": "db.shop.example", "type": "AAAA"}}}
        spec["ports"].append({"name": "dns", "port": 53, "protocol": "UDP", "healthCheck": own})

    def udp_dns(spec: Doc) -> None:
        spec["ports"].append({"name": "dns", "port": 53, "protocol": "UDP"})
        dns = {"name": "_http._tcp.payments.shop.svc.cluster.local.", "type": "SRV", "rcode": "NXDOMAIN"}
        spec["healthCheck"] = {"udp": {"port": "dns", "dns": dns}}

    def lease(spec: Doc) -> None:
        spec["healthCheck"] = {"lease": {"namePrefix": "payments-"}, "deregisterAfterSeconds": 600}

    def http_everything(spec: Doc) -> None:
        spec["healthCheck"]["http"] = {
            "path": "/healthz?full=1",
            "port": 8080,
            "scheme": "HTTPS",
            "headers": [{"name": "Host", "value": "payments.example.com"}],
            "expectedStatuses": [{"min": 200, "max": 299}, {"min": 429}],
        }

    def https_verified(spec: Doc) -> None:
        spec["healthCheck"]["http"] = {
            "path": "/healthz",
            "scheme": "HTTPS",
            "tls": {
                "serverName": "payments.example.com",
                "caBundle": {"configMapName": "payments-ca", "key": "ca.crt"},
            },
        }

    def https_sni_only(spec: Doc) -> None:
        spec["healthCheck"]["http"] = {
            "scheme": "HTTPS",
            "tls": {"serverName": "payments.example.com", "insecureSkipVerify": True},
        }

    def grpc_tls(spec: Doc) -> None:
        spec["healthCheck"] = {
            "grpc": {
                "port": 8080,
                "tls": {"insecureSkipVerify": False, "caBundle": {"configMapName": "ca", "key": "a.b"}},
            }
        }

    def no_health_check(spec: Doc) -> None:
        del spec["healthCheck"]

    def failsafe(spec: Doc) -> None:
        spec["healthCheck"]["minHealthyPercent"] = 50
        spec["healthCheck"]["flapDamping"] = {"halfLifeSeconds": 30, "maxSuppressSeconds": 45}

    def cluster_ip(spec: Doc) -> None:
        spec["headless"] = False
        spec["ports"].append({"name": "dns", "port": 8080, "protocol": "UDP"})  # same number, other protocol

    def per_port(spec: Doc) -> None:  # mysql gated by the entry-level check, the exporter by its own
        spec["ports"] = [
            {"name": "mysql", "port": 3306},
            {"name": "exporter", "port": 9104, "healthCheck": {"http": {"path": "/metrics"}}},
        ]
        spec["healthCheck"] = {"tcp": {"port": "mysql"}, "intervalSeconds": 5}

    def every_port_its_own(spec: Doc) -> None:  # healthCheck holds only the timing
        spec["ports"] = [
            {"name": "db", "port": 5432, "healthCheck": {"tcp": {"holdConnection": True}}},
            {"name": "admin", "port": 9000, "healthCheck": {"grpc": {"service": "admin"}}},
        ]
        spec["healthCheck"] = {"intervalSeconds": 5, "unhealthyThreshold": 2}

    def port_checks_only(spec: Doc) -> None:  # no healthCheck: the port without its own check counts healthy
        spec["ports"] = [{"name": "http", "port": 8080, "healthCheck": {"http": {}}}, {"name": "debug", "port": 6060}]
        del spec["healthCheck"]

    for name, change in [
        ("per-port", per_port),
        ("every-port-its-own", every_port_its_own),
        ("port-checks-only", port_checks_only),
        ("addresses", addresses),
        ("selector-only", selector_only),
        ("tcp", tcp),
        ("grpc", grpc),
        ("udp-echo", udp_echo),
        ("udp-hex-regex", udp_hex_regex),
        ("udp-hex-prefix", udp_hex_prefix),
        ("udp-dns", udp_dns),
        ("udp-port-check", udp_port_check),
        ("lease", lease),
        ("http-everything", http_everything),
        ("https-verified", https_verified),
        ("https-sni-only", https_sni_only),
        ("grpc-tls", grpc_tls),
        ("no-health-check", no_health_check),
        ("failsafe", failsafe),
        ("cluster-ip", cluster_ip),
    ]:
        variant(name, change)
    _accepted(cluster, namespace, *variants, dry_run=True)

    config = _example("configentry-payments.yaml")
    # close to the 196608-character total, and still small enough for client-side apply's annotation
    config["spec"]["data"] = {"a": "", "A_b-9/c": "x" * 65536, "db/pool/size": "1", "b": "y" * 65536, "c": "z" * 65000}
    config["spec"]["rollbackTo"] = 3
    _accepted(cluster, namespace, config, dry_run=True)

    tracked: list[Doc] = []
    for name, rollout, canary in [
        ("rollout-only", {"waveSize": 1}, None),
        ("rollout-bounds", {"waveSize": 100, "rolloutTimeoutSeconds": 86400, "autoRollback": False}, None),
        ("rollout-empty", {}, None),
        ("canary-labels", None, {"selector": {"matchLabels": {"example.com/tier": "canary"}}}),
        (
            "canary-everything",
            {"waveSize": 4, "rolloutTimeoutSeconds": 1},
            {
                "selector": {
                    "matchLabels": {"tier": "canary"},
                    "matchExpressions": [
                        {"key": "zone", "operator": "In", "values": ["a", "b"]},
                        {"key": "track", "operator": "NotIn", "values": ["stable"]},
                        {"key": "canary", "operator": "Exists"},
                        {"key": "legacy", "operator": "DoesNotExist", "values": []},
                    ],
                },
                "holdSeconds": 0,
                "promotion": "Manual",
            },
        ),
        (
            "canary-expressions-only",
            None,
            {"selector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, "holdSeconds": 86400},
        ),
    ]:
        doc = _example("configentry-payments.yaml")
        doc["metadata"]["name"] = name
        if rollout is not None:
            doc["spec"]["rollout"] = rollout
        if canary is not None:
            doc["spec"]["canary"] = canary
        tracked.append(doc)
    _accepted(cluster, namespace, *tracked, dry_run=True)


# ---------------------------------------------------------------------------------------------------- ServiceEntry
def _payments(change: Callable[[Doc], None]) -> Doc:
    doc = _example("serviceentry-payments.yaml")
    change(doc["spec"])
    return doc


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def change(spec: Doc) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node[part]
        node[leaf] = value

    return change


def _drop(*keys: str) -> Callable[[Doc], None]:
    def change(spec: Doc) -> None:
        for key in keys:
            del spec[key]

    return change


def _compose(*changes: Callable[[Doc], None]) -> Callable[[Doc], None]:
    def change(spec: Doc) -> None:
        for one in changes:
            one(spec)

    return change


def _udp(udp: Doc) -> Callable[[Doc], None]:
    """The example's health check, with a udp check in place of its http one."""

    def change(spec: Doc) -> None:
        del spec["healthCheck"]["http"]
        spec["healthCheck"]["udp"] = udp

    return change


def _drop_check_port(spec: Doc) -> None:
    del spec["healthCheck"]["http"]["port"]


def _many_endpoints(count: int) -> list[Doc]:
    return [{"address": f"198.18.{i // 250}.{i % 250 + 1}"} for i in range(count)]


CA_BUNDLE = {"configMapName": "payments-ca", "key": "ca.crt"}


def _https_tls(tls: Doc, scheme: str = "HTTPS") -> Callable[[Doc], None]:
    return _set("healthCheck.http", {"path": "/healthz", "scheme": scheme, "tls": tls})


SERVICE_ENTRY_REJECTIONS: list[tuple[str, Callable[[Doc], None], list[str]]] = [
    ("tls-without-https", _https_tls({"insecureSkipVerify": False}, "HTTP"), ["http.tls needs scheme HTTPS"]),
    (
        "ca-bundle-but-skip-verify",
        _https_tls({"insecureSkipVerify": True, "caBundle": CA_BUNDLE}),
        ["tls.caBundle contradicts insecureSkipVerify true"],
    ),
    (
        "grpc-cannot-skip-verify",
        _set("healthCheck", {"grpc": {"port": 8080, "tls": {"insecureSkipVerify": True}}}),
        ["grpc.tls cannot skip certificate verification"],
    ),
    (
        "ca-configmap-name-not-a-dns-subdomain",
        _https_tls({"caBundle": {"configMapName": "Payments_CA", "key": "ca.crt"}}),
        ["spec.healthCheck.http.tls.caBundle.configMapName", "should match"],
    ),
    (
        "ca-key-not-a-configmap-key",
        _https_tls({"caBundle": {"configMapName": "payments-ca", "key": "certs/ca.crt"}}),
        ["spec.healthCheck.http.tls.caBundle.key", "should match"],
    ),
    (
        "ca-bundle-without-key",
        _https_tls({"caBundle": {"configMapName": "payments-ca"}}),
        ["spec.healthCheck.http.tls.caBundle.key", "Required value"],
    ),
    (
        "server-name-not-a-dns-name",
        _https_tls({"serverName": "payments example"}),
        ["spec.healthCheck.http.tls.serverName", "should match"],
    ),
    (
        "server-name-too-long",
        _https_tls({"serverName": "a" * 254}),
        ["spec.healthCheck.http.tls.serverName", "may not be more than 253"],
    ),
    (
        "panic-floor-above-100",
        _set("healthCheck.minHealthyPercent", 101),
        ["spec.healthCheck.minHealthyPercent", "should be less than or equal to 100"],
    ),
    (
        "damping-that-can-never-suppress",
        _set("healthCheck.flapDamping", {"halfLifeSeconds": 200}),  # with the default maxSuppressSeconds, 240
        ["flapDamping.maxSuppressSeconds must be at least 1.5 x halfLifeSeconds"],
    ),
    (
        "two-health-check-kinds",
        _set("healthCheck.tcp", {"port": "http"}),
        ["healthCheck must set exactly one of http, tcp, grpc, udp or lease"],
    ),
    (
        "no-health-check-kind",
        _set("healthCheck", {"intervalSeconds": 5}),
        ["healthCheck must set exactly one of http, tcp, grpc, udp or lease"],
    ),
    (
        "port-check-with-two-kinds",
        _set("ports", [{"name": "http", "port": 8080, "healthCheck": {"http": {}, "tcp": {}}}]),
        ["ports[].healthCheck must set exactly one of"],
    ),
    (
        "entry-check-on-a-port-with-its-own",
        _set("ports", [{"name": "http", "port": 8080, "healthCheck": {"tcp": {}}}, {"name": "m", "port": 9}]),
        ["healthCheck.http probes a port that has its own check in spec.ports"],
    ),
    (  # the example's http check names no port after this: it defaults to the first
        "entry-check-defaulting-to-a-port-with-its-own",
        _compose(
            _drop_check_port,
            _set(
                "ports",
                [{"name": "http", "port": 8080, "healthCheck": {"tcp": {}}}, {"name": "m", "port": 9}],
            ),
        ),
        ["healthCheck.http probes a port that has its own check in spec.ports"],
    ),
    (
        "entry-check-gating-no-port",
        _set("ports", [{"name": "http", "port": 8080, "healthCheck": {"tcp": {}}}]),
        ["healthCheck's check would gate no port"],
    ),
    (
        "tcp-check-on-a-udp-port",
        _set(
            "ports",
            [
                {"name": "http", "port": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP", "healthCheck": {"tcp": {}}},
            ],
        ),
        ["a UDP port's own check must be udp"],
    ),
    (
        "udp-check-on-a-tcp-port",
        _set("ports", [{"name": "http", "port": 8080}, {"name": "m", "port": 9, "healthCheck": {"udp": {"send": ""}}}]),
        ["a udp check belongs to a UDP port"],
    ),
    (
        "port-udp-check-without-payload",
        _set(
            "ports",
            [
                {"name": "http", "port": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP", "healthCheck": {"udp": {}}},
            ],
        ),
        ["udp must set exactly one of send, sendHex or dns"],
    ),
    (
        "udp-beside-http",
        _set("healthCheck.udp", {"send": "ping"}),
        ["healthCheck must set exactly one of http, tcp, grpc, udp or lease"],
    ),
    ("udp-sends-nothing", _udp({}), ["udp must set exactly one of send, sendHex or dns"]),
    (
        "udp-send-and-dns",
        _udp({"send": "x", "dns": {"name": "db.beacon.test"}}),
        ["udp must set exactly one of send, sendHex or dns"],
    ),
    ("udp-odd-hex", _udp({"sendHex": "abc"}), ["sendHex must be hex digits, two per byte"]),
    ("udp-not-hex", _udp({"sendHex": "zz"}), ["sendHex must be hex digits, two per byte"]),
    ("udp-hex-too-long", _udp({"sendHex": "00" * 1025}), ["spec.healthCheck.udp.sendHex", "2048"]),
    ("udp-text-too-long", _udp({"send": "x" * 1025}), ["spec.healthCheck.udp.send", "1024"]),
    (
        "udp-bad-prefix-hex",
        _udp({"send": "x", "expect": {"prefixHex": "0x00"}}),
        ["prefixHex must be hex digits, two per byte"],
    ),
    (
        "udp-prefix-and-regex",
        _udp({"send": "x", "expect": {"prefix": "OK", "regex": "^OK"}}),
        ["udp.expect must set at most one of prefix, prefixHex or regex"],
    ),
    ("udp-regex-too-long", _udp({"send": "x", "expect": {"regex": "a" * 257}}), ["udp.expect.regex", "256"]),
    (
        "udp-regex-invalid",
        _udp({"send": "x", "expect": {"regex": "(unclosed"}}),
        ["regex must be a valid RE2 regular expression"],
    ),
    (
        "udp-dns-with-expect",
        _udp({"dns": {"name": "db.beacon.test"}, "expect": {"prefix": "x"}}),
        ["udp.expect does not apply to udp.dns"],
    ),
    ("udp-dns-bad-name", _udp({"dns": {"name": "db beacon!"}}), ["dns.name must be a DNS name"]),
    ("udp-dns-long-label", _udp({"dns": {"name": "a" * 64 + ".test"}}), ["dns.name must be a DNS name"]),
    ("udp-dns-bad-type", _udp({"dns": {"name": "db.beacon.test", "type": "AXFR"}}), ['Unsupported value: "AXFR"']),
    (
        "udp-dns-bad-rcode",
        _udp({"dns": {"name": "db.beacon.test", "rcode": "BADVERS"}}),
        ['Unsupported value: "BADVERS"'],
    ),
    (
        "udp-unknown-port-name",
        _udp({"port": "dns", "send": "x"}),
        ['healthCheck.udp.port "dns" is not the name of an entry in spec.ports'],
    ),
    ("udp-port-out-of-range", _udp({"port": 0, "send": "x"}), ["port must be a number from 1 to 65535"]),
    ("udp-unknown-field", _udp({"send": "x", "hold": True}), ['unknown field "spec.healthCheck.udp.hold"']),
    (
        "neither-endpoints-nor-selector",
        _drop("endpoints"),
        ["at least one of spec.endpoints or spec.selector is required"],
    ),
    (
        "healthy-threshold-0",
        _set("healthCheck.healthyThreshold", 0),
        ["spec.healthCheck.healthyThreshold", "should be greater than or equal to 1"],
    ),
    (
        "unhealthy-threshold-0",
        _set("healthCheck.unhealthyThreshold", 0),
        ["spec.healthCheck.unhealthyThreshold", "should be greater than or equal to 1"],
    ),
    (
        "too-many-endpoints",
        _set("endpoints", _many_endpoints(1001)),
        ["spec.endpoints", "must have at most 1000 items"],
    ),
    (
        "duplicate-port-names",
        _set("ports", [{"name": "http", "port": 8080}, {"name": "http", "port": 8081}]),
        ["spec.ports[1]", "Duplicate value"],
    ),
    (
        "duplicate-port-numbers",
        _set("ports", [{"name": "http", "port": 8080}, {"name": "alt", "port": 8080}]),
        ["ports must not repeat the same port number and protocol"],
    ),
    (
        "duplicate-addresses",
        _set("endpoints", [{"address": "198.18.0.10"}, {"address": "198.18.0.10", "zone": "b"}]),
        ["spec.endpoints[1]", "Duplicate value"],
    ),
    (
        "timeout-equals-interval",
        _set("healthCheck.timeoutSeconds", 5),
        ["spec.healthCheck.timeoutSeconds", "healthCheck.timeoutSeconds must be less than healthCheck.intervalSeconds"],
    ),
    (
        "invalid-ipv4",
        _set("endpoints", [{"address": "198.18.0.300"}]),
        ['"198.18.0.300": address must be an IPv4 or IPv6 address in canonical form'],
    ),
    (
        "non-canonical-ipv6",
        _set("endpoints", [{"address": "2001:DB8:0::1"}]),
        ['"2001:DB8:0::1": address must be an IPv4 or IPv6 address in canonical form'],
    ),
    (
        "address-with-port",
        _set("endpoints", [{"address": "198.18.0.10:8080"}]),
        ['"198.18.0.10:8080": address must be an IPv4 or IPv6 address'],
    ),
    (
        "address-not-a-name",
        _set("endpoints", [{"address": "pay_ments!.example.com"}]),
        ["address must be an IPv4 or IPv6 address in canonical form", "or a lowercase DNS name"],
    ),
    (
        "unknown-health-check-port-name",
        _set("healthCheck.http.port", "metrics"),
        ['healthCheck.http.port "metrics" is not the name of an entry in spec.ports'],
    ),
    (
        "health-check-port-out-of-range",
        _set("healthCheck.http.port", 70000),
        ["port must be a number from 1 to 65535 or a port name"],
    ),
    (
        "unknown-endpoint-port-override",
        _set("endpoints", [{"address": "198.18.0.10", "ports": [{"name": "grpc", "port": 9000}]}]),
        ["every endpoints[].ports[].name must be the name of an entry in spec.ports"],
    ),
    ("relative-http-path", _set("healthCheck.http.path", "healthz"), ["path must start with '/'"]),
    ("no-ports", _set("ports", []), ["spec.ports", "should have at least 1 items"]),
    (
        "numeric-port-name",
        _set("ports", [{"name": "8080", "port": 8080}]),
        ["port names must contain at least one letter"],
    ),
    ("port-0", _set("ports", [{"name": "http", "port": 0}]), ["spec.ports[0].port", "greater than or equal to 1"]),
    ("bad-protocol", _set("ports", [{"name": "http", "port": 80, "protocol": "QUIC"}]), ['Unsupported value: "QUIC"']),
    (
        "reversed-status-range",
        _set("healthCheck.http.expectedStatuses", [{"min": 299, "max": 200}]),
        ["expectedStatuses[].max must not be less than min"],
    ),
    ("interval-too-long", _set("healthCheck.intervalSeconds", 3601), ["less than or equal to 3600"]),
    ("unknown-field", _set("healthCheck.http.follow", True), ['unknown field "spec.healthCheck.http.follow"']),
    (
        "bad-label-key",
        _set("endpoints", [{"address": "198.18.0.10", "labels": {"-bad": "x"}}]),
        ["label keys must be at most 63 characters"],
    ),
    (
        "bad-selector-key",
        _set("selector", {"matchLabels": {"app/name/x": "payments"}}),
        ["selector.matchLabels keys must be valid Kubernetes label keys"],
    ),
]


@pytest.mark.parametrize(
    ("change", "messages"),
    [pytest.param(change, messages, id=name) for name, change, messages in SERVICE_ENTRY_REJECTIONS],
)
def test_invalid_service_entry_is_rejected(
    cluster: Any, namespace: str, change: Callable[[Doc], None], messages: list[str]
) -> None:
    stderr = _rejected(cluster, namespace, _payments(change))
    for message in messages:
        assert message in stderr, stderr


def test_service_entry_name_must_be_a_service_name(cluster: Any, namespace: str) -> None:
    doc = _example("serviceentry-payments.yaml")
    doc["metadata"]["name"] = "pay.ments"
    assert "metadata.name must be a DNS-1035 label" in _rejected(cluster, namespace, doc)


def test_headless_is_immutable(cluster: Any, namespace: str) -> None:
    doc = _example("serviceentry-payments.yaml")
    _accepted(cluster, namespace, doc)
    doc["spec"]["headless"] = False
    stderr = _rejected(cluster, namespace, doc)
    assert "headless is immutable; delete and re-create the ServiceEntry to change it" in stderr
    doc["spec"]["endpoints"].pop()  # other fields stay editable
    doc["spec"]["headless"] = True
    _accepted(cluster, namespace, doc)


def test_status_is_strict(cluster: Any, namespace: str) -> None:
    _accepted(cluster, namespace, _example("serviceentry-payments.yaml"))
    too_long = [{"address": f"198.18.0.{i}", "state": "Healthy"} for i in range(17)]
    proc = _patch_status(cluster, namespace, "serviceentry/payments", {"endpoints": too_long}, check=False)
    assert proc.returncode != 0
    assert "must have at most 16 items" in proc.stderr, proc.stderr
    _patch_status(cluster, namespace, "serviceentry/payments", {"kopf": {"progress": {}}})
    assert "kopf" not in _get_json(cluster, namespace, "serviceentry/payments").get("status", {})  # pruned


# ---------------------------------------------------------------------------------------------------- ConfigEntry
def _config(change: Callable[[Doc], None]) -> Doc:
    doc = _example("configentry-payments.yaml")
    change(doc["spec"])
    return doc


CONFIG_ENTRY_REJECTIONS: list[tuple[str, Callable[[Doc], None], list[str]]] = [
    (
        "key-with-space",
        _set("data", {"db pool/size": "1"}),
        ["data keys must be '/'-separated segments of letters, digits, '-' and '_'"],
    ),
    ("key-with-dot", _set("data", {"db.pool.size": "1"}), ["data keys must be '/'-separated segments"]),
    ("key-leading-slash", _set("data", {"/db/pool": "1"}), ["data keys must be '/'-separated segments"]),
    ("key-empty-segment", _set("data", {"db//pool": "1"}), ["data keys must be '/'-separated segments"]),
    ("key-too-long", _set("data", {"k" * 254: "1"}), ["data keys must be '/'-separated segments"]),
    ("value-too-large", _set("data", {"blob": "x" * 65537}), ["spec.data.blob", "Too long"]),
    (
        "data-too-large-in-total",
        _set("data", {f"blob{i}": "x" * 60000 for i in range(4)}),
        ["data is too large: keys and values may total at most 196608 characters"],
    ),
    ("too-many-keys", _set("data", {f"k{i}": "" for i in range(513)}), ["spec.data", "must have at most 512 items"]),
    ("value-not-a-string", _set("data", {"db/pool/size": 10}), ["spec.data.db/pool/size", "must be of type string"]),
    ("bad-service", _set("service", "Payments"), ["spec.service", "should match"]),
    ("bad-target", _set("target", "payments_config"), ["spec.target", "should match"]),
    ("priority-too-high", _set("priority", 1001), ["spec.priority", "less than or equal to 1000"]),
    ("history-0", _set("revisionHistoryLimit", 0), ["spec.revisionHistoryLimit", "greater than or equal to 1"]),
    ("history-101", _set("revisionHistoryLimit", 101), ["spec.revisionHistoryLimit", "less than or equal to 100"]),
    ("rollback-to-0", _set("rollbackTo", 0), ["spec.rollbackTo", "greater than or equal to 1"]),
    ("no-data", _drop("data"), ["spec.data: Required value"]),
    ("unknown-field", _set("reload", True), ['unknown field "spec.reload"']),
    ("wave-size-0", _set("rollout", {"waveSize": 0}), ["spec.rollout.waveSize", "greater than or equal to 1"]),
    ("wave-size-101", _set("rollout", {"waveSize": 101}), ["spec.rollout.waveSize", "less than or equal to 100"]),
    (
        "rollout-timeout-0",
        _set("rollout", {"rolloutTimeoutSeconds": 0}),
        ["spec.rollout.rolloutTimeoutSeconds", "greater than or equal to 1"],
    ),
    (
        "rollout-timeout-over-a-day",
        _set("rollout", {"rolloutTimeoutSeconds": 86401}),
        ["spec.rollout.rolloutTimeoutSeconds", "less than or equal to 86400"],
    ),
    (
        "auto-rollback-not-a-boolean",
        _set("rollout", {"autoRollback": "yes"}),
        ["spec.rollout.autoRollback", "must be of type boolean"],
    ),
    ("canary-without-selector", _set("canary", {"holdSeconds": 5}), ["spec.canary.selector: Required value"]),
    (
        "canary-empty-selector",
        _set("canary", {"selector": {}}),
        ["canary.selector must set matchLabels or matchExpressions"],
    ),
    (
        "canary-selector-of-empty-lists",
        _set("canary", {"selector": {"matchLabels": {}, "matchExpressions": []}}),
        ["canary.selector must set matchLabels or matchExpressions"],
    ),
    (
        "canary-in-without-values",
        _set("canary", {"selector": {"matchExpressions": [{"key": "tier", "operator": "In"}]}}),
        ["canary.selector.matchExpressions with operator In or NotIn need values"],
    ),
    (
        "canary-notin-with-empty-values",
        _set("canary", {"selector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": []}]}}),
        ["canary.selector.matchExpressions with operator In or NotIn need values"],
    ),
    (
        "canary-exists-with-values",
        _set("canary", {"selector": {"matchExpressions": [{"key": "tier", "operator": "Exists", "values": ["a"]}]}}),
        ["canary.selector.matchExpressions with operator Exists or DoesNotExist must not have values"],
    ),
    (
        "canary-does-not-exist-with-values",
        _set(
            "canary",
            {"selector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist", "values": ["a"]}]}},
        ),
        ["canary.selector.matchExpressions with operator Exists or DoesNotExist must not have values"],
    ),
    (
        "canary-bad-operator",
        _set("canary", {"selector": {"matchExpressions": [{"key": "tier", "operator": "Gt", "values": ["1"]}]}}),
        ['Unsupported value: "Gt"'],
    ),
    (
        "canary-bad-label-key",
        _set("canary", {"selector": {"matchLabels": {"-tier": "canary"}}}),
        ["canary.selector.matchLabels keys must be valid Kubernetes label keys"],
    ),
    (
        "canary-bad-expression-key",
        _set("canary", {"selector": {"matchExpressions": [{"key": "a/b/c", "operator": "Exists"}]}}),
        ["spec.canary.selector.matchExpressions[0].key", "should match"],
    ),
    (
        "canary-bad-label-value",
        _set("canary", {"selector": {"matchLabels": {"tier": "can ary"}}}),
        ["spec.canary.selector.matchLabels.tier", "should match"],
    ),
    (
        "canary-negative-hold",
        _set("canary", {"selector": {"matchLabels": {"tier": "canary"}}, "holdSeconds": -1}),
        ["spec.canary.holdSeconds", "greater than or equal to 0"],
    ),
    (
        "canary-hold-over-a-day",
        _set("canary", {"selector": {"matchLabels": {"tier": "canary"}}, "holdSeconds": 86401}),
        ["spec.canary.holdSeconds", "less than or equal to 86400"],
    ),
    (
        "canary-bad-promotion",
        _set("canary", {"selector": {"matchLabels": {"tier": "canary"}}, "promotion": "auto"}),
        ['Unsupported value: "auto"'],
    ),
]


@pytest.mark.parametrize(
    ("change", "messages"),
    [pytest.param(change, messages, id=name) for name, change, messages in CONFIG_ENTRY_REJECTIONS],
)
def test_invalid_config_entry_is_rejected(
    cluster: Any, namespace: str, change: Callable[[Doc], None], messages: list[str]
) -> None:
    stderr = _rejected(cluster, namespace, _config(change))
    for message in messages:
        assert message in stderr, stderr


def test_config_entry_target_is_immutable_once_set(cluster: Any, namespace: str) -> None:
    doc = _example("configentry-payments.yaml")
    _accepted(cluster, namespace, doc)
    doc["spec"]["target"] = "other-config"
    assert "target is immutable once set" in _rejected(cluster, namespace, doc)
    del doc["spec"]["target"]
    assert "target is immutable once set" in _rejected(cluster, namespace, doc)
    doc["spec"]["target"] = "payments-config"
    doc["spec"]["data"]["db/pool/size"] = "30"  # the data itself stays editable
    _accepted(cluster, namespace, doc)

    unset = _example("configentry-defaults.yaml")
    _accepted(cluster, namespace, unset)
    unset["spec"]["target"] = "defaults-config"  # setting it later is fine; changing it afterwards is not
    _accepted(cluster, namespace, unset)
