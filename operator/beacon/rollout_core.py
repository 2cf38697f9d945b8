"""The pure core of progressive config rollouts: the release of one ConfigEntry revision as a sequence of steps
(canary, hold, promotion, waves) whose progress lives in the entry's status, the failure rule and the automatic
rollback decision, the cluster-wide restart budget (a token bucket), and the edit of a canary's pod template so
it reads an immutable per-revision copy of the ConfigMap. No I/O; time is an argument.

Why it exists: a rollout must survive the operator's own restart or failover without restarting a workload twice
or skipping one. That holds when every decision is a function of what the API holds (status.rollout, the
workloads' pod-template annotations, their pods) and the time, computed here, and `beacon.configs` only reads,
writes and waits. The model is Argo Rollouts' and Flagger's: a release is a list of steps whose progress is in
the object's status, and an abort leads to rollback.

The rules (README "Release model"):
- The step in progress is written to status (`members`) before its workloads are restarted, so a restart of the
  operator restarts the same ones; a member already restarted (its template carries the revision) is not
  restarted again.
- A step is done when each member is fully on the revision (every pod runs it and is Ready), or is not waited
  for (an OnDelete update strategy). It fails when a restarted member is not done within the timeout of the
  step's last restart, or when a Deployment reports ProgressDeadlineExceeded for the new template; a canary
  that stops being Ready during the hold fails it too.
- Canaries first (their own step), then the hold, then promotion (automatic or by the beacon.dev/promote
  annotation), then waves of the remaining workloads, sorted by kind and name.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

Obj = dict[str, Any]

ANNOTATION_PROMOTE = "beacon.dev/promote"  # on a ConfigEntry: promote this revision (canary.promotion Manual)
LABEL_CANARY_REVISION = "beacon.dev/canary-revision"  # on the immutable per-revision copy a canary reads
DEFAULT_TIMEOUT = 600
DEFAULT_HOLD = 60
MAX_MEMBERS = 1000  # workloads per step (status.rollout.members is the step's write-ahead record, and bounded)

CANARY = "Canary"
HOLDING = "Holding"
AWAITING = "AwaitingPromotion"
WAVES = "Waves"
COMPLETE = "Complete"
FAILED = "Failed"
ROLLED_BACK = "RolledBack"
CANARY_PHASES = (CANARY, HOLDING, AWAITING)
FINAL_PHASES = (COMPLETE, ROLLED_BACK)


@dataclass(frozen=True)
class RolloutSpec:
    """spec.rollout and spec.canary of an entry (either one makes its rollouts tracked)."""

    wave_size: int | None = None  # None: every remaining workload in one wave
    timeout: float = DEFAULT_TIMEOUT
    auto_rollback: bool = True
    canary: Mapping[str, Any] | None = None  # a LabelSelector on the workloads' labels
    hold: float = DEFAULT_HOLD
    manual: bool = False

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> RolloutSpec | None:
        rollout, canary = spec.get("rollout"), spec.get("canary")
        if not isinstance(rollout, Mapping) and not isinstance(canary, Mapping):
            return None
        rollout = rollout if isinstance(rollout, Mapping) else {}
        canary = canary if isinstance(canary, Mapping) else None
        size = rollout.get("waveSize")
        return cls(
            wave_size=int(size) if size is not None else None,
            timeout=float(rollout.get("rolloutTimeoutSeconds", DEFAULT_TIMEOUT)),
            auto_rollback=bool(rollout.get("autoRollback", True)),
            canary=dict(canary.get("selector") or {}) if canary is not None else None,
            hold=float((canary or {}).get("holdSeconds", DEFAULT_HOLD)),
            manual=(canary or {}).get("promotion") == "Manual",
        )


def parse_promote(value: Any) -> int | None:
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() else None


# ---------------------------------------------------------------------------------------------------- the state
@dataclass(frozen=True)
class Rollout:
    """status.rollout: the revision being released and the step in progress."""

    revision: int
    hash: str
    phase: str
    wave: int = 0
    members: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    step_started: float | None = None
    last_restart: float | None = None
    ready_since: float | None = None
    message: str = ""
    failures: tuple[str, ...] = ()  # failed workloads that did not roll the revision back (autoRollback false)
    from_revision: int | None = None  # what the target ConfigMap held when the rollout began (to roll back to)

    @property
    def canary_step(self) -> bool:
        return self.phase in CANARY_PHASES

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def ended(self) -> bool:
        """Nothing more happens for this revision: finished, or failed without a rollback."""
        return self.final or self.phase == FAILED

    @property
    def unpromoted(self) -> bool:
        """The target ConfigMap keeps the previous content: the canary step, or one that failed (wave 0)."""
        return self.canary_step or (self.phase == FAILED and self.wave == 0)

    def to_status(self) -> Obj:
        out: Obj = {"revision": self.revision, "hash": self.hash, "phase": self.phase, "wave": self.wave}
        if self.members:
            out["members"] = list(self.members)
        if self.restarted:
            out["restarted"] = list(self.restarted)
        for name, value in (
            ("stepStarted", self.step_started),
            ("lastRestart", self.last_restart),
            ("readySince", self.ready_since),
        ):
            if value is not None:
                out[name] = iso(value)
        if self.failures:
            out["failures"] = list(self.failures)
        if self.from_revision is not None:
            out["fromRevision"] = self.from_revision
        if self.message:
            out["message"] = self.message[:1024]
        return out

    @classmethod
    def from_status(cls, raw: Any) -> Rollout | None:
        if not isinstance(raw, Mapping):
            return None
        try:
            return cls(
                revision=int(raw["revision"]),
                hash=str(raw["hash"]),
                phase=str(raw["phase"]),
                wave=int(raw.get("wave", 0)),
                members=tuple(str(m) for m in raw.get("members") or ()),
                restarted=tuple(str(m) for m in raw.get("restarted") or ()),
                step_started=parse_iso(raw.get("stepStarted")),
                last_restart=parse_iso(raw.get("lastRestart")),
                ready_since=parse_iso(raw.get("readySince")),
                message=str(raw.get("message", "")),
                failures=tuple(str(m) for m in raw.get("failures") or ()),
                from_revision=int(raw["fromRevision"]) if raw.get("fromRevision") is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class RollbackRecord:
    """status.rollback: an automatic rollback, decided by beacon and kept in status (never in the spec, so GitOps
    tools do not fight it). The failed spec.data (by its hash) is not tried again until it changes."""

    failed_revision: int
    restored_revision: int
    data_hash: str
    message: str
    revision: int | None = None  # the new revision that carries the restored content, once recorded

    def to_status(self) -> Obj:
        out: Obj = {
            "failedRevision": self.failed_revision,
            "restoredRevision": self.restored_revision,
            "dataHash": self.data_hash,
            "message": self.message[:1024],
        }
        if self.revision is not None:
            out["revision"] = self.revision
        return out

    @classmethod
    def from_status(cls, raw: Any) -> RollbackRecord | None:
        if not isinstance(raw, Mapping):
            return None
        try:
            number = raw.get("revision")
            return cls(
                failed_revision=int(raw["failedRevision"]),
                restored_revision=int(raw["restoredRevision"]),
                data_hash=str(raw["dataHash"]),
                message=str(raw.get("message", "")),
                revision=int(number) if number is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            return None


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


# ---------------------------------------------------------------------------------------------------- the step
@dataclass(frozen=True)
class Member:
    """One opted-in workload reading the entry's ConfigMap, as the rollout of one revision sees it."""

    key: str  # Kind/name
    canary: bool  # its labels match spec.canary.selector
    pending: bool  # it must still be restarted for the revision (its template does not carry it)
    done: bool  # fully on the revision: every pod runs it and is Ready
    failed: str | None = None  # why it failed already (a Deployment's ProgressDeadlineExceeded), else None
    waited: bool = True  # False: an OnDelete update strategy (restarted, never waited for)


