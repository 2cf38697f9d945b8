"""The Helm chart without a cluster: it lints, renders every mode from the single sources, and its alerts work.

Why it exists: the chart (manifests/helm/beacon) is a second way to install what `make deploy` installs, and a
second copy is only safe if something proves it is the same. Here the CRDs and RBAC rules are shown to come from
their single sources (links, not copies), the default render to carry manifests/'s rules and flags, every value to
render a flag the operator's own parser accepts, bad values to be refused by the schema, and the alert rules and
dashboard to parse (Prometheus' parser), read only the operator's metrics and pass promtool's check and unit tests.
No kubectl and no cluster: the object-by-object comparison with `kubectl kustomize`, the server-side dry runs, the
chart ServiceAccount's rights and the alerts on a real operator's metrics are in
tests/integration/test_helm_chart.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import beacon.__main__ as cli
from beacon import metrics
from beacon_dev import charts

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "manifests" / "helm" / "beacon"
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}

VALUE_SETS = charts.VALUE_SETS


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> charts.ChartTools:
    return charts.ChartTools(charts.chart_tools_dir(), tmp_path_factory.mktemp("helm-home"))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


# ---------------------------------------------------------------------------------------------- lint and render


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_chart_lints_strictly_with_every_value_set(tools: charts.ChartTools, name: str) -> None:
    values = tools.home / f"lint-{name}.yaml"
    values.write_text(yaml.safe_dump(VALUE_SETS[name]))
    proc = tools.run("helm", "lint", "--strict", str(CHART), "--namespace", "beacon-system", "--values", str(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_value_set_renders_namespaced_objects_in_the_release_namespace(
    tools: charts.ChartTools, name: str
) -> None:
    docs = tools.render(VALUE_SETS[name])
    watched = set(VALUE_SETS[name].get("watchNamespaces", []))
    for doc in docs:
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], doc["metadata"]
        elif doc["metadata"]["namespace"] != "beacon-system":
            # only the per-namespace peering objects go elsewhere
            assert doc["kind"] in {"KopfPeering", "Role", "RoleBinding"}, doc["metadata"]
            assert doc["metadata"]["namespace"] in watched
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "beacon"


def test_rendered_yaml_passes_yamllint(tools: charts.ChartTools, tmp_path: Path) -> None:
    """The templates are not YAML (yamllint skips them); what they render is, in the project's style (long lines
    aside: the dashboard's JSON and the rules' expressions are kept as they are)."""
    for name, values in VALUE_SETS.items():
        (tmp_path / f"{name}.yaml").write_text(tools.template(values).stdout)
    config = (
        "{extends: default, rules: {line-length: disable, document-start: disable, comments: disable, "
        "indentation: {indent-sequences: whatever}}}"  # toYaml writes a list at its key's indentation
    )
    # the dev dependency puts it beside the interpreter (the venv's bin/, not necessarily on PATH)
    yamllint = shutil.which("yamllint", path=str(Path(sys.executable).parent)) or shutil.which("yamllint")
    if yamllint is None:
        pytest.skip("yamllint is not installed")
    proc = subprocess.run([yamllint, "-s", "-d", config, str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------------------------------- = manifests/


def test_the_default_render_has_the_rules_and_args_of_manifests(tools: charts.ChartTools) -> None:
    """The parts that decide what runs, against the kustomize tree's files (tests/integration/test_helm_chart.py
    compares every object with `kubectl kustomize manifests/default`)."""
    chart = tools.render()
    role = yaml.safe_load((REPO / "manifests" / "rbac" / "role.yaml").read_text())
    manager = yaml.safe_load((REPO / "manifests" / "manager" / "manager.yaml").read_text())
    assert one(chart, "ClusterRole")["rules"] == role["rules"]
    assert one(chart, "ClusterRole")["metadata"]["name"] == role["metadata"]["name"] == "beacon-operator"
    (shipped,) = manager["spec"]["template"]["spec"]["containers"]
    assert container(chart)["args"] == shipped["args"] == ["--peering"]
    assert one(chart, "Deployment")["spec"]["replicas"] == manager["spec"]["replicas"] == 2
    assert one(chart, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "beacon-operator", "namespace": "beacon-system"}
    ]
    assert one(chart, "ClusterKopfPeering")["metadata"]["name"] == "beacon"


def test_the_crds_are_the_repositorys_through_links(tools: charts.ChartTools) -> None:
    """One source: the chart's crds/ (and files/rbac/) are symbolic links to the files kustomize reads, every CRD
    that `make deploy` installs is linked, and helm renders exactly their objects."""
    links = {p.name: p for p in (CHART / "crds").iterdir()}
    assert all(p.is_symlink() for p in links.values())
    resources = yaml.safe_load((REPO / "crds" / "kustomization.yaml").read_text())["resources"]
    crd_sources = [REPO / "crds" / name for name in resources] + [REPO / "manifests" / "crd" / "kopf.dev_peerings.yaml"]
    assert {p.resolve() for p in links.values()} == {p.resolve() for p in crd_sources}
    for name in ("role.yaml", "shard_role.yaml"):
        link = CHART / "files" / "rbac" / name
        assert link.is_symlink()
        assert link.resolve().is_relative_to(REPO / "manifests")
    chart_crds = [d for d in tools.render(include_crds=True) if d["kind"] == "CustomResourceDefinition"]
    sources = [doc for path in crd_sources for doc in charts.parse_docs(path.read_text())]
    assert sorted(chart_crds, key=lambda d: d["metadata"]["name"]) == sorted(
        sources, key=lambda d: d["metadata"]["name"]
    )


def test_the_packaged_chart_carries_copies_of_the_linked_files(tools: charts.ChartTools, tmp_path: Path) -> None:
    """`helm package` follows the links: a chart archive is whole without the repository (and leaves out the
    promtool tests)."""
    tools.run("helm", "package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("beacon-*.tgz")
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert all(m.isfile() or m.isdir() for m in members.values()), "no links inside the archive"
        for name in ("beacon.dev_serviceentries.yaml", "beacon.dev_configentries.yaml", "kopf.dev_peerings.yaml"):
            member = tar.extractfile(members[f"beacon/crds/{name}"])
            assert member is not None
            assert member.read() == (CHART / "crds" / name).read_bytes()
    assert "beacon/rules/beacon.rules.yaml" in members
    assert "beacon/rules/beacon.rules.test.yaml" not in members


# ---------------------------------------------------------------------------------------------- values


def operator_args(args: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """`args` parsed by the operator's own command line (beacon.__main__), which exits on any it does not know."""
    seen: list[argparse.Namespace] = []

    def capture(parsed: argparse.Namespace) -> int:
        seen.append(parsed)
        return 0

    monkeypatch.setattr(cli, "cmd_operator", capture)
    assert cli.main(["operator", *args]) == 0
    return seen[0]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_flag_is_one_the_operator_accepts(
    tools: charts.ChartTools, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    operator_args(container(tools.render(VALUE_SETS[name]))["args"], monkeypatch)


def test_values_become_the_operators_flags(tools: charts.ChartTools, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = tools.render(VALUE_SETS["restricted"])
    c = container(docs)
    assert c["args"] == [
        "--peering",
        "--namespace=team-a",
        "--namespace=team-b",
        "--allow-probe-cidr=169.254.0.0/16",
        "--allow-probe-cidr=fd00::/8",
        "--log-format=json",
        "--metrics-port=9100",
    ]
    assert c["image"] == "registry.example.com/beacon:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9100, "healthz": 8081}
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9100
    assert not [d for d in docs if d["kind"] in {"NetworkPolicy", "PodDisruptionBudget", "ClusterKopfPeering"}]
    # a namespace-restricted peering operator meets its peers in a KopfPeering of each watched namespace
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert sorted(d["metadata"]["namespace"] for d in peerings) == ["team-a", "team-b"]
    assert {d["metadata"]["name"] for d in peerings} == {"beacon"}
    for ns in ("team-a", "team-b"):
        role = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == ns]
        assert role[0]["rules"] == [
            {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["list", "watch", "patch"]}
        ]
    parsed = operator_args(c["args"], monkeypatch)
    assert parsed.namespace == ["team-a", "team-b"]
    assert parsed.allow_probe_cidr == ["169.254.0.0/16", "fd00::/8"]
    assert parsed.metrics_port == 9100
    assert parsed.peering is True
    assert parsed.log_format == "json"


@pytest.mark.parametrize(
    ("mode", "replicas", "args"),
    [("single", 1, []), ("peering", 2, ["--peering"]), ("sharded", 3, ["--shard"])],
)
def test_each_mode_has_its_flags_and_default_replicas(
    tools: charts.ChartTools, mode: str, replicas: int, args: list[str]
) -> None:
    docs = tools.render({"mode": mode})
    assert one(docs, "Deployment")["spec"]["replicas"] == replicas
    assert container(docs)["args"] == args
    env = {e["name"] for e in container(docs)["env"]}
    assert ({"POD_NAME", "POD_NAMESPACE"} <= env) == (mode == "sharded")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert (("ClusterKopfPeering", "beacon") in kinds) == (mode == "peering")
    assert (("Role", "beacon-shard-leases") in kinds) == (mode == "sharded")


def test_another_release_name_keeps_its_objects_and_its_group_apart(tools: charts.ChartTools) -> None:
    peering = tools.render({}, release="edge")
    assert {d["metadata"]["name"] for d in peering if d["kind"] != "ClusterKopfPeering"} >= {"edge-beacon-operator"}
    assert one(peering, "ClusterKopfPeering")["metadata"]["name"] == "edge"
    assert container(peering)["args"] == ["--peering", "--peering-name=edge"]
    sharded = tools.render({"mode": "sharded"}, release="beacon-eu")
    assert container(sharded)["args"] == ["--shard", "--shard-group=beacon-eu"]
    assert one(sharded, "Role")["metadata"]["name"] == "beacon-eu-shard-leases"
    assert one(sharded, "Deployment")["metadata"]["name"] == "beacon-eu-operator"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "active-active"}, "mode"),
        ({"mode": "single", "replicas": 2}, "mode=single runs one replica"),
        ({"logFormat": "xml"}, "logFormat"),
        ({"allowProbeCIDRs": ["10.0.0.0/33"]}, "allowProbeCIDRs"),
        ({"allowProbeCIDRs": ["metadata"]}, "allowProbeCIDRs"),
        ({"watchNamespaces": ["team-*"]}, "watchNamespaces"),
        ({"extraArgs": ["verbose"]}, "extraArgs"),
        ({"image": {"repository": "beacon", "tag": "", "pullPolicy": "IfNotPresent"}}, "tag"),
        ({"replicaCount": 2}, "replicaCount"),
    ],
)
def test_bad_values_are_refused_before_anything_renders(
    tools: charts.ChartTools, values: dict[str, Any], message: str
) -> None:
    proc = tools.template(values, check=False)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr


