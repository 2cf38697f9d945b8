"""The namespace registry: a revision that moves only with content, and shards that stay under the byte budget."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from beacon.reconcile import RegistryRecord
from beacon.registry import (
    ANNOTATION_HASH,
    ANNOTATION_REVISION,
    DATA_KEY,
    LABEL_REGISTRY,
    REGISTRY_NAME,
    SHARD_BYTES,
    desired_registry,
    shard_name,
)

CONFIGMAP_LIMIT = 1024 * 1024


def record(name: str, endpoints: int = 1, **extra: Any) -> RegistryRecord:
    body = {
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"address": f"198.18.{i // 250}.{i % 250}", "ports": {"http": 8080}, "zone": "a"} for i in range(endpoints)
        ],
        **extra,
    }
    return RegistryRecord(name=name, body=body)


def documents(configmaps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(cm["data"][DATA_KEY]) for cm in configmaps]


def head_annotations(configmaps: Sequence[dict[str, Any]]) -> dict[str, str]:
    head = next(cm for cm in configmaps if cm["metadata"]["name"] == REGISTRY_NAME)
    result: dict[str, str] = head["metadata"]["annotations"]
    return result


def test_shard_names() -> None:
    assert [shard_name(i) for i in range(3)] == ["beacon-registry", "beacon-registry-1", "beacon-registry-2"]


def test_a_small_registry_is_one_configmap_listing_every_service() -> None:
    (cm,) = desired_registry("shop", [record("b"), record("a")], previous=None)
    assert cm["metadata"]["name"] == "beacon-registry"
    assert cm["metadata"]["namespace"] == "shop"
    assert cm["metadata"]["labels"][LABEL_REGISTRY] == "true"
    (doc,) = documents([cm])
    assert (doc["namespace"], doc["shard"], doc["shards"], doc["revision"]) == ("shop", 0, ["beacon-registry"], 1)
    assert sorted(doc["services"]) == ["a", "b"]
    assert doc["services"]["a"]["endpoints"][0]["address"] == "198.18.0.0"


def test_an_empty_namespace_still_has_the_head_configmap() -> None:
    (cm,) = desired_registry("shop", [], previous=None)
    assert documents([cm])[0]["services"] == {}


def test_revision_increments_only_on_content_change() -> None:
    records = [record("a"), record("b", endpoints=3)]
    first = desired_registry("shop", records, previous=None)
    assert head_annotations(first)[ANNOTATION_REVISION] == "1"

    same = desired_registry("shop", list(reversed(records)), previous=head_annotations(first))
    assert head_annotations(same)[ANNOTATION_REVISION] == "1"
    assert same == first  # nothing to write

    changed = desired_registry("shop", [record("a"), record("b", endpoints=2)], previous=head_annotations(first))
    assert head_annotations(changed)[ANNOTATION_REVISION] == "2"
    assert head_annotations(changed)[ANNOTATION_HASH] != head_annotations(first)[ANNOTATION_HASH]
    assert documents(changed)[0]["revision"] == 2

    again = desired_registry("shop", [record("a"), record("b", endpoints=2)], previous=head_annotations(changed))
    assert head_annotations(again)[ANNOTATION_REVISION] == "2"


def test_revision_continues_from_a_previous_registry_without_a_hash() -> None:
    configmaps = desired_registry("shop", [record("a")], previous={ANNOTATION_REVISION: "41"})
    assert head_annotations(configmaps)[ANNOTATION_REVISION] == "42"


def test_large_registries_are_sharded_in_name_order() -> None:
    records = [record(f"svc-{i:02d}", endpoints=20) for i in range(30)]
    configmaps = desired_registry("shop", records, previous=None, shard_bytes=8 * 1024)
    assert len(configmaps) > 2
    names = [cm["metadata"]["name"] for cm in configmaps]
    assert names == [shard_name(i) for i in range(len(configmaps))]
    docs = documents(configmaps)
    assert all(doc["shards"] == names for doc in docs)
    assert [doc["shard"] for doc in docs] == list(range(len(docs)))
    in_order = [name for doc in docs for name in doc["services"]]
    assert in_order == sorted(r.name for r in records)
    revisions = {cm["metadata"]["annotations"][ANNOTATION_REVISION] for cm in configmaps}
    assert revisions == {"1"}


def test_default_budget_keeps_a_big_namespace_under_the_configmap_limit() -> None:
    """40 services of 1,000 labelled endpoints each: every ConfigMap stays well below Kubernetes' 1 MiB."""
    labels = {f"l{i}": "" for i in range(8)}  # many short values: the worst case for any per-line overhead
    records = [
        RegistryRecord(
            name=f"svc-{s}",
            body={
                "endpoints": [
                    {"address": f"198.18.{i // 250}.{i % 250}", "ports": {"http": 8080}, "labels": labels}
                    for i in range(1000)
                ]
            },
        )
        for s in range(40)
    ]
    configmaps = desired_registry("shop", records, previous=None)
    assert len(configmaps) > 1
    for cm in configmaps:
        assert len(cm["data"][DATA_KEY].encode()) <= SHARD_BYTES < CONFIGMAP_LIMIT


names_st = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40)
body_st = st.dictionaries(
    keys=st.text(alphabet="abcdefghij", min_size=1, max_size=8),
    values=st.one_of(st.integers(), st.text(max_size=12), st.lists(st.integers(-1000, 1000), max_size=5)),
    max_size=4,
)
RECORD_MAX = 400  # so that every record fits a shard on its own, with room for the shard list


@settings(max_examples=150, deadline=None)
@given(
    bodies=st.dictionaries(keys=names_st, values=body_st, max_size=40),
    shard_bytes=st.integers(min_value=2000, max_value=6000),
    namespace=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=63),
)
def test_sharding_stays_within_budget_and_loses_no_service(
    bodies: dict[str, dict[str, Any]], shard_bytes: int, namespace: str
) -> None:
    assume(all(len(json.dumps({name: body})) <= RECORD_MAX for name, body in bodies.items()))
    records = [RegistryRecord(name=name, body=body) for name, body in bodies.items()]
    configmaps = desired_registry(namespace, records, previous=None, shard_bytes=shard_bytes)
    for cm in configmaps:
        assert len(cm["data"][DATA_KEY].encode()) <= shard_bytes
    merged: dict[str, Any] = {}
    for doc in documents(configmaps):
        assert not set(merged) & set(doc["services"])  # every service in exactly one shard
        merged.update(doc["services"])
    assert merged == bodies
    assert configmaps[0]["metadata"]["name"] == REGISTRY_NAME
