"""The CRDs are the API: check their shape without a cluster.

Why it exists: an unbounded string or list makes the apiserver's CEL cost estimate explode (or lets one object
carry megabytes into every watch event), a preserved-unknown field silently keeps typos, and a missing printer
column or category breaks the `kubectl get` UX promised in DESIGN.md. These are all properties of the YAML alone,
so they are checked here, fast; tests/integration/test_crds.py checks that a real apiserver agrees.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
EXAMPLES = REPO / "examples"

Schema = dict[str, Any]


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


SERVICE_ENTRY: dict[str, Any] = _load(CRDS / "beacon.dev_serviceentries.yaml")
CONFIG_ENTRY: dict[str, Any] = _load(CRDS / "beacon.dev_configentries.yaml")
BY_KIND = {"ServiceEntry": SERVICE_ENTRY, "ConfigEntry": CONFIG_ENTRY}
ALL = pytest.mark.parametrize("crd", [SERVICE_ENTRY, CONFIG_ENTRY], ids=["ServiceEntry", "ConfigEntry"])


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version  # type: ignore[no-any-return]


def _schema(crd: dict[str, Any]) -> Schema:
    return _version(crd)["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (.a.b[] for list items, .a{} for map values)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")
    for key in ("anyOf", "allOf", "oneOf"):
        for i, child in enumerate(schema.get(key, [])):
            yield from _walk(child, f"{path}<{key}{i}>")


def _node(schema: Schema, path: str) -> Schema:
    node = schema
    for part in path.strip(".").split("."):
        node = node["properties"][part]
    return node


def _rules(schema: Schema) -> list[tuple[str, dict[str, str]]]:
    return [(path, rule) for path, node in _walk(schema) for rule in node.get("x-kubernetes-validations", [])]


# ---------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize(
    ("crd", "kind", "plural", "short"),
    [(SERVICE_ENTRY, "ServiceEntry", "serviceentries", "bse"), (CONFIG_ENTRY, "ConfigEntry", "configentries", "bce")],
    ids=["ServiceEntry", "ConfigEntry"],
)
def test_names(crd: dict[str, Any], kind: str, plural: str, short: str) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.beacon.dev"
    spec = crd["spec"]
    assert spec["group"] == "beacon.dev"
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["listKind"], names["plural"], names["singular"]) == (
        kind,
        f"{kind}List",
        plural,
        kind.lower(),
    )
    assert names["shortNames"] == [short]
    assert names["categories"] == ["beacon"]  # `kubectl get beacon`; deliberately not in `all`


def test_short_names_avoid_istio_and_each_other() -> None:
    se = set(SERVICE_ENTRY["spec"]["names"]["shortNames"])
    ce = set(CONFIG_ENTRY["spec"]["names"]["shortNames"])
    assert not se & ce
    assert "se" not in se | ce  # networking.istio.io ServiceEntry owns `se`


@ALL
def test_one_version_served_and_stored_with_status_subresource(crd: dict[str, Any]) -> None:
    version = _version(crd)
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


# ---------------------------------------------------------------------------------------------------- printer columns
@pytest.mark.parametrize(
    ("crd", "expected"),
    [
        (
            SERVICE_ENTRY,
            {
                "Ready": ".status.readySummary",
                "Health": '.status.conditions[?(@.type=="Ready")].reason',
                "Age": ".metadata.creationTimestamp",
            },
        ),
        (
            CONFIG_ENTRY,
            {
                "Revision": ".status.currentRevision",
                "Hash": ".status.hash",
                "Adopted": ".status.adoption.summary",
                "Phase": ".status.rollout.phase",
                "Ready": '.status.conditions[?(@.type=="Ready")].status',
                "Age": ".metadata.creationTimestamp",
            },
        ),
    ],
    ids=["ServiceEntry", "ConfigEntry"],
)
def test_printer_columns(crd: dict[str, Any], expected: dict[str, str]) -> None:
    columns = _version(crd)["additionalPrinterColumns"]
    default = {c["name"]: c["jsonPath"] for c in columns if c.get("priority", 0) == 0}
    assert default == expected
    assert list(default)[-1] == "Age"
    schema = _schema(crd)
    for column in columns:
        path = column["jsonPath"].split("[")[0]
        if path.startswith(".status") or path.startswith(".spec"):
            node = _node(schema, path)  # the column reads a field the schema declares
            want = {"string": "string", "integer": "integer", "date": "string"}[column["type"]]
            assert node.get("type") == want or path.endswith("conditions"), column


# ---------------------------------------------------------------------------------------------------- bounds
@ALL
def test_every_string_list_and_map_is_bounded(crd: dict[str, Any]) -> None:
    problems = []
    for top in ("spec", "status"):
        for path, node in _walk(_schema(crd)["properties"][top], f".{top}"):
            if node.get("type") == "string" and "maxLength" not in node and "<anyOf" not in path:
                problems.append(f"{path}: string without maxLength")
            if node.get("type") == "array" and "maxItems" not in node:
                problems.append(f"{path}: array without maxItems")
            if node.get("type") == "object" and "additionalProperties" in node and "maxProperties" not in node:
                problems.append(f"{path}: map without maxProperties")
            if node.get("x-kubernetes-int-or-string"):
                # no type, so no maxLength: a CEL rule must bound the string form
                rules = " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))
                if "self.size() <=" not in rules:
                    problems.append(f"{path}: int-or-string without a CEL size bound")
            elif "type" not in node and not path.endswith(("<anyOf0>", "<anyOf1>")):
                problems.append(f"{path}: no type (not structural)")
    assert problems == []


@ALL
def test_nothing_preserves_unknown_fields(crd: dict[str, Any]) -> None:
    assert [path for path, node in _walk(_schema(crd)) if "x-kubernetes-preserve-unknown-fields" in node] == []
    assert [path for path, node in _walk(_schema(crd)) if node.get("additionalProperties") is True] == []


@ALL
def test_list_map_keys_are_required(crd: dict[str, Any]) -> None:
    for path, node in _walk(_schema(crd)):
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), path


@ALL
def test_conditions_follow_metav1_condition(crd: dict[str, Any]) -> None:
    conditions = _node(_schema(crd), ".status.conditions")
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert _node(_schema(crd), ".status.observedGeneration")["type"] == "integer"


def test_service_entry_status_is_small() -> None:
    status = _node(_schema(SERVICE_ENTRY), ".status")
    assert {"readyEndpoints", "totalEndpoints", "readySummary", "endpoints"} <= set(status["properties"])
    assert status["properties"]["endpoints"]["maxItems"] <= 16
    assert not any("kopf" in path for path, _ in _walk(status))  # kopf's bookkeeping lives in annotations


# ---------------------------------------------------------------------------------------------------- CEL
@ALL
def test_every_cel_rule_has_a_message(crd: dict[str, Any]) -> None:
    for path, rule in _rules(_schema(crd)):
        assert rule["rule"].strip(), path
        assert rule.get("message") or rule.get("messageExpression"), path


@pytest.mark.parametrize(
    ("crd", "path", "message"),
    [
        (SERVICE_ENTRY, ".spec.healthCheck", "healthCheck must set exactly one of http, tcp, grpc, udp or lease"),
        (SERVICE_ENTRY, ".spec.healthCheck.udp", "udp must set exactly one of send, sendHex or dns"),
        (SERVICE_ENTRY, ".spec.healthCheck.udp", "udp.expect does not apply to udp.dns"),
        (SERVICE_ENTRY, ".spec.healthCheck.udp.expect", "udp.expect must set at most one of prefix, prefixHex"),
        (SERVICE_ENTRY, ".spec.healthCheck.udp.sendHex", "sendHex must be hex digits, two per byte"),
        (SERVICE_ENTRY, ".spec.healthCheck.udp.expect.prefixHex", "prefixHex must be hex digits, two per byte"),
        (SERVICE_ENTRY, ".spec.healthCheck.udp.dns.name", "dns.name must be a DNS name"),
        (SERVICE_ENTRY, ".spec.healthCheck.udp.expect.regex", "regex must be a valid RE2 regular expression"),
        (SERVICE_ENTRY, ".spec", "at least one of spec.endpoints or spec.selector is required"),
        (SERVICE_ENTRY, ".spec.healthCheck", "must be less than healthCheck.intervalSeconds"),
        (SERVICE_ENTRY, ".spec", "ports must not repeat the same port number and protocol"),
        (SERVICE_ENTRY, ".spec", "is not the name of an entry in spec.ports"),
        (SERVICE_ENTRY, ".spec.endpoints[].address", "must be an IPv4 or IPv6 address in canonical form"),
        (SERVICE_ENTRY, ".spec.headless", "headless is immutable"),
        (SERVICE_ENTRY, ".spec.healthCheck.http", "http.tls needs scheme HTTPS"),
        (SERVICE_ENTRY, ".spec.healthCheck.http.tls", "tls.caBundle contradicts insecureSkipVerify true"),
        (SERVICE_ENTRY, ".spec.healthCheck.grpc.tls", "grpc.tls cannot skip certificate verification"),
        (SERVICE_ENTRY, "", "metadata.name must be a DNS-1035 label"),
        (CONFIG_ENTRY, ".spec.data", "data keys must be '/'-separated segments"),
        (CONFIG_ENTRY, ".spec.data", "data is too large"),
        (CONFIG_ENTRY, ".spec", "target is immutable once set"),
        (CONFIG_ENTRY, ".spec.canary.selector", "canary.selector must set matchLabels or matchExpressions"),
        (CONFIG_ENTRY, ".spec.canary.selector.matchLabels", "keys must be valid Kubernetes label keys"),
        (CONFIG_ENTRY, ".spec.canary.selector.matchExpressions[]", "with operator In or NotIn need values"),
        (
            CONFIG_ENTRY,
            ".spec.canary.selector.matchExpressions[]",
            "with operator Exists or DoesNotExist must not have values",
        ),
    ],
)
def test_cel_rule_present(crd: dict[str, Any], path: str, message: str) -> None:
    messages = [r.get("message", "") + r.get("messageExpression", "") for p, r in _rules(_schema(crd)) if p == path]
    assert any(message in m for m in messages), messages


def test_port_names_are_unique_by_list_map() -> None:
    ports = _node(_schema(SERVICE_ENTRY), ".spec.ports")
    assert (ports["x-kubernetes-list-type"], ports["x-kubernetes-list-map-keys"]) == ("map", ["name"])
    endpoints = _node(_schema(SERVICE_ENTRY), ".spec.endpoints")
    assert (endpoints["x-kubernetes-list-type"], endpoints["x-kubernetes-list-map-keys"]) == ("map", ["address"])


def test_health_check_defaults_and_bounds() -> None:
    check = _node(_schema(SERVICE_ENTRY), ".spec.healthCheck")["properties"]
    for name in ("healthyThreshold", "unhealthyThreshold", "timeoutSeconds"):
        assert check[name]["minimum"] == 1, name
    # timeoutSeconds < intervalSeconds ties the two: neither has a schema default (the CEL rule checks them only
    # when both are set, the operator derives the missing one), and the rule is satisfiable at the smallest interval
    assert "default" not in check["timeoutSeconds"]
    assert "default" not in check["intervalSeconds"]
    assert check["timeoutSeconds"]["minimum"] < check["intervalSeconds"]["minimum"]
    assert check["healthyThreshold"]["default"] == 1
    assert check["unhealthyThreshold"]["default"] == 3
    assert set(check) >= {"http", "tcp", "grpc", "udp", "lease", "deregisterAfterSeconds"}
    assert _node(_schema(SERVICE_ENTRY), ".spec.headless")["default"] is True


@ALL
def test_defaults_satisfy_their_own_schema(crd: dict[str, Any]) -> None:
    for path, node in _walk(_schema(crd)):
        if "default" in node:
            assert _validate(node["default"], node, path) == [], path


# ---------------------------------------------------------------------------------------------------- examples
def _validate(value: Any, schema: Schema, path: str = "") -> list[str]:
    """The OpenAPI subset the CRDs use (no CEL): types, unknown fields, required, bounds, patterns, enums."""
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            errors.append(f"{path}: want int or string")
        return errors
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: want object"]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                errors += _validate(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += _validate(item, extra, f"{path}.{key}")
            elif not props and extra is None:
                continue  # a bare `type: object` is metadata: the apiserver's business
            else:
                errors.append(f"{path}: unknown field {key!r}")
        errors += [f"{path}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        if len(value) > schema.get("maxProperties", len(value)) or len(value) < schema.get("minProperties", 0):
            errors.append(f"{path}: {len(value)} properties out of bounds")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{path}: want array"]
        if len(value) > schema.get("maxItems", len(value)) or len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(value)} items out of bounds")
        for i, item in enumerate(value):
            errors += _validate(item, schema["items"], f"{path}[{i}]")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            if len(keys) != len(set(keys)):
                errors.append(f"{path}: duplicate list-map keys")
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{path}: want string, got {value!r}"]
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            errors.append(f"{path}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    elif kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: want integer, got {value!r}"]
        if not schema.get("minimum", value) <= value <= schema.get("maximum", value):
            errors.append(f"{path}: {value} out of bounds")
    elif kind == "boolean" and not isinstance(value, bool):
        errors.append(f"{path}: want boolean")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    return errors


EXAMPLE_FILES = sorted(EXAMPLES.glob("*entry-*.yaml"))


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {
        "serviceentry-payments.yaml",
        "configentry-defaults.yaml",
        "configentry-payments.yaml",
    }
    assert _load(EXAMPLES / "namespace-shop.yaml") == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop"},
    }


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_matches_its_crd(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "beacon.dev/v1alpha1"
        assert doc["metadata"]["namespace"] == "shop"
        assert _validate(doc, _schema(BY_KIND[doc["kind"]])) == []


def test_payments_example_is_the_design_ux() -> None:
    doc = _load(EXAMPLES / "serviceentry-payments.yaml")
    spec = doc["spec"]
    assert doc["metadata"] == {"name": "payments", "namespace": "shop"}
    assert spec["ports"] == [{"name": "http", "port": 8080}]
    assert spec["endpoints"] == [{"address": "198.18.0.10", "zone": "a"}, {"address": "198.18.0.11", "zone": "b"}]
    assert spec["healthCheck"] == {
        "http": {"path": "/healthz", "port": "http"},
        "intervalSeconds": 5,
        "unhealthyThreshold": 2,
    }


def test_config_examples_cover_both_scopes() -> None:
    defaults = _load(EXAMPLES / "configentry-defaults.yaml")
    payments = _load(EXAMPLES / "configentry-payments.yaml")
    assert "service" not in defaults["spec"]
    assert payments["spec"]["service"] == "payments"
    (rule,) = [r["rule"] for p, r in _rules(_schema(CONFIG_ENTRY)) if p == ".spec.data" and "matches" in r["rule"]]
    key = re.compile(re.search(r"matches\('([^']*)'\)", rule).group(1))  # type: ignore[union-attr]
    for doc in (defaults, payments):
        assert all(key.match(k) for k in doc["spec"]["data"])
        assert all(isinstance(v, str) for v in doc["spec"]["data"].values())


def test_the_udp_check_schema_stands_alone() -> None:
    """healthCheck.udp can be copied wherever a check kind is wanted (per-port checks, say): its rules speak only
    of its own fields, and every field is bounded by its own schema. The port-name rule lives on spec, beside the
    other kinds' (a rule inside udp cannot see spec.ports)."""
    udp = _node(_schema(SERVICE_ENTRY), ".spec.healthCheck.udp")
    assert set(udp["properties"]) == {"port", "send", "sendHex", "expect", "dns"}
    for path, rule in _rules(udp):
        assert "healthCheck" not in rule["rule"], path
        assert "oldSelf" not in rule["rule"], path
    assert udp["properties"]["port"] == _node(_schema(SERVICE_ENTRY), ".spec.healthCheck.tcp")["properties"]["port"]
    spec_rules = [r["rule"] for p, r in _rules(_schema(SERVICE_ENTRY)) if p == ".spec"]
    assert any("self.healthCheck.udp.port" in rule for rule in spec_rules)


