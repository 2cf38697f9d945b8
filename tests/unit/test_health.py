"""The health state machine: thresholds turn a stream of probe results into few, deliberate transitions."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from beacon.health import EndpointHealth, Status, Thresholds, observe, seeded, settled


def feed(
    results: Sequence[bool], *, thresholds: Thresholds, start: EndpointHealth | None = None
) -> tuple[EndpointHealth, list[tuple[int, Status]]]:
    """Apply `results` one per second; return the final health and the (index, new status) of each transition."""
    health = start if start is not None else EndpointHealth()
    transitions = []
    for index, ok in enumerate(results):
        health, changed = observe(health, ok=ok, detail=f"probe {index}", now=float(index + 1), thresholds=thresholds)
        if changed:
            transitions.append((index, health.status))
    return health, transitions


def test_new_endpoint_is_unknown_and_not_ready() -> None:
    health = seeded(ready=None, now=5.0)
    assert health.status is Status.UNKNOWN
    assert not health.ready
    assert health.since == 5.0


def test_unknown_becomes_passing_after_healthy_threshold_successes() -> None:
    health, transitions = feed([True, True, True], thresholds=Thresholds(healthy=3, unhealthy=3))
    assert transitions == [(2, Status.PASSING)]
    assert health.ready


def test_unknown_stays_unknown_below_the_healthy_threshold() -> None:
    health, transitions = feed([True, True], thresholds=Thresholds(healthy=3))
    assert transitions == []
    assert health.status is Status.UNKNOWN


def test_unknown_becomes_critical_after_unhealthy_threshold_failures() -> None:
    _, transitions = feed([False] * 4, thresholds=Thresholds(healthy=1, unhealthy=2))
    assert transitions == [(1, Status.CRITICAL)]


def test_passing_needs_unhealthy_threshold_consecutive_failures() -> None:
    start = seeded(ready=True, now=0.0)
    results = [False, False, True, False, False, True, False, False, False]
    health, transitions = feed(results, thresholds=Thresholds(unhealthy=3), start=start)
    assert transitions == [(8, Status.CRITICAL)]  # each success reset the failure count
    assert health.status is Status.CRITICAL


def test_critical_needs_healthy_threshold_consecutive_successes() -> None:
    start = seeded(ready=False, now=0.0)
    health, transitions = feed([True, False, True, True], thresholds=Thresholds(healthy=2), start=start)
    assert transitions == [(3, Status.PASSING)]
    assert health.ready


def test_threshold_of_one_flips_on_a_single_result() -> None:
    thresholds = Thresholds(healthy=1, unhealthy=1)
    _, transitions = feed([True, False, True], thresholds=thresholds, start=seeded(ready=False, now=0.0))
    assert [status for _, status in transitions] == [Status.PASSING, Status.CRITICAL, Status.PASSING]


@pytest.mark.parametrize("start_ready", [None, True, False])
def test_alternating_results_never_flip_with_thresholds_of_two(start_ready: bool | None) -> None:
    start = seeded(ready=start_ready, now=0.0)
    health, transitions = feed([True, False] * 20, thresholds=Thresholds(healthy=2, unhealthy=2), start=start)
    assert transitions == []
    assert health.status is start.status


def test_since_moves_only_on_transitions_and_detail_always() -> None:
    thresholds = Thresholds(healthy=1, unhealthy=2)
    health = seeded(ready=True, now=0.0)
    health, changed = observe(health, ok=False, detail="HTTP 500", now=10.0, thresholds=thresholds)
    assert not changed
    assert (health.since, health.detail) == (0.0, "HTTP 500")
    health, changed = observe(health, ok=False, detail="HTTP 503", now=20.0, thresholds=thresholds)
    assert changed
    assert (health.status, health.since, health.detail) == (Status.CRITICAL, 20.0, "HTTP 503")


def test_seeded_restores_the_published_readiness() -> None:
    assert seeded(ready=True, now=1.0).status is Status.PASSING
    assert seeded(ready=False, now=1.0).status is Status.CRITICAL
    # a restored healthy endpoint survives fewer than `unhealthy` failures, as before the restart
    health, transitions = feed([False, False], thresholds=Thresholds(unhealthy=3), start=seeded(ready=True, now=0.0))
    assert transitions == []
    assert health.ready


def test_deregister_after_counts_from_the_transition_to_critical() -> None:
    thresholds = Thresholds(healthy=1, unhealthy=1, deregister_after=30.0)
    health, _ = observe(EndpointHealth(since=0.0), ok=False, detail="down", now=100.0, thresholds=thresholds)
    assert health.status is Status.CRITICAL
    assert not health.deregistered(now=129.9, thresholds=thresholds)
    assert health.deregistered(now=130.0, thresholds=thresholds)
    # later failures do not restart the clock
    health, _ = observe(health, ok=False, detail="down", now=125.0, thresholds=thresholds)
    assert health.deregistered(now=130.0, thresholds=thresholds)
    # passing again brings it back
    health, _ = observe(health, ok=True, detail="up", now=140.0, thresholds=thresholds)
    assert not health.deregistered(now=1000.0, thresholds=thresholds)


def test_deregister_is_off_without_the_setting_and_never_applies_to_unknown() -> None:
    critical = EndpointHealth(status=Status.CRITICAL, since=0.0)
    assert not critical.deregistered(now=1e9, thresholds=Thresholds())
    unknown = EndpointHealth(status=Status.UNKNOWN, since=0.0)
    assert not unknown.deregistered(now=1e9, thresholds=Thresholds(deregister_after=1.0))


@pytest.mark.parametrize(("healthy", "unhealthy"), [(0, 1), (1, 0), (-1, 3)])
def test_thresholds_below_one_are_rejected(healthy: int, unhealthy: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Thresholds(healthy=healthy, unhealthy=unhealthy)


thresholds_st = st.builds(Thresholds, healthy=st.integers(1, 5), unhealthy=st.integers(1, 5))


def _longest_failure_run(results: Sequence[bool]) -> int:
    longest = run = 0
    for ok in results:
        run = 0 if ok else run + 1
        longest = max(longest, run)
    return longest


@given(thresholds=thresholds_st, results=st.lists(st.booleans(), max_size=60))
def test_passing_never_turns_critical_without_enough_consecutive_failures(
    thresholds: Thresholds, results: list[bool]
) -> None:
    health, transitions = feed(results, thresholds=thresholds, start=seeded(ready=True, now=0.0))
    if _longest_failure_run(results) < thresholds.unhealthy:
        assert Status.CRITICAL not in [status for _, status in transitions]
        assert health.status is Status.PASSING


@given(
    thresholds=thresholds_st, results=st.lists(st.booleans(), max_size=60), start=st.sampled_from([None, True, False])
)
def test_transitions_are_bounded_by_length_over_the_smallest_threshold(
    thresholds: Thresholds, results: list[bool], start: bool | None
) -> None:
    _, transitions = feed(results, thresholds=thresholds, start=seeded(ready=start, now=0.0))
    assert len(transitions) <= len(results) // min(thresholds.healthy, thresholds.unhealthy)


@given(thresholds=thresholds_st, results=st.lists(st.booleans(), min_size=1, max_size=60))
def test_status_follows_the_latest_run_once_it_reaches_its_threshold(
    thresholds: Thresholds, results: list[bool]
) -> None:
    health, transitions = feed(results, thresholds=thresholds)
    last = results[-1]
    run = 0
    for ok in reversed(results):
        if ok != last:
            break
        run += 1
    if run >= (thresholds.healthy if last else thresholds.unhealthy):
        assert health.status is (Status.PASSING if last else Status.CRITICAL)
    # consecutive transitions always alternate: a transition is a change of status
    statuses = [status for _, status in transitions]
    assert all(a is not b for a, b in itertools.pairwise(statuses))


results_strategy = st.lists(st.tuples(st.booleans(), st.sampled_from(["HTTP 200", "HTTP 503", "timed out"])))


@given(
    results=results_strategy,
    healthy=st.integers(1, 4),
    unhealthy=st.integers(1, 4),
    start=st.sampled_from([None, True, False]),
)
def test_skipping_settled_results_changes_nothing_that_is_read(
    results: list[tuple[bool, str]], healthy: int, unhealthy: int, start: bool | None
) -> None:
    """Discovery skips the bookkeeping of a result that `settled` says changes nothing: the statuses, their
    `since`, the details and the transitions stay exactly those of applying every result."""
    thresholds = Thresholds(healthy=healthy, unhealthy=unhealthy)
    full = skipping = seeded(ready=start, now=0.0)
    for index, (ok, detail) in enumerate(results):
        now = float(index + 1)
        full, changed = observe(full, ok=ok, detail=detail, now=now, thresholds=thresholds)
        if settled(skipping, ok=ok, detail=detail):
            assert not changed
            continue
        skipping, changed_too = observe(skipping, ok=ok, detail=detail, now=now, thresholds=thresholds)
        assert changed_too == changed
        assert (skipping.status, skipping.since, skipping.detail) == (full.status, full.since, full.detail)
    assert (skipping.status, skipping.since, skipping.detail) == (full.status, full.since, full.detail)
