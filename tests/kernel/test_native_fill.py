"""The compiled Maglev fill (bpf/native/maglev_fill.c) builds the tables the numpy version of
meshd/maglev.py builds, slot for slot: a daemon that has it and one that does not (or an
older meshd) agree on every table, so a restart adopts them without a write."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import maglev
from meshd.dataplane import native

SIZES = (251, 509, 1021, 2039, 4093)


@pytest.fixture(scope="module")
def fill():
    f = native.load()
    assert f is not None, f"{native.LIBRARY} missing: run bpf/build.sh"
    return f


def both(groups, m, fill):
    before = maglev.compiled_fill()
    try:
        maglev.use_fill(None)
        slow = maglev.build_tables(groups, m)
        maglev.use_fill(fill)
        fast = maglev.build_tables(groups, m)
    finally:
        maglev.use_fill(before)
    return slow, fast


@settings(max_examples=60, deadline=None)
@given(m=st.sampled_from(SIZES), data=st.data())
def test_compiled_fill_equals_the_numpy_fill(fill, m, data):
    groups = data.draw(st.lists(
        st.dictionaries(st.text("abcdef0123456789.:", min_size=1, max_size=12),
                        st.integers(1, 9), min_size=1, max_size=min(60, m // 4)),
        min_size=1, max_size=6))
    slow, fast = both([list(g.items()) for g in groups], m, fill)
    for a, b in zip(slow, fast):
        assert a.dtype == b.dtype == np.uint32 and (a == b).all()


def test_the_shipped_shape_and_a_big_table(fill):
    ten = [[(f"10.0.{g}.{b}:8080/TCP", 1) for b in range(10)] for g in range(64)]
    big = [[(f"10.1.0.{b}:80/TCP", 1 + b % 3) for b in range(200)]]
    for groups, m in ((ten, 1021), (big, 65521)):
        slow, fast = both(groups, m, fill)
        assert all((a == b).all() for a, b in zip(slow, fast))


def test_install_hands_the_fill_to_maglev():
    before = maglev.compiled_fill()
    try:
        native._installed = False
        assert native.install() and maglev.compiled_fill() is not None
    finally:
        maglev.use_fill(before)
