"""Who serves what when several replicas share the work: rendezvous hashing over the live members, and the view of
membership that each replica builds from the members' Leases. Pure: no I/O, no clock (times are passed in).

Why it exists: a sharded beacon (several active replicas, each serving a part of the namespaces) must agree on
one owner per unit without talking to each other. Rendezvous (highest-random-weight) hashing gives every replica
the same answer from the same member list, and a member that joins or leaves moves only the units it wins or
held: about 1/N of them, never a reshuffle. The unit is the namespace: a namespace's registry then has one writer
by construction, and ConfigEntries, which layer over the other entries of their namespace, stay together.

A member is live while its Lease is: the Lease's holder renews it every few seconds, and the others judge its
expiry by their own clocks, from the moment they last saw it change (as client-go's leader election does), so
clocks that disagree between machines do not matter, only their rates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def weight(member: str, unit: str) -> int:
    """The member's random-looking, reproducible weight for a unit (64 bits of BLAKE2b over both names)."""
    digest = hashlib.blake2b(f"{member}\x00{unit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(unit: str, members: Iterable[str]) -> str | None:
    """The member that serves `unit`: the highest weight wins (ties, never seen in practice, by name). None
    when there is no member."""
    best: tuple[int, str] | None = None
    for member in members:
        candidate = (weight(member, unit), member)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]


@dataclass(frozen=True)
class Seen:
    """A member's Lease as one replica last saw it: its renew stamp (any string that changes with each renewal,
    e.g. renewTime), its duration, and when, on this replica's own monotonic clock, the stamp last changed."""

    stamp: str
    duration: float
    changed_at: float


def observe(previous: Seen | None, *, stamp: str, duration: float, now: float) -> Seen:
    """The record after seeing a member's Lease with `stamp` at `now`: the clock restarts only when it changed."""
    if previous is not None and previous.stamp == stamp and previous.duration == duration:
        return previous
    return Seen(stamp=stamp, duration=duration, changed_at=now)


def live(seen: Mapping[str, Seen], *, now: float) -> frozenset[str]:
    """The members whose Lease changed less than its duration ago, by this replica's clock."""
    return frozenset(member for member, s in seen.items() if now - s.changed_at < s.duration)


def moved(
    units: Iterable[str], before: Iterable[str], after: Iterable[str]
) -> dict[str, tuple[str | None, str | None]]:
    """The units whose owner differs between two member sets: unit -> (old owner, new owner)."""
    old, new = frozenset(before), frozenset(after)
    changes: dict[str, tuple[str | None, str | None]] = {}
    for unit in units:
        a, b = owner(unit, old), owner(unit, new)
        if a != b:
            changes[unit] = (a, b)
    return changes
