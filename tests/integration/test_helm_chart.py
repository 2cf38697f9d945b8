"""The Helm chart against kustomize and the real apiserver, its dashboard and alerts against a real operator.

Why it exists: a chart that renders is not yet a chart that installs what `make deploy` installs. Here the default
render is compared with `kubectl kustomize manifests/default` object by object (and mode=sharded with
manifests/sharded); every value set is dry-run server-side (with the Prometheus Operator's real ServiceMonitor and
PrometheusRule CRDs, generated from its Go API types by tools/chart/build.sh, so those two objects are validated by
their schema too); the chart's ServiceAccount gets a token and passes the same RBAC checks as the kustomize one
(tests/integration/test_manifests.py), with exactly the same rights; and the dashboard's queries and the alert
rules are checked against what a running operator really exports, the alerts evaluated by promtool on series
scraped from it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from beacon_dev import charts
from beacon_dev.devcluster import DevCluster
from beacon_dev.devcluster.binaries import find_bin_dir
from beacon_dev.testhosts import TestNetwork
from beacon_dev.testing import (
    IDENTITY_KINDS,
    OPERATOR_NAMESPACE,
    OperatorProcess,
    apply,
    eventually,
    get_json,
    http_service_entry,
)

pytestmark = pytest.mark.integration

MONITORING_CRDS = ("servicemonitors", "prometheusrules")
MANIFESTS = "test_manifests.py"
# labels that say who rendered an object, not what it is: kustomize's and helm's own, and the release's
BOOKKEEPING_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}
RELEASE = "beacon-chart"  # names of its own (beacon-chart-operator), beside the session's kustomize objects


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> charts.ChartTools:
    return charts.ChartTools(charts.chart_tools_dir(), tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def manifests_tests(repo: Path) -> ModuleType:
    """test_manifests.py, for its lists of what the operator's ServiceAccount must and must not be allowed."""
    spec = importlib.util.spec_from_file_location("beacon_manifest_checks", repo / "tests" / "integration" / MANIFESTS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monitoring_crds(cluster: DevCluster, tools: charts.ChartTools) -> Iterator[None]:
    """The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs, as controller-gen generates them from its
    API types: the apiserver then validates the chart's two monitoring objects by their real schema."""
    files = [tools.directory / "crds" / f"monitoring.coreos.com_{plural}.yaml" for plural in MONITORING_CRDS]
    args = [arg for f in files for arg in ("-f", str(f))]
    cluster.kubectl("apply", "--server-side", *args)
    names = [f"crd/{plural}.monitoring.coreos.com" for plural in MONITORING_CRDS]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    yield
    cluster.kubectl("delete", "--ignore-not-found", "--wait=false", *names, check=False)


@pytest.fixture
def two_namespaces(cluster: DevCluster, namespace: str) -> Iterator[list[str]]:
    other = f"{namespace}-b"
    cluster.kubectl("create", "namespace", other)
    yield [namespace, other]
    cluster.kubectl("delete", "namespace", other, "--wait=false", "--ignore-not-found", check=False)


def values_for(name: str, watched: list[str]) -> dict[str, Any]:
    values = dict(charts.VALUE_SETS[name])
    if "watchNamespaces" in values:
        values["watchNamespaces"] = watched
    return values


def dry_run(cluster: DevCluster, manifest: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=helm-chart-test",
        "--dry-run=server",
        "-f",
        "-",
        input=manifest,
        check=False,
    )


# ---------------------------------------------------------------------------------------------- = kustomize


def kustomize(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize manifests/<overlay>`, with the pinned kubectl (the chart must equal what `make deploy`
    applies, and that is what builds it)."""
    kubectl = find_bin_dir() / "kubectl"
    overlay_dir = Path(__file__).resolve().parents[2] / "manifests" / overlay
    out = subprocess.run([str(kubectl), "kustomize", str(overlay_dir)], capture_output=True, text=True, check=True)
    return charts.parse_docs(out.stdout)


def normalised(obj: Any) -> Any:
    """`obj` without the bookkeeping labels (wherever a map of labels is: metadata, selectors, pod templates)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            plain = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            if key in ("labels", "matchLabels") or (key == "selector" and plain):  # a Service's selector
                assert isinstance(value, dict)
                value = {k: v for k, v in value.items() if k not in BOOKKEEPING_LABELS}
                if not value and key == "labels":
                    continue
            out[key] = normalised(value)
        return out
    if isinstance(obj, list):
        return [normalised(item) for item in obj]
    return obj


def by_key(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_the_default_render_is_manifests_default(tools: charts.ChartTools) -> None:
    """Object by object, every field (kinds, names, RBAC rules, args, probes, security, resources...), apart from
    the labels that say who rendered it. The Namespace is the one difference: `helm install` owns its release
    namespace, so the chart renders it only with namespace.create."""
    chart = by_key(tools.render(include_crds=True))
    built = by_key(kustomize("default"))
    namespace = built.pop(("Namespace", "beacon-system"))
    assert sorted(chart) == sorted(built)
    for key, obj in built.items():
        assert normalised(chart[key]) == normalised(obj), key
    with_namespace = by_key(tools.render({"namespace": {"create": True}}))
    assert normalised(with_namespace[("Namespace", "beacon-system")]) == normalised(namespace)


def test_mode_sharded_renders_manifests_sharded(tools: charts.ChartTools) -> None:
    """The overlay keeps the base's ClusterKopfPeering, which a sharded operator never reads; the chart leaves it
    out. Everything else is the same (replicas: the mode's default, the overlay's 3)."""
    chart = by_key(tools.render({"mode": "sharded"}, include_crds=True))
    built = by_key(kustomize("sharded"))
    built.pop(("Namespace", "beacon-system"))
    built.pop(("ClusterKopfPeering", "beacon"))
    assert sorted(chart) == sorted(built)
    for key, obj in built.items():
        assert normalised(chart[key]) == normalised(obj), key


# ---------------------------------------------------------------------------------------------- the apiserver


@pytest.mark.parametrize("release", ["beacon", RELEASE])
@pytest.mark.parametrize("name", sorted(charts.VALUE_SETS))
def test_the_server_accepts_every_value_set(
    cluster: DevCluster,
    operator_kubeconfig: Path,
    monitoring_crds: None,
    tools: charts.ChartTools,
    two_namespaces: list[str],
    name: str,
    release: str,
) -> None:
    """Everything the chart renders, CRDs included, dry-run server-side: schema, admission and the "restricted" Pod
    Security Standard that beacon-system enforces (`operator_kubeconfig`: the namespace and kopf's CRDs exist).
    Release "beacon" meets the session's objects of the same names (an update); the other release creates."""
    manifest = tools.template(values_for(name, two_namespaces), release=release, include_crds=True).stdout
    proc = dry_run(cluster, manifest)
    assert proc.returncode == 0, proc.stderr
    assert "PodSecurity" not in proc.stderr, proc.stderr
    kinds = {doc["kind"] for doc in charts.parse_docs(manifest)}
    applied = proc.stdout
    assert "deployment.apps/" in applied
    if name == "monitoring":
        assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds
        assert "servicemonitor.monitoring.coreos.com/" in applied
        assert "prometheusrule.monitoring.coreos.com/" in applied


def test_the_servicemonitor_schema_is_enforced(
    cluster: DevCluster, operator_kubeconfig: Path, monitoring_crds: None, tools: charts.ChartTools
) -> None:
    """The generated CRDs validate for real: a ServiceMonitor with a misspelt field is refused by the server."""
    monitor = next(d for d in tools.render(charts.VALUE_SETS["monitoring"]) if d["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "every minute"
    proc = dry_run(cluster, yaml.safe_dump(monitor))
    assert proc.returncode != 0
    assert "interval" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- RBAC


def install(cluster: DevCluster, docs: list[dict[str, Any]]) -> None:
    manifest = yaml.safe_dump_all(docs)
    cluster.kubectl("apply", "--server-side", "--field-manager=helm-chart-test", "-f", "-", input=manifest)


def can_i(cluster: DevCluster, kubeconfig: Path, *args: str) -> str:
    proc = subprocess.run(
        [cluster.kubectl_path, f"--kubeconfig={kubeconfig}", "auth", "can-i", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout.strip()


def rights(cluster: DevCluster, kubeconfig: Path, namespace: str) -> set[str]:
    """`kubectl auth can-i --list` of a token in `namespace`: every rule that applies to it there, one a line."""
    return {" ".join(line.split()) for line in can_i(cluster, kubeconfig, "--list", "-n", namespace).splitlines()}


@pytest.fixture(scope="module")
def chart_identity(cluster: DevCluster, operator_kubeconfig: Path, tools: charts.ChartTools) -> Iterator[Path]:
    """The chart's ServiceAccount, ClusterRole and ClusterRoleBinding (release beacon-chart) installed for real,
    and a kubeconfig with a token of that ServiceAccount and nothing else."""
    sa = f"{RELEASE}-operator"
    docs = [d for d in tools.render(release=RELEASE) if d["kind"] in IDENTITY_KINDS - {"ClusterKopfPeering"}]
    install(cluster, docs)
    token = cluster.kubectl("create", "token", sa, "-n", OPERATOR_NAMESPACE, "--duration=1h").stdout.strip()
    path = cluster.workdir / f"{sa}-token.kubeconfig"
    cluster.write_kubeconfig(path, user=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{sa}", token=token)
    eventually(
        lambda: can_i(cluster, path, "watch", "serviceentries.beacon.dev", "-A") == "yes",
        timeout=30,
        what="the chart's ClusterRole in force",
    )
    yield path
    selector = f"app.kubernetes.io/instance={RELEASE}"
    for kinds, scope in (("clusterrolebinding,clusterrole", ()), ("rolebinding,role,serviceaccount", ("-A",))):
        cluster.kubectl("delete", kinds, "-l", selector, *scope, "--ignore-not-found", check=False)


def test_the_chart_token_can_do_what_the_operator_needs_and_nothing_else(
    cluster: DevCluster, chart_identity: Path, manifests_tests: ModuleType
) -> None:
    """test_manifests.py's lists, asked with the chart's token instead of the kustomize one."""
    needed = manifests_tests.NEEDED
    forbidden = manifests_tests.FORBIDDEN
    can = manifests_tests._can
    assert [(v, r, s) for v, r, s in needed if not can(cluster, chart_identity, v, r, s, "some-namespace")] == []
    assert [(v, r, s) for v, r, s in forbidden if can(cluster, chart_identity, v, r, s, "kube-system")] == []


def test_the_chart_token_has_exactly_the_kustomize_tokens_rights(
    cluster: DevCluster, chart_identity: Path, operator_kubeconfig: Path
) -> None:
    """Not a sample: every rule `kubectl auth can-i --list` shows, for the chart's ServiceAccount and for the one
    manifests/default ships (which the whole suite runs the operator with), is the same."""
    for namespace in ("chart-rbac-elsewhere", "kube-system"):
        assert rights(cluster, chart_identity, namespace) == rights(cluster, operator_kubeconfig, namespace)


@pytest.mark.parametrize("mode", ["sharded", "restricted"])
def test_the_modes_add_only_their_own_namespaced_rights(
    cluster: DevCluster,
    chart_identity: Path,
    tools: charts.ChartTools,
    two_namespaces: list[str],
    mode: str,
) -> None:
    """sharded: the group's Leases, in the release namespace only. Peering restricted to namespaces: the
    KopfPeering of each watched namespace, and no other."""
    values = {"mode": "sharded"} if mode == "sharded" else values_for("restricted", two_namespaces[:1])
    docs = [d for d in tools.render(values, release=RELEASE) if d["kind"] in {"Role", "RoleBinding"}]
    assert docs
    install(cluster, docs)
    try:
        if mode == "sharded":
            check = ("create", "leases.coordination.k8s.io")
            inside, outside = OPERATOR_NAMESPACE, two_namespaces[0]
        else:
            check = ("patch", "kopfpeerings.kopf.dev")
            inside, outside = two_namespaces
        eventually(lambda: can_i(cluster, chart_identity, *check, "-n", inside) == "yes", timeout=30, what="role")
        assert can_i(cluster, chart_identity, *check, "-n", outside) == "no"
    finally:
        for doc in docs:
            meta = doc["metadata"]
            cluster.kubectl("delete", doc["kind"].lower(), meta["name"], "-n", meta["namespace"], check=False)


# ---------------------------------------------------------------------------------------------- dashboards, alerts


def test_every_query_reads_only_metrics_the_running_operator_exports(
    operator_running: OperatorProcess, tools: charts.ChartTools
) -> None:
    """The dashboard's queries and the alert expressions, parsed by Prometheus' parser, name only series that a
    real operator's /metrics has (a labelled metric not used yet still has its TYPE line) or Prometheus' `up`."""
    exported = charts.exported_metric_names(operator_running.metrics())
    assert "beacon_probes_total" in exported
    queries = [
        charts.without_grafana_variables(expr)
        for dashboard in charts.dashboards().values()
        for expr in charts.dashboard_queries(dashboard)
    ] + [rule["expr"] for rule in charts.alert_rules()]
    results = tools.promql_metric_names(queries)
    assert [r for r in results if r.get("error")] == []
    unknown = {name for r in results for name in r["metrics"]} - exported - charts.PROMETHEUS_SERIES
    assert unknown == set()


def scraped_series(first: str, second: str, seconds: float, labels: dict[str, str]) -> list[dict[str, str]]:
    """promtool input series from two scrapes `seconds` apart, one sample a minute for an hour: counters (and
    histogram buckets, sums and counts) grow at the rate measured between the scrapes, gauges alternate between
    the two readings.
    Every series gets the labels a ServiceMonitor scrape adds (`labels`)."""
    before = {(s.name, s.labels): s.value for s in charts.parse_samples(first)}
    series = []
    for sample in charts.parse_samples(second):
        name = charts.series_notation(sample.name, sorted({**dict(sample.labels), **labels}.items()))
        growing = sample.kind in {"counter", "histogram", "summary"} and not sample.name.endswith("_created")
        start = before.get((sample.name, sample.labels), sample.value)
        if growing:
            per_minute = max(sample.value - start, 0.0) / seconds * 60
            values = f"{start!r}+{per_minute!r}x60"
        else:  # both readings, in turn (a gauge such as the queue depth is a snapshot)
            values = " ".join(repr(start if minute % 2 == 0 else sample.value) for minute in range(61))
        series.append({"series": name, "values": values})
    return series


def test_alerts_evaluate_on_series_scraped_from_the_running_operator(
    cluster: DevCluster,
    namespace: str,
    net: TestNetwork,
    operator_running: OperatorProcess,
    tools: charts.ChartTools,
    tmp_path: Path,
) -> None:
    """An operator probing a healthy and a dead endpoint (real probes, lateness, a transition, writes) is scraped
    twice; promtool evaluates every alert rule on those series (none fires: the operator is healthy) and the
    quantities they compare (probe rate, p99 lateness) come out real. The same series with every replica down, or
    with failing reconciles added, fire BeaconOperatorDown and BeaconReconcileErrors."""
    good, dead = net.add_hosts(2)
    good.http(port=8080, path="/healthz")
    apply(cluster, http_service_entry("chart", namespace, [good.address, dead.address], interval=2, threshold=1))
    eventually(
        lambda: (
            get_json(cluster, "serviceentry", "chart", "-n", namespace).get("status", {}).get("readySummary") == "1/2"
        ),
        timeout=30,
        what="READY 1/2",
    )
    first, t0 = operator_running.metrics(), time.monotonic()
    time.sleep(5)
    second, t1 = operator_running.metrics(), time.monotonic()

    target = {
        "job": "beacon",
        "namespace": OPERATOR_NAMESPACE,
        "pod": "beacon-operator-0",
        "instance": f"127.0.0.1:{operator_running.metrics_port}",
    }
    series = scraped_series(first, second, t1 - t0, target)
    assert any(s["series"].startswith("beacon_probes_total{") and "+0.0x" not in s["values"] for s in series)
    up = {"series": charts.series_notation("up", sorted(target.items())), "values": "1x60"}
    down = {"series": up["series"], "values": "0x60"}
    failing = {
        "series": charts.series_notation(
            "beacon_reconciles_total", sorted({**target, "kind": "ServiceEntry", "outcome": "error"}.items())
        ),
        "values": "0+6x60",
    }
    alerts = [rule["alert"] for rule in charts.alert_rules()]
    down_annotations = next(r for r in charts.alert_rules() if r["alert"] == "BeaconOperatorDown")["annotations"]
    silent = [{"eval_time": "59m", "alertname": name, "exp_alerts": []} for name in alerts]
    facts = [
        # the probe rate the dashboard shows, and the p99 lateness BeaconProbeLagHigh compares with 1 s
        'sum(rate(beacon_probes_total{job="beacon"}[5m])) > bool 0',
        'histogram_quantile(0.99, sum by (le) (rate(beacon_probe_lateness_seconds_bucket{job="beacon"}[5m]))) < bool 1',
        'count(beacon_probe_targets{job="beacon"} >= 2)',  # this test's two endpoints, at least
    ]
    tests = {
        "rule_files": [str(charts.rules_file())],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "healthy, as scraped",
                "interval": "1m",
                "input_series": [*series, up],
                "alert_rule_test": silent,
                "promql_expr_test": [
                    {"expr": expr, "eval_time": "59m", "exp_samples": [{"labels": "{}", "value": 1}]} for expr in facts
                ],
            },
            {
                "name": "as scraped, but no replica up",
                "interval": "1m",
                "input_series": [*series, down],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "BeaconOperatorDown",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}, "exp_annotations": down_annotations}],
                    }
                ],
            },
            {
                "name": "as scraped, plus failing reconciles",
                "interval": "1m",
                "input_series": [*series, up, failing],
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "BeaconReconcileErrors",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": OPERATOR_NAMESPACE,
                                    "pod": "beacon-operator-0",
                                    "kind": "ServiceEntry",
                                },
                                "exp_annotations": {
                                    "summary": "beacon ServiceEntry reconciles fail",
                                    "description": "beacon-operator-0 has failed ServiceEntry reconciles for 10 "
                                    "minutes (100m per second); its log says why.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "30m", "alertname": "BeaconOperatorDown", "exp_alerts": []},
                ],
            },
        ],
    }
    (tmp_path / "scraped.test.yaml").write_text(yaml.safe_dump(tests, width=1000))
    proc = tools.run("promtool", "test", "rules", str(tmp_path / "scraped.test.yaml"), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
