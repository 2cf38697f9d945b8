"""Discovery that fails safe: self-preservation, flap damping, the panic floor and their precedence (pure)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beacon.failsafe import (
    FACT_REASONS,
    DampingPolicy,
    EndpointInput,
    FlapDamper,
    ModeChange,
    ModeState,
    Reason,
    SelfPreservation,
    SelfPreservationPolicy,
    check_kind,
    decide,
    panic,
)
from beacon.health import Status, Thresholds, observe, seeded
from beacon.targets import GrpcCheck, HttpCheck, LeaseCheck, TcpCheck

WINDOW = 10.0


def preservation(**kw: Any) -> SelfPreservation[str]:
    return SelfPreservation(SelfPreservationPolicy(**kw))


def report(sp: SelfPreservation[str], results: Iterable[tuple[str, bool]], *, now: float, kind: str = "http") -> None:
    for key, ok in results:
        sp.observe(key, ok=ok, kind=kind, now=now)


def fleet(n: int, failing: int, *, prefix: str = "ep") -> list[tuple[str, bool]]:
    """`n` endpoints, the first `failing` of them failing."""
    return [(f"{prefix}{i}", i >= failing) for i in range(n)]


# ---------------------------------------------------------------------------------------------- check kinds
def test_check_kinds() -> None:
    assert check_kind(HttpCheck(port=80)) == "http"
    assert check_kind(TcpCheck(port=80)) == "tcp"
    assert check_kind(GrpcCheck(port=80)) == "grpc"
    assert check_kind(LeaseCheck(namespace="ns", name="l")) == "lease"


# ---------------------------------------------------------------------------------------------- self-preservation
def test_enters_when_more_than_half_of_enough_endpoints_fail() -> None:
    sp = preservation()
    report(sp, fleet(20, 10), now=1.0)
    assert not sp.active(1.0)  # exactly 50%: not "more than"
    report(sp, [("ep10", False)], now=1.5)
    assert sp.active(1.5)
    [change] = sp.take_changes()
    assert change.entered
    assert (change.failing, change.population) == (11, 20)
    assert "11 of 20 endpoints (55%)" in change.describe()
    assert sp.take_changes() == []  # read once


def test_minimum_population() -> None:
    sp = preservation()
    report(sp, fleet(19, 19), now=1.0)
    assert not sp.active(1.0)  # every probe failed, but 19 endpoints are too few to overrule them
    report(sp, [("ep19", False)], now=1.0)
    assert sp.active(1.0)


def test_exit_hysteresis() -> None:
    sp = preservation()
    report(sp, fleet(20, 20), now=0.0)
    assert sp.active(0.0)
    report(sp, fleet(20, 8), now=1.0)  # 40%: below the entry threshold, above the exit threshold
    assert sp.active(1.0)
    report(sp, fleet(20, 6), now=2.0)  # 30%: not below 30%
    assert sp.active(2.0)
    report(sp, [("ep5", True)], now=3.0)  # 25%
    assert not sp.active(3.0)
    entered, left = sp.take_changes()
    assert entered.entered
    assert not left.entered
    assert (left.since, left.at) == (0.0, 3.0)
    assert "after 3 s" in left.describe()
    report(sp, fleet(20, 8), now=4.0)  # 40% again: below the entry threshold, stays off
    assert not sp.active(4.0)


def test_lease_results_are_ignored() -> None:
    sp = preservation()
    report(sp, fleet(40, 40), now=1.0, kind="lease")
    assert not sp.active(1.0)
    assert len(sp) == 0
    report(sp, fleet(20, 0), now=2.0)
    report(sp, fleet(40, 40, prefix="lease"), now=2.0, kind="lease")
    assert sp.state(2.0).population == 20  # the Lease failures are not in the count


@pytest.mark.parametrize("kind", ["http", "tcp", "grpc", "udp"])
def test_network_checks_count(kind: str) -> None:
    sp = preservation()
    report(sp, fleet(20, 20), now=1.0, kind=kind)
    assert sp.active(1.0)


def test_each_endpoint_counts_once() -> None:
    """A fast prober (connection-loss re-probes, a short interval) does not outvote a slow one."""
    sp = preservation()
    report(sp, fleet(20, 0), now=0.0)
    for step in range(100):
        sp.observe("ep0", ok=False, kind="http", now=step / 20)
    state = sp.state(5.0)
    assert (state.failing, state.population) == (1, 20)
    assert not state.active


def test_the_latest_result_in_the_window_decides() -> None:
    sp = preservation()
    report(sp, fleet(20, 20), now=0.0)
    assert sp.active(0.0)
    report(sp, fleet(20, 0), now=1.0)  # every endpoint recovered: its latest result passed
    assert not sp.active(1.0)


def test_results_leave_the_window() -> None:
    sp = preservation()
    report(sp, fleet(15, 15), now=0.0)
    report(sp, fleet(10, 10, prefix="late"), now=WINDOW + 1)  # the first 15 are out of the window by now
    state = sp.state(WINDOW + 1)
    assert (state.failing, state.population, state.tracked) == (10, 10, 25)
    assert not state.active


def test_leaving_needs_evidence() -> None:
    """No results at all (a stalled event loop) is no sign that the path healed."""
    sp = preservation()
    report(sp, fleet(30, 30), now=0.0)
    assert sp.active(0.0)
    assert sp.active(1000.0)
    assert sp.state(1000.0).population == 0
    report(sp, fleet(5, 0), now=1001.0)  # 5 answers from a fleet of 30: too few to judge
    assert sp.active(1001.0)


def test_a_fleet_that_shrinks_is_judged_on_what_is_left() -> None:
    sp = preservation()
    report(sp, fleet(30, 30), now=0.0)
    for i in range(25):
        sp.forget(f"ep{i}")  # entries deleted meanwhile
    assert sp.active(0.0)  # the 5 left still fail
    report(sp, fleet(5, 0, prefix="new"), now=1.0)  # 5 new endpoints answer...
    assert sp.active(1.0)  # ...but half of the 10 fail
    for i in range(25, 30):
        sp.forget(f"ep{i}")  # the failing five go too: the five new ones are the fleet now, and they pass
    assert not sp.active(1.0)


def test_forgetting_everyone_ends_the_mode() -> None:
    sp = preservation()
    report(sp, fleet(20, 20), now=0.0)
    for i in range(20):
        sp.forget(f"ep{i}")
    assert not sp.active(0.0)


def test_disabled() -> None:
    sp = preservation(enabled=False)
    report(sp, fleet(100, 100), now=0.0)
    assert not sp.active(0.0)
    assert sp.may_publish_not_ready("ep0", threshold=1, now=0.0)
    assert len(sp) == 0


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        SelfPreservationPolicy(enter_share=0.3, exit_share=0.3)
    with pytest.raises(ValueError, match="window"):
        SelfPreservationPolicy(window=0)
    with pytest.raises(ValueError, match="min_endpoints"):
        SelfPreservationPolicy(min_endpoints=0)


def test_time_never_goes_back() -> None:
    sp = preservation()
    report(sp, fleet(20, 20), now=100.0)
    report(sp, fleet(20, 0), now=50.0)  # an older time counts as the newest seen
    assert not sp.active(60.0)


def test_not_ready_is_publishable_before_the_mode_never_during_it() -> None:
    sp = preservation()
    report(sp, fleet(20, 1), now=0.0)
    assert sp.may_publish_not_ready("ep0", threshold=3, now=0.0)  # an isolated failure, no mode: as before
    report(sp, fleet(20, 20), now=1.0)
    assert not sp.may_publish_not_ready("ep0", threshold=3, now=1.0)


def test_after_exit_only_failures_of_probes_started_after_it_count() -> None:
    sp = preservation()
    report(sp, fleet(20, 20), now=0.0)
    report(sp, fleet(20, 1), now=5.0)  # exit at 5.0; ep0 still fails
    assert not sp.active(5.0)
    [_, left] = sp.take_changes()
    assert left.at == 5.0
    # a probe that started before the exit (in flight across it) is no evidence
    sp.observe("ep0", ok=False, kind="http", now=6.0, started=4.0)
    sp.observe("ep0", ok=False, kind="http", now=7.0, started=5.0)  # started at the exit, not after it
    assert not sp.may_publish_not_ready("ep0", threshold=2, now=7.0)
    sp.observe("ep0", ok=False, kind="http", now=8.0, started=7.5)
    assert not sp.may_publish_not_ready("ep0", threshold=2, now=8.0)
    sp.observe("ep0", ok=True, kind="http", now=9.0)  # a success resets the count
    sp.observe("ep0", ok=False, kind="http", now=10.0)
    assert not sp.may_publish_not_ready("ep0", threshold=2, now=10.0)
    sp.observe("ep0", ok=False, kind="http", now=11.0)
    assert sp.may_publish_not_ready("ep0", threshold=2, now=11.0)
    assert not sp.may_publish_not_ready("ep0", threshold=3, now=11.0)
    assert not sp.may_publish_not_ready("ep1", threshold=1, now=11.0)  # no failure after the exit


def test_observe_tells_when_a_failure_is_confirmed_after_an_exit() -> None:
    """A held endpoint's health stays CRITICAL (nothing the caller would reconcile for): the result that
    confirms it says so, once."""
    sp = preservation()
    report(sp, fleet(20, 20), now=0.0)
    assert not sp.observe("ep0", ok=False, kind="http", now=0.5, threshold=1)  # in the mode: nothing confirms
    report(sp, fleet(20, 1), now=1.0)  # exit
    assert not sp.observe("ep0", ok=False, kind="http", now=2.0, threshold=2)
    assert sp.observe("ep0", ok=False, kind="http", now=3.0, threshold=2)
    assert not sp.observe("ep0", ok=False, kind="http", now=4.0, threshold=2)  # confirmed already
    assert not sp.observe("ep1", ok=False, kind="http", now=4.0)  # no threshold given: never


def test_reentering_forgets_the_confirmations() -> None:
    sp = preservation()
    report(sp, fleet(20, 20), now=0.0)
    report(sp, fleet(20, 1), now=1.0)  # exit
    report(sp, [("ep0", False)] * 3, now=2.0)
    assert sp.may_publish_not_ready("ep0", threshold=3, now=2.0)
    report(sp, fleet(20, 20), now=3.0)  # in again
    report(sp, fleet(20, 1), now=4.0)  # and out
    assert not sp.may_publish_not_ready("ep0", threshold=3, now=4.0)


def test_changes_are_bounded_when_nobody_reads_them() -> None:
    sp = preservation()
    for cycle in range(100):
        report(sp, fleet(20, 20), now=2.0 * cycle)
        report(sp, fleet(20, 0), now=2.0 * cycle + 1)
    changes = sp.take_changes()
    assert len(changes) == 64
    assert [c.entered for c in changes[-2:]] == [True, False]


def test_state_is_bounded_and_forgotten() -> None:
    sp = preservation()
    for step in range(50):
        report(sp, fleet(200, 0), now=float(step))
    assert len(sp) == 200
    assert sp.buffered <= 200 * (WINDOW + 1)  # the window's results only, not the history
    sp.active(1000.0)
    assert sp.buffered == 0
    for i in range(200):
        sp.forget(f"ep{i}")
    assert len(sp) == 0
    assert sp.state(1000.0) == ModeState(active=False, failing=0, population=0, tracked=0, since=None)


# a reference model of the mode: recompute the window's count from the whole history at every step
@dataclass
class _Reference:
    policy: SelfPreservationPolicy
    active: bool = False

    def __post_init__(self) -> None:
        self.history: list[tuple[float, str, bool]] = []
        self.tracked: set[str] = set()

    def step(self, now: float) -> bool:
        latest: dict[str, tuple[float, bool]] = {}
        for at, key, ok in self.history:
            if key in self.tracked:
                latest[key] = (at, ok)
        horizon = now - self.policy.window
        counted = [ok for at, ok in latest.values() if not at < horizon]
        population, failing = len(counted), sum(1 for ok in counted if not ok)
        if not self.active:
            self.active = population >= self.policy.min_endpoints and failing > self.policy.enter_share * population
        else:
            enough = population > 0 and population >= min(self.policy.min_endpoints, len(self.tracked))
            if not self.tracked or (enough and failing < self.policy.exit_share * population):
                self.active = False
        return self.active


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["observe", "observe", "observe", "forget", "tick"]),
        st.integers(0, 11),
        st.booleans(),
        st.sampled_from(["http", "tcp", "lease"]),
        st.sampled_from([0.0, 0.0, 0.5, 1.0, 4.0, 11.0]),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_incremental_counting_matches_a_recount(ops: list[tuple[str, int, bool, str, float]]) -> None:
    policy = SelfPreservationPolicy(window=WINDOW, min_endpoints=4, enter_share=0.5, exit_share=0.25)
    sp: SelfPreservation[str] = SelfPreservation(policy)
    ref = _Reference(policy)
    now = 0.0
    for op, index, ok, kind, dt in ops:
        now += dt
        key = f"ep{index}"
        if op == "observe":
            sp.observe(key, ok=ok, kind=kind, now=now)
            if kind != "lease":
                ref.history.append((now, key, ok))
                ref.tracked.add(key)
        elif op == "forget":
            sp.forget(key)
            ref.tracked.discard(key)
            ref.history = [h for h in ref.history if h[1] != key]
        assert sp.active(now) == ref.step(now)
        assert len(sp) == len(ref.tracked)
    changes = sp.take_changes()
    assert all(a.entered != b.entered for a, b in itertools.pairwise(changes))  # they alternate


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 24), st.booleans(), st.integers(1, 60)), max_size=200))
def test_lease_results_change_nothing(leases: list[tuple[int, bool, int]]) -> None:
    """The same network results, with and without Lease results between them: the same mode at every step."""
    plain, mixed = preservation(), preservation()
    for step, (index, ok, repeat) in enumerate(leases):
        now = step * 0.25
        result = (f"ep{index}", (index + step) % 3 != 0)
        report(plain, [result], now=now)
        report(mixed, [result], now=now)
        report(mixed, [(f"ep{index}", ok)] * repeat, now=now, kind="lease")
        assert plain.state(now) == mixed.state(now)


# ---------------------------------------------------------------------------------------------- flap damping
def flap(damper: FlapDamper[str], states: Sequence[bool], *, start: float = 0.0, every: float = 1.0) -> list[bool]:
    """Feed `states` one per `every` seconds; the suppression after each."""
    return [damper.update("ep", ready=ready, now=start + i * every) for i, ready in enumerate(states)]


def test_the_first_input_is_no_flap() -> None:
    damper: FlapDamper[str] = FlapDamper()
    assert not damper.update("ep", ready=False, now=0.0)
    assert damper.penalty("ep", now=0.0) == 0.0


def test_suppressed_on_the_third_quick_transition() -> None:
    damper: FlapDamper[str] = FlapDamper()
    #             start  down   up     down
    assert flap(damper, [True, False, True, False]) == [False, False, False, True]
    assert damper.penalty("ep", now=3.0) > 2000
    assert damper.suppressed("ep", now=3.0)


def test_two_transitions_are_not_enough() -> None:
    damper: FlapDamper[str] = FlapDamper()
    assert flap(damper, [True, False, True], every=0.0) == [False, False, False]
    assert damper.penalty("ep", now=0.0) == pytest.approx(2000)  # at the level, not above it


def test_slow_flaps_decay_away() -> None:
    damper: FlapDamper[str] = FlapDamper()
    # one transition every 2 minutes: each penalty has lost 3/4 by the next one
    assert not any(flap(damper, [True, False, True, False, True, False, True], every=120.0))


def test_release_needs_decay_below_reuse_and_passing() -> None:
    damper: FlapDamper[str] = FlapDamper()
    flap(damper, [True, False, True, False, True])  # suppressed at the 4th input (t=3), up again at t=4
    release = damper.release_at("ep")
    assert release is not None
    assert release == pytest.approx(4.0 + 60.0 * math.log2(damper.penalty("ep", now=4.0) / 750))
    assert damper.update("ep", ready=True, now=release - 1.0)  # passing, but the penalty is above reuse
    assert not damper.update("ep", ready=True, now=release)  # decayed to reuse and passing: released
    assert damper.release_at("ep") is None


def test_decayed_but_failing_stays_out_until_it_passes() -> None:
    damper: FlapDamper[str] = FlapDamper()
    flap(damper, [True, False, True, False])  # suppressed while down, at t=3
    release = damper.release_at("ep")
    assert release is not None
    assert damper.update("ep", ready=False, now=release - 1.0)
    # decayed while down: no longer damped, and not ready by its health alone (Unhealthy, no longer Flapping)
    assert not damper.update("ep", ready=False, now=release + 1.0)
    # back up: ready at once, not suppressed again by its own recovery (750 + 1000 is not above 2000)
    assert not damper.update("ep", ready=True, now=release + 2.0)
    assert damper.penalty("ep", now=release + 2.0) < 2000


def test_a_suppressed_endpoint_keeps_being_charged() -> None:
    damper: FlapDamper[str] = FlapDamper()
    flap(damper, [True, False, True, False])
    first = damper.release_at("ep")
    flap(damper, [True, False, True, False], start=10.0)
    later = damper.release_at("ep")
    assert first is not None
    assert later is not None
    assert later > first


def test_max_suppress_bounds_the_hold() -> None:
    damper: FlapDamper[str] = FlapDamper()
    flap(damper, [False, True] * 100, every=0.1)  # a storm of flaps, ending up
    last = 199 * 0.1
    assert damper.penalty("ep", now=last) == pytest.approx(DampingPolicy().ceiling)
    assert DampingPolicy().ceiling == pytest.approx(12000)
    assert damper.update("ep", ready=True, now=last + 239.0)
    assert not damper.update("ep", ready=True, now=last + 240.0 + 0.1)  # max_suppress after the last flap


def test_damping_policy_validation() -> None:
    with pytest.raises(ValueError, match="reuse"):
        DampingPolicy(reuse=2000, suppress=2000)
    with pytest.raises(ValueError, match="max_suppress"):
        DampingPolicy(max_suppress=30)  # ceiling 750 * 2^0.5 < 2000: nothing could ever be suppressed
    with pytest.raises(ValueError, match="positive"):
        DampingPolicy(half_life=0)


def test_damping_disabled() -> None:
    damper: FlapDamper[str] = FlapDamper(DampingPolicy(enabled=False))
    assert not any(flap(damper, [True, False] * 10))
    assert len(damper) == 0


def test_damper_forgets() -> None:
    damper: FlapDamper[str] = FlapDamper()
    for i in range(100):
        damper.update(f"ep{i}", ready=True, now=0.0)
    assert len(damper) == 100
    for i in range(100):
        damper.forget(f"ep{i}")
    assert len(damper) == 0
    assert damper.release_at("ep0") is None


_FLAPS = st.lists(st.tuples(st.booleans(), st.floats(0.0, 200.0, allow_nan=False)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(_FLAPS)
def test_damping_properties(inputs: list[tuple[bool, float]]) -> None:
    policy = DampingPolicy()
    damper: FlapDamper[str] = FlapDamper(policy)
    now, previous, transitions, last_transition, was_suppressed = 0.0, None, 0, 0.0, False
    for ready, dt in inputs:
        now += dt
        before = damper.penalty("ep", now=now)
        suppressed = damper.update("ep", ready=ready, now=now)
        if previous is not None and ready != previous:
            transitions += 1
            last_transition = now
        previous = ready
        assert 0.0 <= damper.penalty("ep", now=now) <= policy.ceiling * (1 + 1e-9)
        if transitions <= 2:
            assert not suppressed  # two transitions reach 2000 at most: not above it
        if was_suppressed and not suppressed:
            assert before <= policy.reuse * (1 + 1e-9)  # never released above the reuse level
        was_suppressed = suppressed
    if previous is not None:  # quiet and passing: released within max_suppress of the last transition
        assert not damper.update("ep", ready=True, now=last_transition + policy.max_suppress + 1e-6)


# ---------------------------------------------------------------------------------------------- panic floor
def test_panic_is_strictly_below_the_floor() -> None:
    assert not panic(healthy=5, total=10, min_healthy_percent=50)  # at the floor: health still filters
    assert panic(healthy=4, total=10, min_healthy_percent=50)
    assert panic(healthy=0, total=3, min_healthy_percent=1)
    assert not panic(healthy=1, total=3, min_healthy_percent=33)  # 33.3% is not below 33%
    assert panic(healthy=1, total=3, min_healthy_percent=34)


def test_panic_off() -> None:
    assert not panic(healthy=0, total=10, min_healthy_percent=None)
    assert not panic(healthy=0, total=10, min_healthy_percent=0)
    assert not panic(healthy=0, total=0, min_healthy_percent=100)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        panic(healthy=0, total=1, min_healthy_percent=101)


@given(st.integers(0, 500), st.integers(0, 500), st.integers(1, 100))
def test_panic_matches_the_share(healthy: int, extra: int, floor: int) -> None:
    total = healthy + extra
    expected = total > 0 and Fraction(healthy, total) * 100 < floor
    assert panic(healthy=healthy, total=total, min_healthy_percent=floor) == expected


# ---------------------------------------------------------------------------------------------- the precedence
def inputs(*items: tuple[str, Status, bool | None]) -> list[EndpointInput[str]]:
    return [EndpointInput(key=k, health=h, published_ready=p) for k, h, p in items]


def active_preservation() -> SelfPreservation[str]:
    sp = preservation()
    report(sp, fleet(20, 20, prefix="other"), now=0.0)
    assert sp.active(0.0)
    return sp


def test_without_policies_health_decides() -> None:
    decision = decide(
        inputs(("a", Status.PASSING, None), ("b", Status.CRITICAL, True), ("c", Status.UNKNOWN, None)),
        now=0.0,
        check="http",
        unhealthy_threshold=3,
    )
    assert {k: (p.ready, p.serving, p.reason) for k, p in decision.endpoints.items()} == {
        "a": (True, True, Reason.HEALTHY),
        "b": (False, False, Reason.UNHEALTHY),
        "c": (False, False, Reason.UNKNOWN),
    }
    assert (decision.panic, decision.healthy, decision.eligible) == (False, 1, 3)


def test_self_preservation_holds_what_was_published() -> None:
    decision = decide(
        inputs(("held", Status.CRITICAL, True), ("down", Status.CRITICAL, False), ("new", Status.CRITICAL, None)),
        now=0.0,
        check="tcp",
        unhealthy_threshold=3,
        self_preservation=active_preservation(),
    )
    held = decision.endpoints["held"]
    assert (held.ready, held.serving, held.reason) == (True, True, Reason.HELD)
    assert decision.endpoints["down"].reason is Reason.UNHEALTHY  # withdrawn before: stays withdrawn
    assert decision.endpoints["new"].reason is Reason.UNHEALTHY  # nothing published to hold
    assert decision.count(Reason.HELD) == 1


def test_self_preservation_lets_recoveries_through() -> None:
    decision = decide(
        inputs(("back", Status.PASSING, False)),
        now=0.0,
        check="http",
        unhealthy_threshold=3,
        self_preservation=active_preservation(),
    )
    assert decision.endpoints["back"].ready


def test_lease_checks_are_not_held() -> None:
    for check in ("lease", None):
        decision = decide(
            inputs(("ep", Status.CRITICAL, True)),
            now=0.0,
            check=check,
            unhealthy_threshold=3,
            self_preservation=active_preservation(),
        )
        assert decision.endpoints["ep"].reason is Reason.UNHEALTHY


@pytest.mark.parametrize(
    ("facts", "reason", "serving"),
    [
        ({"terminating": True}, Reason.TERMINATING, True),
        ({"draining": True}, Reason.DRAINING, True),
        ({"pod_ready": False}, Reason.POD_NOT_READY, False),
        ({"refused": True}, Reason.PROBE_REFUSED, False),
        ({"terminating": True, "pod_ready": False}, Reason.TERMINATING, False),
    ],
)
def test_facts_come_first(facts: dict[str, bool], reason: Reason, serving: bool) -> None:
    damper: FlapDamper[str] = FlapDamper()
    item = EndpointInput(key="ep", health=Status.PASSING, published_ready=True, **facts)
    decision = decide(
        [item, *inputs(("other", Status.CRITICAL, False))],
        now=0.0,
        check="http",
        unhealthy_threshold=3,
        self_preservation=active_preservation(),
        damper=damper,
        min_healthy_percent=100,
    )
    published = decision.endpoints["ep"]
    assert (published.ready, published.serving, published.reason) == (False, serving, reason)
    assert published.terminating == (reason in (Reason.TERMINATING, Reason.DRAINING))
    assert decision.eligible == 1
    assert decision.panic  # panic publishes "other", never the endpoint taken out
    assert decision.endpoints["other"].reason is Reason.PANIC


def test_damping_after_self_preservation() -> None:
    """A mass outage held by self-preservation charges no penalty: the damper's input never moved."""
    sp, damper = active_preservation(), FlapDamper[str]()
    for step, health in enumerate([Status.PASSING, Status.CRITICAL, Status.PASSING, Status.CRITICAL]):
        decision = decide(
            inputs(("ep", health, True)),
            now=float(step),
            check="http",
            unhealthy_threshold=1,
            self_preservation=sp,
            damper=damper,
        )
        assert decision.endpoints["ep"].ready
    assert damper.penalty("ep", now=4.0) == 0.0


