"""The ConfigEntry core without a cluster: key mapping, layering and conflicts, hashes, history, rollback
selection, and the reload decisions (debounce, rate limit, restart safety) with time as an argument."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from beacon.config_core import (
    ANNOTATION_HASH,
    ANNOTATION_REVISION,
    KEY_PATTERN,
    MAX_DATA_BYTES,
    ConfigEntry,
    Current,
    Revision,
    choose_revision,
    config_map_data,
    config_map_key,
    conflicts,
    content_hash,
    current_of,
    debounce_due,
    desired_config_map,
    desired_revision,
    desired_status,
    format_hashes,
    invalid_keys,
    merge,
    parse_hashes,
    parse_rate_limit,
    plan,
    rate_limit_next,
    reload_decision,
    reload_names,
    revision_data,
    revision_from_object,
    revision_intact,
    revision_name,
    to_prune,
)

CRD = Path(__file__).resolve().parents[2] / "crds" / "beacon.dev_configentries.yaml"


def entry(name: str, data: dict[str, str], *, service: str | None = None, priority: int = 0, **kw: Any) -> ConfigEntry:
    return ConfigEntry(
        namespace=kw.pop("namespace", "shop"),
        name=name,
        uid=f"uid-{name}",
        generation=kw.pop("generation", 1),
        data=data,
        service=service,
        priority=priority,
        **kw,
    )


# ---------------------------------------------------------------------------------------------------- parsing, keys
def test_from_body_reads_the_spec_with_the_crd_defaults() -> None:
    body = {
        "metadata": {"name": "payments", "namespace": "shop", "uid": "u1", "generation": 4},
        "spec": {"service": "payments", "data": {"db/pool/size": "25"}, "target": "payments-config", "rollbackTo": 3},
    }
    e = ConfigEntry.from_body(body)
    assert (e.name, e.namespace, e.uid, e.generation) == ("payments", "shop", "u1", 4)
    assert (e.service, e.priority, e.target, e.history_limit, e.rollback_to) == (
        "payments",
        0,
        "payments-config",
        10,
        3,
    )
    assert e.config_map_name == "payments-config"
    assert ConfigEntry.from_body({"metadata": body["metadata"], "spec": {"data": {}}}).config_map_name == "payments"


def test_keys_map_slashes_to_dots() -> None:
    assert config_map_key("db/pool/size") == "db.pool.size"
    assert config_map_key("log_level") == "log_level"
    assert config_map_data({"b/c": "2", "a": "1"}) == {"a": "1", "b.c": "2"}


def test_key_pattern_is_the_crds() -> None:
    crd = yaml.safe_load(CRD.read_text())
    data = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["data"]
    rule = next(r["rule"] for r in data["x-kubernetes-validations"] if "matches" in r["rule"])
    assert re.search(r"matches\('([^']*)'\)", rule).group(1) == KEY_PATTERN.pattern  # type: ignore[union-attr]


_segment = st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_]{0,6}[A-Za-z0-9])?\Z")


@given(st.lists(st.lists(_segment, min_size=1, max_size=4).map("/".join), min_size=1, max_size=20, unique=True))
def test_key_mapping_is_one_to_one_and_valid_for_configmaps(keys: list[str]) -> None:
    mapped = [config_map_key(k) for k in keys]
    assert len(set(mapped)) == len(keys)
    for key in mapped:
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", key)
        assert key not in (".", "..")
        assert not key.startswith("..")
    assert invalid_keys(dict.fromkeys(keys, "v")) == []


def test_invalid_keys_are_found() -> None:
    assert invalid_keys({"db.pool": "1", "ok/key": "1", "/lead": "1", "a//b": "1", "n": 5, "x" * 254: ""}) == sorted(
        ["db.pool", "/lead", "a//b", "n", "x" * 254]
    )


# ---------------------------------------------------------------------------------------------------- hash
def test_hash_is_stable_and_order_independent() -> None:
    a = content_hash({"a": "1", "b": "2"})
    assert a == content_hash({"b": "2", "a": "1"})
    assert len(a) == 16
    assert re.fullmatch(r"[0-9a-f]{16}", a)
    assert a != content_hash({"a": "1", "b": "3"})
    assert content_hash({}) == content_hash({})


def test_hash_known_value() -> None:
    # sha256('{"a":"1"}') -- a changed canonical form would silently restart every opted-in workload
    assert content_hash({"a": "1"}) == "9afeb0f2b203f254"


# ---------------------------------------------------------------------------------------------------- layering
DEFAULTS = entry("defaults", {"log/level": "info", "db/pool/size": "10", "feature/x": "false"})
PAYMENTS = entry("payments", {"db/pool/size": "25", "feature/x": "true"}, service="payments", priority=10)


def test_service_entry_overrides_namespace_defaults() -> None:
    merged = merge(PAYMENTS, [DEFAULTS, PAYMENTS])
    assert merged.values == {"db/pool/size": "25", "feature/x": "true", "log/level": "info"}
    assert merged.sources == {"db/pool/size": "payments", "feature/x": "payments", "log/level": "defaults"}


def test_scope_beats_priority() -> None:
    high_default = entry("defaults", {"k": "global"}, priority=1000)
    low_service = entry("svc", {"k": "service"}, service="payments", priority=-1000)
    assert merge(low_service, [high_default]).values == {"k": "service"}
    # the namespace-wide entry's own ConfigMap is the namespace-wide merge: service entries do not leak into it
    assert merge(high_default, [low_service]).values == {"k": "global"}


def test_priority_orders_entries_of_one_scope() -> None:
    low = entry("a-low", {"k": "low", "only-low": "1"}, service="payments", priority=1)
    high = entry("b-high", {"k": "high"}, service="payments", priority=5)
    for e in (low, high):
        assert merge(e, [low, high]).values == {"k": "high", "only-low": "1"}
    # a different service's entries never apply
    other = entry("other", {"k": "other"}, service="cart", priority=100)
    assert merge(low, [low, high, other]).values["k"] == "high"
    # nor do other namespaces'
    foreign = entry("foreign", {"k": "foreign"}, namespace="elsewhere")
    assert merge(DEFAULTS, [DEFAULTS, foreign]).values == DEFAULTS.data


def test_equal_priority_conflict_is_won_by_the_last_name_and_reported_on_both() -> None:
    a = entry("alpha", {"k": "from-alpha", "a-only": "1"}, service="payments", priority=5)
    b = entry("bravo", {"k": "from-bravo", "other": "2"}, service="payments", priority=5)
    c = entry("charlie", {"k": "c"}, service="payments", priority=6)  # higher: not a conflict, just an override
    assert merge(a, [b, a]).values["k"] == "from-bravo"
    assert merge(b, [a, b]).values["k"] == "from-bravo"
    found = conflicts([a, b, c])
    assert found == {"alpha": {"k": ["bravo"]}, "bravo": {"k": ["alpha"]}}
    pa = plan(a, [a, b, c], history=[])
    pb = plan(b, [a, b, c], history=[])
    pc = plan(c, [a, b, c], history=[])
    for p in (pa, pb):
        assert p.conflict.status == "True"
        assert p.conflict.reason == "KeyConflict"
        assert "k (also set by" in p.conflict.message
        assert "bravo wins" in p.conflict.message
    assert pc.conflict.status == "False"
    assert pa.data == pb.data == pc.data == {"a-only": "1", "k": "c", "other": "2"}


def test_namespace_wide_conflicts_are_reported_and_merged_deterministically() -> None:
    one = entry("one", {"k": "1"})
    two = entry("two", {"k": "2"})
    assert conflicts([two, one]) == {"one": {"k": ["two"]}, "two": {"k": ["one"]}}
    assert plan(one, [two, one], history=[]).data == {"k": "2"}
    # the same pair at different scopes or priorities is layering, not a conflict
    assert conflicts([one, entry("two", {"k": "2"}, priority=1)]) == {}
    assert conflicts([one, entry("two", {"k": "2"}, service="payments")]) == {}
    assert conflicts([one, entry("two", {"k": "2"}, namespace="other")]) == {}


def test_plan_materialises_the_merge_with_its_hash() -> None:
    p = plan(PAYMENTS, [DEFAULTS, PAYMENTS], history=[])
    assert p.data == {"db.pool.size": "25", "feature.x": "true", "log.level": "info"}
    assert p.hash == content_hash(p.data)
    assert (p.ready.status, p.ready.reason) == ("True", "Materialised")
    assert p.rollback_of is None


def test_plan_refuses_too_much_data() -> None:
    big = [entry(f"big{i}", {f"blob{i}": "x" * 190_000}) for i in range(6)]
    p = plan(big[0], big, history=[])
    assert p.data is None
    assert (p.ready.status, p.ready.reason) == ("False", "TooLarge")
    assert str(MAX_DATA_BYTES) in p.ready.message
    assert plan(big[0], big[:5], history=[]).data is not None


def test_plan_refuses_keys_the_crd_should_have_rejected() -> None:
    bad = entry("bad", {"db.pool": "1"})
    p = plan(bad, [bad], history=[])
    assert (p.data, p.ready.reason) == (None, "InvalidKeys")
    assert "'db.pool'" in p.ready.message


# ---------------------------------------------------------------------------------------------------- rollback
HISTORY = [Revision(1, "payments-1", "h1"), Revision(2, "payments-2", "h2")]


def test_rollback_to_a_missing_revision_is_refused_with_the_kept_ones() -> None:
    e = entry("payments", {"k": "v"}, rollback_to=7)
    p = plan(e, [e], history=HISTORY)
    assert p.data is None
    assert (p.ready.status, p.ready.reason) == ("False", "RevisionNotFound")
    assert "revision 7 does not exist" in p.ready.message
    assert "kept revisions: 1, 2" in p.ready.message


def test_rollback_materialises_the_stored_data_exactly() -> None:
    e = entry("payments", {"k": "new"}, rollback_to=1)
    stored = {"k": "old", "z.y": "é\n"}
    p = plan(e, [e], history=HISTORY, rollback_data=stored)
    assert p.data == stored
    assert p.hash == content_hash(stored)
    assert (p.ready.status, p.ready.reason, p.rollback_of) == ("True", "RolledBack", 1)
    unreadable = plan(e, [e], history=HISTORY, rollback_data=None)
    assert (unreadable.data, unreadable.ready.reason) == (None, "RevisionUnreadable")


def test_choose_revision() -> None:
    # first materialisation
    assert choose_revision(history=[], current=None, desired_hash="h1") == (1, True)
    # unchanged content (a restart): nothing new
    assert choose_revision(history=HISTORY, current=Current(2, "h2"), desired_hash="h2") == (2, False)
    # an update
    assert choose_revision(history=HISTORY, current=Current(2, "h2"), desired_hash="h3") == (3, True)
    # a rollback to revision 1's content is recorded as a new revision
    assert choose_revision(history=HISTORY, current=Current(2, "h2"), desired_hash="h1") == (3, True)
    # the revision was recorded but the ConfigMap write failed: reuse it
    assert choose_revision(history=HISTORY, current=Current(1, "h1"), desired_hash="h2") == (2, False)
    # numbers never go down, even when the history was pruned or lost
    assert choose_revision(history=[], current=Current(9, "h9"), desired_hash="h10") == (10, True)
    assert choose_revision(history=[Revision(4, "p-4", "h4")], current=None, desired_hash="h5") == (5, True)


def test_prune_keeps_the_newest_and_the_pinned() -> None:
    assert to_prune(numbers=range(1, 13), limit=10) == [1, 2]
    assert to_prune(numbers=[3, 1, 2], limit=10) == []
    assert to_prune(numbers=range(1, 6), limit=2, keep=(5, 1)) == [2, 3]
    assert to_prune(numbers=range(1, 6), limit=1, keep=(5, None)) == [1, 2, 3, 4]


def test_revision_names_fit() -> None:
    assert revision_name("payments", 3) == "payments-3"
    long = "a" * 253
    name = revision_name(long, 123456789012)
    assert len(name) <= 253
    assert name != revision_name("a" * 252 + "b", 123456789012)


# ---------------------------------------------------------------------------------------------------- objects
def test_desired_objects_are_owned_and_labelled() -> None:
    data = {"a": "1"}
    cm = desired_config_map(PAYMENTS, data=data, digest="abc", revision=3)
    assert cm["metadata"]["name"] == "payments"
    assert cm["data"] == data
    assert cm["metadata"]["annotations"][ANNOTATION_HASH] == "abc"
    assert cm["metadata"]["annotations"][ANNOTATION_REVISION] == "3"
    ref = cm["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("ConfigEntry", "uid-payments", True)
    cr = desired_revision(PAYMENTS, data=data, digest="abc", revision=3, rollback_of=1)
    assert (cr["kind"], cr["revision"], cr["metadata"]["name"]) == ("ControllerRevision", 3, "payments-3")
    assert cr["metadata"]["ownerReferences"] == [ref]
    assert cr["metadata"]["labels"] == cm["metadata"]["labels"]
    assert revision_from_object(cr) == Revision(3, "payments-3", "abc", 1)
    assert revision_data(cr) == data
    assert revision_data({"data": {"data": {"a": 1}}}) is None
    assert current_of(cm, PAYMENTS) == Current(3, "abc")
    assert current_of(cm, DEFAULTS) is None  # someone else's ConfigMap tells nothing
    assert current_of(None, PAYMENTS) is None


def test_status_keeps_transition_times_and_reports_both_conditions() -> None:
    p = plan(PAYMENTS, [PAYMENTS], history=[])
    first = desired_status(
        PAYMENTS,
        ready=p.ready,
        conflict=p.conflict,
        current=Current(1, "h"),
        config_map="payments",
        previous=None,
        now=0,
    )
    assert first["currentRevision"] == 1
    assert first["hash"] == "h"
    assert first["configMapName"] == "payments"
    assert [c["type"] for c in first["conditions"]] == ["Ready", "Conflict"]
    later = desired_status(
        PAYMENTS,
        ready=p.ready,
        conflict=p.conflict,
        current=Current(2, "i"),
        config_map="payments",
        previous=first,
        now=99,
    )
    assert later["conditions"] == first["conditions"]


# ---------------------------------------------------------------------------------------------------- reloads
def test_reload_annotation_parsing() -> None:
    assert reload_names(" b, a,,a ") == ("a", "b")
    assert reload_names(None) == ()
    assert format_hashes({"b": "2", "a": "1"}) == "a=1,b=2"
    assert parse_hashes("a=1,b=2") == {"a": "1", "b": "2"}
    assert parse_hashes("") == {}
    assert parse_hashes(None) is None


def test_opting_in_records_a_baseline_and_rolls_nothing_out() -> None:
    d = reload_decision(desired={"cfg": "h1"}, template=None, baseline=None)
    assert (d.action, d.baseline) == ("baseline", "cfg=h1")
    assert reload_decision(desired={"cfg": "h1"}, template=None, baseline={"cfg": "h1"}).action == "none"
    # a config that does not exist yet is not part of the decision
    assert reload_decision(desired={}, template=None, baseline=None).action == "none"
    # a config named later (or created later) joins the baseline, still without a rollout
    d = reload_decision(desired={"cfg": "h1", "new": "n1"}, template={"cfg": "h1"}, baseline=None)
    assert (d.action, d.baseline) == ("baseline", "new=n1")


def test_a_changed_hash_rolls_out_all_configs() -> None:
    d = reload_decision(desired={"cfg": "h2", "other": "o1"}, template=None, baseline={"cfg": "h1", "other": "o1"})
    assert (d.action, d.template) == ("rollout", "cfg=h2,other=o1")
    d = reload_decision(desired={"cfg": "h2"}, template={"cfg": "h1"}, baseline=None)
    assert (d.action, d.template) == ("rollout", "cfg=h2")


def test_restart_with_unchanged_hashes_does_nothing() -> None:
    assert reload_decision(desired={"cfg": "h2"}, template={"cfg": "h2"}, baseline=None).action == "none"
    assert reload_decision(desired={"cfg": "h2"}, template={"cfg": "h2"}, baseline={"cfg": "h1"}).action == "none"
    # a config that was deleted does not restart anything either
    assert reload_decision(desired={}, template={"cfg": "h2"}, baseline=None).action == "none"


def test_debounce_is_trailing_and_bounded() -> None:
    # ten changes 0.1 s apart: one rollout, 2 s after the last
    changes = [100 + i * 0.1 for i in range(10)]
    due = debounce_due(first_change=changes[0], last_change=changes[-1], window=2, max_delay=30)
    assert due == pytest.approx(changes[-1] + 2)
    for t in changes[:-1]:
        assert t < due  # every change of the burst happened before the rollout
    # a config that never stops changing is still rolled out after max_delay
    assert debounce_due(first_change=100, last_change=200, window=2, max_delay=30) == 130
    assert debounce_due(first_change=100, last_change=100, window=5, max_delay=1) == 105


def test_rate_limit_allows_count_per_period_and_defers_the_rest() -> None:
    assert rate_limit_next(rollouts=[], now=10, count=3, period=60) == 10
    assert rate_limit_next(rollouts=[0, 5], now=10, count=3, period=60) == 10
    assert rate_limit_next(rollouts=[0, 5, 9], now=10, count=3, period=60) == 60
    assert rate_limit_next(rollouts=[0, 5, 9], now=61, count=3, period=60) == 61
    assert rate_limit_next(rollouts=[0, 5, 9, 61], now=62, count=3, period=60) == 65
    assert rate_limit_next(rollouts=[1], now=2, count=1, period=10) == 11


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=30), st.integers(1, 5), st.floats(1, 100))
def test_following_the_rate_limit_never_exceeds_it(requests: list[float], count: int, period: float) -> None:
    done: list[float] = []
    for t in sorted(requests):
        allowed = rate_limit_next(rollouts=done, now=t, count=count, period=period)
        assert allowed >= t
        done.append(allowed)
        done.sort()
    for i, t in enumerate(done):
        window = [u for u in done if t <= u < t + period]
        assert len(window) <= count, (i, done)


def test_parse_rate_limit() -> None:
    assert parse_rate_limit("3/60") == (3, 60.0)
    assert parse_rate_limit("1/2.5s") == (1, 2.5)
    for bad in ("3", "0/10", "2/0", "x/1"):
        with pytest.raises(ValueError):  # noqa: PT011 - the message is checked by the CLI's own output
            parse_rate_limit(bad)


# ---------------------------------------------------------------------------------------------------- shared layering
_names = st.sampled_from(["a", "b", "c", "d", "e"])
_entries = st.lists(
    st.builds(
        lambda name, data, service, priority: entry(name, data, service=service, priority=priority),
        _names,
        st.dictionaries(st.sampled_from(["k", "x/y", "z"]), st.sampled_from(["1", "2"]), max_size=3),
        st.sampled_from([None, None, "payments", "cart"]),
        st.integers(0, 1),
    ),
    max_size=6,
    unique_by=lambda e: e.name,
)


@given(_entries, _names, st.sampled_from([None, "payments"]))
def test_the_shared_layering_plans_exactly_what_the_per_entry_merge_gives(
    others: list[ConfigEntry], name: str, service: str | None
) -> None:
    """plan (layerings built once per scope) agrees with merge and conflicts (computed per entry, from every
    peer): same data, same winner for each key, Conflict exactly when the entry ties on a key."""
    me = entry(name, {"k": "mine"}, service=service)
    peers = [e for e in others if e.key != me.key]
    p = plan(me, peers, history=[])
    assert p.data == config_map_data(merge(me, peers).values)
    assert p.sources == merge(me, peers).sources
    tied = conflicts([e for e in [*peers, me] if e.service == me.service])
    assert (p.conflict.status == "True") == (name in tied)


def test_a_conflict_among_many_names_a_few_and_counts_the_rest() -> None:
    tie = [entry(f"e{i:02d}", {"k": str(i)}) for i in range(30)]
    p = plan(tie[0], tie, history=[])
    assert p.conflict.reason == "KeyConflict"
    assert "k (also set by e01, e02, e03, e04, e05, e06, e07, e08 and 21 more; e29 wins)" in p.conflict.message
    assert len(p.conflict.message) < 200


def test_a_revision_is_intact_only_exactly_as_beacon_wrote_it() -> None:
    data = {"k": "v"}
    obj = desired_revision(PAYMENTS, data=data, digest=content_hash(data), revision=2, rollback_of=None)
    recorded = Revision(2, obj["metadata"]["name"], content_hash(data))
    assert revision_intact(obj, PAYMENTS, recorded)
    for path, value in (
        (("revision",), 3),
        (("metadata", "labels", "extra"), "x"),
        (("metadata", "annotations", ANNOTATION_HASH), "0" * 16),
        (("metadata", "ownerReferences"), []),
        (("data", "data", "k"), "other"),
    ):
        edited = json.loads(json.dumps(obj))
        target = edited
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        assert not revision_intact(edited, PAYMENTS, recorded), path
