"""`kubectl beacon ...`: the command line, each subcommand a few reads through `api` and a print through `render`.

Why it exists: kubectl runs any `kubectl-<name>` on PATH as `kubectl <name>`, passing the arguments and the
environment (KUBECONFIG) through. This module parses them, does the reads and the kinds of write the APIs
define for people (the drain annotations, a ConfigEntry's `spec.rollbackTo` and its `beacon.dev/promote`
annotation), and prints. Exit status: 0 on success, 1 when the API or the arguments refer to something that is
not there (or, for `config promote`, a rollout that does not wait for promotion), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence

from kubectl_beacon import render
from kubectl_beacon.api import Api, ApiError, Obj


class CommandError(Exception):
    """What to tell the user before exiting with status 1."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _entry(api: Api, kind: str, namespace: str, name: str) -> Obj:
    found = api.get(kind, namespace, name)
    if found is None:
        raise CommandError(f"{kind.lower()} {namespace}/{name} not found")
    return found


def _slices(api: Api, namespace: str, name: str) -> list[Obj]:
    selector = f"{render.LABEL_SERVICE_NAME}={name},{render.LABEL_MANAGED_BY}={render.MANAGED_BY}"
    return sorted(api.list("EndpointSlice", namespace, label_selector=selector), key=lambda s: s["metadata"]["name"])


# ---------------------------------------------------------------------------------------------------- status
def cmd_status(api: Api, args: argparse.Namespace) -> int:
    if args.entry:
        entries = [_entry(api, "ServiceEntry", args.namespace, args.entry)]
    else:
        entries = sorted(api.list("ServiceEntry", args.namespace), key=lambda e: e["metadata"]["name"])
        if not entries:
            raise CommandError(f"no ServiceEntries in namespace {args.namespace}")
    combined = [(e, render.endpoint_rows(e, _slices(api, args.namespace, e["metadata"]["name"]))) for e in entries]
    if args.output == "json":
        print(json.dumps(render.status_json(combined), indent=2))
    else:
        print(render.status_text(combined, now=_now()))
    return 0


# ---------------------------------------------------------------------------------------------------- registry
def cmd_registry(api: Api, args: argparse.Namespace) -> int:
    selector = "beacon.dev/registry=true"
    for _ in range(5):  # shards of two revisions: a write was under way; read again
        shards = {c["metadata"]["name"]: c for c in api.list("ConfigMap", args.namespace, label_selector=selector)}
        try:
            document = render.registry_document(shards)
        except LookupError:
            raise CommandError(f"no beacon registry in namespace {args.namespace} (no ServiceEntries there?)") from None
        except ValueError:
            time.sleep(0.5)
            continue
        if args.output == "json":
            print(json.dumps(document, indent=2))
        else:
            print(render.registry_text(document))
        return 0
    raise CommandError(f"the registry of namespace {args.namespace} kept changing while it was read; try again")


# ---------------------------------------------------------------------------------------------------- config
def _history(api: Api, namespace: str, name: str) -> tuple[Obj, list[Obj]]:
    entry = _entry(api, "ConfigEntry", namespace, name)
    selector = f"{render.LABEL_CONFIG_ENTRY_UID}={entry['metadata']['uid']}"
    revisions = render.revisions_of(api.list("ControllerRevision", namespace, label_selector=selector))
    return entry, [dict(r) for r in revisions]


def _revision(revisions: Sequence[Obj], number: int) -> Obj:
    for rev in revisions:
        if int(rev.get("revision") or 0) == number:
            return rev
    kept = ", ".join(str(r.get("revision")) for r in revisions) or "none"
    raise CommandError(f"revision {number} is not in the history (kept revisions: {kept})")


def _current(entry: Obj) -> int:
    current = (entry.get("status") or {}).get("currentRevision")
    if current is None:
        raise CommandError(f"configentry {entry['metadata']['name']} has no current revision yet (not materialised)")
    return int(current)