def test_flapping_endpoint_is_held_out() -> None:
    damper: FlapDamper[str] = FlapDamper()
    reasons = []
    for step, health in enumerate([Status.PASSING, Status.CRITICAL, Status.PASSING, Status.CRITICAL, Status.PASSING]):
        decision = decide(
            inputs(("ep", health, None)), now=float(step), check="http", unhealthy_threshold=1, damper=damper
        )
        reasons.append(decision.endpoints["ep"].reason)
    assert reasons == [Reason.HEALTHY, Reason.UNHEALTHY, Reason.HEALTHY, Reason.FLAPPING, Reason.FLAPPING]
    assert not decision.endpoints["ep"].ready


def test_unknown_endpoints_do_not_feed_the_damper() -> None:
    damper: FlapDamper[str] = FlapDamper()
    decide(inputs(("ep", Status.UNKNOWN, None)), now=0.0, check="http", unhealthy_threshold=1, damper=damper)
    assert len(damper) == 0


def test_panic_overrides_damping_and_reports_the_real_count() -> None:
    damper: FlapDamper[str] = FlapDamper()
    flap(damper, [True, False, True, False])
    decision = decide(
        inputs(
            ("ep", Status.PASSING, False),  # flapping: suppressed although passing
            ("a", Status.PASSING, True),
            ("b", Status.CRITICAL, False),
            ("c", Status.UNKNOWN, None),
        ),
        now=4.0,
        check="http",
        unhealthy_threshold=3,
        damper=damper,
        min_healthy_percent=50,
    )
    assert decision.panic
    assert (decision.healthy, decision.eligible) == (1, 4)
    assert {k: p.reason for k, p in decision.endpoints.items()} == {
        "ep": Reason.PANIC,
        "a": Reason.HEALTHY,
        "b": Reason.PANIC,
        "c": Reason.PANIC,
    }
    assert all(p.ready and p.serving for p in decision.endpoints.values())


