"""Structured log fields: which namespace, entry and endpoint a log line is about. Pure.

Why it exists: with `python -m beacon operator --log-format json` every line is one JSON object, and kopf's JSON
formatter writes a record's `extra` attributes as keys of that object. Transition, write and error lines pass the
same three keys, `namespace`, `entry` and `endpoint` (null where a line is not about one), plus `event` (what kind
of line it is), so a log pipeline selects an entry's or an endpoint's history by field instead of parsing
messages. The plain format ignores extras, so its lines look as they always did.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

# what a line reports: a health transition, a drain or undrain, a write to the API, a failure
TRANSITION = "transition"
DRAIN = "drain"
WRITE = "write"
ERROR = "error"


def fields(
    event: str,
    *,
    namespace: str | None,
    entry: str | None = None,
    endpoint: str | Iterable[str] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The `extra` of a log call. Several endpoints (one line per direction names every endpoint that moved) are
    joined with commas, so `endpoint` is always a string or null."""
    if endpoint is not None and not isinstance(endpoint, str):
        endpoint = ",".join(endpoint) or None
    return {"event": event, "namespace": namespace, "entry": entry, "endpoint": endpoint, **more}


def key_fields(event: str, key: Hashable, **more: Any) -> dict[str, Any]:
    """`fields` for a work-queue key: (namespace, name) or (kind, namespace, name) names an entry (or workload),
    a plain string is a namespace (the Registry controller's key)."""
    if isinstance(key, tuple) and len(key) >= 2 and all(isinstance(part, str) for part in key[-2:]):
        return fields(event, namespace=key[-2], entry=key[-1], **more)
    if isinstance(key, str):
        return fields(event, namespace=key, **more)
    return fields(event, namespace=None, **more)
