"""Shared by the test layers (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

CGROUP2 = Path("/sys/fs/cgroup/unified")
BPFFS = Path("/sys/fs/bpf")
TEST_PREFIX = "mtest-"  # instance names, pin dirs and cgroups of kernel and lab tests
