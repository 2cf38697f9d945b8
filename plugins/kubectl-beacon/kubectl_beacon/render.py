"""What the plugin shows, computed from the objects beacon publishes. Pure: dicts in, text or dicts out.

Why it exists: each command is "read some objects, combine them, print". Keeping the combining and the printing
free of I/O makes every table the plugin prints testable without a cluster, and keeps `cli.py` down to the
reads and writes. The names of beacon's annotations and labels are repeated here (the plugin never imports the
operator); a unit test checks that they still agree with beacon's own.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Obj = dict[str, Any]

# beacon's names (beacon.models, beacon.reconcile, beacon.registry, beacon.config_core)
ANNOTATION_DRAIN = "beacon.dev/drain"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "operator.beacon.dev"
REGISTRY_NAME = "beacon-registry"
REGISTRY_DATA_KEY = "registry.json"
LABEL_CONFIG_ENTRY_UID = "beacon.dev/config-entry-uid"
ANNOTATION_CONFIG_HASH = "beacon.dev/config-hash"
ANNOTATION_ROLLBACK_OF = "beacon.dev/rollback-of"
ANNOTATION_RELOAD = "beacon.dev/reload"
ANNOTATION_TEMPLATE_HASHES = "beacon.dev/config-hashes"
ANNOTATION_TEMPLATE_REVISIONS = "beacon.dev/config-revisions"
ANNOTATION_BASELINE = "beacon.dev/config-hashes-baseline"
ANNOTATION_PROMOTE = "beacon.dev/promote"  # on a ConfigEntry: the revision a Manual canary promotion releases
PHASE_AWAITING_PROMOTION = "AwaitingPromotion"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")

NONE = "-"


# ---------------------------------------------------------------------------------------------------- helpers
def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns as kubectl prints them: upper-case headers, left-aligned, three spaces apart."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def parse_time(stamp: str | None) -> dt.datetime | None:
    if not stamp:
        return None
    try:
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(stamp: str | None, now: dt.datetime) -> str:
    """How long ago `stamp` was, the way kubectl prints an AGE (45s, 3m12s, 5h3m, 2d4h)."""
    when = parse_time(stamp)
    if when is None:
        return NONE
    seconds = max(0, int((now - when).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def _address_order(address: str) -> tuple[int, Any]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (2, address)
    return (ip.version // 6, ip)  # IPv4 first, then IPv6, then names


def condition(status: Mapping[str, Any], type_: str) -> Obj:
    return next((dict(c) for c in status.get("conditions") or [] if c.get("type") == type_), {})


# ---------------------------------------------------------------------------------------------------- status
def endpoint_rows(entry: Mapping[str, Any], slices: Sequence[Mapping[str, Any]]) -> list[Obj]:
    """Every endpoint of a ServiceEntry, from its status (state, since, deciding probe: all endpoints up to 16,
    above that the ones not Healthy), its EndpointSlices (zone, conditions, pod: every published endpoint) and its
    spec (static endpoints, zones). Endpoints the status does not list take their state from the slice."""
    status = entry.get("status") or {}
    listed = {str(item.get("address")): item for item in status.get("endpoints") or []}
    published: dict[str, Mapping[str, Any]] = {}
    for item in slices:
        for ep in item.get("endpoints") or []:
            for address in ep.get("addresses") or []:
                published[address] = ep
    static = {str(e.get("address")): e for e in (entry.get("spec") or {}).get("endpoints") or []}
    rows = []
    for address in sorted(set(listed) | set(published) | set(static), key=_address_order):
        item, ep, spec = listed.get(address) or {}, published.get(address) or {}, static.get(address) or {}
        conditions = ep.get("conditions") or {}
        if item.get("state"):
            state = str(item["state"])
        elif not ep:
            state = "NotPublished"  # deregistered, refused, or not reconciled yet
        elif conditions.get("ready"):
            state = "Healthy"
        elif conditions.get("terminating"):
            state = "Terminating"
        else:
            state = "Unhealthy"
        ref = ep.get("targetRef") or {}
        row: Obj = {
            "address": address,
            "zone": ep.get("zone") or spec.get("zone"),
            "pod": ref.get("name") if ref.get("kind") == "Pod" else None,
            "state": state,
            "check": item.get("check"),
            "since": item.get("since"),
            "probe": item.get("probe"),
            "latencyMs": item.get("latencyMs"),
            "consecutive": item.get("consecutive"),
        }
        if item.get("ports"):  # per-port checks: each port's verdict
            row["ports"] = dict(item["ports"])
        if ep:
            row["conditions"] = {k: bool(conditions.get(k)) for k in ("ready", "serving", "terminating")}
        rows.append(row)
    return rows


def _latency(ms: Any) -> str:
    if ms is None:
        return NONE
    return f"{float(ms):.1f}ms" if float(ms) < 100 else f"{float(ms):.0f}ms"


def _ports(ports: Mapping[str, Any] | None) -> str:
    """Each port's verdict, e.g. "mysql:passing,exporter:critical"."""
    return ",".join(f"{name}:{verdict}" for name, verdict in ports.items()) if ports else NONE


