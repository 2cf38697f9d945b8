"""The release of a config revision as steps (beacon.rollout_core): canary, hold, promotion, waves, failure and
the rollback decision, resumption from status, the restart budget and the canary's pod-template edit. Pure
functions with time as an argument: every rule of README "Release model" is checked here without a cluster."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from beacon.rollout_core import (
    AWAITING,
    CANARY,
    COMPLETE,
    FAILED,
    HOLDING,
    MAX_MEMBERS,
    WAVES,
    Member,
    RollbackRecord,
    Rollout,
    RolloutSpec,
    TokenBucket,
    canary_map_name,
    condition_of,
    copy_revision,
    rewrite_refs,
    stale_copies,
    step,
    template_refs,
)

T0 = 1_800_000_000.0


def _members(n: int, *, canary: frozenset[int] = frozenset()) -> list[Member]:
    """`n` workloads that all need the revision, none restarted yet."""
    return [Member(key=f"Deployment/w{i:02}", canary=i in canary, pending=True, done=False) for i in range(n)]


def _on(members: list[Member], keys: tuple[str, ...] | list[str], *, done: bool = True) -> list[Member]:
    """`keys` restarted (their template carries the revision), and Ready when `done`."""
    return [Member(m.key, m.canary, pending=False, done=done) if m.key in keys else m for m in members]


def test_waves_of_four_each_after_the_previous_is_ready() -> None:
    spec = RolloutSpec(wave_size=4)
    workloads = _members(12)
    rollout = Rollout(revision=2, hash="h2", phase=WAVES)
    waves = []
    now = T0
    while True:
        result = step(spec, rollout, workloads, now=now, promote=None)
        rollout = result.rollout
        if rollout.phase == COMPLETE:
            break
        waves.append(rollout.members)
        # restarted but not Ready: the wave holds, no next wave
        workloads = _on(workloads, rollout.members, done=False)
        held = step(spec, rollout, workloads, now=now + 1, promote=None).rollout
        assert held.members == rollout.members
        assert held.wave == rollout.wave
        assert held.restarted == rollout.members
        rollout = held
        workloads = _on(workloads, rollout.members)
        now += 10
    assert [len(w) for w in waves] == [4, 4, 4]
    assert [k for w in waves for k in w] == [f"Deployment/w{i:02}" for i in range(12)]
    assert rollout.wave == 3


def test_a_restart_resumes_the_step_written_to_status() -> None:
    spec = RolloutSpec(wave_size=4)
    wave1 = ("Deployment/w00", "Deployment/w01", "Deployment/w02", "Deployment/w03")
    workloads = _on(_members(12), wave1)
    done = Rollout(2, "h2", WAVES, wave=1, members=wave1, restarted=wave1, step_started=T0, last_restart=T0)
    first = step(spec, done, workloads, now=T0, promote=None).rollout
    assert first.wave == 2
    assert first.members[0] == "Deployment/w04"
    # the operator dies after restarting w04 and w05; a new one reads the status back
    read_back = Rollout.from_status(first.to_status())
    assert read_back == first
    workloads = _on(workloads, ["Deployment/w04", "Deployment/w05"], done=False)
    again = step(spec, read_back, workloads, now=T0 + 5, promote=None).rollout
    assert again.members == first.members, "the same wave, not a new one"
    assert again.restarted == ("Deployment/w04", "Deployment/w05")


def test_canary_hold_then_automatic_promotion_then_the_rest() -> None:
    spec = RolloutSpec(canary={"matchLabels": {"tier": "canary"}}, hold=30)
    workloads = _members(3, canary=frozenset({0}))
    r = step(spec, Rollout(7, "h7", CANARY), workloads, now=T0, promote=None)
    assert r.rollout.members == ("Deployment/w00",)
    assert r.rollout.phase == CANARY
    assert not r.promote
    workloads = _on(workloads, ["Deployment/w00"])
    held = step(spec, r.rollout, workloads, now=T0 + 5, promote=None)
    assert held.rollout.phase == HOLDING
    assert held.wake_at == T0 + 35
    assert not held.promote
    still = step(spec, held.rollout, workloads, now=T0 + 20, promote=None)
    assert still.rollout.phase == HOLDING
    assert not still.promote
    promoted = step(spec, still.rollout, workloads, now=T0 + 36, promote=None)
    assert promoted.promote
    assert promoted.rollout.phase == WAVES
    assert promoted.rollout.members == ("Deployment/w01", "Deployment/w02")
    assert "Deployment/w00" not in promoted.rollout.members, "promotion never restarts a canary again"


def test_manual_promotion_waits_for_the_annotation_naming_the_revision() -> None:
    spec = RolloutSpec(canary={"matchLabels": {"tier": "canary"}}, hold=0, manual=True)
    workloads = _on(_members(2, canary=frozenset({0})), ["Deployment/w00"])
    rollout = Rollout(7, "h7", CANARY, members=("Deployment/w00",), step_started=T0)
    waiting = step(spec, rollout, workloads, now=T0 + 1, promote=None)
    assert waiting.rollout.phase == AWAITING
    assert not waiting.promote
    assert not step(spec, waiting.rollout, workloads, now=T0 + 2, promote=6).promote, "an older revision's promote"
    assert step(spec, waiting.rollout, workloads, now=T0 + 3, promote=7).promote


def test_no_canary_needs_it_promotes_at_once() -> None:
    spec = RolloutSpec(canary={"matchLabels": {"tier": "canary"}}, hold=60)
    result = step(spec, Rollout(3, "h3", CANARY), _members(2), now=T0, promote=None)
    assert result.promote
    assert result.rollout.phase == WAVES
    assert len(result.rollout.members) == 2


def test_a_canary_not_ready_within_the_timeout_fails_and_rolls_back() -> None:
    spec = RolloutSpec(canary={"matchLabels": {"tier": "canary"}}, timeout=60)
    workloads = _on(_members(3, canary=frozenset({0})), ["Deployment/w00"], done=False)
    rollout = Rollout(7, "h7", CANARY, members=("Deployment/w00",), step_started=T0)
    early = step(spec, rollout, workloads, now=T0 + 10, promote=None)
    assert early.failure is None
    assert early.wake_at == T0 + 70, "the clock runs from the last restart seen"
    late = step(spec, early.rollout, workloads, now=T0 + 71, promote=None)
    assert late.failure is not None
    assert "Deployment/w00" in late.failure
    assert "60s" in late.failure
    assert not late.promote


def test_members_not_restarted_yet_do_not_time_out() -> None:
    """A restart waiting for the budget is not a failure: only restarted members are timed."""
    spec = RolloutSpec(wave_size=2, timeout=10)
    rollout = Rollout(2, "h2", WAVES, wave=1, members=("Deployment/w00", "Deployment/w01"), step_started=T0)
    assert step(spec, rollout, _members(2), now=T0 + 100, promote=None).failure is None


def test_progress_deadline_exceeded_fails_at_once() -> None:
    spec = RolloutSpec(wave_size=2)
    workloads = [Member("Deployment/w00", False, pending=False, done=False, failed="ProgressDeadlineExceeded")]
    rollout = Rollout(2, "h2", WAVES, wave=1, members=("Deployment/w00",), step_started=T0)
    assert step(spec, rollout, workloads, now=T0 + 1, promote=None).failure is not None


def test_a_canary_not_ready_during_the_hold_fails() -> None:
    spec = RolloutSpec(canary={"matchLabels": {"tier": "canary"}}, hold=60)
    rollout = Rollout(7, "h7", HOLDING, members=("Deployment/w00",), step_started=T0, ready_since=T0 + 5)
    workloads = _on(_members(2, canary=frozenset({0})), ["Deployment/w00"], done=False)
    result = step(spec, rollout, workloads, now=T0 + 10, promote=None)
    assert result.failure is not None
    assert "became not Ready" in result.failure


def test_without_auto_rollback_a_failed_wave_is_passed_and_a_failed_canary_stops() -> None:
    spec = RolloutSpec(wave_size=1, timeout=5, auto_rollback=False)
    workloads = _on(_members(2), ["Deployment/w00"], done=False)
    rollout = Rollout(
        2, "h2", WAVES, wave=1, members=("Deployment/w00",), restarted=("Deployment/w00",), step_started=T0
    )
    result = step(spec, rollout, workloads, now=T0 + 6, promote=None)
    assert result.failure is None
    assert result.rollout.members == ("Deployment/w01",)
    assert result.rollout.failures == ("Deployment/w00",)
    assert any(reason == "ConfigRolloutFailed" for _, reason, _ in result.events)
    assert condition_of(result.rollout, None) is not None
    assert condition_of(result.rollout, None)[:2] == ("False", "RolloutFailed")  # type: ignore[index]
    canary = RolloutSpec(canary={"matchLabels": {"tier": "canary"}}, timeout=5, auto_rollback=False)
    workloads = _on(_members(2, canary=frozenset({0})), ["Deployment/w00"], done=False)
    stuck = Rollout(7, "h7", CANARY, members=("Deployment/w00",), restarted=("Deployment/w00",), step_started=T0)
    stopped = step(canary, stuck, workloads, now=T0 + 6, promote=None)
    assert stopped.rollout.phase == FAILED
    assert not stopped.promote
    assert stopped.failure is None


def test_steps_are_bounded() -> None:
    workloads = _members(MAX_MEMBERS + 5)
    result = step(RolloutSpec(), Rollout(2, "h2", WAVES), workloads, now=T0, promote=None)
    assert len(result.rollout.members) == MAX_MEMBERS


def test_the_rollback_condition_says_why() -> None:
    record = RollbackRecord(7, 6, "d", "Deployment/c: new pods not Ready within 60s", revision=8)
    assert RollbackRecord.from_status(record.to_status()) == record
    status, reason, message = condition_of(Rollout(8, "h6", "RolledBack"), record) or ("", "", "")
    assert (status, reason) == ("False", "AutoRolledBack")
    assert "revision 7 failed" in message
    assert "Deployment/c" in message
    assert "revision 8" in message


def test_spec_parsing() -> None:
    assert RolloutSpec.from_spec({"data": {}}) is None
    spec = RolloutSpec.from_spec({"canary": {"selector": {"matchLabels": {"a": "b"}}, "promotion": "Manual"}})
    assert spec is not None
    assert spec.manual
    assert spec.canary == {"matchLabels": {"a": "b"}}
    assert spec.wave_size is None
    spec = RolloutSpec.from_spec({"rollout": {"waveSize": 3, "rolloutTimeoutSeconds": 20, "autoRollback": False}})
    assert spec == RolloutSpec(wave_size=3, timeout=20, auto_rollback=False)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 20),
    period=st.floats(0.5, 60),
    gaps=st.lists(st.floats(0, 5), min_size=1, max_size=200),
)
def test_the_budget_never_grants_more_than_its_bucket(count: int, period: float, gaps: list[float]) -> None:
    """However restarts ask, any window of length W is granted at most COUNT + COUNT * W / SECONDS tokens."""
    bucket = TokenBucket(count, period)
    now = 0.0
    granted: list[float] = []
    for gap in gaps:
        now += gap
        if bucket.take(now) == 0.0:
            granted.append(now)
    for i, start in enumerate(granted):
        for j in range(i, len(granted)):
            window = granted[j] - start
            assert j - i + 1 <= count + count * window / period + 1e-6


def test_the_budget_says_how_long_to_wait() -> None:
    bucket = TokenBucket(2, 4.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    wait = bucket.take(0.0)
    assert wait == 2.0
    assert bucket.take(wait) == 0.0


def _pod_spec(name: str) -> dict[str, Any]:
    return {
        "volumes": [
            {"name": "cfg", "configMap": {"name": name}},
            {"name": "other", "configMap": {"name": "unrelated"}},
            {"name": "proj", "projected": {"sources": [{"configMap": {"name": name}}, {"secret": {"name": "s"}}]}},
        ],
        "initContainers": [{"name": "init", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": name}}}]}],
        "containers": [
            {"name": "app", "envFrom": [{"configMapRef": {"name": name}}, {"secretRef": {"name": "s"}}]},
            {"name": "side", "env": [{"name": "Y", "value": "1"}]},
        ],
    }


def test_a_canary_is_pointed_at_the_copy_and_back() -> None:
    copy = canary_map_name("app", 7)
    assert copy == "app-r7"
    assert copy_revision(copy, "app") == 7
    assert copy_revision("app-rx", "app") is None
    assert copy_revision("other-r7", "app") is None
    parts = rewrite_refs(_pod_spec("app"), {"app": copy})
    assert parts is not None
    pointed = {**_pod_spec("app"), **parts}
    assert template_refs(pointed) == {copy, "unrelated"}
    assert pointed["containers"][1] == _pod_spec("app")["containers"][1]
    assert pointed["volumes"][1] == _pod_spec("app")["volumes"][1], "other ConfigMaps are left alone"
    assert rewrite_refs(pointed, {"app": copy}) is None, "nothing to change"
    back = {**pointed, **(rewrite_refs(pointed, {"app": "app"}) or {})}
    assert back == _pod_spec("app")


def test_stale_copies_are_those_no_longer_kept_nor_referenced() -> None:
    names = ["app-r1", "app-r2", "app-r3", "app-r9", "unrelated-r1"]
    assert stale_copies(names, target="app", keep_revisions={3, 9}, referenced={"app-r2"}) == ["app-r1"]


def test_only_a_canary_step_leaves_the_target_on_the_previous_content() -> None:
    """A rollout that failed in its canary step (wave 0) was never promoted; one that failed in a wave was."""
    assert Rollout(7, "h7", CANARY).unpromoted
    assert Rollout(7, "h7", FAILED, wave=0).unpromoted
    assert not Rollout(7, "h7", FAILED, wave=2).unpromoted
    assert not Rollout(7, "h7", WAVES, wave=1).unpromoted
    assert Rollout(7, "h7", FAILED, wave=2).ended
    assert Rollout(7, "h7", COMPLETE).ended
    assert not Rollout(7, "h7", HOLDING).ended
