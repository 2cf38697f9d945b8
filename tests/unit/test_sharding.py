"""Rendezvous hashing and the Lease-based membership view: one owner per unit, every replica agrees, a join or a
leave moves about 1/N of the units, and expiry is judged by the observer's own clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from beacon.sharding import Seen, live, moved, observe, owner

UNITS = [f"team-{i}" for i in range(3000)]


def test_every_replica_computes_the_same_owner_whatever_the_order_of_members() -> None:
    members = ["beacon-0", "beacon-1", "beacon-2"]
    for unit in UNITS[:200]:
        assert owner(unit, members) == owner(unit, reversed(members)) == owner(unit, set(members))
    assert owner("shop", []) is None


def test_units_spread_evenly_over_three_members() -> None:
    counts = dict.fromkeys(("beacon-0", "beacon-1", "beacon-2"), 0)
    for unit in UNITS:
        counts[owner(unit, counts)] += 1  # type: ignore[index]
    assert min(counts.values()) / max(counts.values()) > 0.85


def test_a_fourth_member_takes_about_a_quarter_and_nothing_moves_between_the_others() -> None:
    three = ["beacon-0", "beacon-1", "beacon-2"]
    changes = moved(UNITS, three, [*three, "beacon-3"])
    assert all(new == "beacon-3" for _, new in changes.values()), "only to the newcomer"
    assert 0.20 < len(changes) / len(UNITS) < 0.30


def test_a_leaving_member_hands_out_only_its_own_units() -> None:
    three = ["beacon-0", "beacon-1", "beacon-2"]
    changes = moved(UNITS, three, ["beacon-0", "beacon-2"])
    assert all(old == "beacon-1" for old, _ in changes.values())
    assert len(changes) == sum(owner(u, three) == "beacon-1" for u in UNITS)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=8), st.text(min_size=1, max_size=12))
def test_a_join_moves_units_only_to_the_joiner(members: set[str], joiner: str) -> None:
    changes = moved(UNITS[:300], members, members | {joiner})
    assert all(new == joiner for _, new in changes.values())


def test_expiry_is_judged_from_when_this_replica_saw_the_lease_change() -> None:
    seen = observe(None, stamp="t1", duration=10.0, now=100.0)
    assert observe(seen, stamp="t1", duration=10.0, now=105.0) is seen, "no change: the clock keeps running"
    assert live({"a": seen}, now=109.9) == {"a"}
    assert live({"a": seen}, now=110.0) == frozenset()
    renewed = observe(seen, stamp="t2", duration=10.0, now=108.0)
    assert live({"a": renewed}, now=115.0) == {"a"}
    assert live({"a": renewed, "b": Seen(stamp="x", duration=2.0, changed_at=100.0)}, now=115.0) == {"a"}
