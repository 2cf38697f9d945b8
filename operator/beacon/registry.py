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


def _pack(records: Sequence[RegistryRecord], budget: int) -> list[dict[str, Obj]]:
    shards: list[dict[str, Obj]] = [{}]
    used = 0
    for record in sorted(records, key=lambda r: r.name):
        size = len(_dumps(record.body)) + len(record.name) + 8
        if shards[-1] and used + size > budget:
            shards.append({})
            used = 0
        shards[-1][record.name] = record.body
        used += size
    return shards


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
    shards = _pack(records, shard_bytes)
    names = [shard_name(i) for i in range(len(shards))]
    out = []
    for index, services in enumerate(shards):
        document: Obj = {
            "format": FORMAT,
            "namespace": namespace,
            "revision": revision,
            "shard": index,
            "shards": names,
            "services": services,
        }
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
                "data": {DATA_KEY: json.dumps(document, sort_keys=True, indent=1)},
            }
        )
    return out
