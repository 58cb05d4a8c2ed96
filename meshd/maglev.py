"""Maglev consistent-hashing lookup tables (after Eisenbud et al., NSDI'16).

A Maglev table is an array of ``m`` slots (``m`` prime), each naming a backend.
The data plane sends a flow to the backend in slot ``hash(flow) % m``: all of a
flow's packets reach the same backend, and when the backend set changes only a
small share of the slots (and so of the flows) moves.

Permutations, as in the paper: backend ``i`` prefers the slots in the order
``perm_i(j) = (offset_i + j * skip_i) mod m``, ``j = 0 .. m-1``, with
``offset_i = h1(name) % m`` and ``skip_i = h2(name) % (m - 1) + 1``. h1 and h2
are BLAKE2b of the backend's stable name with two different ``person`` keys, so
every process, host and Python version builds the same table.

Fill rule and weighting (a variant of the paper's; same cost, about half the
disruption, see below):

* Quota: backend ``i`` gets exactly ``q_i = m * w_i / W`` slots (``W`` the sum
  of the weights), rounded by largest remainder, ties to the lower name.
* The backends walk their permutations on a common clock: backend ``i`` looks at
  position ``j`` at time ``(1/m + 1/(m-1) + ... + 1/(m-j)) / w_i``. A backend
  walks ``w_i`` times as fast as a weight-1 one, and slows down as it gets far
  along its permutation (where more of the slots it has not looked at yet are
  free), so that claims keep pace with weight. Looks happen in order of
  (time, name); a look claims its slot if the slot is free and the backend holds
  fewer than ``q_i`` slots. The table is full when every backend has its quota.

In the paper's rule every backend instead takes one turn per claim, claiming its
next free slot wherever that is. Late in the fill those claims land far down
the permutations, and a changed claim shifts all of that backend's later claims.
Removing one of 100 backends from a 16381-slot table moves about 1.35% of the
other slots that way and about 0.65% with this rule (tests/unit/test_maglev.py).

Speed: the looks are played in numpy batches of about ``_BATCH * m``. In a batch
the first look at each free slot claims it; a backend's looks after it reached
its quota are dropped (so a later look may claim that slot) until nothing
changes. The result is exactly that of playing the looks one by one; m=65537 with 1000 backends builds in tens
of milliseconds (bench/maglev_build.py).

Kernel memory: one 2-byte index per slot (into the half's member list), twice (two
halves, see docs/datapath.md), per service port and family:

    m        table size (two halves, with the members of as many backends as m balances)
    251        1.2 KiB
    1021       4.3 KiB
    4093        17 KiB
    16381       67 KiB
    65521      266 KiB

Rule of thumb: ``m >= 100 * (sum of weights)``, which table_size_for() picks per group. Then every backend holds about 100
slots or more, its share is exact to one slot (about 1% of its share), and a
backend change moves about 1% or less of the other slots (measured 0.6% for
100 backends in 16381 slots; but 1.4% for 10 backends in 1021 slots, and more
for unlucky names, e.g. two backends with skips 380 and 760).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np

__all__ = ["LADDER", "build_table", "build_tables", "changed_slots", "imbalance", "is_prime",
           "next_prime", "table_size_for", "table_size_kept"]

# Table sizes a group may get when maglev.table_size is auto: primes just under powers of
# two, so a table's chunks (16 slots, bpf/include/meshd_structs.h) waste little.
LADDER = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521)
# Slots per unit of weight: with m >= 100 * W every backend's share is exact to one slot in
# 100 (the fill gives backend i exactly round(m * w_i / W) slots): imbalance <= 1%.
SLOTS_PER_WEIGHT = 100


def table_size_for(weight: int, fixed: int | None = None, ceiling: int = LADDER[-1]) -> int:
    """The table size of a group whose backends' weights add up to `weight`: `fixed` when
    given (maglev.table_size set to a prime), else the smallest rung of LADDER that is at
    least SLOTS_PER_WEIGHT * weight, at most `ceiling` (the largest rung <= ceiling; a
    ceiling below every rung is itself the size)."""
    if fixed:
        return fixed
    fits = [m for m in LADDER if m <= ceiling] or [ceiling]
    return next((m for m in fits if m >= SLOTS_PER_WEIGHT * weight), fits[-1])

# Looks per batch, as a multiple of m, but at least _MIN_LOOKS. Any value gives the same
# table; these keep the batch count low without large temporary arrays (small tables are
# dominated by per-batch numpy overhead: 10 backends at m=1021 build in 0.7 ms, not 1.3).
_BATCH = 0.25
_MIN_LOOKS = 1024


def imbalance(weights: Sequence[int], m: int) -> float:
    """How far the most favoured backend's slot share exceeds its weight's share in a table
    of size `m` (the fill gives exact quotas): max(q_i / (m * w_i / W)) - 1."""
    total = sum(weights)
    return max(q * total / (m * w) for q, w in zip(_quotas(list(weights), m), weights)) - 1


def table_size_kept(weights: Sequence[int], have: int, fixed: int | None = None,
                    ceiling: int = LADDER[-1]) -> int:
    """The size of a group that has a table of size `have` (0: none) after a change: the
    size table_size_for() picks, except that a table on the ladder is kept while its
    imbalance stays <= 1% and it is not two rungs too big. So a group at a rung's edge does
    not change size (a map-in-map swap: an RCU wait) on every endpoint added or removed."""
    want = table_size_for(sum(weights), fixed, ceiling)
    if fixed or not have or have == want or have not in LADDER or have > ceiling:
        return want
    if have > want:
        return have if LADDER.index(want) > LADDER.index(have) - 2 else want
    return have if have >= len(weights) and imbalance(weights, have) <= 0.01 else want


def is_prime(n: int) -> bool:
    """True if ``n`` is a prime number (trial division; fine for table sizes)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def next_prime(n: int) -> int:
    """The smallest prime ``>= n``."""
    p = max(n, 2)
    while not is_prime(p):
        p += 1
    return p