def test_kustomization_lists_both_crds() -> None:
    kustomization = _load(CRDS / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in CRDS.glob("beacon.dev_*.yaml"))
    assert len(kustomization["resources"]) == 2


def test_connection_loss_hint_fields_are_described_booleans_without_schema_defaults() -> None:
    """Unset means on (hints) and off (held TCP connections); no schema default, so stored specs stay as written."""
    check = _node(_schema(SERVICE_ENTRY), ".spec.healthCheck")["properties"]
    for node in (check["connectionLossHints"], check["tcp"]["properties"]["holdConnection"]):
        assert node["type"] == "boolean"
        assert "default" not in node
        assert len(node["description"]) > 80


# ---------------------------------------------------------------------------------------------------- rollouts
def test_rollout_and_canary_knobs_have_the_documented_defaults_and_bounds() -> None:
    """The knobs of a tracked rollout, as README "Release model" lists them."""
    rollout = _node(_schema(CONFIG_ENTRY), ".spec.rollout")["properties"]
    assert set(rollout) == {"waveSize", "rolloutTimeoutSeconds", "autoRollback"}
    assert "default" not in rollout["waveSize"]  # absent: every remaining workload in one wave
    assert (rollout["waveSize"]["minimum"], rollout["waveSize"]["maximum"]) == (1, 100)
    timeout = rollout["rolloutTimeoutSeconds"]
    assert (timeout["default"], timeout["minimum"], timeout["maximum"]) == (600, 1, 86400)
    assert (rollout["autoRollback"]["type"], rollout["autoRollback"]["default"]) == ("boolean", True)
    canary = _node(_schema(CONFIG_ENTRY), ".spec.canary")
    assert canary["required"] == ["selector"]
    hold = canary["properties"]["holdSeconds"]
    assert (hold["default"], hold["minimum"], hold["maximum"]) == (60, 0, 86400)
    promotion = canary["properties"]["promotion"]
    assert (promotion["enum"], promotion["default"]) == (["Auto", "Manual"], "Auto")
    expression = _node(_schema(CONFIG_ENTRY), ".spec.canary.selector.matchExpressions")["items"]
    assert expression["properties"]["operator"]["enum"] == ["In", "NotIn", "Exists", "DoesNotExist"]
    assert expression["required"] == ["key", "operator"]
    # the selector's label rules are the ServiceEntry selector's
    service_labels = _node(_schema(SERVICE_ENTRY), ".spec.selector.matchLabels")
    canary_labels = _node(_schema(CONFIG_ENTRY), ".spec.canary.selector.matchLabels")
    assert canary_labels["additionalProperties"] == service_labels["additionalProperties"]
    assert [r["rule"] for r in canary_labels["x-kubernetes-validations"]] == [
        r["rule"] for r in service_labels["x-kubernetes-validations"]
    ]
    assert expression["properties"]["values"]["items"]["pattern"] == service_labels["additionalProperties"]["pattern"]
    key_rule = re.search(r"matches\('([^']*)'\)", canary_labels["x-kubernetes-validations"][0]["rule"])
    assert key_rule is not None
    assert key_rule.group(1) == expression["properties"]["key"]["pattern"]