def test_held_endpoints_count_as_healthy_for_the_floor() -> None:
    """A network outage absorbed by self-preservation does not also throw the entry into panic (which would
    re-add the endpoint withdrawn before the outage)."""
    decision = decide(
        inputs(*[(f"ep{i}", Status.CRITICAL, True) for i in range(9)], ("dead", Status.CRITICAL, False)),
        now=0.0,
        check="http",
        unhealthy_threshold=3,
        self_preservation=active_preservation(),
        min_healthy_percent=50,
    )
    assert not decision.panic
    assert decision.healthy == 9
    assert not decision.endpoints["dead"].ready


_HEALTH = st.sampled_from([Status.PASSING, Status.CRITICAL, Status.UNKNOWN])
_ENDPOINT = st.builds(
    EndpointInput,
    key=st.text("abcdef", min_size=1, max_size=3),
    health=_HEALTH,
    published_ready=st.sampled_from([True, False, None]),
    terminating=st.booleans(),
    draining=st.booleans(),
    pod_ready=st.sampled_from([True, False, None]),
    refused=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_ENDPOINT, max_size=12, unique_by=lambda e: e.key),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 0, 30, 50, 100]),
    st.sampled_from(["http", "lease", None]),
)
def test_precedence_properties(
    endpoints: list[EndpointInput[str]], preserve: bool, damp: bool, floor: int | None, check: str | None
) -> None:
    damper: FlapDamper[str] = FlapDamper()
    for item in endpoints:  # every endpoint has flapped: suppressed if its health is known
        for i, ready in enumerate([True, False, True, False]):
            damper.update(item.key, ready=ready, now=float(i))
    decision = decide(
        endpoints,
        now=4.0,
        check=check,
        unhealthy_threshold=3,
        self_preservation=active_preservation() if preserve else None,
        damper=damper if damp else None,
        min_healthy_percent=floor,
    )
    assert set(decision.endpoints) == {e.key for e in endpoints}
    for item in endpoints:
        published = decision.endpoints[item.key]
        taken_out = item.terminating or item.draining or item.pod_ready is False or item.refused
        if taken_out:  # facts bypass every policy
            assert not published.ready
            assert published.reason in FACT_REASONS
            continue
        assert published.reason not in FACT_REASONS
        assert published.serving == published.ready
        if decision.panic:
            assert published.ready
        elif not preserve and not damp:  # no policy: the health verdict, as before the policies
            assert published.ready == (item.health is Status.PASSING)
        if published.reason is Reason.HELD:
            assert (preserve, check, item.published_ready, item.health) == (True, "http", True, Status.CRITICAL)
    assert decision.eligible == sum(
        1 for e in endpoints if not (e.terminating or e.draining or e.pod_ready is False or e.refused)
    )
    assert decision.panic == panic(healthy=decision.healthy, total=decision.eligible, min_healthy_percent=floor)


