"""The pure core of ConfigEntries: layering, key mapping, content hashes, the desired ConfigMap and
ControllerRevision, revision bookkeeping, the reload decisions (debounce, rate limit), the key selections of
workloads that read only some keys (`parse_reload`, `selection_hash`) and adoption (which revision each pod runs,
the bounded status summary). No I/O, no clock.

Why it exists: what beacon materialises for a ConfigEntry, and when it restarts a workload, are functions of
(the entries of a namespace, the history, the workload's annotations, the time). Keeping them here, with time as
an argument, makes every rule of the README's "ConfigEntry" section unit-testable without a cluster or a sleep;
`beacon.configs` owns the state and the timers and does the I/O through `beacon.kube`.

Semantics (README "ConfigEntry"):
- Each entry materialises its own ConfigMap (spec.target, default: the entry's name) holding the effective config
  of its scope: a namespace-wide entry (no spec.service) gets the merge of every namespace-wide entry; an entry
  for service S gets the namespace-wide merge overlaid by every entry for S.
- Precedence, lowest first: scope (namespace-wide < service-scoped), then spec.priority (higher wins), then the
  entry name (the name that sorts last wins). Two entries of the same scope and priority that set the same key
  conflict: the last name wins and both get Conflict=True naming the key.
- Keys map '/' -> '.' (db/pool/size -> db.pool.size); the CRD forbids '.' in segments, so the map is one-to-one.
- The content hash is sha256 over the canonical JSON of the ConfigMap data, first 16 hex digits.

Cost: the layering of a scope (the namespace-wide merge, or that merge overlaid by one service's entries), its
key conflicts and its invalid keys are computed once per change of the scope (`layering`, a `Layering`) and
shared by every entry of the scope; planning one entry (`plan_in`) then costs its own keys, not the entries of
its namespace. With N namespace-wide entries, materialising all of them is O(N) layer visits, not O(N^2).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from beacon.reconcile import Condition, merge_conditions
from beacon.rollout_core import (
    ANNOTATION_PROMOTE,
    LABEL_CANARY_REVISION,
    RolloutSpec,
    canary_map_name,
    parse_promote,
)

GROUP = "beacon.dev"
VERSION = "v1alpha1"
KIND = "ConfigEntry"

LABEL_ENTRY_UID = "beacon.dev/config-entry-uid"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANNOTATION_ENTRY = "beacon.dev/config-entry"
ANNOTATION_HASH = "beacon.dev/config-hash"
ANNOTATION_REVISION = "beacon.dev/config-revision"
ANNOTATION_ROLLBACK_OF = "beacon.dev/rollback-of"
ANNOTATION_COPY_HASH = "beacon.dev/canary-hash"  # the content hash of a canary copy (not the target's annotation)
# on a Deployment/StatefulSet/DaemonSet: the ConfigMaps whose changes restart it (comma-separated names)
ANNOTATION_RELOAD = "beacon.dev/reload"
# on its pod template: "name=hash,..." of the configs the template was last rolled out for (the hash of the keys
# it selected, for a workload that reads only some keys: see parse_reload)
ANNOTATION_TEMPLATE_HASHES = "beacon.dev/config-hashes"
# on its pod template, with the hashes: "name=revision,..." (the revision of each config at that rollout), so that each
# pod carries the revision it runs, whatever is pruned or rolled back later
ANNOTATION_TEMPLATE_REVISIONS = "beacon.dev/config-revisions"
# on its metadata, never on the template: the hashes seen when the workload opted in (no rollout for that)
ANNOTATION_BASELINE = "beacon.dev/config-hashes-baseline"

DEFAULT_HISTORY_LIMIT = 10
# The API caps a ConfigMap's data at 1 MiB; beacon keeps a margin for metadata and the JSON of the
# ControllerRevision that stores the same data.
MAX_DATA_BYTES = 1_000_000
HASH_LENGTH = 16

_SEGMENT = r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?"
KEY_PATTERN = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
MAX_KEY_LENGTH = 253

Obj = dict[str, Any]


# ---------------------------------------------------------------------------------------------------- the entry
@dataclass(frozen=True)
class ConfigEntry:
    """A ConfigEntry as read from the API: identity plus the spec fields beacon uses."""

    namespace: str
    name: str
    uid: str
    generation: int
    data: Mapping[str, str] = field(default_factory=dict)
    service: str | None = None
    priority: int = 0
    target: str | None = None
    history_limit: int = DEFAULT_HISTORY_LIMIT
    rollback_to: int | None = None
    rollout: RolloutSpec | None = None  # spec.rollout / spec.canary: tracked rollouts (beacon.rollout_core)
    promote: int | None = None  # the revision the beacon.dev/promote annotation promotes

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ConfigEntry:
        meta, spec = body["metadata"], body.get("spec") or {}
        rollback = spec.get("rollbackTo")
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=int(meta.get("generation", 1)),
            # values are strings by schema; anything else is kept as-is and reported by `invalid_keys`
            data=dict(spec.get("data") or {}),
            service=spec.get("service") or None,
            priority=int(spec.get("priority", 0)),
            target=spec.get("target") or None,
            history_limit=int(spec.get("revisionHistoryLimit", DEFAULT_HISTORY_LIMIT)),
            rollback_to=int(rollback) if rollback is not None else None,
            rollout=RolloutSpec.from_spec(spec),
            promote=parse_promote((meta.get("annotations") or {}).get(ANNOTATION_PROMOTE)),
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def config_map_name(self) -> str:
        return config_map_name(name=self.name, target=self.target)


def config_map_name(*, name: str, target: str | None) -> str:
    """spec.target, or else the entry's own name (a valid ConfigMap name, since entry names are DNS subdomains)."""
    return target or name


