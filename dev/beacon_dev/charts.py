"""The Helm chart and its monitoring files, as the tests see them: the cached chart tools, renders, metric names.

Why it exists: the chart (manifests/helm/beacon) is checked by unit tests (lint, renders, equality with the
kustomize tree, promtool) and by integration tests (server-side dry runs, RBAC, alerts evaluated on a real
operator's metrics). Both need the same things: helm and promtool from tools/chart/build.sh (built once per machine
and cached like the control-plane binaries), a render parsed into objects, the PromQL of the dashboard and the
alert rules, the metric names an expression reads (Prometheus' own parser, through promql-names) and the names a
/metrics page exports. They live here once instead of in each test module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from beacon_dev.devcluster.binaries import repo_root

TOOLS = ("helm", "promtool", "promql-names")
# Prometheus' own series that an expression may read besides the operator's: `up` of every scrape target
PROMETHEUS_SERIES = frozenset({"up"})
# What a dashboard query's Grafana variables stand for when it is parsed or evaluated outside Grafana
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$namespace": ".+", "$pod": ".+"}


# The value sets the tests render (tests/unit/test_helm_chart.py) and dry-run against the apiserver
# (tests/integration/test_helm_chart.py): every mode, the monitoring objects, and every option that becomes a flag.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "single": {"mode": "single"},
    "peering": {"mode": "peering", "replicas": 3},
    "sharded": {"mode": "sharded", "replicas": 4},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
        "networkPolicy": {
            "enabled": True,
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
    },
    "restricted": {
        "watchNamespaces": ["team-a", "team-b"],
        "allowProbeCIDRs": ["169.254.0.0/16", "fd00::/8"],
        "logFormat": "json",
        "metrics": {"port": 9100},
        "networkPolicy": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "image": {"repository": "registry.example.com/beacon", "tag": "1.2.3", "pullPolicy": "Always"},
    },
}


class ChartToolsMissingError(RuntimeError):
    """helm/promtool are not available."""


def _root() -> Path:
    root = repo_root()
    if root is None:
        raise ChartToolsMissingError("not running from a beacon checkout: the chart lives in manifests/helm/beacon")
    return root


def chart_dir() -> Path:
    return _root() / "manifests" / "helm" / "beacon"


def chart_tools_dir(*, build: bool = True) -> Path:
    """The directory of helm, promtool, promql-names and crds/: $BEACON_CHART_TOOLS_DIR, else what
    tools/chart/build.sh prints (it builds on a cold cache and answers at once on a warm one)."""
    env = os.environ.get("BEACON_CHART_TOOLS_DIR")
    if env:
        directory = Path(env)
    else:
        script = _root() / "tools" / "chart" / "build.sh"
        if not build:
            raise ChartToolsMissingError(f"chart tools not located; run `make chart-tools` ({script})")
        proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise ChartToolsMissingError(f"`bash {script}` failed with exit code {proc.returncode}; see its output")
        directory = Path(proc.stdout.strip().splitlines()[-1])
    missing = [name for name in TOOLS if not os.access(directory / name, os.X_OK)]
    if missing:
        raise ChartToolsMissingError(f"{directory} lacks {', '.join(missing)}; run `make chart-tools`")
    return directory


@dataclass(frozen=True)
class ChartTools:
    """The cached chart tools, run with a home of their own (helm writes no config or cache into the user's)."""

    directory: Path
    home: Path

    def run(
        self, tool: str, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        proc = subprocess.run(
            [str(self.directory / tool), *args], input=input, capture_output=True, text=True, env=env, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def template(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        release: str = "beacon",
        namespace: str = "beacon-system",
        include_crds: bool = False,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`helm template` of the chart with `values` (a values file of its own, so nothing is string-coerced)."""
        values_file = self.home / "values.yaml"
        values_file.parent.mkdir(parents=True, exist_ok=True)
        values_file.write_text(yaml.safe_dump(dict(values or {})))
        args = ["template", release, str(chart_dir()), "--namespace", namespace, "--values", str(values_file)]
        if include_crds:
            args.append("--include-crds")
        return self.run("helm", *args, check=check)

    def render(self, values: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        """The objects `helm template` renders, parsed."""
        return parse_docs(self.template(values, **kwargs).stdout)

    def promql_metric_names(self, exprs: Sequence[str]) -> list[dict[str, Any]]:
        """For each expression: {"expr", "metrics": the metric names it reads, "error": a parse error, if any}."""
        out = self.run("promql-names", input=json.dumps(list(exprs))).stdout
        results: list[dict[str, Any]] = json.loads(out)
        return results


def parse_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def dashboards() -> dict[str, dict[str, Any]]:
    """The chart's Grafana dashboards by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted((chart_dir() / "dashboards").glob("*.json"))}


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL query of a dashboard: its panels' targets and its query variables."""
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            exprs.append(match.group(1) if match else query)
    return exprs


def without_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def rules_file() -> Path:
    return chart_dir() / "rules" / "beacon.rules.yaml"


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of the chart's rule file."""
    groups = yaml.safe_load(rules_file().read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_metric_names(text: str) -> set[str]:
    """The series names a Prometheus text page exports: its samples' names, and the names every `# TYPE` line
    promises (a labelled metric that has not been used yet has a TYPE line but no sample)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
            elif kind == "counter":
                names |= {name, f"{name.removesuffix('_total')}_created"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>.*)\})? (?P<value>\S+)( \S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float
    kind: str  # the TYPE of its family: counter, gauge, histogram, ... ("untyped" when none)


def parse_samples(text: str) -> list[Sample]:
    """The samples of a Prometheus text page, each with the TYPE of its family."""
    kinds: dict[str, str] = {}
    samples: list[Sample] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            kinds[name] = kind
            continue
        match = _SAMPLE.match(line)
        if line.startswith("#") or match is None:
            continue
        name = match["name"]
        family = next(
            (f for f in (name, name.rsplit("_", 1)[0], name.removesuffix("_created") + "_total") if f in kinds),
            name,
        )
        labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
        samples.append(Sample(name, labels, float(match["value"]), kinds.get(family, "untyped")))
    return samples


def series_notation(name: str, labels: Iterable[tuple[str, str]]) -> str:
    """A series in PromQL notation, as promtool's input_series reads it."""
    inner = ", ".join(f"{key}={json.dumps(value)}" for key, value in labels)
    return f"{name}{{{inner}}}"