@dataclass(frozen=True)
class Step:
    """What the rollout does now: its new state, whether to promote (materialise the revision into the target
    ConfigMap), a failure to roll back from, when to look again, and what to say."""

    rollout: Rollout
    promote: bool = False
    failure: str | None = None
    wake_at: float | None = None
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)


def step(spec: RolloutSpec, rollout: Rollout, members: Sequence[Member], *, now: float, promote: int | None) -> Step:
    """Advance `rollout` as far as it can go now. Pure: the caller writes the returned state to status before it
    restarts the new step's members, and evaluates again on every change of the workloads and at `wake_at`."""
    by_key = {m.key: m for m in members}
    events: list[tuple[str, str, str]] = []
    state = rollout
    promoted = False
    for _ in range(4):  # canary -> hold -> promotion -> a wave can all happen in one evaluation
        if state.ended:
            break
        current = [by_key[k] for k in state.members if k in by_key]
        restarted = tuple(k for k in state.members if k in by_key and not by_key[k].pending)
        if restarted != state.restarted:
            state = replace(state, restarted=restarted, last_restart=now)
        failure = _failure(spec, state, current, now=now)
        if failure is None and state.phase in (HOLDING, AWAITING) and not all(m.done for m in current if m.waited):
            failure = "canary " + ", ".join(m.key for m in current if m.waited and not m.done) + " became not Ready"
        if failure is not None:
            events.append(("Warning", "ConfigRolloutFailed", f"revision {state.revision}: {failure}"))
            failed = tuple(m.key for m in current if not m.done and m.waited)
            if spec.auto_rollback:
                return Step(replace(state, message=failure), failure=failure, events=tuple(events))
            state = replace(state, failures=(*state.failures, *failed), message=failure)
            if state.canary_step:  # not promoted: the other workloads keep the content they have
                return Step(replace(state, phase=FAILED), events=tuple(events))
            state = replace(state, members=(), restarted=())
            current = []
        finished = all(m.done or not m.waited for m in current)
        if state.phase == CANARY:
            if not state.members and state.step_started is None:
                canaries = tuple(sorted(m.key for m in members if m.canary and m.pending)[:MAX_MEMBERS])
                if canaries:
                    state = replace(state, members=canaries, step_started=now, message=_canary_message(canaries))
                    events.append(("Normal", "ConfigCanaryStarted", f"revision {state.revision}: {state.message}"))
                    break
                state = replace(state, phase=HOLDING, ready_since=now - spec.hold)  # no canary needs it: promote
                continue
            if not finished:
                break
            state = replace(state, phase=HOLDING, ready_since=now, message="canaries Ready; holding")
            continue
        if state.phase in (HOLDING, AWAITING):
            held_until = (state.ready_since or now) + spec.hold
            if now < held_until:
                message = f"canaries Ready; holding until {iso(held_until)}"
                return Step(replace(state, message=message), wake_at=held_until, events=tuple(events))
            if spec.manual and promote != state.revision:
                message = (
                    f"canaries Ready; awaiting promotion (annotate the entry {ANNOTATION_PROMOTE}="
                    f'"{state.revision}", or kubectl beacon config promote)'
                )
                state = replace(state, phase=AWAITING, message=message)
                break
            events.append(("Normal", "ConfigPromoted", f"revision {state.revision} promoted after the canaries"))
            promoted = True
            state = replace(state, phase=WAVES, wave=0, members=(), restarted=(), step_started=None)
            state = replace(state, last_restart=None, ready_since=None)
            continue
        if state.phase == WAVES:
            if not finished:
                break
            pending = sorted(m.key for m in members if m.pending and m.key not in state.members)
            if not pending:
                message = "every workload is on the revision"
                if state.failures:
                    message += "; failed and not rolled back: " + ", ".join(state.failures[:8])
                state = replace(state, phase=COMPLETE, members=(), restarted=(), message=message)
                break
            size = min(spec.wave_size or len(pending), MAX_MEMBERS)
            wave = tuple(pending[:size])
            left = len(pending) - len(wave)
            message = f"wave {state.wave + 1}: {len(wave)} workloads, {left} after it"
            state = replace(state, wave=state.wave + 1, members=wave, restarted=(), step_started=now, last_restart=None)
            state = replace(state, message=message)
            events.append(("Normal", "ConfigWaveStarted", f"revision {state.revision}: {message}"))
            break
    return Step(state, promote=promoted, wake_at=_deadline(spec, state), events=tuple(events))