def _hash(name: str, person: bytes) -> int:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big")


def _checked(backends: Sequence[tuple[str, int]], m: int) -> list[tuple[str, int]]:
    """The backends sorted by name, after validating them and ``m``."""
    if not backends:
        raise ValueError("maglev: no backends (callers must handle an empty backend set)")
    ordered = sorted(backends, key=lambda b: b[0])
    for i, (name, weight) in enumerate(ordered):
        if i and ordered[i - 1][0] == name:
            raise ValueError(f"maglev: duplicate backend name {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, Integral) or weight < 1:
            raise ValueError(f"maglev: backend {name!r} has weight {weight!r}; need an int >= 1")
    if isinstance(m, bool) or not isinstance(m, Integral) or m < 3 or not is_prime(int(m)):
        raise ValueError(f"maglev: table size {m!r} is not a prime >= 3 (e.g. 1021, 4093, 16381, 65521)")
    if m < len(ordered):
        raise ValueError(f"maglev: table size {m} is smaller than the number of backends ({len(ordered)})")
    return [(name, int(weight)) for name, weight in ordered]


def _quotas(weights: list[int], m: int) -> np.ndarray:
    """Slots per backend: m * w / W, rounded by largest remainder (ties to lower index)."""
    total = sum(weights)
    quota = [m * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(m * weights[i] % total), i))
    for i in by_remainder[: m - sum(quota)]:
        quota[i] += 1
    return np.array(quota, dtype=np.int64)


def _first_per_slot(slot: np.ndarray, n_slots: int) -> np.ndarray:
    """Indexes of the first occurrence of each value of ``slot`` (any order). Most slots
    occur once: only the others pay for a sort."""
    counts = np.bincount(slot, minlength=n_slots)[slot]
    alone = np.flatnonzero(counts == 1)
    shared = np.flatnonzero(counts > 1)
    if not shared.size:
        return alone
    return np.concatenate((alone, shared[np.unique(slot[shared], return_index=True)[1]]))


def _claims(who: np.ndarray, slot: np.ndarray, room: np.ndarray, by_backend: np.ndarray,
            n_slots: int) -> np.ndarray:
    """Which of a batch's looks (in play order; all at then-free slots) claim.

    ``by_backend`` lists the looks grouped by backend, each backend's in play order.
    A look claims iff it is the first look at its slot among the looks still in
    play; a backend's looks after it has made ``room`` claims drop out of play.
    Dropping looks only adds claims, so iterating to a fixed point gives exactly
    the result of playing the looks one by one.
    """
    grouped = who[by_backend]
    looks = np.bincount(grouped, minlength=room.size)
    group_start = (np.cumsum(looks) - looks)[grouped]
    in_play = np.ones(who.size, dtype=bool)
    while True:
        live = np.flatnonzero(in_play)
        wins = np.zeros(who.size, dtype=bool)
        wins[live[_first_per_slot(slot[live], n_slots)]] = True
        won = wins[by_backend].astype(np.int64)
        before = np.cumsum(won) - won
        before -= before[group_start]  # claims among the backend's earlier looks
        keep = np.empty(who.size, dtype=bool)
        keep[by_backend] = before < room[grouped]
        if not (in_play & ~keep).any():
            return wins
        in_play &= keep


# A compiled fill with the same result (meshd/dataplane/native.py installs it): called with
# (m, backends per table, offset, skip, weight, quota, clock) -> count * m uint32 indexes.
_fill = None


def use_fill(fill) -> None:
    """Builds tables with `fill` from now on (None: numpy again)."""
    global _fill
    _fill = fill


def compiled_fill():
    return _fill


