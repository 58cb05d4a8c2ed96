"""The Python mirrors in meshd/dataplane/structs.py match the compiled object's BTF."""

import ctypes
import json
import shutil
import subprocess

import pytest

from meshd.dataplane import structs
from meshd.dataplane.loader import object_path
from meshd import names


def _btf_structs(obj) -> dict:
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "-j"],
                         check=True, capture_output=True, text=True).stdout
    types = json.loads(out)["types"]
    return {t["name"]: t for t in types if t["kind"] == "STRUCT" and t.get("name")}


@pytest.fixture(scope="module")
def btf():
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is not installed: run scripts/setup")
    return _btf_structs(object_path(names.OBJ_SOCK_LB))


@pytest.mark.parametrize("cname", sorted(structs.MIRRORS))
def test_mirror_matches_btf(btf, cname):
    mirror = structs.MIRRORS[cname]
    assert cname in btf, f"struct {cname} is not in the object's BTF"
    t = btf[cname]
    assert ctypes.sizeof(mirror) == t["size"], f"{cname}: size differs"
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
    py_fields = [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
    assert py_fields == c_fields


def test_rodata_holds_only_the_cfg_struct(btf):
    """The loader writes .rodata as one struct meshd_cfg: nothing else may live there."""
    out = subprocess.run(["bpftool", "btf", "dump", "file",
                          str(object_path(names.OBJ_SOCK_LB)), "-j"],
                         check=True, capture_output=True, text=True).stdout
    types = json.loads(out)["types"]
    rodata = [t for t in types if t["kind"] == "DATASEC" and t["name"] == ".rodata"]
    assert len(rodata) == 1 and len(rodata[0]["vars"]) == 1
    assert rodata[0]["vars"][0]["offset"] == 0
    assert rodata[0]["vars"][0]["size"] == ctypes.sizeof(structs.Cfg)


def test_doomed_key_mirror_matches_the_iterator_object():
    from meshd.dataplane import sockdestroy
    structs_ = _btf_structs(object_path(sockdestroy.OBJ))
    t = structs_["meshd_doomed_key"]
    mirror = sockdestroy.DoomedKey
    assert ctypes.sizeof(mirror) == t["size"]
    assert [(m["name"], m["bits_offset"] // 8) for m in t["members"]] == [
        (f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