def _deadline(spec: RolloutSpec, state: Rollout) -> float | None:
    if state.final or not state.members or state.phase not in (CANARY, WAVES):
        return None
    return max(state.step_started or 0.0, state.last_restart or 0.0) + spec.timeout


def _failure(spec: RolloutSpec, state: Rollout, current: Sequence[Member], *, now: float) -> str | None:
    """Why the step in progress failed, or None: a restarted member not done within the timeout of the step's
    last restart, or one whose controller gave up (ProgressDeadlineExceeded)."""
    for member in current:
        if member.failed and not member.pending:
            return f"{member.key}: {member.failed}"
    deadline = _deadline(spec, state)
    if deadline is None or now < deadline or state.phase not in (CANARY, WAVES):
        return None
    late = [m.key for m in current if m.waited and not m.pending and not m.done]
    if not late:
        return None
    return f"{', '.join(late[:8])}: new pods not Ready within {spec.timeout:.0f}s (rolloutTimeoutSeconds)"


def _canary_message(canaries: Sequence[str]) -> str:
    return f"canary: {len(canaries)} workloads ({', '.join(canaries[:4])}{', ...' if len(canaries) > 4 else ''})"


def condition_of(rollout: Rollout | None, rollback: RollbackRecord | None) -> tuple[str, str, str] | None:
    """The Rollout condition (status, reason, message)."""
    if rollout is None:
        return None
    if rollout.phase == ROLLED_BACK and rollback is not None:
        restored = f" as revision {rollback.revision}" if rollback.revision is not None else ""
        message = (
            f"revision {rollback.failed_revision} failed ({rollback.message}); the content of revision "
            f"{rollback.restored_revision} is served again{restored}; spec.data is not tried again until it changes"
        )
        return ("False", "AutoRolledBack", message)
    if rollout.failures:
        return ("False", "RolloutFailed", f"revision {rollout.revision}: failed: {', '.join(rollout.failures[:8])}")
    reason = {COMPLETE: "Complete", HOLDING: "CanaryHolding", AWAITING: "AwaitingPromotion"}.get(
        rollout.phase, "Progressing"
    )
    return ("True", reason, f"revision {rollout.revision}: {rollout.phase}: {rollout.message}")


