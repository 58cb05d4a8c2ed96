"""The wheel carries the compiled BPF objects: `pip wheel` of a clean export (no
meshd/bpf_obj) compiles them into it; `pip install` of that wheel into a fresh virtualenv,
run with no compiler on PATH, loads the programs into the kernel; without them, `meshd run`
fails with one line saying what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from testlib import BPFFS

import pkglib

LOAD = """
import json, sys
from pathlib import Path
import meshd
from meshd.dataplane import libbpf as bpf, loader, tc
from meshd.dataplane.pins import object_path
from meshd.dataplane.sockdestroy import OBJ
bpffs, instance, cgroup = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
maps = loader.load(bpffs, instance, cgroup, 1021)
maps.close()
tc.load(bpffs, instance).close()
with bpf.BpfObject(object_path(OBJ)) as obj:   # CO-RE: relocated against this kernel
    obj.load()
from meshd.dataplane import native
assert native.load() is not None, "the compiled Maglev fill did not load"
print(json.dumps({"meshd": meshd.__file__, "objects": str(object_path(OBJ).parent)}))
"""


@pytest.fixture
def venv(tmp_path):
    """A fresh virtualenv with the built wheel installed (dependencies as PyPI wheels)."""
    wheel = pkglib.build_wheel()
    names = zipfile.ZipFile(wheel).namelist()
    for obj in ("sock_lb.bpf.o", "tc_lb.bpf.o", "sock_destroy.bpf.o", "maglev_fill.so"):
        assert f"meshd/bpf_obj/{obj}" in names, names
    v = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(v)], check=True)
    whl = tmp_path / "meshd-0.1.0-py3-none-any.whl"  # pip wants the wheel's own name
    shutil.copy(wheel, whl)
    r = subprocess.run([str(v / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                        "--only-binary=:all:", str(whl)], capture_output=True, text=True,
                       timeout=600, env={"PATH": f"{v}/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")})
    assert r.returncode == 0, r.stderr
    return v


def _no_compiler_path(tmp: Path, venv: Path) -> str:
    """PATH of the venv and the few tools meshd runs (mount, ip): no clang, no cc."""
    bin_ = tmp / "bin"
    bin_.mkdir()
    for tool in ("mount", "ip"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    path = f"{venv}/bin:{bin_}"
    assert shutil.which("clang-19", path=path) is None and shutil.which("clang", path=path) is None
    return path


def test_wheel_installed_without_a_compiler_loads_the_programs(venv, kernel_instance, tmp_path):
    name, cg = kernel_instance
    env = {"PATH": _no_compiler_path(tmp_path, venv)}
    r = subprocess.run([str(venv / "bin/python"), "-c", LOAD, str(BPFFS), name, str(cg)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    where = json.loads(r.stdout)
    assert where["meshd"].startswith(str(venv)), where  # the wheel's meshd, not the checkout
    assert where["objects"].startswith(str(venv)), where
    progs = json.loads(subprocess.run(["bpftool", "-j", "cgroup", "show", str(cg)],
                                      capture_output=True, text=True, check=True).stdout)
    assert {"cgroup_inet4_connect", "cgroup_inet6_connect"} <= {p["attach_type"] for p in progs}, progs


def test_missing_objects_are_one_clear_line(venv, kernel_instance, tmp_path):
    name, cg = kernel_instance
    site = next((venv / "lib").glob("python3*/site-packages"))
    shutil.rmtree(site / "meshd" / "bpf_obj")
    cfg = tmp_path / "meshd.yaml"
    cfg.write_text(json.dumps({"instance": name, "cgroup": str(cg), "etcd": None,
                               "state_dir": str(tmp_path / "state"), "metrics": {"listen": None},
                               "healthz": {"listen": None}}))
    r = subprocess.run([str(venv / "bin/meshd"), "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": _no_compiler_path(tmp_path, venv)})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("meshd: error: BPF object sock_lb.bpf.o is missing from "), r.stderr
    assert "reinstall meshd" in last and "Traceback" not in r.stderr, r.stderr