def owner_reference(entry: ConfigEntry) -> Obj:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": entry.name,
        "uid": entry.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# ---------------------------------------------------------------------------------------------------- keys, hash
def config_map_key(key: str) -> str:
    """db/pool/size -> db.pool.size (a valid ConfigMap key: [-._a-zA-Z0-9]+)."""
    return key.replace("/", ".")


def invalid_keys(data: Mapping[str, Any]) -> list[str]:
    """Keys (or values) the CRD should already have rejected; beacon refuses to materialise them."""
    return sorted(
        k for k, v in data.items() if not isinstance(v, str) or len(k) > MAX_KEY_LENGTH or not KEY_PATTERN.match(k)
    )


def canonical(data: Mapping[str, str]) -> str:
    return json.dumps(dict(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(data: Mapping[str, str]) -> str:
    """Short sha256 of the ConfigMap data: equal content, equal hash, whatever the key order."""
    return hashlib.sha256(canonical(data).encode()).hexdigest()[:HASH_LENGTH]


def data_bytes(data: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in data.items())


# ---------------------------------------------------------------------------------------------------- layering
def applies_to(layer: ConfigEntry, entry: ConfigEntry) -> bool:
    """Whether `layer` contributes to `entry`'s effective config (same namespace, same or wider scope)."""
    if layer.namespace != entry.namespace:
        return False
    return layer.service is None or layer.service == entry.service


def precedence(entry: ConfigEntry) -> tuple[int, int, str]:
    """Sort key, lowest first; the last layer setting a key wins."""
    return (0 if entry.service is None else 1, entry.priority, entry.name)


@dataclass(frozen=True)
class Merged:
    values: dict[str, str]  # hierarchical key -> value
    sources: dict[str, str]  # hierarchical key -> name of the winning entry


def merge(entry: ConfigEntry, entries: Iterable[ConfigEntry]) -> Merged:
    """The effective config of `entry`'s scope, built from `entries` (which may include `entry` itself)."""
    layers = sorted({e.key: e for e in [*entries, entry] if applies_to(e, entry)}.values(), key=precedence)
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        for key, value in layer.data.items():
            values[key] = value
            sources[key] = layer.name
    return Merged(values=dict(sorted(values.items())), sources=dict(sorted(sources.items())))


def conflicts(entries: Iterable[ConfigEntry]) -> dict[str, dict[str, list[str]]]:
    """entry name -> {key: [other entries of the same scope and priority that set it too]} (sorted)."""
    groups: dict[tuple[str, str | None, int], list[ConfigEntry]] = defaultdict(list)
    for e in entries:
        groups[(e.namespace, e.service, e.priority)].append(e)
    out: dict[str, dict[str, list[str]]] = {}
    for members in groups.values():
        setters: dict[str, list[str]] = defaultdict(list)
        for e in members:
            for key in e.data:
                setters[key].append(e.name)
        for key, names in setters.items():
            if len(names) < 2:
                continue
            for name in names:
                out.setdefault(name, {})[key] = sorted(n for n in names if n != name)
    return {name: dict(sorted(keys.items())) for name, keys in sorted(out.items())}


def conflict_condition(name: str, found: Mapping[str, Mapping[str, list[str]]]) -> Condition:
    mine = found.get(name) or {}
    if not mine:
        return Condition("Conflict", "False", "NoConflict", "no other entry of the same scope and priority sets a key")
    parts = []
    for key, others in list(mine.items())[:8]:
        winner = max([name, *others])
        parts.append(f"{key} (also set by {', '.join(others)}; {winner} wins)")
    more = f" and {len(mine) - 8} more keys" if len(mine) > 8 else ""
    message = "same scope and priority set " + "; ".join(parts) + more
    return Condition("Conflict", "True", "KeyConflict", message)


def config_map_data(values: Mapping[str, str]) -> dict[str, str]:
    return {config_map_key(k): v for k, v in sorted(values.items())}


# ---------------------------------------------------------------------------------------------------- history
@dataclass(frozen=True)
class Revision:
    """One stored revision (a ControllerRevision): its number, object name and content hash."""

    number: int
    name: str
    hash: str
    rollback_of: int | None = None


def revision_name(entry_name: str, number: int) -> str:
    """<entry>-<n>; long entry names are shortened with a digest so the name stays within 253 characters."""
    base = entry_name
    if len(base) > 230:
        base = base[:219] + "-" + hashlib.sha256(entry_name.encode()).hexdigest()[:10]
    return f"{base}-{number}"


def revision_from_object(obj: Mapping[str, Any]) -> Revision:
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    data = (obj.get("data") or {}).get("data")
    digest = annotations.get(ANNOTATION_HASH) or (content_hash(data) if isinstance(data, dict) else "")
    rollback = annotations.get(ANNOTATION_ROLLBACK_OF)
    return Revision(
        number=int(obj.get("revision", 0)),
        name=meta.get("name", ""),
        hash=digest,
        rollback_of=int(rollback) if rollback and str(rollback).isdigit() else None,
    )


def revision_data(obj: Mapping[str, Any]) -> dict[str, str] | None:
    """The ConfigMap data a ControllerRevision stores, or None when it is not what beacon wrote."""
    data = (obj.get("data") or {}).get("data")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return dict(data)


@dataclass(frozen=True)
class Current:
    """What the ConfigMap holds now, from its annotations."""

    revision: int
    hash: str


def choose_revision(*, history: Sequence[Revision], current: Current | None, desired_hash: str) -> tuple[int, bool]:
    """(revision number to materialise, whether to record it as a new ControllerRevision).

    Unchanged content keeps the current revision. If the newest stored revision already holds the content (a
    write of the ConfigMap failed after the revision was recorded), it is reused. Otherwise a new revision
    follows the highest number ever used, so numbers only go up, also after pruning.
    """
    numbers = {r.number for r in history}
    if current is not None and current.hash == desired_hash and current.revision in numbers:
        return current.revision, False
    newest = max(history, key=lambda r: r.number, default=None)
    if newest is not None and newest.hash == desired_hash and (current is None or current.revision <= newest.number):
        return newest.number, False
    highest = max([*numbers, current.revision if current else 0, 0])
    return highest + 1, True


def to_prune(*, numbers: Iterable[int], limit: int, keep: Iterable[int | None] = ()) -> list[int]:
    """Revisions beyond the newest `limit`, except those in `keep` (the current one, the one pinned by
    spec.rollbackTo): oldest first."""
    ordered = sorted(set(numbers), reverse=True)
    protected = {k for k in keep if k is not None}
    return sorted(n for n in ordered[max(limit, 1) :] if n not in protected)


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """What to materialise for one entry, or why not (then `data` is None and the ConfigMap stays as it is)."""

    data: dict[str, str] | None
    hash: str | None
    ready: Condition
    conflict: Condition
    rollback_of: int | None = None
    sources: dict[str, str] = field(default_factory=dict)


MAX_NAMED = 8  # other entries named per conflicting key in the Conflict message; the rest are counted


@dataclass(frozen=True)
class Layering:
    """The layering of one scope of one namespace: namespace-wide (`service` None) or one service's (the
    namespace-wide layering overlaid by that service's entries). Computed once per change of the scope's entries
    (or, for a service scope, of the namespace-wide ones beneath it) and shared by every entry of the scope.

    `data` is None when some layer has invalid keys or the merge is too large; `plan_in` says why, per entry.
    `data` and `merged` are shared by every plan of the scope: never mutate them."""

    namespace: str
    service: str | None
    merged: Merged
    data: dict[str, str] | None
    hash: str | None
    size: int
    # (entry name, its invalid keys) of every layer that has some, namespace-wide and this scope's, by name
    invalid: tuple[tuple[str, tuple[str, ...]], ...]
    # (priority, key) -> sorted names of this scope's own entries that set it, for keys set by two or more
    setters: Mapping[tuple[int, str], tuple[str, ...]]
    layers: int  # entries that contribute a key


def layering(
    entries: Iterable[ConfigEntry], *, namespace: str, service: str | None, base: Layering | None = None
) -> Layering:
    """The layering of `service`'s scope (None: namespace-wide) in `namespace`, from `entries` (those of other
    scopes or namespaces are ignored). A service scope lays its entries over `base`, the namespace-wide layering
    (None: no namespace-wide entries). Cost: O(this scope's entries + keys of the merge)."""
    own = sorted(
        (e for e in entries if e.namespace == namespace and e.service == service),
        key=precedence,
    )
    below = base if service is not None else None
    values: dict[str, str] = dict(below.merged.values) if below is not None else {}
    sources: dict[str, str] = dict(below.merged.sources) if below is not None else {}
    by_key: dict[tuple[int, str], list[str]] = defaultdict(list)
    bad: list[tuple[str, tuple[str, ...]]] = list(below.invalid) if below is not None else []
    for layer in own:
        for key, value in layer.data.items():
            values[key] = value
            sources[key] = layer.name
            by_key[(layer.priority, key)].append(layer.name)
        wrong = invalid_keys(layer.data)
        if wrong:
            bad.append((layer.name, tuple(wrong)))
    merged = Merged(values=dict(sorted(values.items())), sources=dict(sorted(sources.items())))
    setters = {k: tuple(sorted(names)) for k, names in by_key.items() if len(names) > 1}
    data = config_map_data(merged.values)
    size = data_bytes(data)
    usable = not bad and size <= MAX_DATA_BYTES
    return Layering(
        namespace=namespace,
        service=service,
        merged=merged,
        data=data if usable else None,
        hash=content_hash(data) if usable else None,
        size=size,
        invalid=tuple(sorted(bad)),
        setters=setters,
        layers=len(set(sources.values())),
    )


def conflict_of(entry: ConfigEntry, scope: Layering) -> Condition:
    """`entry`'s Conflict condition from its scope's setters: O(its own keys), whatever the size of the tie."""
    mine = sorted(k for k in entry.data if (entry.priority, k) in scope.setters)
    if not mine:
        return Condition("Conflict", "False", "NoConflict", "no other entry of the same scope and priority sets a key")
    parts = []
    for key in mine[:8]:
        names = scope.setters[(entry.priority, key)]
        at = bisect.bisect_left(names, entry.name)
        present = at < len(names) and names[at] == entry.name
        others = [n for n in names[: MAX_NAMED + 1] if n != entry.name][:MAX_NAMED]
        count = len(names) - (1 if present else 0)
        more = f" and {count - len(others)} more" if count > len(others) else ""
        winner = max(names[-1], entry.name)
        parts.append(f"{key} (also set by {', '.join(others)}{more}; {winner} wins)")
    more_keys = f" and {len(mine) - 8} more keys" if len(mine) > 8 else ""
    return Condition("Conflict", "True", "KeyConflict", "same scope and priority set " + "; ".join(parts) + more_keys)


def plan(
    entry: ConfigEntry,
    entries: Iterable[ConfigEntry],
    *,
    history: Sequence[Revision],
    rollback_data: Mapping[str, str] | None = None,
) -> Plan:
    """Decide the ConfigMap content of `entry` among `entries` (which may include it). Builds the layerings of
    its scope and calls `plan_in`; an engine planning many entries keeps the layerings instead (`layering`)."""
    peers = {e.key: e for e in entries if e.namespace == entry.namespace}
    peers[entry.key] = entry
    scope = wide = layering(peers.values(), namespace=entry.namespace, service=None)
    if entry.service is not None:
        scope = layering(peers.values(), namespace=entry.namespace, service=entry.service, base=wide)
    return plan_in(entry, scope, history=history, rollback_data=rollback_data)


def plan_in(
    entry: ConfigEntry,
    scope: Layering,
    *,
    history: Sequence[Revision],
    rollback_data: Mapping[str, str] | None = None,
) -> Plan:
    """Decide the ConfigMap content of `entry` from the layering of its scope (built with `entry` as it is now).
    `rollback_data` is the stored data of spec.rollbackTo when that revision exists in `history` (the engine
    reads it); it is ignored without spec.rollbackTo. Cost: O(the entry's own keys)."""
    conflict = conflict_of(entry, scope)
    others = [(name, keys) for name, keys in scope.invalid if name != entry.name]
    own = invalid_keys(entry.data)
    if others or own:
        who, bad = (f"entry {others[0][0]}", list(others[0][1])) if others else ("this entry", own)
        shown = ", ".join(repr(k) for k in bad[:5])
        message = f"{who} has keys that are not allowed (or non-string values): {shown}"
        return Plan(None, None, Condition("Ready", "False", "InvalidKeys", message), conflict)
    if entry.rollback_to is not None:
        if entry.rollback_to not in {r.number for r in history}:
            known = ", ".join(str(r.number) for r in sorted(history, key=lambda r: r.number)) or "none"
            message = (
                f"spec.rollbackTo: revision {entry.rollback_to} does not exist (kept revisions: {known}); "
                "the ConfigMap keeps its current content"
            )
            return Plan(None, None, Condition("Ready", "False", "RevisionNotFound", message), conflict)
        if rollback_data is None:
            message = f"revision {entry.rollback_to} could not be read; the ConfigMap keeps its current content"
            return Plan(None, None, Condition("Ready", "False", "RevisionUnreadable", message), conflict)
        data = dict(rollback_data)
        digest = content_hash(data)
        message = f"pinned to revision {entry.rollback_to} by spec.rollbackTo (hash {digest})"
        return Plan(data, digest, Condition("Ready", "True", "RolledBack", message), conflict, entry.rollback_to)
    if scope.data is None or scope.hash is None:
        message = (
            f"the merged configuration is {scope.size} bytes, over the limit of {MAX_DATA_BYTES} bytes (a ConfigMap "
            "holds at most 1 MiB); the ConfigMap keeps its current content"
        )
        return Plan(None, None, Condition("Ready", "False", "TooLarge", message), conflict)
    message = f"{len(scope.data)} keys from {scope.layers} entries (hash {scope.hash})"
    ready = Condition("Ready", "True", "Materialised", message)
    return Plan(scope.data, scope.hash, ready, conflict, sources=scope.merged.sources)


# ---------------------------------------------------------------------------------------------------- objects
def _labels(entry: ConfigEntry) -> dict[str, str]:
    return {LABEL_ENTRY_UID: entry.uid, LABEL_MANAGED_BY: "beacon"}


def desired_config_map(entry: ConfigEntry, *, data: Mapping[str, str], digest: str, revision: int) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": entry.config_map_name,
            "namespace": entry.namespace,
            "labels": _labels(entry),
            "annotations": {
                ANNOTATION_ENTRY: entry.name,
                ANNOTATION_HASH: digest,
                ANNOTATION_REVISION: str(revision),
            },
            "ownerReferences": [owner_reference(entry)],
        },
        "data": dict(data),
    }