def status_text(entries: Sequence[tuple[Mapping[str, Any], list[Obj]]], *, now: dt.datetime) -> str:
    """Per entry a header (READY, the Ready condition's reason and message) and a table of its endpoints."""
    blocks = []
    for entry, rows in entries:
        meta, status = entry.get("metadata") or {}, entry.get("status") or {}
        ready = condition(status, "Ready")
        header = (
            f"{meta.get('namespace')}/{meta.get('name')}   READY {status.get('readySummary') or NONE}   "
            f"{ready.get('reason') or 'NotReconciled'}: {ready.get('message') or 'not reconciled by beacon yet'}"
        )
        with_pods = any(r["pod"] for r in rows)
        with_ports = any(r.get("ports") for r in rows)
        headers = ["ADDRESS", "ZONE", *(["POD"] if with_pods else []), "STATE", "CHECK"]
        headers += [*(["PORTS"] if with_ports else []), "SINCE", "PROBE"]
        headers += ["LATENCY", "CONSECUTIVE"]
        cells = [
            [
                r["address"],
                r["zone"] or NONE,
                *([r["pod"] or NONE] if with_pods else []),
                r["state"],
                r["check"] or NONE,
                *([_ports(r.get("ports"))] if with_ports else []),
                age(r["since"], now),
                r["probe"] or NONE,
                _latency(r["latencyMs"]),
                r["consecutive"] if r["consecutive"] is not None else NONE,
            ]
            for r in rows
        ]
        blocks.append(header + "\n" + (table(headers, cells) if rows else "(no endpoints)"))
    return "\n\n".join(blocks)