# ---------------------------------------------------------------------------------------------------- the budget
@dataclass
class TokenBucket:
    """The cluster-wide restart budget (--restart-budget COUNT/SECONDS): at most COUNT restarts at once, refilled
    at COUNT per SECONDS. `take` reserves a token and says how long to wait for it (0: go now)."""

    count: int
    period: float
    tokens: float = field(default=0.0, init=False)  # filled to `count` at the first take
    stamp: float | None = field(default=None, init=False)

    def take(self, now: float) -> float:
        rate = self.count / self.period
        if self.stamp is None:
            self.tokens, self.stamp = float(self.count), now
        self.tokens = min(float(self.count), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


# ---------------------------------------------------------------------------------------------------- canary copies
def canary_map_name(target: str, revision: int) -> str:
    """The immutable copy of revision `revision` that canaries read: <target>-r<revision> (within 253)."""
    suffix = f"-r{revision}"
    return target[: 253 - len(suffix)] + suffix


def copy_revision(name: str, target: str) -> int | None:
    """The revision of `name` when it is a canary copy of `target`, else None."""
    match = re.fullmatch(r".+-r([0-9]{1,18})", name)
    if match is None or canary_map_name(target, int(match.group(1))) != name:
        return None
    return int(match.group(1))


def template_refs(pod_spec: Mapping[str, Any]) -> set[str]:
    """The ConfigMap names a pod template's spec references (volumes, projected volumes, envFrom, env)."""
    refs: set[str] = set()
    for volume in pod_spec.get("volumes") or ():
        name = (volume.get("configMap") or {}).get("name")
        if name:
            refs.add(str(name))
        for source in (volume.get("projected") or {}).get("sources") or ():
            name = (source.get("configMap") or {}).get("name")
            if name:
                refs.add(str(name))
    for container in [*(pod_spec.get("initContainers") or ()), *(pod_spec.get("containers") or ())]:
        for source in container.get("envFrom") or ():
            name = (source.get("configMapRef") or {}).get("name")
            if name:
                refs.add(str(name))
        for env in container.get("env") or ():
            name = ((env.get("valueFrom") or {}).get("configMapKeyRef") or {}).get("name")
            if name:
                refs.add(str(name))
    return refs


def rewrite_refs(pod_spec: Mapping[str, Any], wanted: Mapping[str, str]) -> Obj | None:
    """The parts of a pod template's spec (volumes, containers, initContainers, whole lists as a merge patch
    replaces them) with every reference to a target ConfigMap, or to one of its canary copies, pointing at
    `wanted[target]`; None when every reference already does."""

    def swap(name: Any) -> Any:
        if not isinstance(name, str):
            return name
        for target, want in wanted.items():
            if name == target or copy_revision(name, target) is not None:
                return want
        return name

    out: Obj = {}
    volumes = [dict(v) for v in pod_spec.get("volumes") or ()]
    for volume in volumes:
        if isinstance(volume.get("configMap"), Mapping):
            volume["configMap"] = {**volume["configMap"], "name": swap(volume["configMap"].get("name"))}
        projected = volume.get("projected")
        if isinstance(projected, Mapping):
            sources = [dict(s) for s in projected.get("sources") or ()]
            for source in sources:
                if isinstance(source.get("configMap"), Mapping):
                    source["configMap"] = {**source["configMap"], "name": swap(source["configMap"].get("name"))}
            volume["projected"] = {**projected, "sources": sources}
    if volumes != list(pod_spec.get("volumes") or ()):
        out["volumes"] = volumes
    for field_name in ("initContainers", "containers"):
        containers = [dict(c) for c in pod_spec.get(field_name) or ()]
        for container in containers:
            if container.get("envFrom"):
                container["envFrom"] = [
                    {**s, "configMapRef": {**s["configMapRef"], "name": swap(s["configMapRef"].get("name"))}}
                    if isinstance(s.get("configMapRef"), Mapping)
                    else s
                    for s in container["envFrom"]
                ]
            if container.get("env"):
                container["env"] = [_swap_env(e, swap) for e in container["env"]]
        if containers != list(pod_spec.get(field_name) or ()):
            out[field_name] = containers
    return out or None


def _swap_env(env: Mapping[str, Any], swap: Any) -> Any:
    ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
    if not isinstance(ref, Mapping):
        return env
    return {**env, "valueFrom": {**env["valueFrom"], "configMapKeyRef": {**ref, "name": swap(ref.get("name"))}}}


def stale_copies(
    names: Iterable[str], *, target: str, keep_revisions: Iterable[int], referenced: Iterable[str]
) -> list[str]:
    """Canary copies of `target` to delete: those of revisions no longer kept that no workload references."""
    keep, refs = set(keep_revisions), set(referenced)
    out = []
    for name in sorted(names):
        number = copy_revision(name, target)
        if number is not None and number not in keep and name not in refs:
            out.append(name)
    return out