def desired_revision(
    entry: ConfigEntry, *, data: Mapping[str, str], digest: str, revision: int, rollback_of: int | None
) -> Obj:
    annotations = {ANNOTATION_ENTRY: entry.name, ANNOTATION_HASH: digest}
    if rollback_of is not None:
        annotations[ANNOTATION_ROLLBACK_OF] = str(rollback_of)
    return {
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": revision_name(entry.name, revision),
            "namespace": entry.namespace,
            "labels": _labels(entry),
            "annotations": annotations,
            "ownerReferences": [owner_reference(entry)],
        },
        "revision": revision,
        "data": {"data": dict(data)},
    }


def revision_intact(obj: Mapping[str, Any], entry: ConfigEntry, recorded: Revision) -> bool:
    """Whether a ControllerRevision is exactly what beacon wrote for `recorded`: its number, labels, annotations
    and owner as `desired_revision` makes them, and data with the recorded content hash. Anything else (an edit
    by hand, a label or annotation added or removed) is to be written back."""
    want = desired_revision(
        entry, data={}, digest=recorded.hash, revision=recorded.number, rollback_of=recorded.rollback_of
    )["metadata"]
    meta = obj.get("metadata") or {}
    if obj.get("revision") != recorded.number or meta.get("name") != recorded.name:
        return False
    if (meta.get("labels") or {}) != want["labels"] or (meta.get("annotations") or {}) != want["annotations"]:
        return False
    refs = meta.get("ownerReferences") or []
    (owner,) = want["ownerReferences"]
    if len(refs) != 1 or any(refs[0].get(k) != v for k, v in owner.items()):
        return False
    data = revision_data(obj)
    return data is not None and content_hash(data) == recorded.hash


