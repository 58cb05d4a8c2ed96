"""Objects and pins: where the compiled BPF objects are, bpffs, and adopting pinned maps.

Shared by every loader of the package (socket LB, tc LB, UDP socket destroyer), so none of
them imports another for these helpers (loader.py used to be imported by tc.py while
loader.remove() imported tc.py back).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from meshd.errors import DataplaneError
from meshd.dataplane import libbpf as bpf

log = logging.getLogger("meshd.dataplane")

BPF_OBJ_DIR = Path(__file__).resolve().parent.parent / "bpf_obj"


def object_path(name: str) -> Path:
    """The compiled BPF object `name`: package data of the wheel (setup.py compiles it when
    the wheel is built; scripts/setup does in a checkout)."""
    path = BPF_OBJ_DIR / name
    if not path.is_file():
        raise DataplaneError(
            f"BPF object {name} is missing from {BPF_OBJ_DIR}: in a checkout run scripts/setup "
            "(compiles bpf/ with clang); otherwise reinstall meshd from its wheel or .deb, "
            "which carry the compiled objects")
    return path


def ensure_bpffs(bpffs: Path) -> None:
    """Mounts bpffs at `bpffs` if nothing of type bpf is mounted there."""
    bpffs = Path(bpffs)
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == str(bpffs) and line.split()[2] == "bpf" for line in f):
            return
    bpffs.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], capture_output=True, text=True)
    if r.returncode != 0:
        raise DataplaneError(f"cannot mount bpffs at {bpffs}: {r.stderr.strip()} "
                             "(run as root, or mount it: mount -t bpf bpf /sys/fs/bpf)")
    log.info("mounted bpffs at %s", bpffs)


def adopt_pins(obj: bpf.BpfObject, pin_dir: Path, map_names) -> set[str]:
    """Before load: makes each map of `map_names` that is pinned in `pin_dir` reuse the pinned
    map (its entries survive a restart or upgrade). Returns the names adopted."""
    adopted = set()
    for name in map_names:
        pin = pin_dir / name
        if pin.exists():
            fd = bpf.obj_get(pin)
            try:
                obj.reuse_map_fd(name, fd)
            finally:
                bpf.close_fd(fd)
            adopted.add(name)
    return adopted


def pin_new(obj: bpf.BpfObject, pin_dir: Path, map_names, adopted: set[str]) -> None:
    """After load: pins every map of `map_names` that was not adopted."""
    for name in map_names:
        if name not in adopted:
            bpf.obj_pin(obj.map_fd(name), pin_dir / name)
