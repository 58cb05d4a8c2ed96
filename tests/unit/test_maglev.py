"""Pure tests of meshd.maglev: exactness against a one-look-at-a-time reference,
order independence, balance, disruption, validation. No root needed."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.maglev import build_table, build_tables, changed_slots, is_prime, next_prime

FAST = settings(max_examples=40, deadline=None, derandomize=True)


def _h(name: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=person).digest(), "big")


def reference(backends: list[tuple[str, int]], m: int) -> np.ndarray:
    """The fill rule of the module docstring, one look at a time (slow, obvious)."""
    ordered = sorted(backends)
    weights = [w for _, w in ordered]
    total = sum(weights)
    quota = [m * w // total for w in weights]
    for i in sorted(range(len(ordered)), key=lambda i: (-(m * weights[i] % total), i))[: m - sum(quota)]:
        quota[i] += 1
    offset = [_h(name, b"maglev-offset") % m for name, _ in ordered]
    skip = [_h(name, b"maglev-skip") % (m - 1) + 1 for name, _ in ordered]
    clock = np.cumsum(1.0 / np.arange(m, 0, -1, dtype=np.float64))
    looks = sorted((clock[j] / w, i, j) for i, w in enumerate(weights) for j in range(m))
    table, held = [-1] * m, [0] * len(ordered)
    for _, i, j in looks:
        slot = (offset[i] + j * skip[i]) % m
        if table[slot] < 0 and held[i] < quota[i]:
            table[slot] = i
            held[i] += 1
    assert min(table) >= 0
    return np.array(table)


def random_backends(rng: random.Random, n: int, weighted: bool) -> list[tuple[str, int]]:
    names: set[str] = set()
    while len(names) < n:
        names.add(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}:{rng.randrange(1, 65536)}/TCP")
    return [(name, rng.randint(1, 5) if weighted else 1) for name in sorted(names)]


def owners(backends: list[tuple[str, int]], m: int) -> np.ndarray:
    """The table as backend NAMES (indexes shift when the sorted list changes)."""
    return np.array(sorted(name for name, _ in backends))[build_table(backends, m)]


names_st = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12, unique=True)


@FAST
@given(names=names_st, data=st.data())
def test_matches_one_look_at_a_time_reference(names: list[str], data: st.DataObject) -> None:
    m = data.draw(st.sampled_from([p for p in (3, 5, 7, 11, 13, 53, 101, 211) if p >= len(names)]))
    backends = [(name, data.draw(st.integers(1, 6))) for name in names]
    np.testing.assert_array_equal(build_table(backends, m), reference(backends, m))


@FAST
@given(names=names_st, data=st.data())
def test_input_order_does_not_matter(names: list[str], data: st.DataObject) -> None:
    backends = [(name, data.draw(st.integers(1, 5))) for name in names]
    shuffled = data.draw(st.permutations(backends))
    table = build_table(backends, 1021)
    assert table.dtype == np.uint32 and table.shape == (1021,)
    np.testing.assert_array_equal(table, build_table(shuffled, 1021))
    assert table.max() < len(backends)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("n", "m"), [(3, 1021), (10, 1021), (10, 16381), (100, 16381), (1000, 65537)])
def test_every_backend_gets_its_weighted_share(n: int, m: int, weighted: bool) -> None:
    backends = random_backends(random.Random(n * m), n, weighted)
    weights = np.array([w for _, w in backends])
    counts = np.bincount(build_table(backends, m), minlength=n)
    ideal = m * weights / weights.sum()
    assert counts.min() > 0 and counts.sum() == m
    assert np.abs(counts - ideal).max() < 1  # exact quotas: stronger than the 1%-of-m goal
    assert np.abs(counts - ideal).max() <= 0.01 * m


def test_single_backend_and_one_slot_each() -> None:
    assert (build_table([("a", 3)], 7) == 0).all()
    assert sorted(build_table([("a", 1), ("b", 1), ("c", 1)], 3)) == [0, 1, 2]


# Disruption: % of m that changes owner among the slots the removed (or added)
# backend does not hold. Measured with random_backends(), one random backend
# removed, equal / mixed 1..5 weights (200 name sets for m=1021, 60 for 16381):
#                   this module: mean        max    paper's rule: mean      max
#   N=3,   m=1021:          0.35 / 0.31  6.5 / 4.2               0.60 / 0.53  6.9 / 4.8
#   N=10,  m=1021:          1.47 / 1.32  9.5 / 4.8               2.49 / 2.34  3.7 / 3.4
#   N=100, m=1021:          2.31 / 2.49  3.7 / 6.0               3.67 / 3.46  4.9 / 5.9
#   N=3,   m=16381:         0.02 / 0.04  0.14 / 0.71             0.07 / 0.07  0.35 / 0.66
#   N=10,  m=16381:         0.33 / 0.28  0.94 / 0.65             0.52 / 0.45  1.25 / 1.26
#   N=100, m=16381:         0.63 / 0.62  0.82 / 0.84             1.34 / 1.40  1.59 / 1.73
# So ~1% holds for m >= 100 N with a 16381 table; 1021 is too small for 10+
# backends. The rare large values (both rules) come from pairs of backends whose
# skips have a small ratio mod m (e.g. 380 and 760), which makes their
# permutations nearly parallel. The bounds below are for the 20 fixed name sets
# the test uses (their measured mean / max: 0.58/6.46, 0.48/4.21; 1.48/2.45,
# 1.31/2.06; 2.43/3.23, 2.77/5.58; 0.02/0.11, 0.07/0.71; 0.37/0.55, 0.29/0.65;
# 0.63/0.82, 0.62/0.84).
DISRUPTION_BOUNDS = {  # (n, m): (mean %, max %) over 20 name sets
    (3, 1021): (0.8, 7.0),
    (10, 1021): (1.8, 3.0),
    (100, 1021): (3.0, 6.0),
    (3, 16381): (0.1, 1.0),
    (10, 16381): (0.5, 1.0),
    (100, 16381): (0.8, 1.0),
}


def moved_pct(old: np.ndarray, new: np.ndarray, changed_backend: str) -> float:
    """% of the table whose owner changed, among slots ``changed_backend`` holds in neither."""
    others = (old != changed_backend) & (new != changed_backend)
    return 100 * np.count_nonzero(old[others] != new[others]) / old.size


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("n", "m"), list(DISRUPTION_BOUNDS))
def test_backend_change_moves_few_other_slots(n: int, m: int, weighted: bool) -> None:
    removed, added = [], []
    for seed in range(20):
        rng = random.Random(seed)
        rest = random_backends(rng, n, weighted)
        changed = rest.pop(rng.randrange(n))
        with_it, without_it = owners(rest + [changed], m), owners(rest, m)
        removed.append(moved_pct(with_it, without_it, changed[0]))
        added.append(moved_pct(without_it, with_it, changed[0]))  # the same slots, seen from the other side
    mean_bound, max_bound = DISRUPTION_BOUNDS[(n, m)]
    for pct in (removed, added):
        assert np.mean(pct) <= mean_bound and max(pct) <= max_bound, pct


def test_table_is_stable_across_versions() -> None:
    # Pin the exact table: a change here changes every deployed table (and so
    # breaks flow affinity during a rolling upgrade). Change it only on purpose.
    backends = [("10.0.0.1:8080/TCP", 1), ("10.0.0.2:8080/TCP", 1), ("10.0.0.3:8080/TCP", 2)]
    table = build_table(backends, 1021)
    assert hashlib.sha256(table.astype("<u4").tobytes()).hexdigest()[:16] == "b5b6b16c91be09a1"


@pytest.mark.parametrize(
    ("backends", "m", "match"),
    [
        ([], 1021, "no backends"),
        ([("a", 1), ("a", 2)], 1021, "duplicate"),
        ([("a", 0)], 1021, "weight"),
        ([("a", -1)], 1021, "weight"),
        ([("a", 1.5)], 1021, "weight"),
        ([("a", True)], 1021, "weight"),
        ([("a", 1)], 1000, "prime"),
        ([("a", 1)], 2, "prime"),
        ([("a", 1)], 1, "prime"),
        ([("a", 1), ("b", 1), ("c", 1), ("d", 1)], 3, "smaller"),
    ],
)
def test_invalid_input_raises(backends: list[tuple[str, int]], m: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_table(backends, m)


def test_primes() -> None:
    small = [p for p in range(100) if is_prime(p)]
    assert small == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97]
    assert all(is_prime(p) for p in (1021, 4093, 16381, 65537))
    assert not is_prime(65535) and not is_prime(-7)
    assert [next_prime(n) for n in (0, 2, 1000, 1021, 16380, 65536)] == [2, 2, 1009, 1021, 16381, 65537]


def test_changed_slots() -> None:
    old = np.array([0, 1, 2, 1], dtype=np.uint32)
    new = np.array([0, 2, 2, 0], dtype=np.uint32)
    assert changed_slots(old, new).tolist() == [1, 3]
    assert changed_slots(old, old).size == 0
    with pytest.raises(ValueError):
        changed_slots(old, new[:3])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 5)), min_size=1,
                         max_size=25, unique_by=lambda t: t[0]), min_size=1, max_size=10),
       st.sampled_from([251, 1021, 4093]))
def test_build_tables_equals_one_build_per_table(groups, m):
    named = [[(f"10.0.{i // 250}.{i % 250}:80/TCP", w) for i, w in g] for g in groups]
    together = build_tables(named, m)
    assert len(together) == len(named)
    for g, table in zip(named, together):
        assert np.array_equal(table, build_table(g, m))


def test_build_tables_validates_every_group():
    with pytest.raises(ValueError, match="duplicate backend name"):
        build_tables([[("a", 1)], [("b", 1), ("b", 2)]], 251)
    assert build_tables([], 251) == []


# ---- table sizes per group (maglev.table_size: auto) ----------------------------------------
from meshd.maglev import LADDER, imbalance, table_size_for, table_size_kept  # noqa: E402


def test_ladder_rungs_are_primes_and_the_smallest_fitting_one_is_picked():
    assert all(is_prime(m) for m in LADDER) and list(LADDER) == sorted(LADDER)
    assert [table_size_for(w) for w in (1, 2, 3, 10, 11, 20, 21, 163, 164, 655, 5000)] == \
        [251, 251, 509, 1021, 2039, 2039, 4093, 16381, 32749, 65521, 65521]
    assert table_size_for(10, fixed=16381) == 16381  # a fixed size wins
    assert table_size_for(100, ceiling=4093) == 4093 and table_size_for(1, ceiling=251) == 251


def test_a_table_is_kept_at_a_rung_edge_while_it_balances_to_one_percent():
    """10 -> 11 backends stays in 1021 slots (0.2% off), 12 moves on (1.1% off); a group
    shrinks only once its table is two rungs too big; fixed and ceiling changes apply."""
    assert table_size_kept([1] * 11, 1021) == 1021 and imbalance([1] * 11, 1021) <= 0.01
    assert table_size_kept([1] * 12, 1021) == 2039 and imbalance([1] * 12, 1021) > 0.01
    assert table_size_kept([1] * 10, 2039) == 2039  # one rung too big: kept
    assert table_size_kept([1] * 2, 2039) == 251  # three rungs too big: shrinks
    assert table_size_kept([1] * 11, 0) == 2039  # a new table: the 100x rule
    assert table_size_kept([1] * 11, 1021, fixed=4093) == 4093
    assert table_size_kept([1] * 3, 4093, ceiling=1021) == 509


@pytest.mark.parametrize("m", LADDER)
def test_balance_and_disruption_at_every_rung(m):
    """The most backends a rung takes under the 100x rule: every share within 1% of its
    weight's, and removing one backend moves few of the other backends' slots."""
    n = max(2, m // 100)
    assert table_size_for(n) == m
    names = [f"10.0.{i // 256}.{i % 256}:80/TCP" for i in range(n)]
    table = build_table([(x, 1) for x in names], m)
    counts = np.bincount(table, minlength=n)
    assert counts.max() / (m / n) - 1 <= 0.01 and imbalance([1] * n, m) <= 0.01
    after = build_table([(x, 1) for x in names[1:]], m)
    before_names, after_names = np.array(names)[table], np.array(names[1:])[after]
    kept = before_names != names[0]
    moved = float((before_names[kept] != after_names[kept]).mean())
    assert moved <= (0.025 if n < 20 else 0.01), moved