@functools.lru_cache(maxsize=8)
def _clock(m: int) -> np.ndarray:
    clock = np.cumsum(1.0 / np.arange(m, 0, -1, dtype=np.float64))
    clock.flags.writeable = False
    return clock


def build_table(backends: Sequence[tuple[str, int]], m: int) -> np.ndarray:
    """Build a weighted Maglev table of prime size ``m``.

    ``backends`` are ``(stable_name, weight)`` pairs: names unique, weights ints
    ``>= 1``; their order does not matter.

    Returns a ``uint32`` array of length ``m`` whose values are INDEXES INTO THE
    NAME-SORTED BACKEND LIST, i.e. into ``sorted(backends)`` by name, not into
    ``backends`` as given. Backend ``i`` holds exactly its quota of slots
    (``m * w_i / W`` rounded; see the module docstring).

    Raises ValueError on no backends, a duplicate name, a weight < 1, ``m`` not a
    prime >= 3, or ``m`` smaller than the number of backends.
    """
    return build_tables([backends], m)[0]


def build_tables(groups: Sequence[Sequence[tuple[str, int]]], m: int) -> list[np.ndarray]:
    """The tables ``build_table`` gives for each group, computed in one vectorised pass.

    Tables are independent and the result does not depend on how the time axis is cut into
    batches, so many tables run through the same batches as one problem whose slots are
    (table, slot) pairs. At 10,000 services the per-call numpy overhead of separate builds
    dominates a cold sync; this removes it. Same validation and errors as build_table.
    """
    if not groups:
        return []
    ordered = [_checked(g, m) for g in groups]
    m = int(m)
    sizes = np.array([len(o) for o in ordered], dtype=np.int64)
    t_count = len(ordered)
    n = int(sizes.sum())
    base = np.cumsum(sizes) - sizes  # first global backend index of each table
    table_of = np.repeat(np.arange(t_count), sizes)
    names = [name for o in ordered for name, _ in o]
    offset = np.array([_hash(x, b"maglev-offset") % m for x in names], dtype=np.int64)
    skip = np.array([_hash(x, b"maglev-skip") % (m - 1) + 1 for x in names], dtype=np.int64)
    weight = np.array([w for o in ordered for _, w in o], dtype=np.float64)
    quota = np.concatenate([_quotas([w for _, w in o], m) for o in ordered])
    clock = _clock(m)
    if _fill is not None:  # the same looks, played one by one in C
        table = _fill(m, sizes, offset, skip, weight, quota, clock)
        # views into one array: one allocation per build, not one per table (the tables of
        # a build are written and dropped together)
        return [table[i * m:(i + 1) * m] for i in range(t_count)]

    table = np.zeros(t_count * m, dtype=np.uint32)
    claimed = np.zeros(t_count * m, dtype=bool)
    held = np.zeros(n, dtype=np.int64)
    pointer = np.zeros(n, dtype=np.int64)
    horizon = 0.0
    free = t_count * m
    step = max(_BATCH * m, _MIN_LOOKS) * t_count  # looks per batch, over all tables
    while free:
        active = np.flatnonzero(held < quota)
        w, p = weight[active], pointer[active]
        looks_per_time = float((w * (m - p)).sum())
        horizon = max(horizon + step / looks_per_time, float((clock[p] / w).min()))
        count = np.maximum(np.minimum(np.searchsorted(clock, horizon * w, side="right") + 2, m) - p, 0)
        row = np.repeat(np.arange(active.size), count)
        pos = p[row] + np.arange(row.size) - np.repeat(np.cumsum(count) - count, count)
        look_time = clock[pos] / w[row]
        in_batch = look_time <= horizon
        pointer[active] += np.bincount(row, weights=in_batch, minlength=active.size).astype(np.int64)
        who = active[row]
        slot = table_of[who] * m + (offset[who] + pos * skip[who]) % m
        keep = np.flatnonzero(in_batch & ~claimed[slot])
        # Looks are generated grouped by backend (global order = name order within a
        # table), each backend's in time order: a stable sort by time is the play order
        # (time, then name), and its inverse lists them grouped by backend again.
        by_time = np.argsort(look_time[keep], kind="stable")
        by_backend = np.empty_like(by_time)
        by_backend[by_time] = np.arange(by_time.size)
        order = keep[by_time]
        who, slot = who[order], slot[order]
        wins = _claims(who, slot, quota - held, by_backend, t_count * m)
        table[slot[wins]] = who[wins] - base[table_of[who[wins]]]
        claimed[slot[wins]] = True
        held += np.bincount(who[wins], minlength=n)
        free -= int(wins.sum())
    return [table[i * m:(i + 1) * m].copy() for i in range(t_count)]


def changed_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Indexes of the slots where two tables of equal length differ."""
    if old.shape != new.shape:
        raise ValueError(f"maglev: tables differ in shape {old.shape} vs {new.shape}")
    return np.flatnonzero(old != new)
