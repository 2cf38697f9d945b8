"""The namespace registry: every ServiceEntry's healthy endpoints as JSON in ConfigMaps that pods can mount. Pure.

Why it exists: DNS gives addresses; the registry gives everything else a client or sidecar wants (ports, zones,
tags, labels) in one file, Consul-catalog style. Pods can mount only ConfigMaps of their own namespace, so there
is one registry per namespace. A ConfigMap must stay under 1 MiB, so services are packed, in name order, into
shards of at most `SHARD_BYTES`: `beacon-registry` always exists and lists the shard names; `beacon-registry-1`,
`-2`, ... follow when needed. The revision goes up by one whenever the content changes, never otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from beacon.reconcile import RegistryRecord

REGISTRY_NAME = "beacon-registry"
DATA_KEY = "registry.json"
SHARD_BYTES = 512 * 1024
ANNOTATION_REVISION = "beacon.dev/registry-revision"
ANNOTATION_HASH = "beacon.dev/registry-hash"
LABEL_REGISTRY = "beacon.dev/registry"
FORMAT = "beacon.dev/registry/v1"

Obj = dict[str, Any]


def shard_name(index: int) -> str:
    return REGISTRY_NAME if index == 0 else f"{REGISTRY_NAME}-{index}"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def content_hash(records: Sequence[RegistryRecord]) -> str:
    body = _dumps({r.name: r.body for r in sorted(records, key=lambda r: r.name)})
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _document(namespace: str, revision: int, index: int, names: Sequence[str], services: Obj) -> Obj:
    return {
        "format": FORMAT,
        "namespace": namespace,
        "revision": revision,
        "shard": index,
        "shards": list(names),
        "services": services,
    }


def _pack(records: Sequence[RegistryRecord], budget: int, *, namespace: str, revision: int) -> list[dict[str, Obj]]:
    """Services in name order, greedily packed so that each shard's serialised document stays within `budget`.

    The document around the services (format, namespace, revision, shard list) takes room too, and the shard list
    grows with the number of shards: pack for an assumed count, and repack for more if that was too few.
    """
    ordered = sorted(records, key=lambda r: r.name)
    sizes = [len(_dumps(r.name)) + len(_dumps(r.body)) + 2 for r in ordered]  # `"name":{...},`
    count = 1
    while True:
        names = [shard_name(i) for i in range(count)]
        room = budget - len(_dumps(_document(namespace, revision, count - 1, names, {})))
        shards: list[dict[str, Obj]] = [{}]
        used = 0
        for record, size in zip(ordered, sizes, strict=True):
            if shards[-1] and used + size > room:
                shards.append({})
                used = 0
            shards[-1][record.name] = record.body
            used += size
        if len(shards) <= count:
            return shards
        count = len(shards)


def desired_registry(
    namespace: str,
    records: Sequence[RegistryRecord],
    *,
    previous: Mapping[str, str] | None,
    shard_bytes: int = SHARD_BYTES,
) -> list[Obj]:
    """The registry ConfigMaps of `namespace`. `previous` is the annotations of the current `beacon-registry`."""
    digest = content_hash(records)
    prev_revision = int((previous or {}).get(ANNOTATION_REVISION, "0") or 0)
    same = previous is not None and previous.get(ANNOTATION_HASH) == digest
    revision = prev_revision if same else prev_revision + 1
    shards = _pack(records, shard_bytes, namespace=namespace, revision=revision)
    names = [shard_name(i) for i in range(len(shards))]
    out = []
    for index, services in enumerate(shards):
        document = _document(namespace, revision, index, names, services)
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": names[index],
                    "namespace": namespace,
                    "labels": {LABEL_REGISTRY: "true", "app.kubernetes.io/managed-by": "beacon"},
                    "annotations": {ANNOTATION_REVISION: str(revision), ANNOTATION_HASH: digest},
                },
                # compact, so the bytes written are the bytes the packing counted (indentation doubled them)
                "data": {DATA_KEY: _dumps(document)},
            }
        )
    return out