# ---------------------------------------------------------------------------------------------- a whole outage
def test_an_operator_network_outage_withdraws_nothing_and_a_real_death_is_confirmed_after_it() -> None:
    """40 endpoints probed every second (unhealthyThreshold 3). The operator's network breaks from t=10 to t=40,
    and ep7 really dies at t=20. Nothing is withdrawn during the outage; after it, ep7 is withdrawn once three
    probes started after the exit failed, and no other endpoint ever leaves."""
    thresholds = Thresholds(healthy=1, unhealthy=3)
    sp: SelfPreservation[str] = SelfPreservation()
    damper: FlapDamper[str] = FlapDamper()
    keys = [f"ep{i}" for i in range(40)]
    health = {k: seeded(ready=True, now=0.0) for k in keys}
    published = dict.fromkeys(keys, True)
    withdrawn_at: dict[str, float] = {}
    for second in range(70):
        for i, key in enumerate(keys):
            now = second + i / 40
            ok = not (10 <= second < 40) and not (key == "ep7" and second >= 20)
            sp.observe(key, ok=ok, kind="http", now=now, started=now - 0.01)
            health[key], _ = observe(health[key], ok=ok, detail="", now=now, thresholds=thresholds)
            decision = decide(
                [EndpointInput(key=k, health=health[k].status, published_ready=published[k]) for k in keys],
                now=now,
                check="http",
                unhealthy_threshold=thresholds.unhealthy,
                self_preservation=sp,
                damper=damper,
            )
            for k, p in decision.endpoints.items():
                if published[k] and not p.ready:
                    withdrawn_at.setdefault(k, now)
                published[k] = p.ready
    entered, left = sp.take_changes()
    assert entered.entered
    assert 10 < entered.at < 11  # within the first second of the outage
    assert not left.entered
    assert 40 < left.at < 41  # within the first second after it
    assert list(withdrawn_at) == ["ep7"]
    assert 43 < withdrawn_at["ep7"] < 44  # the third failure started after the exit
    assert all(published[k] for k in keys if k != "ep7")
    assert damper.penalty("ep7", now=70.0) < 1000  # one transition, decaying; nobody else was charged
    assert all(damper.penalty(k, now=70.0) == 0.0 for k in keys if k != "ep7")


def test_mode_change_share() -> None:
    assert ModeChange(True, 0.0, 0, 0, WINDOW, 0.0).share == 0.0
    assert ModeChange(True, 0.0, 3, 4, WINDOW, 0.0).share == 0.75
