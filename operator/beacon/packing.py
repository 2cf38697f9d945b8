"""Stable packing of endpoints into EndpointSlices: which endpoint goes in which slice, given where they are now.

Why it exists: packing the sorted endpoints into consecutive chunks of 100 moves every later endpoint along when
one is added or removed, so one change rewrites every slice after it (100 writes for one new endpoint of a
10,000-endpoint entry, and a watch event for every consumer of each). Kubernetes' own EndpointSlice reconciler
avoids that, and so does this module, in the same spirit: an endpoint stays in the slice it is in; a new one goes
first into a slice that is being written anyway, then into the fullest slice with room for it, and only then into
a new slice; slices are repacked only when the group runs too empty (more than twice the slices it needs). One
added, removed or changed endpoint therefore costs one slice write.

Pure and generic: members are opaque keys (beacon uses addresses), slices are names. `beacon.reconcile` builds
the slice objects around the plan.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# a group is repacked when it holds more than this many times the slices its endpoints need
REPACK_FACTOR = 2


@dataclass(frozen=True)
class Plan(Generic[K]):
    """Where every desired member goes. `slices` maps slice name -> members (each at most `capacity`, in desired
    order); `touched` names the slices whose membership or member content differs from what was observed
    (created or changed); `removed` names observed slices of the group that are no longer used."""

    slices: dict[str, tuple[K, ...]]
    touched: frozenset[str]
    removed: frozenset[str]
    repacked: bool


def slice_index(stem: str, name: str) -> int | None:
    """The index of `name` in the group `stem` (names are `<stem>-<index>`), or None when it is not the group's."""
    match = re.fullmatch(re.escape(stem) + r"-(\d{1,9})", name)
    return int(match.group(1)) if match else None


def plan(
    *,
    stem: str,
    desired: Sequence[K],
    observed: Mapping[str, Sequence[K]],
    changed: Collection[K] = (),
    capacity: int = 100,
) -> Plan[K]:
    """Place `desired` (unique keys, in the order slices should list them) into slices of the group `stem`.

    `observed` is the group's current membership (slice name -> members; names of other groups are ignored);
    `changed` lists members whose published content differs from what their slice holds now (their slice is
    written anyway, so new members are put there first).
    """
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    order = {key: i for i, key in enumerate(desired)}
    changed_set = set(changed)
    indexed = sorted((idx, name) for name in observed if (idx := slice_index(stem, name)) is not None)
    bins: dict[str, list[K]] = {}
    dirty: set[str] = set()
    placed: set[K] = set()

    # 1. every member stays where it is (a member observed twice stays in the first slice only)
    for _, name in indexed:
        before = observed[name]
        kept: list[K] = []
        for key in before:
            if key in order and key not in placed and len(kept) < capacity:
                kept.append(key)
                placed.add(key)
        bins[name] = kept
        if len(kept) != len(before) or any(key in changed_set for key in kept):
            dirty.add(name)
    remaining = [key for key in desired if key not in placed]

    # 2. new members fill the slices written anyway, fullest first (an emptied slice is reused, not recreated)
    for name in sorted(dirty, key=lambda n: (-len(bins[n]), _index(stem, n))):
        room = capacity - len(bins[name])
        if room > 0 and remaining:
            bins[name].extend(remaining[:room])
            remaining = remaining[room:]

    # 3. what is left goes into the fullest untouched slice that takes all of it, else into new slices
    next_index = 0
    used = {_index(stem, n) for n in bins}
    while remaining:
        target = None
        if len(remaining) < capacity:
            fits = [n for n in bins if n not in dirty and capacity - len(bins[n]) >= len(remaining)]
            if fits:
                target = max(fits, key=lambda n: (len(bins[n]), -_index(stem, n)))
        if target is None:
            while next_index in used:
                next_index += 1
            used.add(next_index)
            target = f"{stem}-{next_index}"
            bins[target] = []
        dirty.add(target)
        room = capacity - len(bins[target])
        bins[target].extend(remaining[:room])
        remaining = remaining[room:]

    # 4. repack only a group that has run too empty: keep the fullest slices, move the rest into their room
    occupied = [n for n in bins if bins[n]]
    needed = -(-len(desired) // capacity)
    repacked = len(occupied) > REPACK_FACTOR * needed
    if repacked:
        ranked = sorted(occupied, key=lambda n: (-len(bins[n]), _index(stem, n)))
        keep, dissolve = ranked[:needed], ranked[needed:]
        movers = [key for n in dissolve for key in bins[n]]
        for n in dissolve:
            bins[n] = []
        for n in keep:
            room = capacity - len(bins[n])
            if room > 0 and movers:
                bins[n].extend(movers[:room])
                movers = movers[room:]
                dirty.add(n)

    slices = {n: tuple(sorted(bins[n], key=order.__getitem__)) for n in sorted(bins, key=lambda n: _index(stem, n))}
    slices = {n: members for n, members in slices.items() if members}
    touched = frozenset(n for n in slices if n in dirty or tuple(observed.get(n, ())) != slices[n])
    removed = frozenset(n for _, n in indexed if n not in slices)
    return Plan(slices=slices, touched=touched, removed=removed, repacked=repacked)


def _index(stem: str, name: str) -> int:
    idx = slice_index(stem, name)
    return idx if idx is not None else -1
