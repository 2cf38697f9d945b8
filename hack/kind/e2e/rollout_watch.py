"""A tracked ConfigEntry rollout, seen as it happens (hack/kind-e2e.sh, scenarios "canary" and "rollback").

Lists and watches one ConfigEntry and its target ConfigMap, applies one merge patch to the entry's spec (the
change under test), then follows both objects until the rollout of the new revision ends, printing a timeline of
every change that matters (rollout phase and revision, currentRevision, ADOPTED, the Rollout condition, the
ConfigMap's value of --key), with times since the patch returned. It then checks the order of what it saw:

  canary    the new revision R = --revision goes to the canaries first: the target ConfigMap keeps --old while the
            canaries take R (ADOPTED at most --canaries/N, and exactly that at some point) and for at least
            --hold seconds after the phase became Holding; then the ConfigMap holds --new, the phase reaches
            Complete and ADOPTED N/N, with the Rollout condition True.
  rollback  R's canaries never become Ready: the Rollout condition turns False with reason AutoRolledBack no
            sooner than --rollout-timeout seconds after the patch and no later than --slack seconds after that;
            status.rollback names R as failed and R-1 as restored; the target ConfigMap never holds --new (R's
            value) and holds --old at the end.

Arrival times are taken as each watch event's line arrives (time.monotonic()), one clock for both watches. Events
of the two watches may arrive in a different order than the writes behind them by a few milliseconds, so the
checks compare times with a second's tolerance, never the order of two events from different watches.
Exit status 1, with the reason and the timeline, when a check fails or the rollout does not end within --timeout.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kubeapi import Kube

TOLERANCE = 1.0  # seconds: what separates two events' arrival times from the writes behind them, at most
# seconds: how much earlier than the status write showing phase Holding the hold may have begun (readySince is
# when beacon saw the canaries Ready; the write that says so may come a little later)
HOLD_TOLERANCE = 2.0


def log(msg: str) -> None:
    print(f"[rollout-watch] {msg}", flush=True)


class ObjectWatcher(threading.Thread):
    """List + watch one named object; every (arrival, name, object or None when deleted) goes onto `events`."""

    def __init__(self, kube: Kube, path: str, name: str, label: str, events: queue.Queue[Any]) -> None:
        super().__init__(daemon=True)
        self.kube, self.path, self.name, self.label, self.events = kube, path, name, label, events
        self.listed = threading.Event()

    def run(self) -> None:
        selector = f"metadata.name={self.name}"
        for arrival, kind, obj in self.kube.follow(self.path, log=log, fieldSelector=selector):
            if kind == "LISTED":
                self.events.put((arrival, self.label, obj[0] if obj else None))
                self.listed.set()
            else:
                self.events.put((arrival, self.label, None if kind == "DELETED" else obj))


@dataclass(frozen=True)
class EntryView:
    """What the checks read of the ConfigEntry's status."""

    phase: str | None
    revision: int | None  # status.rollout.revision
    current: int | None  # status.currentRevision
    adopted: str | None  # status.adoption.summary
    adopted_revision: int | None  # status.adoption.revision: the revision ADOPTED counts
    condition: tuple[str, str] | None  # the Rollout condition: (status, reason)
    rollback: dict[str, Any] = field(default_factory=dict, compare=False)

    @staticmethod
    def of(obj: dict[str, Any] | None) -> EntryView:
        status = (obj or {}).get("status") or {}
        rollout = status.get("rollout") or {}
        cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Rollout"), None)
        return EntryView(
            phase=rollout.get("phase"),
            revision=rollout.get("revision"),
            current=status.get("currentRevision"),
            adopted=(status.get("adoption") or {}).get("summary"),
            adopted_revision=(status.get("adoption") or {}).get("revision"),
            condition=(str(cond.get("status")), str(cond.get("reason"))) if cond else None,
            rollback=dict(status.get("rollback") or {}),
        )

    def adopted_count(self) -> int | None:
        """The N of ADOPTED "N/M workloads"."""
        if not self.adopted or "/" not in self.adopted:
            return None
        head = self.adopted.split("/", 1)[0]
        return int(head) if head.isdigit() else None

    def line(self) -> str:
        cond = f"{self.condition[0]}/{self.condition[1]}" if self.condition else "-"
        return (
            f"entry: rollout revision {self.revision} phase {self.phase}, currentRevision {self.current}, "
            f"ADOPTED {self.adopted!r} (revision {self.adopted_revision}), Rollout {cond}"
        )


