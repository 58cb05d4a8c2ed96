"""Test layers: tests/unit (pure, no root), tests/kernel (root, real BPF), tests/lab (root,
namespaces, real traffic), tests/faults (root: real faults against a real daemon; marked
`lab` as well), tests/package (root: builds the wheel and the .deb and runs them in a Debian
root; marked `lab` as well). Privileged tests skip without root — except where
MESHD_REQUIRE_PRIVILEGED=1 (CI), where a skip would hide a broken data plane: it fails.
The daemon/etcd harness and its fixtures: tests/meshdlib.py (a plugin, registered below)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from testlib import BPFFS, CGROUP2, TEST_PREFIX, claim, release, sweep_kernel_leftovers

pytest_plugins = ["netns_lab.pytest_plugin", "meshdlib"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "kernel" in parts:
            item.add_marker(pytest.mark.kernel)
        if "lab" in parts or "faults" in parts or "package" in parts:
            item.add_marker(pytest.mark.lab)
        if "package" in parts:
            item.add_marker(pytest.mark.package)


def pytest_runtest_setup(item):
    if ("kernel" in item.keywords or "lab" in item.keywords) and os.geteuid() != 0:
        if os.environ.get("MESHD_REQUIRE_PRIVILEGED") == "1":
            pytest.fail("privileged test run without root while MESHD_REQUIRE_PRIVILEGED=1")
        pytest.skip("needs root: loads BPF into the kernel / builds network namespaces")


def pytest_sessionstart(session):
    if os.geteuid() == 0 and CGROUP2.is_dir():
        sweep_kernel_leftovers()


@pytest.fixture
def kernel_instance():
    """(instance name, own cgroup2 dir): removed with every pin after the test."""
    from meshd.dataplane import loader
    name = TEST_PREFIX + secrets.token_hex(4)
    claim(name)
    cg = CGROUP2 / name
    cg.mkdir()
    try:
        yield name, cg
    finally:
        loader.remove(BPFFS, name)
        cg.rmdir()
        release(name)


@pytest.fixture
def socklb(lab):
    """The lab's socket LB, driven by the daemon's reconciler; removed after the test."""
    from testlib import SocketLB
    s = SocketLB(lab)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def require_tool():
    def need(tool: str) -> str:
        path = shutil.which(tool)
        if path is None:
            pytest.fail(f"{tool} is not installed: run scripts/setup")
        return path
    return need
