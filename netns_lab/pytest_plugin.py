"""pytest fixtures for the netns lab.

Register with ``pytest_plugins = ["netns_lab.pytest_plugin"]`` in the root
conftest (or import ``lab``/``lab_module`` into a test module).

* ``lab``        function-scoped: a fresh 3-backend lab, agents on :8080
* ``lab_module`` module-scoped variant (share it; don't break it)

Both skip when not root; as root any build failure is an error, never a skip.
Leftovers of crashed runs are swept once per session (at session start when
registered as a plugin, else before the first lab is built). Labs of other
live test sessions are never touched (sweep checks their owner process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .lab import Lab, sweep

_swept = False


def _sweep_once() -> None:
    global _swept
    if not _swept and os.geteuid() == 0:
        _swept = True
        removed = sweep()
        if removed:
            print(f"\nnetns_lab: swept leftovers of crashed runs: {removed}")


def pytest_sessionstart(session: pytest.Session) -> None:
    _sweep_once()


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("netns lab needs root (creates network namespaces, veths and cgroups)")


def _lab() -> Iterator[Lab]:
    _need_root()
    _sweep_once()
    lab = Lab(backends=3).up()
    try:
        lab.start_backends(8080)
        yield lab
    finally:
        lab.down()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab (3 backends, agents b1..b3 on :8080 tcp+udp), torn down after."""
    yield from _lab()


@pytest.fixture(scope="module")
def lab_module() -> Iterator[Lab]:
    """One lab shared by a test module, torn down after its last test."""
    yield from _lab()