class Follow:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kube = Kube(args.kubeconfig, args.context)
        ns = args.namespace
        self.entry_path = f"/apis/beacon.dev/v1alpha1/namespaces/{ns}/configentries"
        self.events: queue.Queue[tuple[float, str, dict[str, Any] | None]] = queue.Queue()
        self.watchers = [
            ObjectWatcher(self.kube, self.entry_path, args.entry, "entry", self.events),
            ObjectWatcher(self.kube, f"/api/v1/namespaces/{ns}/configmaps", args.configmap, "configmap", self.events),
        ]
        self.t0 = 0.0
        self.timeline: list[str] = []
        self.entry = EntryView.of(None)
        self.value: str | None = None  # the ConfigMap's data[--key]
        # arrival times (since the patch) of the first event showing ...
        self.first_holding: float | None = None  # phase Holding for R
        self.first_past_hold: float | None = None  # phase Waves or Complete for R
        self.first_new_value: float | None = None  # the ConfigMap holding --new
        self.first_canaries_adopted: float | None = None  # ADOPTED == --canaries, rollout revision R
        self.max_adopted_before_new: int = 0  # the largest ADOPTED for R before the ConfigMap held --new
        self.rolled_back_at: float | None = None  # the Rollout condition False/AutoRolledBack

    def note(self, at: float, text: str) -> None:
        line = f"{at:+8.2f}s  {text}" if self.t0 else f"{'before':>9}  {text}"
        self.timeline.append(line)
        log(line)

    def fail(self, msg: str) -> NoReturn:
        log(f"FAILED: {msg}")
        log(f"last seen: {self.entry.line()}; configmap {self.args.key}={self.value!r}")
        if self.entry.rollback:
            log(f"status.rollback: {json.dumps(self.entry.rollback, sort_keys=True)}")
        sys.exit(1)

    def apply(self, arrival: float, label: str, obj: dict[str, Any] | None) -> None:
        a = self.args
        at = arrival - self.t0
        if label == "configmap":
            value = ((obj or {}).get("data") or {}).get(a.key)
            if obj is None or value != self.value:
                self.value = value
                self.note(at, f"configmap {a.configmap}: {a.key}={value!r}" if obj else f"configmap {a.configmap} gone")
            if value == a.new and self.first_new_value is None and self.t0:
                self.first_new_value = at
            return
        view = EntryView.of(obj)
        if view != self.entry:
            self.note(at, view.line())
        self.entry = view
        if not self.t0:
            return
        # the rollback may move status.rollout on to the revision that restores the old data: not gated on R
        if view.condition == ("False", "AutoRolledBack") and self.rolled_back_at is None:
            self.rolled_back_at = at
        if view.revision != a.revision:
            return
        if view.phase == "Holding" and self.first_holding is None:
            self.first_holding = at
        if view.phase in ("Waves", "Complete") and self.first_past_hold is None:
            self.first_past_hold = at
        count = view.adopted_count() if view.adopted_revision == a.revision else None
        if count is not None and self.first_new_value is None:
            self.max_adopted_before_new = max(self.max_adopted_before_new, count)
            if count == a.canaries and self.first_canaries_adopted is None:
                self.first_canaries_adopted = at

    def done(self) -> bool:
        a = self.args
        e = self.entry
        if a.expect == "canary":
            return (
                e.revision == a.revision
                and e.phase == "Complete"
                and e.adopted == f"{a.workloads}/{a.workloads} workloads"
                and e.adopted_revision == a.revision
                and e.condition is not None
                and e.condition[0] == "True"
                and self.value == a.new
            )
        return (
            self.rolled_back_at is not None
            and self.entry.rollback.get("failedRevision") == a.revision
            and self.value == a.old
        )

    def run(self) -> None:
        a = self.args
        for w in self.watchers:
            w.start()
        for w in self.watchers:
            if not w.listed.wait(a.timeout):
                self.fail(f"could not list the {w.label}")
        while True:  # the state before the patch
            try:
                arrival, label, obj = self.events.get_nowait()
            except queue.Empty:
                break
            self.apply(arrival, label, obj)
        self.kube.merge_patch(f"{self.entry_path}/{a.entry}", {"spec": json.loads(a.patch)})
        self.t0 = time.monotonic()
        self.note(0.0, f"patched spec of ConfigEntry {a.entry}: {a.patch}")
        deadline = self.t0 + a.timeout
        while not self.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"the rollout of revision {a.revision} did not end within {a.timeout:.0f}s")
            try:
                arrival, label, obj = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            self.apply(arrival, label, obj)
        if a.expect == "canary":
            self.check_canary()
        else:
            self.check_rollback()
        log(f"ok ({a.expect}): revision {a.revision} ended {time.monotonic() - self.t0:.1f}s after the patch")

    def check_canary(self) -> None:
        a = self.args
        new_at = self.first_new_value
        assert new_at is not None  # done() saw it
        canaries = f"{a.canaries}/{a.workloads} workloads"
        if self.first_canaries_adopted is None:
            self.fail(f"ADOPTED never showed {canaries!r} for revision {a.revision} before the promotion")
        if self.max_adopted_before_new > a.canaries:
            self.fail(
                f"ADOPTED reached {self.max_adopted_before_new} workloads on revision {a.revision} before the "
                f"target ConfigMap held it: a non-canary took the revision during the canary step"
            )
        if self.first_holding is None:
            self.fail(f"the phase never was Holding for revision {a.revision}")
        held = new_at - self.first_holding
        if held < a.hold - HOLD_TOLERANCE:
            self.fail(f"the target ConfigMap held {a.key}={a.new} {held:.2f}s after Holding began (hold {a.hold}s)")
        if self.first_past_hold is not None and self.first_past_hold - self.first_holding < a.hold - HOLD_TOLERANCE:
            self.fail(f"the phase left Holding after {self.first_past_hold - self.first_holding:.2f}s (hold {a.hold}s)")
        log(
            f"canary: ADOPTED {canaries!r} at {self.first_canaries_adopted:+.2f}s, Holding at "
            f"{self.first_holding:+.2f}s, target ConfigMap {a.key}={a.new} at {new_at:+.2f}s "
            f"(held {held:.2f}s, hold {a.hold}s)"
        )

    def check_rollback(self) -> None:
        a = self.args
        at = self.rolled_back_at
        assert at is not None  # done() saw it
        if self.first_new_value is not None:
            self.fail(
                f"the target ConfigMap held the failed revision's {a.key}={a.new} at {self.first_new_value:+.2f}s"
            )
        if at < a.rollout_timeout - TOLERANCE:
            self.fail(f"AutoRolledBack at {at:.2f}s, before the rollout timeout ({a.rollout_timeout}s)")
        if at > a.rollout_timeout + a.slack:
            self.fail(f"AutoRolledBack at {at:.2f}s, after the rollout timeout ({a.rollout_timeout}s) + {a.slack}s")
        rb = self.entry.rollback
        if rb.get("failedRevision") != a.revision or rb.get("restoredRevision") != a.revision - 1:
            self.fail(
                f"status.rollback names failedRevision {rb.get('failedRevision')}, restoredRevision "
                f"{rb.get('restoredRevision')} (expected {a.revision} and {a.revision - 1})"
            )
        log(
            f"rollback: Rollout False/AutoRolledBack at {at:+.2f}s (rollout timeout {a.rollout_timeout}s); "
            f"status.rollback {json.dumps(rb, sort_keys=True)}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--context")
    p.add_argument("--namespace", required=True)
    p.add_argument("--entry", required=True, help="the ConfigEntry")
    p.add_argument("--configmap", required=True, help="its target ConfigMap")
    p.add_argument("--patch", required=True, help="JSON merge patch of the entry's spec")
    p.add_argument("--expect", choices=["canary", "rollback"], required=True)
    p.add_argument("--revision", type=int, required=True, help="the revision the patch makes")
    p.add_argument("--key", required=True, help="the data key whose value the checks follow")
    p.add_argument("--old", required=True, help="its value before the patch")
    p.add_argument("--new", required=True, help="its value in the patch")
    p.add_argument("--workloads", type=int, default=3, help="opted-in workloads reading the entry")
    p.add_argument("--canaries", type=int, default=1, help="of them, canaries")
    p.add_argument("--hold", type=float, default=0.0, help="spec.canary.holdSeconds")
    p.add_argument("--rollout-timeout", type=float, default=0.0, help="spec.rollout.rolloutTimeoutSeconds")
    p.add_argument("--slack", type=float, default=30.0, help="rollback: how late after the rollout timeout")
    p.add_argument("--timeout", type=float, default=180.0)
    Follow(p.parse_args()).run()


if __name__ == "__main__":
    main()