def current_of(config_map: Mapping[str, Any] | None, entry: ConfigEntry) -> Current | None:
    """What an existing ConfigMap of `entry` holds (None if absent or not written by beacon for this entry)."""
    if config_map is None:
        return None
    meta = config_map.get("metadata") or {}
    if not any(ref.get("uid") == entry.uid for ref in meta.get("ownerReferences") or []):
        return None
    annotations = meta.get("annotations") or {}
    revision = str(annotations.get(ANNOTATION_REVISION, ""))
    digest = annotations.get(ANNOTATION_HASH)
    if not revision.isdigit() or not digest:
        return None
    return Current(revision=int(revision), hash=str(digest))


def owned_by_other(config_map: Mapping[str, Any] | None, entry: ConfigEntry) -> bool:
    if config_map is None:
        return False
    refs = (config_map.get("metadata") or {}).get("ownerReferences") or []
    return not any(ref.get("uid") == entry.uid for ref in refs)


def desired_status(
    entry: ConfigEntry,
    *,
    ready: Condition,
    conflict: Condition,
    current: Current | None,
    config_map: str | None,
    previous: Mapping[str, Any] | None,
    now: float,
    served_by: str | None = None,
    adoption: Obj | None = None,
    rollout: Obj | None = None,
    rollback: Obj | None = None,
    rollout_condition: Condition | None = None,
) -> Obj:
    """The entry's status. `served_by`: the replica that serves it (sharded mode), else omitted. `adoption`: the
    bounded summary of how far the current revision has got (see `adoption`), once there is a current revision."""
    conditions = [ready, conflict, *([rollout_condition] if rollout_condition is not None else [])]
    status: Obj = {
        "observedGeneration": entry.generation,
        "conditions": merge_conditions(
            (previous or {}).get("conditions") or [], conditions, generation=entry.generation, now=now
        ),
    }
    if current is not None:
        status["currentRevision"] = current.revision
        status["hash"] = current.hash
    if config_map is not None:
        status["configMapName"] = config_map
    if served_by:
        status["servedBy"] = served_by
    if adoption is not None and current is not None:
        status["adoption"] = adoption
    if rollout is not None:
        status["rollout"] = rollout
    if rollback is not None:
        status["rollback"] = rollback
    return status