def cmd_config_history(api: Api, args: argparse.Namespace) -> int:
    entry, revisions = _history(api, args.namespace, args.entry)
    print(render.history_text(entry, revisions, now=_now()))
    return 0


def cmd_config_status(api: Api, args: argparse.Namespace) -> int:
    """status ENTRY: the adoption summary of the entry's status, then each opted-in workload: the keys it reads,
    the revision of its template, its live pods by revision, and whether it is fully on the current revision."""
    entry, revisions = _history(api, args.namespace, args.entry)
    _current(entry)
    name = (entry.get("status") or {}).get("configMapName") or args.entry
    config_map = api.get("ConfigMap", args.namespace, name) or {"metadata": {"name": name}}
    workloads = [(kind, body) for kind in render.WORKLOAD_KINDS for body in api.list(kind, args.namespace)]
    readers = []
    for kind, body in render.readers_of(name, workloads):
        query = render.pod_query(body)
        pods = api.list("Pod", args.namespace, label_selector=query) if query else []
        readers.append((kind, body, pods))
    rows = render.workload_rows(entry, config_map, readers, revisions)
    if args.output == "json":
        status = entry.get("status") or {}
        document = {"adoption": status.get("adoption"), "workloads": rows}
        document.update({k: status[k] for k in ("rollout", "rollback") if status.get(k)})
        print(json.dumps(document, indent=2))
    else:
        print(render.adoption_text(entry, rows))
    return 0


def cmd_config_diff(api: Api, args: argparse.Namespace) -> int:
    """diff ENTRY: the previous revision against the current one; diff ENTRY REV: REV against the current one;
    diff ENTRY REV OTHER: REV against OTHER."""
    entry, revisions = _history(api, args.namespace, args.entry)
    if args.other is not None:
        old, new = args.revision, args.other
    else:
        new = _current(entry)
        old = args.revision if args.revision is not None else render.previous_revision(revisions, new)
        if old is None:
            raise CommandError(f"revision {new} is the only one: nothing to compare it with")
    current = (entry.get("status") or {}).get("currentRevision")

    def label(number: int) -> str:
        return f"revision {number}" + (" (current)" if current is not None and int(current) == number else "")

    print(
        render.diff_text(
            render.revision_data(_revision(revisions, old)),
            render.revision_data(_revision(revisions, new)),
            old_label=label(old),
            new_label=label(new),
        )
    )
    return 0


def cmd_config_rollback(api: Api, args: argparse.Namespace) -> int:
    entry, revisions = _history(api, args.namespace, args.entry)
    where = f"configentry {args.namespace}/{args.entry}"
    if args.clear:
        api.merge_patch("ConfigEntry", args.namespace, args.entry, {"spec": {"rollbackTo": None}})
        print(f"{where}: spec.rollbackTo removed; beacon materialises spec.data again (as a new revision)")
        return 0
    number = args.revision
    if number is None:
        number = render.previous_revision(revisions, _current(entry))
        if number is None:
            raise CommandError(f"{where}: no revision before the current one to roll back to")
    rev = _revision(revisions, number)
    api.merge_patch("ConfigEntry", args.namespace, args.entry, {"spec": {"rollbackTo": number}})
    digest = ((rev.get("metadata") or {}).get("annotations") or {}).get(render.ANNOTATION_CONFIG_HASH, "?")
    print(
        f"{where}: spec.rollbackTo={number} (hash {digest}); beacon pins the ConfigMap to that revision's data and "
        "records it as a new revision. `kubectl beacon config rollback --clear` returns to spec.data."
    )
    return 0