def status_json(entries: Sequence[tuple[Mapping[str, Any], list[Obj]]]) -> list[Obj]:
    out = []
    for entry, rows in entries:
        meta, status = entry.get("metadata") or {}, entry.get("status") or {}
        ready = condition(status, "Ready")
        out.append(
            {
                "namespace": meta.get("namespace"),
                "name": meta.get("name"),
                "ready": status.get("readySummary"),
                "reason": ready.get("reason"),
                "message": ready.get("message"),
                "endpoints": rows,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------- registry
def registry_document(shards: Mapping[str, Mapping[str, Any]]) -> Obj:
    """The namespace's catalog: the services of every shard (`beacon-registry` lists the others) merged.
    `shards` maps ConfigMap names to ConfigMaps. Raises ValueError when the shards disagree on the revision (a
    write in progress: read again)."""
    head = shards.get(REGISTRY_NAME)
    if head is None:
        raise LookupError("no registry")
    documents = []
    first = json.loads((head.get("data") or {}).get(REGISTRY_DATA_KEY) or "{}")
    for name in first.get("shards") or [REGISTRY_NAME]:
        shard = shards.get(name)
        if shard is None:
            raise ValueError(f"registry shard {name} is missing")
        documents.append(json.loads((shard.get("data") or {}).get(REGISTRY_DATA_KEY) or "{}"))
    if len({d.get("revision") for d in documents}) > 1:
        raise ValueError("registry shards of different revisions")
    services: Obj = {}
    for document in documents:
        services.update(document.get("services") or {})
    return {
        "namespace": first.get("namespace"),
        "revision": first.get("revision"),
        "shards": len(documents),
        "services": dict(sorted(services.items())),
    }


def registry_text(document: Mapping[str, Any]) -> str:
    rows = []
    for name, service in (document.get("services") or {}).items():
        ports = ",".join(
            f"{p.get('name')}:{p.get('port')}/{p.get('protocol', 'TCP')}" for p in service.get("ports", [])
        )
        endpoints = ",".join(
            str(e.get("address")) + (f"@{e['zone']}" if e.get("zone") else "") for e in service.get("endpoints", [])
        )
        tags = ",".join(f"{k}={v}" for k, v in (service.get("tags") or {}).items())
        ready = f"{service.get('readyEndpoints', 0)}/{service.get('totalEndpoints', 0)}"
        rows.append([name, ready, service.get("dns") or NONE, ports or NONE, endpoints or NONE, tags or NONE])
    head = f"registry {document.get('namespace')}   revision {document.get('revision')}"
    return head + "\n" + table(["SERVICE", "READY", "DNS", "PORTS", "HEALTHY ENDPOINTS", "TAGS"], rows)


# ---------------------------------------------------------------------------------------------------- config
def revisions_of(revisions: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(revisions, key=lambda r: int(r.get("revision") or 0))


def revision_data(revision: Mapping[str, Any]) -> dict[str, str]:
    """The ConfigMap data a revision stores, keys back in their '/' form (beacon maps '/' to '.', one to one)."""
    data = (revision.get("data") or {}).get("data") or {}
    return {str(k).replace(".", "/"): str(v) for k, v in sorted(data.items())}


def history_text(entry: Mapping[str, Any], revisions: Sequence[Mapping[str, Any]], *, now: dt.datetime) -> str:
    status, spec = entry.get("status") or {}, entry.get("spec") or {}
    current, pinned = status.get("currentRevision"), spec.get("rollbackTo")
    rows = []
    for rev in revisions_of(revisions):
        number = int(rev.get("revision") or 0)
        meta = rev.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        notes = []
        if annotations.get(ANNOTATION_ROLLBACK_OF):
            notes.append(f"rollback of {annotations[ANNOTATION_ROLLBACK_OF]}")
        if pinned is not None and int(pinned) == number:
            notes.append("pinned by spec.rollbackTo")
        rows.append(
            [
                number,
                "*" if current is not None and int(current) == number else "",
                annotations.get(ANNOTATION_CONFIG_HASH) or NONE,
                len(revision_data(rev)),
                age(meta.get("creationTimestamp"), now),
                "; ".join(notes) or NONE,
            ]
        )
    meta = entry.get("metadata") or {}
    head = f"configentry {meta.get('namespace')}/{meta.get('name')}   current revision {current or NONE}"
    head += f"   ConfigMap {status.get('configMapName') or NONE}"
    return head + "\n" + table(["REVISION", "CURRENT", "HASH", "KEYS", "AGE", "NOTE"], rows)


def _lines(data: Mapping[str, str]) -> list[str]:
    out = []
    for key, value in sorted(data.items()):
        if "\n" in value:
            out.append(f"{key}: |")
            out += [f"  {line}" for line in value.splitlines()]
        else:
            out.append(f"{key}: {value}")
    return out


def diff_text(old: Mapping[str, str], new: Mapping[str, str], *, old_label: str, new_label: str) -> str:
    """A unified diff of two revisions' data, one `key: value` line per key (block values indented)."""
    lines = list(difflib.unified_diff(_lines(old), _lines(new), fromfile=old_label, tofile=new_label, lineterm=""))
    return "\n".join(lines) if lines else f"{old_label} and {new_label} hold the same data"


def previous_revision(revisions: Sequence[Mapping[str, Any]], current: int) -> int | None:
    """The newest revision older than `current` (what `rollback` and `diff` default to)."""
    older = [int(r.get("revision") or 0) for r in revisions if int(r.get("revision") or 0) < current]
    return max(older, default=None)


# ---------------------------------------------------------------------------------------------------- drain
def drain_value(current: str | None, address: str, *, drain: bool) -> str | None:
    """The ServiceEntry's drain annotation after draining (or undraining) `address`: comma-separated, sorted;
    None (remove the annotation) when nothing is left drained."""
    addresses = {a for a in (current or "").replace(",", " ").split() if a}
    if drain:
        addresses.add(address)
    else:
        addresses.discard(address)
    return ",".join(sorted(addresses, key=_address_order)) or None


# ---------------------------------------------------------------------------------------------------- adoption
# What `config status` prints per workload is what the operator computes for status.adoption and its metrics
# (beacon.config_core: parse_reload, selection_hash, pod_revision, adoption), repeated here in small; a unit test
# checks that both agree.
def reload_configs(value: str | None) -> dict[str, tuple[str, ...] | None]:
    """The ConfigMaps a beacon.dev/reload value names, each with its keys (None: every key); {} when malformed
    (the operator then reloads nothing and says why in an Event)."""
    parts, depth, start, text = [], 0, 0, value or ""
    for at, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            return {}
        if char == "," and depth == 0:
            parts.append(text[start:at])
            start = at + 1
    if depth:
        return {}
    parts.append(text[start:])
    out: dict[str, set[str] | None] = {}
    for raw in (p.strip() for p in parts):
        if not raw:
            continue
        name, bracket, rest = raw.partition("[")
        name = name.strip()
        keys = {k.strip() for k in rest.partition("]")[0].split(",") if k.strip()} if bracket else None
        if bracket and not keys:
            return {}
        before = out.get(name, set()) if name in out else set()
        out[name] = None if keys is None or before is None else before | keys
    return {n: (tuple(sorted(k)) if k is not None else None) for n, k in sorted(out.items())}


def selection_hash(data: Mapping[str, str], keys: Sequence[str] | None) -> str:
    """beacon's hash of the keys a workload reads of a ConfigMap's data ('.' form; keys and prefixes in '/' form)."""
    if keys is not None:
        exact = {k.replace("/", ".") for k in keys if not k.endswith("/")}
        prefixes = tuple(k.replace("/", ".") for k in keys if k.endswith("/"))
        data = {k: v for k, v in data.items() if k in exact or k.startswith(prefixes)}
    canonical = json.dumps(dict(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _pairs(value: str | None) -> dict[str, str]:
    out = {}
    for part in (value or "").split(","):
        name, sep, rest = part.strip().partition("=")
        if sep and name:
            out[name] = rest.strip()
    return out


def _selector_string(selector: Mapping[str, Any] | None) -> str | None:
    """A workload's spec.selector as a label selector query, for listing its pods."""
    if not selector:
        return None
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), ",".join(expr.get("values") or [])
        terms.append(
            {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": f"{key}"}.get(op, f"!{key}")
        )
    return ",".join(terms) or None


def readers_of(config_map: str, workloads: Iterable[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, Obj]]:
    """The (kind, workload) pairs whose beacon.dev/reload names `config_map`, with the query for their pods."""
    out = []
    for kind, body in workloads:
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        if config_map in reload_configs(annotations.get(ANNOTATION_RELOAD)):
            out.append((kind, dict(body)))
    return sorted(out, key=lambda kb: (kb[0], kb[1]["metadata"]["name"]))


def pod_query(body: Mapping[str, Any]) -> str | None:
    return _selector_string((body.get("spec") or {}).get("selector"))


def workload_rows(
    entry: Mapping[str, Any],
    config_map: Mapping[str, Any],
    readers: Sequence[tuple[str, Mapping[str, Any], Sequence[Mapping[str, Any]]]],
    revisions: Sequence[Mapping[str, Any]],
) -> list[Obj]:
    """Per opted-in workload: the keys it reads, the revision its template was rolled out for, its live pods by
    revision (ready/all), and whether it is fully on the current revision, as the operator counts it."""
    current = int((entry.get("status") or {}).get("currentRevision") or 0)
    name = (config_map.get("metadata") or {}).get("name", "")
    full_hash = ((config_map.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_CONFIG_HASH)
    by_hash: dict[str, int] = {}
    for stored in revisions_of(revisions):
        digest = ((stored.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_CONFIG_HASH)
        if digest:
            by_hash[digest] = int(stored.get("revision") or 0)
    rows = []
    for kind, body, pods in readers:
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        keys = reload_configs((meta.get("annotations") or {}).get(ANNOTATION_RELOAD)).get(name)
        desired = full_hash if keys is None else selection_hash(config_map.get("data") or {}, keys)
        template = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
        template_hash = _pairs(template.get(ANNOTATION_TEMPLATE_HASHES)).get(name)
        template_rev = _pairs(template.get(ANNOTATION_TEMPLATE_REVISIONS)).get(name)
        baseline_hash = _pairs((meta.get("annotations") or {}).get(ANNOTATION_BASELINE)).get(name)
        baseline_ok = desired is not None and baseline_hash == desired
        counts: dict[str, list[int]] = {}
        effective: set[str] = set()
        all_ready, live = True, 0
        for pod in pods:
            pmeta = pod.get("metadata") or {}
            if pmeta.get("deletionTimestamp"):
                continue
            live += 1
            annotations = pmeta.get("annotations") or {}
            digest = _pairs(annotations.get(ANNOTATION_TEMPLATE_HASHES)).get(name)
            number = _pairs(annotations.get(ANNOTATION_TEMPLATE_REVISIONS)).get(name)
            if digest is None:
                rev = "baseline"
            elif digest == desired:
                rev = str(current)
            elif number is not None and number.isdigit():
                rev = number
            elif keys is None and digest in by_hash:
                rev = str(by_hash[digest])
            else:
                rev = "unknown"
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (pod.get("status") or {}).get("conditions") or []
            )
            slot = counts.setdefault(rev, [0, 0])
            slot[0] += 1
            slot[1] += int(ready)
            all_ready &= ready
            effective.add(str(current) if rev == "baseline" and baseline_ok else rev)
        if kind == "DaemonSet":
            wanted = int((body.get("status") or {}).get("desiredNumberScheduled") or 0)
        else:
            wanted = int(spec["replicas"]) if spec.get("replicas") is not None else 1
        template_ok = desired is not None and (template_hash == desired or (template_hash is None and baseline_ok))
        on_current = effective == {str(current)} and all_ready and live >= wanted
        adopted = template_ok and (on_current or (not live and not wanted))
        order = sorted(counts, key=lambda r: (not r.isdigit(), -int(r) if r.isdigit() else 0, r))
        rows.append(
            {
                "workload": f"{kind}/{meta.get('name')}",
                "keys": list(keys) if keys is not None else None,
                "templateRevision": int(template_rev) if template_rev and template_rev.isdigit() else None,
                "pods": {r: {"pods": counts[r][0], "ready": counts[r][1]} for r in order},
                "adopted": bool(adopted),
            }
        )
    return rows


def rollout_lines(entry: Mapping[str, Any]) -> list[str]:
    """The tracked rollout (status.rollout) and the last automatic rollback (status.rollback), one line each;
    nothing for an entry without them (spec.rollout and spec.canary unset)."""
    status = entry.get("status") or {}
    rollout, rollback = status.get("rollout") or {}, status.get("rollback") or {}
    lines = []
    if rollout:
        members, restarted = rollout.get("members") or [], rollout.get("restarted") or []
        wave = rollout.get("wave")
        line = f"rollout of revision {rollout.get('revision', NONE)}   PHASE {rollout.get('phase') or NONE}"
        line += f"   WAVE {NONE if wave is None else ('canary' if int(wave) == 0 else wave)}"
        if members:
            line += f"   RESTARTED {len(restarted)}/{len(members)}"
        if rollout.get("message"):
            line += f"   {rollout['message']}"
        lines.append(line)
    if rollback:
        lines.append(
            f"automatic rollback: revision {rollback.get('failedRevision', NONE)} failed, revision "
            f"{rollback.get('restoredRevision', NONE)}'s data restored as revision {rollback.get('revision', NONE)}"
            + (f": {rollback['message']}" if rollback.get("message") else "")
        )
    return lines


def promote_patch(entry: Mapping[str, Any]) -> Obj:
    """The merge patch that promotes the canaries of a rollout waiting for it (promotion Manual): the entry's
    beacon.dev/promote annotation set to the rollout's revision, conditional on the entry's resourceVersion (so a
    rollout that moved on meanwhile is never promoted blind). ValueError, saying the phase, in any other phase."""
    meta = entry.get("metadata") or {}
    where = f"configentry {meta.get('namespace')}/{meta.get('name')}"
    rollout = (entry.get("status") or {}).get("rollout") or {}
    phase, revision = rollout.get("phase"), rollout.get("revision")
    if not rollout or not phase:
        raise ValueError(
            f"{where} has no rollout in progress (status.rollout is empty): only a canary with promotion Manual "
            f"waits for promotion"
        )
    if phase != PHASE_AWAITING_PROMOTION or revision is None:
        raise ValueError(
            f"{where}: the rollout of revision {revision if revision is not None else NONE} is in phase {phase}, "
            f"not {PHASE_AWAITING_PROMOTION}: nothing to promote"
        )
    annotations = {ANNOTATION_PROMOTE: str(int(revision))}
    return {"metadata": {"resourceVersion": meta.get("resourceVersion"), "annotations": annotations}}


def adoption_text(entry: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    status, meta = entry.get("status") or {}, entry.get("metadata") or {}
    adoption = status.get("adoption") or {}
    head = f"configentry {meta.get('namespace')}/{meta.get('name')}   current revision "
    head += f"{status.get('currentRevision') or NONE}   ADOPTED {adoption.get('summary') or NONE}"
    head = "\n".join([head, *rollout_lines(entry)])
    summary = [
        [
            item.get("revision"),
            item.get("workloads", 0),
            f"{item.get('readyPods', 0)}/{item.get('pods', 0)}",
            "pruned" if item.get("pruned") else NONE,
        ]
        for item in adoption.get("revisions") or []
    ]
    extra = f"baseline pods {adoption.get('baselinePods', 0)}   unknown pods {adoption.get('unknownPods', 0)}"
    lines = [head, table(["REVISION", "WORKLOADS", "READY/PODS", "NOTE"], summary), extra, ""]
    workload_table = [
        [
            row["workload"],
            ",".join(row["keys"]) if row["keys"] is not None else "*",
            row["templateRevision"] if row["templateRevision"] is not None else NONE,
            " ".join(f"{r}:{c['ready']}/{c['pods']}" for r, c in row["pods"].items()) or NONE,
            "yes" if row["adopted"] else "no",
        ]
        for row in rows
    ]
    lines.append(table(["WORKLOAD", "KEYS", "TEMPLATE", "PODS (REV:READY/ALL)", "ADOPTED"], workload_table))
    return "\n".join(lines)