def desired_copy(entry: ConfigEntry, *, data: Mapping[str, str], digest: str, revision: int) -> Obj:
    """The immutable copy of a revision that canaries read (kustomize's configMapGenerator, by revision): the
    target ConfigMap keeps the promoted content meanwhile, so no other pod can see this revision early."""
    labels = {**_labels(entry), LABEL_CANARY_REVISION: str(revision)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": canary_map_name(entry.config_map_name, revision),
            "namespace": entry.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_ENTRY: entry.name, ANNOTATION_COPY_HASH: digest},
            "ownerReferences": [owner_reference(entry)],
        },
        "immutable": True,
        "data": dict(data),
    }


# ---------------------------------------------------------------------------------------------------- reloads
def reload_names(value: str | None) -> tuple[str, ...]:
    """The ConfigMap names in a workload's beacon.dev/reload annotation ("a, b[x/]" -> ("a", "b")); raises
    ReloadSyntaxError for a value `parse_reload` refuses."""
    return tuple(parse_reload(value))


def format_hashes(hashes: Mapping[str, str]) -> str:
    return ",".join(f"{name}={digest}" for name, digest in sorted(hashes.items()))


def parse_hashes(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    out = {}
    for part in value.split(","):
        name, sep, digest = part.strip().partition("=")
        if sep and name:
            out[name] = digest
    return out


@dataclass(frozen=True)
class Reload:
    """What to do to one workload: nothing, record a baseline (no rollout), or roll it out."""

    action: str  # "none" | "baseline" | "rollout"
    template: str | None = None  # new pod-template annotation value (rollout)
    baseline: str | None = None  # new metadata annotation value (baseline; "" removes it)


def reload_decision(
    *, desired: Mapping[str, str], template: Mapping[str, str] | None, baseline: Mapping[str, str] | None
) -> Reload:
    """Compare the hashes of the ConfigMaps a workload names (`desired`, only those that exist) with what its pod
    template was rolled out for (`template`) and, for configs the template does not list, with the hashes seen
    when it opted in (`baseline`).

    A hash that differs from the known one means the pods run old config: roll out (the template annotation
    becomes `desired`, which the debounce and the rate limit gate). A config never seen before is recorded as
    the baseline without a rollout: opting in, or starting the operator, restarts nothing.
    """
    template = template or {}
    baseline = baseline or {}
    known = {**baseline, **template}
    if any(name in known and known[name] != digest for name, digest in desired.items()):
        return Reload("rollout", template=format_hashes(desired))
    wanted = {name: digest for name, digest in desired.items() if name not in template}
    if wanted != baseline and set(wanted) - set(baseline):
        return Reload("baseline", baseline=format_hashes(wanted))
    return Reload("none")


def debounce_due(*, first_change: float, last_change: float, window: float, max_delay: float) -> float:
    """When a burst of changes may be rolled out: `window` after the last change (trailing debounce), but never
    later than `max_delay` after the first, so a config that keeps changing still gets rolled out."""
    return min(last_change + window, first_change + max(max_delay, window))


def rate_limit_next(*, rollouts: Sequence[float], now: float, count: int, period: float) -> float:
    """The earliest time another rollout is allowed: at most `count` rollouts in any `period` seconds.
    Returns `now` when one is allowed now."""
    recent = sorted(t for t in rollouts if t > now - period)
    if len(recent) < count:
        return now
    return recent[-count] + period


def parse_rate_limit(value: str) -> tuple[int, float]:
    """ "3/60" or "3/60s" -> (3, 60.0): at most 3 rollouts per 60 seconds."""
    count, sep, seconds = value.strip().partition("/")
    if not sep:
        raise ValueError(f"rate limit {value!r}: want COUNT/SECONDS, e.g. 3/60")
    n, s = int(count), float(seconds.strip().removesuffix("s"))
    if n < 1 or s <= 0:
        raise ValueError(f"rate limit {value!r}: COUNT must be >= 1 and SECONDS > 0")
    return n, s


# ---------------------------------------------------------------------------------------------------- key-aware opt-in
# beacon.dev/reload: "payments-config[db/, feature/flag], defaults" -- a ConfigMap name alone reads every key (as
# before); with [...] only the listed keys (in the ConfigEntry's '/' form) or key prefixes (ending in '/').
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_RELOAD_VALUE = 4096

Selection = tuple[str, ...] | None  # the keys and prefixes a workload reads of one ConfigMap; None: every key


class ReloadSyntaxError(ValueError):
    """A beacon.dev/reload value beacon cannot read; the message says what is wrong, for an Event."""


def _selector_ok(selector: str) -> bool:
    key = selector.removesuffix("/")
    return bool(key) and len(selector) <= MAX_KEY_LENGTH and KEY_PATTERN.match(key) is not None


def parse_reload(value: str | None) -> dict[str, Selection]:
    """The ConfigMaps a workload's beacon.dev/reload annotation names, each with the keys it reads (None: all).

    "a, b" -> {"a": None, "b": None}, as always. "a[db/, feature/flag], b" -> {"a": ("db/", "feature/flag"),
    "b": None}: of `a` only the key feature/flag and the keys under db/ matter. A name given twice reads the union
    (a bare name: every key). Raises ReloadSyntaxError for anything else (unbalanced brackets, an empty list, a
    name that is not a ConfigMap name, a key that is not a ConfigEntry key)."""
    text = (value or "").strip()
    if len(text) > MAX_RELOAD_VALUE:
        raise ReloadSyntaxError(f"longer than {MAX_RELOAD_VALUE} characters")
    parts: list[str] = []
    depth, start = 0, 0
    for at, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ReloadSyntaxError(f"nested '[' at character {at + 1}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ReloadSyntaxError(f"']' without '[' at character {at + 1}")
        elif char == "," and depth == 0:
            parts.append(text[start:at])
            start = at + 1
    if depth:
        raise ReloadSyntaxError("'[' without ']'")
    parts.append(text[start:])
    out: dict[str, set[str] | None] = {}
    for raw in (p.strip() for p in parts):
        if not raw:
            continue
        name, bracket, rest = raw.partition("[")
        name = name.strip()
        if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
            raise ReloadSyntaxError(f"{name!r} is not a ConfigMap name")
        selection: set[str] | None = None
        if bracket:
            inner, _, tail = rest.partition("]")
            if tail.strip():
                raise ReloadSyntaxError(f"unexpected {tail.strip()!r} after the keys of {name}")
            selection = {s.strip() for s in inner.split(",") if s.strip()}
            if not selection:
                raise ReloadSyntaxError(f"{name}[]: list at least one key or prefix")
            wrong = sorted(s for s in selection if not _selector_ok(s))
            if wrong:
                raise ReloadSyntaxError(
                    f"{name}: {wrong[0]!r} is not a ConfigEntry key or prefix (segments of letters, digits, '-' and "
                    "'_' separated by '/'; a prefix ends with '/')"
                )
        if name in out:
            before = out[name]
            out[name] = None if before is None or selection is None else before | selection
        else:
            out[name] = selection
    return {name: (tuple(sorted(sel)) if sel is not None else None) for name, sel in sorted(out.items())}


def selected_data(data: Mapping[str, str], selection: Selection) -> dict[str, str]:
    """The part of a ConfigMap's data (keys in '.' form) that `selection` (keys in '/' form) reads. A key selects
    itself; a prefix "db/" selects every key under db/. The '/' -> '.' map is one-to-one (no '.' in a segment), so
    the prefix "db." of ConfigMap keys is exactly the keys under db/."""
    if selection is None:
        return dict(data)
    exact = {config_map_key(s) for s in selection if not s.endswith("/")}
    prefixes = tuple(config_map_key(s) for s in selection if s.endswith("/"))
    return {k: v for k, v in data.items() if k in exact or k.startswith(prefixes)}


def selection_hash(data: Mapping[str, str], selection: Selection) -> str:
    """The hash a workload is rolled out for: that of the whole data, or of the keys it selected only (so a change
    to any other key leaves it equal and restarts nothing)."""
    return content_hash(selected_data(data, selection))


def format_revisions(revisions: Mapping[str, int]) -> str:
    return ",".join(f"{name}={number}" for name, number in sorted(revisions.items()))


def parse_revisions(value: str | None) -> dict[str, int]:
    out = {}
    for part in (value or "").split(","):
        name, sep, number = part.strip().partition("=")
        if sep and name and number.strip().isdigit():
            out[name] = int(number)
    return out


# ---------------------------------------------------------------------------------------------------- adoption
BASELINE = "baseline"  # a pod started before its workload opted in (no beacon annotation for the config)
UNKNOWN = "unknown"  # a pod whose revision cannot be told (an annotation from before revisions were recorded)
MAX_STATUS_REVISIONS = 5  # revisions in status.adoption.revisions: the current one and the newest others with pods
PodRevision = int | str  # a revision number, BASELINE or UNKNOWN


@dataclass(frozen=True)
class PodConfig:
    """What adoption needs of a pod: its labels (to find its workload), what its template was rolled out for
    (beacon's pod-template annotations, copied to the pod by the workload's controller), and its state."""

    name: str
    labels: Mapping[str, str]
    hashes: Mapping[str, str]
    revisions: Mapping[str, int]
    ready: bool
    terminating: bool

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PodConfig:
        meta = body.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        conditions = (body.get("status") or {}).get("conditions") or []
        return cls(
            name=str(meta.get("name", "")),
            labels=dict(meta.get("labels") or {}),
            hashes=parse_hashes(annotations.get(ANNOTATION_TEMPLATE_HASHES)) or {},
            revisions=parse_revisions(annotations.get(ANNOTATION_TEMPLATE_REVISIONS)),
            ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions),
            terminating=bool(meta.get("deletionTimestamp")),
        )


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A workload's spec.selector (matchLabels, matchExpressions) against a pod's labels, as the API defines it;
    an empty or missing selector selects nothing (the apps/v1 API requires one)."""
    if not selector:
        return False
    match = selector.get("matchLabels") or {}
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    expressions = selector.get("matchExpressions") or []
    for expr in expressions:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return bool(match or expressions)


@dataclass(frozen=True)
class WorkloadConfig:
    """One opted-in workload as adoption sees it, for one config (ConfigMap) it reads."""

    kind: str
    name: str
    replicas: int  # desired pods (a DaemonSet: status.desiredNumberScheduled)
    desired_hash: str | None  # what it should run now (whole data, or its selected keys); None: not known yet
    template_hash: str | None  # what its pod template was rolled out for
    baseline_hash: str | None  # what it ran when it opted in (no rollout then)
    whole: bool  # it reads every key (its hashes are content hashes, comparable with the history's)
    pods: tuple[PodConfig, ...]


@dataclass(frozen=True)
class WorkloadAdoption:
    """Per-workload detail: for the metric and `kubectl beacon config status`, never for status."""

    kind: str
    name: str
    revision: int | None  # the revision it is fully on (all its pods run it and are ready), else None
    pods: Mapping[PodRevision, tuple[int, int]]  # revision -> (pods, ready pods)


@dataclass(frozen=True)
class Adoption:
    status: Obj  # status.adoption
    workloads: tuple[WorkloadAdoption, ...]


def pod_revision(
    pod: PodConfig, *, config: str, workload: WorkloadConfig, current: int, by_hash: Mapping[str, int]
) -> PodRevision:
    """The revision a pod runs: the current one when it runs what its workload should run now (also when the
    workload skipped revisions that changed none of its keys, and after a rollback to content it runs), else the
    revision its template annotation records, else (an older annotation) the newest kept revision with its
    content hash. A pod without beacon's annotation for the config started before the workload opted in."""
    digest = pod.hashes.get(config)
    if digest is None:
        return BASELINE
    if workload.desired_hash is not None and digest == workload.desired_hash:
        return current
    number = pod.revisions.get(config)
    if number is not None:
        return number
    if workload.whole and digest in by_hash:
        return by_hash[digest]
    return UNKNOWN


def adoption(
    *,
    config: str,
    workloads: Sequence[WorkloadConfig],
    current: int,
    history: Iterable[Revision],
    limit: int = MAX_STATUS_REVISIONS,
) -> Adoption:
    """How far the current revision of a config has got: per workload the revision of each live pod and the
    revision it is fully on; per revision the workloads fully on it and its pods (the current one first, then the
    newest others that have pods, at most `limit`; a revision no longer in the history is marked pruned). A
    workload is fully on revision R when every live pod runs R and is ready, there are as many as it wants, and
    (for the current revision) its template is what it should be. Its baseline pods count as current while
    nothing it reads changed since it opted in."""
    kept = sorted(history, key=lambda r: r.number)
    by_hash = {r.hash: r.number for r in kept}  # the newest revision with each hash
    numbers = {r.number for r in kept}
    rows: list[WorkloadAdoption] = []
    for w in sorted(workloads, key=lambda w: (w.kind, w.name)):
        pods = [p for p in w.pods if not p.terminating]
        counts: dict[PodRevision, list[int]] = {}
        effective: set[PodRevision] = set()
        unready = False
        baseline_ok = w.desired_hash is not None and w.baseline_hash == w.desired_hash
        for pod in pods:
            rev = pod_revision(pod, config=config, workload=w, current=current, by_hash=by_hash)
            slot = counts.setdefault(rev, [0, 0])
            slot[0] += 1
            slot[1] += int(pod.ready)
            effective.add(current if rev == BASELINE and baseline_ok else rev)
            unready |= not pod.ready
        template_ok = w.desired_hash is not None and (
            w.template_hash == w.desired_hash or (w.template_hash is None and baseline_ok)
        )
        on: int | None = None
        if len(effective) == 1 and not unready and len(pods) >= w.replicas:
            (only,) = effective
            if isinstance(only, int) and (only != current or template_ok):
                on = only
        elif not pods and w.replicas == 0 and template_ok:
            on = current
        rows.append(WorkloadAdoption(w.kind, w.name, on, {k: (v[0], v[1]) for k, v in counts.items()}))
    per: dict[int, list[int]] = {current: [0, 0, 0]}
    baseline = unknown = 0
    for row in rows:
        if row.revision is not None:
            per.setdefault(row.revision, [0, 0, 0])[0] += 1
        for rev, (n, ready) in row.pods.items():
            if rev == BASELINE:
                baseline += n
            elif rev == UNKNOWN:
                unknown += n
            else:
                slot = per.setdefault(int(rev), [0, 0, 0])
                slot[1] += n
                slot[2] += ready
    shown = [current, *sorted((n for n in per if n != current), reverse=True)[: max(limit - 1, 0)]]
    items = []
    for number in shown:
        n_workloads, n_pods, n_ready = per[number]
        item: Obj = {"revision": number, "workloads": n_workloads, "pods": n_pods, "readyPods": n_ready}
        if number not in numbers:
            item["pruned"] = True
        items.append(item)
    adopted = per[current][0]
    status: Obj = {
        "summary": f"{adopted}/{len(rows)} workloads",
        "revision": current,
        "workloads": len(rows),
        "adoptedWorkloads": adopted,
        "revisions": items,
        "baselinePods": baseline,
        "unknownPods": unknown,
    }
    return Adoption(status, tuple(rows))
