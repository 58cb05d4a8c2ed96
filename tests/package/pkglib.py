"""Builds for the package tests: the wheel and the .deb from this checkout, cached under
CACHE by the hash of their inputs (every file git knows, as scripts/build-deb exports them,
plus the version), so a second run of an unchanged tree reuses them; and a Debian 12 root
made by debootstrap, cached as a tarball keyed by its inputs and rebuilt if it is corrupt."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MESHD_TEST_CACHE", "/var/cache/meshd-tests"))
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# Preinstalled, so the test installs offline and quickly: the package's Depends (python3,
# libbpf1, iproute2, procps) and Recommends (etcd-server), deb-systemd-helper
# (init-system-helpers), and systemd, whose units `systemd-analyze verify --root` needs (as on
# a VM; no systemd runs in the root)
ROOT_INCLUDE = ["python3", "libbpf1", "iproute2", "procps", "etcd-server", "init-system-helpers",
                "systemd"]


def _tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return sorted(f for f in out.decode().split("\0") if f and (REPO / f).exists())


def tree_hash() -> str:
    """Of the files a build reads (the tests are exported too, but not built into anything)."""
    h = hashlib.sha256()
    for f in _tree_files():
        if f.startswith("tests/"):
            continue
        p = REPO / f
        h.update(f.encode() + b"\0")
        h.update(os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
    return h.hexdigest()[:16]


def export_tree(dest: Path) -> Path:
    """The checkout's files (what scripts/build-deb packs): no .venv, no compiled objects."""
    dest.mkdir(parents=True)
    for f in _tree_files():
        src, dst = REPO / f, dest / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def _cached(kind: str, key: str, name: str, build) -> Path:
    """CACHE/<kind>/<key>/<name>, made by build(tmpdir) -> file once; atomic. Builds of other
    keys unused for a day are removed then (each .deb is ~20 MB)."""
    final = CACHE / kind / key / name
    if final.is_file() and final.stat().st_size > 0:
        os.utime(final.parent)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if key:
        for old in (CACHE / kind).iterdir():
            if old != final.parent and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        made = build(Path(tmp))
        os.replace(made, final)
    return final


def build_wheel() -> Path:
    """`pip wheel` of a clean export (no meshd/bpf_obj): setup.py must compile the objects."""
    def build(tmp: Path) -> Path:
        src = export_tree(tmp / "src")
        assert not (src / "meshd" / "bpf_obj").exists()
        subprocess.run([str(REPO / ".venv/bin/pip"), "wheel", "-q", "--no-deps",
                        "--disable-pip-version-check", "-w", str(tmp / "out"), str(src)],
                       check=True, capture_output=True, text=True, timeout=600)
        return next((tmp / "out").glob("meshd-*.whl"))
    key = tree_hash()
    return _cached("wheel", key, "meshd.whl", build)


def build_deb(version: str) -> Path:
    """scripts/build-deb --fast --version VERSION (the real one-command build; gzip instead of
    xz saves half a minute and changes nothing dpkg or lintian look at but the compression)."""
    def build(tmp: Path) -> Path:
        r = subprocess.run([str(REPO / "scripts/build-deb"), "--fast", "--version", version,
                            "--out", str(tmp)], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"scripts/build-deb failed:\n{r.stdout}\n{r.stderr}"
        return Path(r.stdout.strip().splitlines()[-1])
    return _cached("deb", f"{tree_hash()}-{version}-fast", f"meshd_{version}.deb", build)


def _root_key() -> str:
    v = subprocess.run(["debootstrap", "--version"], capture_output=True, text=True).stdout
    return hashlib.sha256(f"{SUITE} minbase {MIRROR} {sorted(ROOT_INCLUDE)} {v}".encode()
                          ).hexdigest()[:16]


def debian_root(dest: Path) -> None:
    """A Debian 12 minbase root at `dest`, from the cached tarball (made on a miss; remade
    once if it does not extract)."""
    tarball = CACHE / "debootstrap" / f"{SUITE}-{_root_key()}.tar"

    def build(tmp: Path) -> Path:
        root = tmp / "root"
        r = subprocess.run(["debootstrap", "--variant=minbase",
                            f"--include={','.join(ROOT_INCLUDE)}", SUITE, str(root), MIRROR],
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, f"debootstrap failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        out = tmp / "root.tar"
        subprocess.run(["tar", "-C", str(root), "--one-file-system", "-cf", str(out), "."],
                       check=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)
        return out

    for attempt in (1, 2):
        path = _cached("debootstrap", "", tarball.name, build)
        try:
            with tarfile.open(path) as t:  # a truncated or damaged tarball fails here
                t.getmember("./usr/bin/python3")
            dest.mkdir(parents=True)
            subprocess.run(["tar", "-C", str(dest), "-xf", str(path)], check=True,
                           capture_output=True)
            return
        except (tarfile.TarError, KeyError, subprocess.CalledProcessError):
            if attempt == 2:
                raise
            path.unlink(missing_ok=True)  # corrupt: made again
            subprocess.run(["rm", "-rf", "--one-file-system", str(dest)], check=False)