def cmd_config_promote(api: Api, args: argparse.Namespace) -> int:
    """promote ENTRY: release a canaried revision waiting for manual promotion (phase AwaitingPromotion) by setting
    the entry's beacon.dev/promote annotation to it. Conditional on the resourceVersion read: a rollout that
    moved on meanwhile is read again, and refused if it no longer waits."""
    where = f"configentry {args.namespace}/{args.entry}"
    for _ in range(10):
        entry = _entry(api, "ConfigEntry", args.namespace, args.entry)
        try:
            patch = render.promote_patch(entry)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        try:
            api.merge_patch("ConfigEntry", args.namespace, args.entry, patch)
        except ApiError as exc:
            if exc.status != 409:
                raise
            continue
        revision = patch["metadata"]["annotations"][render.ANNOTATION_PROMOTE]
        print(
            f"{where}: {render.ANNOTATION_PROMOTE}={revision}; beacon promotes revision {revision} (the target "
            "ConfigMap gets its data) and rolls it out to the other workloads, in waves"
        )
        return 0
    raise CommandError(f"{where} kept changing; try again")


# ---------------------------------------------------------------------------------------------------- drain
def _drain(api: Api, args: argparse.Namespace, *, drain: bool) -> int:
    """Static endpoints: the ServiceEntry's beacon.dev/drain annotation (addresses); pod endpoints: the Pod's
    beacon.dev/drain: "true" (it drains the pod in every entry that selects it)."""
    namespace, name, address = args.namespace, args.entry, args.address
    entry = _entry(api, "ServiceEntry", namespace, name)
    static = {str(e.get("address")) for e in (entry.get("spec") or {}).get("endpoints") or []}
    pod = None
    for item in _slices(api, namespace, name):
        for ep in item.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            if address in (ep.get("addresses") or []) and ref.get("kind") == "Pod":
                pod = str(ref.get("name"))
    verb = "drained" if drain else "undrained"
    if address in static:
        _annotate_entry(api, namespace, name, address, drain=drain)
        print(f"endpoint {address} of {namespace}/{name} {verb} (annotation {render.ANNOTATION_DRAIN} on the entry)")
    elif pod is not None:
        value = "true" if drain else None
        patch = {"metadata": {"annotations": {render.ANNOTATION_DRAIN: value}}}
        api.merge_patch("Pod", namespace, pod, patch)
        print(
            f"endpoint {address} of {namespace}/{name} {verb} (annotation {render.ANNOTATION_DRAIN} on pod {pod}, "
            "for every entry that selects it)"
        )
    else:
        known = ", ".join(sorted(static)) or "none"
        raise CommandError(
            f"{address} is neither a static endpoint of {namespace}/{name} (static: {known}) nor one of its "
            "published pod endpoints"
        )
    if args.wait:
        _wait_published(api, namespace, name, address, drain=drain, timeout=args.timeout)
    return 0


def _annotate_entry(api: Api, namespace: str, name: str, address: str, *, drain: bool) -> None:
    """Read, change and write back the entry's drain annotation, conditional on its resourceVersion: a
    concurrent drain of another address is never lost (a conflict is read again and retried)."""
    for _ in range(10):
        entry = _entry(api, "ServiceEntry", namespace, name)
        meta = entry["metadata"]
        current = (meta.get("annotations") or {}).get(render.ANNOTATION_DRAIN)
        value = render.drain_value(current, address, drain=drain)
        if value == current:
            return
        patch = {
            "metadata": {"resourceVersion": meta["resourceVersion"], "annotations": {render.ANNOTATION_DRAIN: value}}
        }
        try:
            api.merge_patch("ServiceEntry", namespace, name, patch)
            return
        except ApiError as exc:
            if exc.status != 409:
                raise
    raise CommandError(f"serviceentry {namespace}/{name} kept changing; try again")


def _wait_published(api: Api, namespace: str, name: str, address: str, *, drain: bool, timeout: float) -> None:
    """Wait until beacon publishes the drain (terminating, not ready) or the undrain (not terminating)."""
    deadline = time.monotonic() + timeout
    while True:
        for item in _slices(api, namespace, name):
            for ep in item.get("endpoints") or []:
                if address in (ep.get("addresses") or []):
                    c = ep.get("conditions") or {}
                    done = (c.get("terminating") and not c.get("ready")) if drain else not c.get("terminating")
                    if done:
                        state = "ready" if c.get("ready") else "not ready"
                        serving = "serving" if c.get("serving") else "not serving"
                        print(f"published: {address} {state}, {serving}, terminating={bool(c.get('terminating'))}")
                        return
        if time.monotonic() > deadline:
            raise CommandError(f"beacon did not publish the change of {address} within {timeout:g}s")
        time.sleep(0.2)


