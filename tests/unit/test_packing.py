"""Stable slice membership: no endpoint lost or duplicated, no slice over capacity, and one change touches one slice."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beacon.packing import REPACK_FACTOR, Plan, plan, slice_index

STEM = "svc-ipv4"


def check_valid(
    result: Plan[int], desired: Sequence[int], observed: Mapping[str, Sequence[int]], capacity: int
) -> None:
    members = [key for keys in result.slices.values() for key in keys]
    assert sorted(members) == sorted(desired), "every desired endpoint is in exactly one slice"
    assert all(0 < len(keys) <= capacity for keys in result.slices.values())
    assert all(slice_index(STEM, name) is not None for name in result.slices)
    order = {key: i for i, key in enumerate(desired)}
    assert all(list(keys) == sorted(keys, key=order.__getitem__) for keys in result.slices.values())
    ours = {name for name in observed if slice_index(STEM, name) is not None}
    assert result.removed == ours - set(result.slices)
    assert len(result.slices) <= REPACK_FACTOR * math.ceil(len(desired) / capacity)


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[int], dict[str, list[int]], int]:
    """Desired keys and an arbitrary observed membership: stale keys, duplicates, odd names, over-full slices."""
    capacity = draw(st.integers(min_value=1, max_value=8))
    desired = draw(st.lists(st.integers(min_value=0, max_value=200), unique=True, max_size=60))
    pool = desired + draw(st.lists(st.integers(min_value=201, max_value=260), unique=True, max_size=10))
    observed: dict[str, list[int]] = {}
    for index in draw(st.lists(st.integers(min_value=0, max_value=40), unique=True, max_size=12)):
        observed[f"{STEM}-{index}"] = draw(st.lists(st.sampled_from(pool), max_size=capacity + 2)) if pool else []
    if draw(st.booleans()):
        observed["other-ipv6-0"] = desired[:3]  # another group's slice: ignored
    return desired, observed, capacity


@settings(max_examples=300)
@given(worlds())
def test_any_observed_state_gives_a_valid_plan(world: tuple[list[int], dict[str, list[int]], int]) -> None:
    desired, observed, capacity = world
    check_valid(plan(stem=STEM, desired=desired, observed=observed, capacity=capacity), desired, observed, capacity)


def settled(world: tuple[list[int], dict[str, list[int]], int]) -> tuple[list[int], dict[str, tuple[int, ...]], int]:
    desired, observed, capacity = world
    return desired, plan(stem=STEM, desired=desired, observed=observed, capacity=capacity).slices, capacity


@settings(max_examples=300)
@given(worlds())
def test_a_settled_state_is_left_alone(world: tuple[list[int], dict[str, list[int]], int]) -> None:
    desired, current, capacity = settled(world)
    again = plan(stem=STEM, desired=desired, observed=current, capacity=capacity)
    assert again.slices == current
    assert again.touched == frozenset()
    assert again.removed == frozenset()


def changed_slices(before: Mapping[str, Sequence[int]], after: Plan[int]) -> set[str]:
    names = set(before) | set(after.slices)
    return {n for n in names if tuple(before.get(n, ())) != tuple(after.slices.get(n, ()))} | set(after.touched)


@settings(max_examples=300)
@given(worlds(), st.data())
def test_adding_one_endpoint_touches_one_slice(
    world: tuple[list[int], dict[str, list[int]], int], data: st.DataObject
) -> None:
    desired, current, capacity = settled(world)
    new = 1000
    position = data.draw(st.integers(min_value=0, max_value=len(desired)))
    grown = [*desired[:position], new, *desired[position:]]
    after = plan(stem=STEM, desired=grown, observed=current, capacity=capacity)
    check_valid(after, grown, current, capacity)
    assert not after.repacked
    assert len(changed_slices(current, after)) == 1
    assert after.removed == frozenset()
    (name,) = after.touched
    assert new in after.slices[name]
    if any(len(keys) < capacity for keys in current.values()):
        assert name in current, "a slice with room takes the new endpoint before a new slice is made"


@settings(max_examples=300)
@given(worlds(), st.data())
def test_removing_one_endpoint_touches_one_slice_unless_too_empty(
    world: tuple[list[int], dict[str, list[int]], int], data: st.DataObject
) -> None:
    desired, current, capacity = settled(world)
    if not desired:
        return
    gone = data.draw(st.sampled_from(desired))
    shrunk = [key for key in desired if key != gone]
    after = plan(stem=STEM, desired=shrunk, observed=current, capacity=capacity)
    check_valid(after, shrunk, current, capacity)
    holder = next(n for n, keys in current.items() if gone in keys)
    occupied = len(current) - (1 if current[holder] == (gone,) else 0)
    needed = math.ceil(len(shrunk) / capacity)
    assert after.repacked == (occupied > REPACK_FACTOR * needed), "repacked only when too empty"
    if after.repacked:
        assert len(after.slices) == needed
    else:
        assert changed_slices(current, after) == {holder}


@settings(max_examples=300)
@given(worlds(), st.data())
def test_flipping_one_endpoint_touches_only_its_slice(
    world: tuple[list[int], dict[str, list[int]], int], data: st.DataObject
) -> None:
    desired, current, capacity = settled(world)
    if not desired:
        return
    flipped = data.draw(st.sampled_from(desired))
    after = plan(stem=STEM, desired=desired, observed=current, changed={flipped}, capacity=capacity)
    assert after.slices == current
    assert after.touched == {next(n for n, keys in current.items() if flipped in keys)}


def test_new_endpoints_go_into_a_slice_written_anyway_first() -> None:
    current = {f"{STEM}-0": (1, 2, 3), f"{STEM}-1": (4, 5), f"{STEM}-2": (6,)}
    after = plan(stem=STEM, desired=[1, 2, 3, 4, 5, 6, 7], observed=current, changed={6}, capacity=4)
    assert after.slices == {f"{STEM}-0": (1, 2, 3), f"{STEM}-1": (4, 5), f"{STEM}-2": (6, 7)}
    assert after.touched == {f"{STEM}-2"}


def test_an_emptied_slice_is_reused_not_deleted_and_recreated() -> None:
    current = {f"{STEM}-0": (1, 2), f"{STEM}-1": (3,)}
    after = plan(stem=STEM, desired=[1, 2, 4], observed=current, capacity=2)
    assert after.slices == {f"{STEM}-0": (1, 2), f"{STEM}-1": (4,)}
    assert after.removed == frozenset()


def test_new_slices_take_the_lowest_free_index() -> None:
    current = {f"{STEM}-0": (1, 2), f"{STEM}-2": (3, 4)}
    after = plan(stem=STEM, desired=[1, 2, 3, 4, 5], observed=current, capacity=2)
    assert after.slices[f"{STEM}-1"] == (5,)


def test_a_fresh_group_is_packed_in_order() -> None:
    after = plan(stem=STEM, desired=list(range(250)), observed={}, capacity=100)
    assert {n: len(k) for n, k in after.slices.items()} == {f"{STEM}-0": 100, f"{STEM}-1": 100, f"{STEM}-2": 50}
    assert after.slices[f"{STEM}-0"] == tuple(range(100))


def test_a_too_empty_group_is_repacked_into_its_fullest_slices() -> None:
    # 6 or 7 endpoints need 2 slices of 4: 4 slices are not too many, 6 are
    four = {f"{STEM}-{i}": (i,) if i else (0, 10, 20) for i in range(4)}
    assert not plan(stem=STEM, desired=[0, 1, 2, 3, 10, 20], observed=four, capacity=4).repacked
    seven = {f"{STEM}-{i}": (i,) if i else (0, 10) for i in range(6)}
    after = plan(stem=STEM, desired=[0, 1, 2, 3, 4, 5, 10], observed=seven, capacity=4)
    assert after.repacked
    assert after.slices == {f"{STEM}-0": (0, 2, 3, 10), f"{STEM}-1": (1, 4, 5)}
    assert after.removed == {f"{STEM}-2", f"{STEM}-3", f"{STEM}-4", f"{STEM}-5"}


def test_names_of_other_groups_are_not_ours() -> None:
    assert slice_index("svc-ipv4", "svc-ipv4-7") == 7
    assert slice_index("svc-ipv4", "svc-ipv4-a1b2c3-7") is None
    assert slice_index("svc-ipv4", "svc-ipv4-123456-0") is None
    assert slice_index("svc-ipv4", "svc-ipv6-0") is None
    with pytest.raises(ValueError, match="capacity"):
        plan(stem=STEM, desired=[1], observed={}, capacity=0)
