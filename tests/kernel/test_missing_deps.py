"""A host without libbpf, or whose kernel lacks what meshd needs, gets one line naming what
is missing and how to get it, never a traceback. Each case runs in a private mount
namespace (unshare -m) where one file is hidden by an empty file bind-mounted over it;
the host's own file is never touched and the mount ends with the namespace."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBBPF = Path("/usr/lib/x86_64-linux-gnu/libbpf.so.1")


def run_hidden(hide: Path, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Runs argv with `hide` replaced by an empty file, in a mount namespace of its own."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                           "sh", str(empty), str(hide), *argv], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env)


def assert_one_line(cp: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 1, no traceback, one line of error (libbpf's own log lines, which go through
    logging as warnings, may come before it)."""
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip() and not ln.startswith("libbpf: ")]
    assert len(lines) == 1, cp.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config(tmp_path):
    cfg = tmp_path / "meshd.yaml"
    cfg.write_text(f"instance: mshdtest-nolib\nbpffs: {tmp_path / 'bpffs'}\netcd: null\n")
    return cfg


@pytest.mark.parametrize("verb", [["services", "--kernel-only"], ["cleanup"], ["top", "--once"],
                                  ["run"]])
def test_without_libbpf_every_verb_says_what_to_install_in_one_line(verb, config, tmp_path):
    if not LIBBPF.exists():
        pytest.skip(f"{LIBBPF} is not where this test hides it")
    cp = run_hidden(LIBBPF, [sys.executable, "-m", "meshd", verb[0], "--config", str(config),
                             *verb[1:]], tmp_path)
    line = assert_one_line(cp, "libbpf.so.1", "apt-get install libbpf1")
    assert line.startswith(("meshd: error: ", "meshd top: "))


def test_the_host_still_has_libbpf():
    """The bind mounts above stayed private to their namespaces."""
    assert ctypes.util.find_library("bpf") and LIBBPF.stat().st_size > 0


LOAD = r"""
import sys
from pathlib import Path
from meshd.dataplane import loader
from meshd.errors import MeshdError
try:
    loader.load(Path("/sys/fs/bpf"), sys.argv[1], Path(sys.argv[2]), 1021).close()
except MeshdError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
"""


def test_a_kernel_without_btf_is_named_when_the_socket_lb_cannot_load(kernel_instance,
                                                                        tmp_path):
    """The socket LB's metrics use CO-RE, which needs the kernel's BTF: with
    /sys/kernel/btf/vmlinux hidden, loading fails and says so in one line."""
    inst, cg = kernel_instance
    btf = Path("/sys/kernel/btf/vmlinux")
    if not btf.exists():
        pytest.skip("this kernel has no BTF to hide")
    cp = run_hidden(btf, [sys.executable, "-c", LOAD, inst, str(cg)], tmp_path)
    line = assert_one_line(cp, "KernelFeatureMissing", "kernel BTF", "CONFIG_DEBUG_INFO_BTF")
    assert os.uname().release in line