def test_rollout_status_is_the_api_files_shape() -> None:
    status = _node(_schema(CONFIG_ENTRY), ".status")["properties"]
    assert set(status["rollout"]["properties"]) == {
        "revision",
        "hash",
        "phase",
        "wave",
        "members",
        "restarted",
        "stepStarted",
        "readySince",
        "message",
    }
    assert status["rollout"]["properties"]["phase"]["enum"] == [
        "Canary",
        "Holding",
        "AwaitingPromotion",
        "Waves",
        "Complete",
        "Failed",
        "RolledBack",
    ]
    assert set(status["rollback"]["properties"]) == {
        "failedRevision",
        "restoredRevision",
        "revision",
        "dataHash",
        "message",
    }
    # a wave holds at most waveSize (<= 100) workloads, the canaries or a rollback step may hold more
    assert status["rollout"]["properties"]["members"]["maxItems"] >= 100


def _canary(selector: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "beacon.dev/v1alpha1",
        "kind": "ConfigEntry",
        "metadata": {"name": "payments", "namespace": "shop"},
        "spec": {
            "data": {"a": "1"},
            "rollout": {"waveSize": 4, "rolloutTimeoutSeconds": 120, "autoRollback": False},
            "canary": {"selector": selector, "holdSeconds": 0, "promotion": "Manual"},
        },
    }


@pytest.mark.parametrize(
    ("selector", "problem"),
    [
        ({"matchLabels": {"tier": "canary"}}, None),
        ({"matchExpressions": [{"key": "example.com/tier", "operator": "In", "values": ["canary", "a_b.c"]}]}, None),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, None),
        ({"matchExpressions": [{"key": "tier", "operator": "Gt", "values": ["1"]}]}, "not in"),
        ({"matchExpressions": [{"key": "-tier", "operator": "Exists"}]}, "does not match"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "missing 'key'"),
        ({"matchLabels": {"tier": "canary!"}}, "does not match"),
        ({"matchLabels": {"tier": "canary"}, "matchFields": []}, "unknown field"),
    ],
)
def test_canary_selector_shape(selector: dict[str, Any], problem: str | None) -> None:
    """What the schema alone says of a selector (tests/integration/test_crds.py sends the CEL cases to an
    apiserver)."""
    errors = _validate(_canary(selector), _schema(CONFIG_ENTRY))
    if problem is None:
        assert errors == []
    else:
        assert any(problem in e for e in errors), errors
