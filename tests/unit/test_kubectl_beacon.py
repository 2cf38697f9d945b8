"""The kubectl plugin's pure part (kubectl_beacon.render): what each command prints from the objects beacon
publishes, and the names it shares with the operator (kept in step here, since the plugin never imports beacon).
tests/integration/test_day2.py runs the commands themselves against a real control plane."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from beacon import config_core, models, reconcile, registry
from kubectl_beacon import cli, render
from kubectl_beacon.api import Api, ApiError
from kubectl_beacon.cli import parser

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_the_plugin_uses_beacons_own_names() -> None:
    assert render.ANNOTATION_DRAIN == models.ANNOTATION_DRAIN
    assert render.LABEL_SERVICE_NAME == reconcile.LABEL_SERVICE_NAME
    assert render.LABEL_MANAGED_BY == reconcile.LABEL_MANAGED_BY
    assert render.MANAGED_BY == reconcile.MANAGED_BY
    assert render.REGISTRY_NAME == registry.REGISTRY_NAME
    assert render.REGISTRY_DATA_KEY == registry.DATA_KEY
    assert render.LABEL_CONFIG_ENTRY_UID == config_core.LABEL_ENTRY_UID
    assert render.ANNOTATION_CONFIG_HASH == config_core.ANNOTATION_HASH
    assert render.ANNOTATION_ROLLBACK_OF == config_core.ANNOTATION_ROLLBACK_OF


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (59, "59s"),
        (119, "119s"),
        (130, "2m10s"),
        (600, "10m"),
        (3 * 3600 + 5 * 60, "3h5m"),
        (30 * 3600, "30h"),
    ],
)
def test_ages_read_like_kubectl(seconds: int, shown: str) -> None:
    stamp = (NOW - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert render.age(stamp, NOW) == shown
    assert render.age(None, NOW) == "-"


def service_entry(status_endpoints: list[dict[str, Any]], **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "payments", "namespace": "shop"},
        "spec": {"endpoints": [{"address": "198.18.0.10", "zone": "a"}, {"address": "198.18.0.11", "zone": "b"}]},
        "status": {
            "readySummary": "1/3",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Draining", "message": "1 of 3 ..."}],
            "endpoints": status_endpoints,
            **status,
        },
    }


SLICES = [
    {
        "endpoints": [
            {"addresses": ["198.18.0.10"], "zone": "a", "conditions": {"ready": True, "serving": True}},
            {"addresses": ["198.18.0.11"], "zone": "b", "conditions": {"serving": True, "terminating": True}},
            {
                "addresses": ["198.18.0.20"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "name": "web-1"},
            },
        ]
    }
]


def test_status_combines_the_status_the_slices_and_the_spec() -> None:
    items = [
        {
            "address": "198.18.0.11",
            "state": "Draining",
            "check": "passing",
            "since": "2030-01-01T11:58:00Z",
            "probe": "HTTP 200",
            "latencyMs": 0.84,
            "consecutive": 1,
        }
    ]
    rows = render.endpoint_rows(service_entry(items), SLICES)
    by = {r["address"]: r for r in rows}
    assert [r["address"] for r in rows] == ["198.18.0.10", "198.18.0.11", "198.18.0.20"]
    assert by["198.18.0.11"]["state"] == "Draining"
    assert by["198.18.0.11"]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert (by["198.18.0.10"]["state"], by["198.18.0.10"]["zone"]) == ("Healthy", "a")  # from the slice
    assert by["198.18.0.20"]["pod"] == "web-1"
    text = render.status_text([(service_entry(items), rows)], now=NOW)
    assert text.splitlines() == [
        "shop/payments   READY 1/3   Draining: 1 of 3 ...",
        "ADDRESS       ZONE   POD     STATE      CHECK     SINCE   PROBE      LATENCY   CONSECUTIVE",
        "198.18.0.10   a      -       Healthy    -         -       -          -         -",
        "198.18.0.11   b      -       Draining   passing   2m      HTTP 200   0.8ms     1",
        "198.18.0.20   -      web-1   Healthy    -         -       -          -         -",
    ]
    assert render.status_json([(service_entry(items), rows)])[0]["endpoints"][1]["latencyMs"] == 0.84


def test_status_shows_each_ports_verdict_with_per_port_checks() -> None:
    items = [
        {
            "address": "198.18.0.11",
            "state": "Degraded",
            "check": "passing",
            "ports": {"mysql": "passing", "exporter": "critical"},
            "since": "2030-01-01T11:59:00Z",
            "probe": "exporter: HTTP 500",
            "latencyMs": 1.5,
            "consecutive": 2,
        }
    ]
    rows = render.endpoint_rows(service_entry(items), [])
    text = render.status_text([(service_entry(items), rows)], now=NOW)
    header, row = text.splitlines()[1], next(line for line in text.splitlines() if line.startswith("198.18.0.11"))
    assert header.split() == ["ADDRESS", "ZONE", "STATE", "CHECK", "PORTS", "SINCE", "PROBE", "LATENCY", "CONSECUTIVE"]
    cells = ["198.18.0.11", "b", "Degraded", "passing", "mysql:passing,exporter:critical", "60s"]
    assert row.split() == [*cells, "exporter:", "HTTP", "500", "1.5ms", "2"]
    assert render.status_json([(service_entry(items), rows)])[0]["endpoints"][1]["ports"] == items[0]["ports"]


def test_an_endpoint_in_no_slice_and_not_in_status_is_not_published() -> None:
    rows = render.endpoint_rows(service_entry([]), [])
    assert {r["state"] for r in rows} == {"NotPublished"}


def registry_map(name: str, document: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "data": {"registry.json": json.dumps(document)}}


def test_the_registry_merges_its_shards() -> None:
    base = {"namespace": "shop", "revision": 7, "shards": ["beacon-registry", "beacon-registry-1"]}
    payments = {
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "tags": {"team": "pay"},
        "dns": "payments.shop.svc",
        "endpoints": [{"address": "198.18.0.10", "zone": "a"}],
        "readyEndpoints": 1,
        "totalEndpoints": 2,
    }
    shards = {
        "beacon-registry": registry_map("beacon-registry", {**base, "services": {"payments": payments}}),
        "beacon-registry-1": registry_map("beacon-registry-1", {**base, "services": {"cart": {"endpoints": []}}}),
    }
    document = render.registry_document(shards)
    assert (document["revision"], list(document["services"])) == (7, ["cart", "payments"])
    assert render.registry_text(document).splitlines() == [
        "registry shop   revision 7",
        "SERVICE    READY   DNS                 PORTS           HEALTHY ENDPOINTS   TAGS",
        "cart       0/0     -                   -               -                   -",
        "payments   1/2     payments.shop.svc   http:8080/TCP   198.18.0.10@a       team=pay",
    ]
    stale = {**shards, "beacon-registry-1": registry_map("beacon-registry-1", {**base, "revision": 6})}
    with pytest.raises(ValueError, match="different revisions"):
        render.registry_document(stale)
    with pytest.raises(LookupError):
        render.registry_document({})


def revision(number: int, data: dict[str, str], *, digest: str, rollback_of: int | None = None) -> dict[str, Any]:
    annotations = {"beacon.dev/config-hash": digest}
    if rollback_of is not None:
        annotations["beacon.dev/rollback-of"] = str(rollback_of)
    meta = {"name": f"payments-{number}", "annotations": annotations, "creationTimestamp": "2030-01-01T11:00:00Z"}
    return {"metadata": meta, "revision": number, "data": {"data": data}}


REVISIONS = [
    revision(3, {"db.pool.size": "10"}, digest="c3", rollback_of=1),
    revision(1, {"db.pool.size": "10"}, digest="c1"),
    revision(2, {"db.pool.size": "25", "upstream.url": "http://ledger"}, digest="c2"),
]


def test_history_lists_revisions_oldest_first_with_the_current_and_the_pinned_one() -> None:
    entry = {
        "metadata": {"name": "payments", "namespace": "shop"},
        "spec": {"rollbackTo": 1},
        "status": {"currentRevision": 3, "configMapName": "payments-config"},
    }
    assert render.history_text(entry, REVISIONS, now=NOW).splitlines() == [
        "configentry shop/payments   current revision 3   ConfigMap payments-config",
        "REVISION   CURRENT   HASH   KEYS   AGE   NOTE",
        "1                    c1     1      60m   pinned by spec.rollbackTo",
        "2                    c2     2      60m   -",
        "3          *         c3     1      60m   rollback of 1",
    ]
    assert render.previous_revision(REVISIONS, 3) == 2
    assert render.previous_revision(REVISIONS, 1) is None


def test_diff_shows_keys_in_their_own_form() -> None:
    old, new = render.revision_data(REVISIONS[2]), render.revision_data(REVISIONS[0])
    assert old == {"db/pool/size": "25", "upstream/url": "http://ledger"}
    assert render.diff_text(old, new, old_label="revision 2", new_label="revision 3 (current)").splitlines() == [
        "--- revision 2",
        "+++ revision 3 (current)",
        "@@ -1,2 +1 @@",
        "-db/pool/size: 25",
        "-upstream/url: http://ledger",
        "+db/pool/size: 10",
    ]
    same = render.diff_text(new, new, old_label="revision 1", new_label="revision 3")
    assert same == "revision 1 and revision 3 hold the same data"
    block = render.diff_text({"a": "x"}, {"a": "x\ny"}, old_label="1", new_label="2")
    assert "+a: |" in block
    assert "+  y" in block


def test_the_drain_annotation_is_a_sorted_address_list() -> None:
    assert render.drain_value(None, "198.18.0.10", drain=True) == "198.18.0.10"
    assert render.drain_value("198.18.0.9,198.18.0.10", "198.18.0.2", drain=True) == "198.18.0.2,198.18.0.9,198.18.0.10"
    assert render.drain_value("198.18.0.10", "198.18.0.10", drain=True) == "198.18.0.10"
    assert render.drain_value("198.18.0.10, 2001:db8::1", "198.18.0.10", drain=False) == "2001:db8::1"
    assert render.drain_value("198.18.0.10", "198.18.0.10", drain=False) is None
    # what the operator reads back is exactly the set the plugin wrote
    value = render.drain_value("198.18.0.9", "2001:db8::1", drain=True)
    assert models.drained_addresses({models.ANNOTATION_DRAIN: value or ""}) == {"198.18.0.9", "2001:db8::1"}


def test_the_command_line() -> None:
    args = parser().parse_args(["config", "diff", "payments", "2", "3", "-n", "shop"])
    assert (args.entry, args.revision, args.other, args.namespace) == ("payments", 2, 3, "shop")
    args = parser().parse_args(["drain", "payments", "198.18.0.10", "--wait", "--timeout", "5"])
    assert (args.address, args.wait, args.timeout) == ("198.18.0.10", True, 5.0)
    args = parser().parse_args(["registry", "-o", "json"])
    assert args.output == "json"
    with pytest.raises(SystemExit):
        parser().parse_args(["config", "rollback"])


# ---------------------------------------------------------------------------------------------------- config status
def test_the_plugin_reads_opt_ins_and_hashes_as_beacon_does() -> None:
    assert render.ANNOTATION_RELOAD == config_core.ANNOTATION_RELOAD
    assert render.ANNOTATION_TEMPLATE_HASHES == config_core.ANNOTATION_TEMPLATE_HASHES
    assert render.ANNOTATION_TEMPLATE_REVISIONS == config_core.ANNOTATION_TEMPLATE_REVISIONS
    assert render.ANNOTATION_BASELINE == config_core.ANNOTATION_BASELINE
    for value in ("a, b", "a[db/, feature/flag], b", "a[x], a[y/]", "a[x], a", "", " a,a ,, "):
        assert render.reload_configs(value) == config_core.parse_reload(value)
    for value in ("a[db/", "a]x", "a[[x]]", "a[]"):
        assert render.reload_configs(value) == {}
    data = config_core.config_map_data({"db/host": "h", "db/pool/size": "5", "dbx": "1", "feature/flag": "on"})
    for keys in (None, ("db/",), ("feature/flag", "dbx"), ("nothing/",)):
        assert render.selection_hash(data, keys) == config_core.selection_hash(data, keys)


def _workload_body(name: str, reload: str, *, template: dict[str, str], baseline: str | None = None) -> dict[str, Any]:
    annotations = {"beacon.dev/reload": reload}
    if baseline is not None:
        annotations["beacon.dev/config-hashes-baseline"] = baseline
    return {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]},
            "template": {"metadata": {"annotations": template}},
        },
    }


def _pod_body(template: dict[str, str], *, ready: bool, gone: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"annotations": dict(template)}
    if gone:
        meta["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_config_status_shows_each_workload_as_the_operator_counts_it() -> None:
    data = config_core.config_map_data({"db/host": "b", "feature/flag": "on"})
    digest = config_core.content_hash(data)
    db_hash = config_core.selection_hash(data, ("db/",))
    flag_hash = config_core.selection_hash(data, ("feature/flag",))
    entry = {
        "metadata": {"name": "app", "namespace": "shop"},
        "status": {
            "currentRevision": 3,
            "configMapName": "app",
            "adoption": {
                "summary": "2/3 workloads",
                "revisions": [
                    {"revision": 3, "workloads": 2, "pods": 2, "readyPods": 1},
                    {"revision": 1, "workloads": 0, "pods": 1, "readyPods": 1, "pruned": True},
                ],
                "baselinePods": 1,
                "unknownPods": 0,
            },
        },
    }
    config_map = {"metadata": {"name": "app", "annotations": {"beacon.dev/config-hash": digest}}, "data": data}
    revisions = [
        {"revision": n, "metadata": {"annotations": {"beacon.dev/config-hash": h}}} for n, h in ((2, "h2"), (3, digest))
    ]
    rolling = {"beacon.dev/config-hashes": f"app={db_hash}", "beacon.dev/config-revisions": "app=3"}
    old = {"beacon.dev/config-hashes": "app=old", "beacon.dev/config-revisions": "app=1"}
    whole = {"beacon.dev/config-hashes": f"app={digest}", "beacon.dev/config-revisions": "app=3"}
    readers = [
        (
            "Deployment",
            _workload_body("a", "app[db/]", template=rolling),
            [_pod_body(rolling, ready=False), _pod_body(old, ready=True)],
        ),
        (
            "Deployment",
            _workload_body("b", "app[feature/flag]", template={}, baseline=f"app={flag_hash}"),
            [_pod_body({}, ready=True)],
        ),
        (
            "StatefulSet",
            _workload_body("c", "other, app", template=whole),
            [_pod_body(whole, ready=True), _pod_body(old, ready=True, gone=True)],
        ),
    ]
    rows = render.workload_rows(entry, config_map, readers, revisions)
    assert rows == [
        {
            "workload": "Deployment/a",
            "keys": ["db/"],
            "templateRevision": 3,
            "pods": {"3": {"pods": 1, "ready": 0}, "1": {"pods": 1, "ready": 1}},
            "adopted": False,
        },
        {
            "workload": "Deployment/b",
            "keys": ["feature/flag"],
            "templateRevision": None,
            "pods": {"baseline": {"pods": 1, "ready": 1}},
            "adopted": True,
        },
        {
            "workload": "StatefulSet/c",
            "keys": None,
            "templateRevision": 3,
            "pods": {"3": {"pods": 1, "ready": 1}},
            "adopted": True,
        },
    ]
    # the operator's own count of the same workloads agrees
    views = []
    for kind, body, pods in readers:
        meta, template = body["metadata"], body["spec"]["template"]["metadata"]["annotations"]
        keys = config_core.parse_reload(meta["annotations"]["beacon.dev/reload"])["app"]
        views.append(
            config_core.WorkloadConfig(
                kind=kind,
                name=meta["name"],
                replicas=1,
                desired_hash=digest if keys is None else config_core.selection_hash(data, keys),
                template_hash=config_core.parse_hashes(template.get("beacon.dev/config-hashes") or "").get("app"),
                baseline_hash=(
                    config_core.parse_hashes(meta["annotations"].get(config_core.ANNOTATION_BASELINE)) or {}
                ).get("app"),
                whole=keys is None,
                pods=tuple(
                    config_core.PodConfig.from_body({**pod, "metadata": {**pod["metadata"], "name": f"p{i}"}})
                    for i, pod in enumerate(pods)
                ),
            )
        )
    computed = config_core.adoption(
        config="app", workloads=views, current=3, history=[config_core.Revision(3, "app-3", digest)]
    )
    assert [w.revision == 3 for w in computed.workloads] == [row["adopted"] for row in rows]
    text = render.adoption_text(entry, rows)
    assert text.splitlines()[0] == "configentry shop/app   current revision 3   ADOPTED 2/3 workloads"
    assert "Deployment/a    db/            3          3:0/1 1:1/1" in text
    assert "1          0           1/1          pruned" in text
    assert render.pod_query(readers[0][1]) == "app=a,tier"
    args = parser().parse_args(["config", "status", "app", "-n", "shop", "-o", "json"])
    assert (args.entry, args.namespace, args.output) == ("app", "shop", "json")


# ---------------------------------------------------------------------------------------------------- rollouts
def rolling_entry(phase: str | None, **rollout: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"currentRevision": 6, "adoption": {"summary": "1/3 workloads"}}
    if phase is not None:
        status["rollout"] = {"revision": 7, "hash": "h7", "phase": phase, **rollout}
    return {"metadata": {"name": "app", "namespace": "shop", "resourceVersion": "41"}, "status": status}


def test_promote_sets_the_annotation_to_the_revision_awaiting_promotion() -> None:
    assert render.ANNOTATION_PROMOTE == "beacon.dev/promote"  # the API's name (the operator reads it)
    assert render.promote_patch(rolling_entry("AwaitingPromotion", wave=0)) == {
        "metadata": {"resourceVersion": "41", "annotations": {"beacon.dev/promote": "7"}}
    }


@pytest.mark.parametrize("phase", ["Canary", "Holding", "Waves", "Complete", "Failed", "RolledBack"])
def test_promote_refuses_any_other_phase_and_says_which(phase: str) -> None:
    with pytest.raises(ValueError, match=f"rollout of revision 7 is in phase {phase}, not AwaitingPromotion"):
        render.promote_patch(rolling_entry(phase))


def test_promote_refuses_an_entry_without_a_rollout() -> None:
    with pytest.raises(ValueError, match="configentry shop/app has no rollout in progress"):
        render.promote_patch(rolling_entry(None))


class FakeApi:
    """The plugin's Api as `config promote` uses it: get the entry, merge-patch it (409 while `conflicts` lasts,
    each conflict bringing a newer entry)."""

    def __init__(self, *entries: dict[str, Any], conflicts: int = 0) -> None:
        self.entries = list(entries)
        self.conflicts = conflicts
        self.patches: list[dict[str, Any]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert (kind, namespace, name) == ("ConfigEntry", "shop", "app")
        return self.entries[0] if self.entries else None

    def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(patch)
        if self.conflicts:
            self.conflicts -= 1
            self.entries.pop(0)
            raise ApiError(409, "the object has been modified")
        return {}


def _promote(api: FakeApi) -> int:
    args = parser().parse_args(["config", "promote", "app", "-n", "shop"])
    return cli.cmd_config_promote(api, args)  # type: ignore[arg-type]


def test_config_promote_writes_the_annotation(capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeApi(rolling_entry("AwaitingPromotion", wave=0))
    assert _promote(api) == 0
    assert api.patches == [{"metadata": {"resourceVersion": "41", "annotations": {"beacon.dev/promote": "7"}}}]
    assert "configentry shop/app: beacon.dev/promote=7; beacon promotes revision 7" in capsys.readouterr().out


def test_config_promote_reads_again_after_a_conflict_and_refuses_a_rollout_that_moved_on() -> None:
    api = FakeApi(rolling_entry("AwaitingPromotion"), rolling_entry("Canary"), conflicts=1)
    with pytest.raises(cli.CommandError, match="is in phase Canary, not AwaitingPromotion"):
        _promote(api)
    assert len(api.patches) == 1
    with pytest.raises(cli.CommandError, match="configentry shop/app not found"):
        _promote(FakeApi())
    with pytest.raises(cli.CommandError, match="has no rollout in progress"):
        _promote(FakeApi(rolling_entry(None)))


def test_config_promote_errors_exit_1_with_the_phase(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeApi(rolling_entry("Waves", wave=2))
    api.namespace = "default"  # type: ignore[attr-defined]
    api.close = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr(Api, "from_kubeconfig", classmethod(lambda cls, **_: api))
    assert cli.main(["config", "promote", "app", "-n", "shop"]) == 1
    assert capsys.readouterr().err == (
        "error: configentry shop/app: the rollout of revision 7 is in phase Waves, not AwaitingPromotion: nothing to "
        "promote\n"
    )
    assert api.patches == []


def test_config_status_shows_the_rollout_and_the_last_rollback() -> None:
    entry = rolling_entry(
        "Waves",
        wave=2,
        members=["Deployment/w05", "Deployment/w06"],
        restarted=["Deployment/w05"],
        message="wave 2 of 3: 2 workloads",
    )
    entry["status"]["rollback"] = {
        "failedRevision": 5,
        "restoredRevision": 4,
        "revision": 6,
        "message": "Deployment/canary: new pods not Ready within 60s",
    }
    lines = render.adoption_text(entry, []).splitlines()
    assert lines[:3] == [
        "configentry shop/app   current revision 6   ADOPTED 1/3 workloads",
        "rollout of revision 7   PHASE Waves   WAVE 2   RESTARTED 1/2   wave 2 of 3: 2 workloads",
        "automatic rollback: revision 5 failed, revision 4's data restored as revision 6: Deployment/canary: new "
        "pods not Ready within 60s",
    ]
    canary = render.rollout_lines(rolling_entry("Holding", wave=0, members=["Deployment/c"]))
    assert canary == ["rollout of revision 7   PHASE Holding   WAVE canary   RESTARTED 0/1"]
    assert render.rollout_lines(rolling_entry(None)) == []
    untracked = render.adoption_text(rolling_entry(None), []).splitlines()
    assert untracked[1].split() == ["REVISION", "WORKLOADS", "READY/PODS", "NOTE"]  # as before