def test_replicas_zero_is_allowed_to_pause_the_operator(tools: charts.ChartTools) -> None:
    assert one(tools.render({"replicas": 0}), "Deployment")["spec"]["replicas"] == 0


# ---------------------------------------------------------------------------------------------- monitoring


def test_monitoring_objects_render_from_the_monitoring_files(tools: charts.ChartTools) -> None:
    docs = tools.render(VALUE_SETS["monitoring"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    service = one(docs, "Service")
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "beacon", "the job label the rules select"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service["spec"]["ports"][0]["name"]]
    rule = one(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(charts.rules_file().read_text())["groups"]
    dashboards = one(docs, "ConfigMap")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {k: json.loads(v) for k, v in dashboards["data"].items()} == charts.dashboards()
    policy = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert policy == [
        {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": VALUE_SETS["monitoring"]["networkPolicy"]["from"]}
    ]
    assert not [d for d in tools.render() if d["kind"] in {"ServiceMonitor", "PrometheusRule", "ConfigMap"}]


def registry_names() -> set[str]:
    from prometheus_client import generate_latest

    return charts.exported_metric_names(generate_latest(metrics.REGISTRY).decode())


def all_queries() -> Iterator[tuple[str, str]]:
    for file, dashboard in charts.dashboards().items():
        for expr in charts.dashboard_queries(dashboard):
            yield file, charts.without_grafana_variables(expr)
    for rule in charts.alert_rules():
        yield rule["alert"], rule["expr"]


def test_every_query_parses_and_reads_only_metrics_of_the_operators_registry(tools: charts.ChartTools) -> None:
    """Parsed by Prometheus' own parser (promql-names); the names are compared with beacon.metrics' registry here,
    and with a running operator's /metrics in tests/integration/test_helm_chart.py."""
    queries = list(all_queries())
    results = tools.promql_metric_names([expr for _, expr in queries])
    known = registry_names() | charts.PROMETHEUS_SERIES
    errors = [(where, r["expr"], r["error"]) for (where, _), r in zip(queries, results, strict=True) if r.get("error")]
    assert errors == []
    unknown = [
        (where, r["metrics"]) for (where, _), r in zip(queries, results, strict=True) if not set(r["metrics"]) <= known
    ]
    assert unknown == []
    read = {name for r in results for name in r["metrics"]}
    # the dashboard shows what the issue asks for
    assert {
        "beacon_probes_total",
        "beacon_probe_duration_seconds_bucket",
        "beacon_probe_lateness_seconds_bucket",
        "beacon_health_transitions_total",
        "beacon_api_writes_total",
        "beacon_reconciles_total",
        "beacon_probe_queue_depth",
        "beacon_config_revisions_total",
        "beacon_config_reloads_total",
    } <= read


def test_the_dashboard_is_importable(tools: charts.ChartTools) -> None:
    (dashboard,) = charts.dashboards().values()
    assert dashboard["uid"] == "beacon-operator"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "pod"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]


def test_the_alert_rules_pass_promtool_check(tools: charts.ChartTools) -> None:
    proc = tools.run("promtool", "check", "rules", str(charts.rules_file()))
    assert "SUCCESS: 9 rules found" in proc.stdout + proc.stderr
    names = {rule["alert"] for rule in charts.alert_rules()}
    assert names >= {
        "BeaconOperatorDown",
        "BeaconProbeLagHigh",
        "BeaconEndpointsFlapping",
        "BeaconReconcileErrors",
        "BeaconConfigReloadDeferred",
        "BeaconConfigRolloutFailed",
        "BeaconSelfPreservationStuck",
        "BeaconEntryInPanic",
    }


def test_every_alert_fires_on_crafted_series_and_not_on_healthy_ones(tools: charts.ChartTools) -> None:
    """rules/beacon.rules.test.yaml: promtool unit tests, each alert against a failure and a healthy neighbour."""
    tests = yaml.safe_load((CHART / "rules" / "beacon.rules.test.yaml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])}
    fired = {
        case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    assert tested == fired == {rule["alert"] for rule in charts.alert_rules()}
    proc = subprocess.run(
        [str(tools.directory / "promtool"), "test", "rules", "beacon.rules.test.yaml"],
        cwd=CHART / "rules",
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_a_broken_rule_fails_the_promtool_tests(tools: charts.ChartTools, tmp_path: Path) -> None:
    """The unit tests can fail: with the reconcile-error threshold raised, the alert they expect does not fire."""
    rules = yaml.safe_load(charts.rules_file().read_text())
    broken = copy.deepcopy(rules)
    for rule in broken["groups"][0]["rules"]:
        if rule["alert"] == "BeaconReconcileErrors":
            rule["expr"] = rule["expr"].replace("> 0", "> 1000")
    (tmp_path / "beacon.rules.yaml").write_text(yaml.safe_dump(broken))
    (tmp_path / "t.yaml").write_text((CHART / "rules" / "beacon.rules.test.yaml").read_text())
    proc = subprocess.run(
        [str(tools.directory / "promtool"), "test", "rules", "t.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "BeaconReconcileErrors" in proc.stdout + proc.stderr