def cmd_drain(api: Api, args: argparse.Namespace) -> int:
    return _drain(api, args, drain=True)


def cmd_undrain(api: Api, args: argparse.Namespace) -> int:
    return _drain(api, args, drain=False)


# ---------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table (default) or json")
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument("--wait", action="store_true", help="wait until beacon has published the change")
    wait.add_argument("--timeout", type=float, default=30.0, help="seconds --wait waits at most (default 30)")

    top = argparse.ArgumentParser(
        prog="kubectl beacon", description="Day-2 operations on beacon: status, registry, config history, drain."
    )
    sub = top.add_subparsers(dest="command", required=True)
    status = sub.add_parser(
        "status",
        parents=[common, output],
        help="endpoints of one or every ServiceEntry: state, since, the probe that decided it",
    )
    status.add_argument("entry", nargs="?", help="a ServiceEntry (default: every one in the namespace)")
    status.set_defaults(func=cmd_status)
    registry = sub.add_parser("registry", parents=[common, output], help="the namespace's service catalog")
    registry.set_defaults(func=cmd_registry)

    config = sub.add_parser(
        "config", help="a ConfigEntry's revisions: history, status (adoption, rollout), diff, rollback, promote"
    )
    config_sub = config.add_subparsers(dest="config_command", required=True)
    history = config_sub.add_parser("history", parents=[common], help="the revisions beacon keeps")
    history.add_argument("entry")
    history.set_defaults(func=cmd_config_history)
    adoption = config_sub.add_parser(
        "status",
        parents=[common, output],
        help="how far the current revision has got: the rollout's phase and wave, then per revision and per "
        "opted-in workload (keys, pods, ready)",
    )
    adoption.add_argument("entry")
    adoption.set_defaults(func=cmd_config_status)
    diff = config_sub.add_parser(
        "diff", parents=[common], help="REV (default: the previous one) against the current revision, or REV OTHER"
    )
    diff.add_argument("entry")
    diff.add_argument("revision", nargs="?", type=int)
    diff.add_argument("other", nargs="?", type=int)
    diff.set_defaults(func=cmd_config_diff)
    rollback = config_sub.add_parser(
        "rollback", parents=[common], help="set spec.rollbackTo: REV (default: the revision before the current one)"
    )
    rollback.add_argument("entry")
    rollback.add_argument("revision", nargs="?", type=int)
    rollback.add_argument("--clear", action="store_true", help="remove spec.rollbackTo: back to spec.data")
    rollback.set_defaults(func=cmd_config_rollback)
    promote = config_sub.add_parser(
        "promote",
        parents=[common],
        help="release a canaried revision waiting for manual promotion (sets the annotation beacon.dev/promote)",
    )
    promote.add_argument("entry")
    promote.set_defaults(func=cmd_config_promote)

    for name, func, what in (
        ("drain", cmd_drain, "take an endpoint out of DNS and the registry; it stays probed and keeps serving"),
        ("undrain", cmd_undrain, "bring a drained endpoint back (at once when it is healthy)"),
    ):
        command = sub.add_parser(name, parents=[common, wait], help=what)
        command.add_argument("entry", help="the ServiceEntry")
        command.add_argument("address", help="the endpoint's address (static, or a selected pod's IP)")
        command.set_defaults(func=func)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    func: Callable[[Api, argparse.Namespace], int] = args.func
    try:
        api = Api.from_kubeconfig(kubeconfig=args.kubeconfig, context=args.context)
    except Exception as exc:
        print(f"error: cannot load the kubeconfig: {exc}", file=sys.stderr)
        return 1
    args.namespace = args.namespace or api.namespace
    try:
        return func(api, args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiError as exc:
        print(f"error: the API server answered {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        api.close()
