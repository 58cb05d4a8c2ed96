"""Host-side plumbing of the lab: commands, /proc, cgroups, state files, sweep.

Everything here identifies what it touches precisely:

* names match the lab scheme exactly (``^ml[0-9a-f]{6}-`` for namespaces and
  links, ``^ml[0-9a-f]{6}$`` for cgroups) or come from a lab's state file;
* a recorded PID is only signalled if its start time still matches the one
  recorded AND it carries the lab marker (``netns_lab`` in its cmdline or
  ``NETNS_LAB_PREFIX=<prefix>`` in its environment) — a recycled PID is skipped;
* other processes are only signalled because they live *inside* a lab network
  namespace (same nsfs inode as ``/run/netns/<lab-ns>``) or a lab cgroup.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from meshd.errors import LabError

LAB_PREFIX_ROOT = "ml"
PREFIX_RE = re.compile(rf"^{LAB_PREFIX_ROOT}[0-9a-f]{{6}}$")
NAME_RE = re.compile(rf"^({LAB_PREFIX_ROOT}[0-9a-f]{{6}})-[A-Za-z0-9]+$")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
STATE_DIR = Path("/run/netns_lab")
NETNS_DIR = Path("/run/netns")
ENV_MARK = "NETNS_LAB_PREFIX"
KILL_GRACE_S = 2.0


# ---------------------------------------------------------------- commands


def run_cmd(argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a host command (text, captured); raise LabError naming it and its stderr."""
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise LabError(f"`{argv[0]}` not found (install iproute2/util-linux): {e}") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"`{' '.join(argv)}` timed out after {timeout}s") from e
    if check and cp.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed (exit {cp.returncode}): "
                       f"{(cp.stderr or cp.stdout).strip()}")
    return cp


# ---------------------------------------------------------------- /proc


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie PID, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_is_lab(pid: int, prefix: str) -> bool:
    """True if the PID carries the lab marker (cmdline or environment)."""
    try:
        if b"netns_lab" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return True
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{ENV_MARK}={prefix}".encode() in env


def netns_inode(name: str) -> int | None:
    """nsfs inode of a named namespace (``/run/netns/<name>``), or None."""
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def pids_in_netns(inodes: set[int]) -> list[int]:
    """PIDs whose network namespace is one of ``inodes``."""
    if not inodes:
        return []
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            link = os.readlink(d / "ns" / "net")  # "net:[4026532...]"
        except OSError:
            continue
        if int(link[5:-1]) in inodes:
            found.append(int(d.name))
    return found


def kill_pids(pids: Iterable[int], grace: float = KILL_GRACE_S) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL. Returns the PIDs signalled."""
    alive = {p: t for p in set(pids) if p > 1 and (t := proc_start_time(p)) is not None}
    if not alive:
        return []
    for p in alive:
        _signal(p, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(proc_start_time(p) == t for p, t in alive.items()):
        time.sleep(0.02)
    for p, t in alive.items():
        if proc_start_time(p) == t:
            _signal(p, signal.SIGKILL)
    end = time.monotonic() + 1.0
    while time.monotonic() < end and any(proc_start_time(p) == t for p, t in alive.items()):
        time.sleep(0.02)
    return sorted(alive)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- teardown pieces


def delete_netns(name: str) -> bool:
    """Kill every process inside ``name``, then delete it. False if it was absent."""
    ino = netns_inode(name)
    if ino is None:
        return False
    kill_pids(pids_in_netns({ino}))
    cp = run_cmd(["ip", "netns", "delete", name], check=False)
    if cp.returncode != 0 and netns_inode(name) is not None:
        raise LabError(f"`ip netns delete {name}` failed: {cp.stderr.strip()}")
    return True


def remove_cgroup(path: Path) -> bool:
    """Kill every process in the cgroup subtree, then rmdir it. False if absent."""
    if not path.is_dir():
        return False
    kill = path / "cgroup.kill"
    if kill.exists():
        try:
            kill.write_text("1")
        except OSError:
            pass
    procs: list[int] = []
    for d, _, _ in os.walk(path):
        try:
            procs += [int(x) for x in Path(d, "cgroup.procs").read_text().split()]
        except OSError:
            pass
    kill_pids(procs, grace=0.5)
    end = time.monotonic() + KILL_GRACE_S
    while True:
        try:
            for d, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
                os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if time.monotonic() > end:
                raise LabError(f"cannot remove cgroup {path}: {e}") from e
            time.sleep(0.05)


def root_links() -> list[str]:
    """Names of root-namespace links that match the lab naming scheme exactly."""
    cp = run_cmd(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in cp.stdout.splitlines():
        parts = line.split(": ", 2)
        if len(parts) > 1:
            name = parts[1].split("@", 1)[0]
            if NAME_RE.match(name):
                names.append(name)
    return names


# ---------------------------------------------------------------- state files


def state_path(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


def write_state(prefix: str, state: dict[str, Any]) -> None:
    """Atomically (re)write a lab's state file."""
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = STATE_DIR / f"{prefix}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, state_path(prefix))


def read_states() -> dict[str, dict[str, Any] | None]:
    """prefix -> state (None if unreadable) for every state file."""
    out: dict[str, dict[str, Any] | None] = {}
    if not STATE_DIR.is_dir():
        return out
    for f in sorted(STATE_DIR.glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):
            out[f.stem] = None
    return out


def remove_state(prefix: str) -> list[str]:
    """Remove a lab's state file and logs (``<prefix>.json``, ``<prefix>.*.log``)."""
    removed = []
    for f in [state_path(prefix), *STATE_DIR.glob(f"{glob_escape(prefix)}.*.log")]:
        try:
            f.unlink()
            removed.append(str(f))
        except FileNotFoundError:
            pass
    return removed


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def owner_alive(state: dict[str, Any]) -> bool:
    """True if the process that built the lab is still running."""
    owner = state.get("owner")
    if not owner:
        return False
    return proc_start_time(int(owner["pid"])) == owner.get("start")


def teardown(prefix: str, namespaces: Iterable[str], cgroup: Path | None,
             pids: Iterable[dict[str, Any]]) -> list[str]:
    """Remove one lab: verified recorded PIDs, namespaces (and their processes),
    cgroup, state file and logs. Never fails on already-gone items."""
    removed: list[str] = []
    errors: list[str] = []
    mine = [int(r["pid"]) for r in pids
            if proc_start_time(int(r["pid"])) == r.get("start") and proc_is_lab(int(r["pid"]), prefix)]
    removed += [f"pid {p}" for p in kill_pids(mine)]
    for ns in namespaces:
        try:
            if delete_netns(ns):
                removed.append(f"netns {ns}")
        except LabError as e:
            errors.append(str(e))
    if cgroup is not None:
        try:
            if remove_cgroup(cgroup):
                removed.append(f"cgroup {cgroup}")
        except LabError as e:
            errors.append(str(e))
    if errors:
        raise LabError(f"lab {prefix}: teardown incomplete: " + "; ".join(errors))
    removed += [f"file {f}" for f in remove_state(prefix)]
    return removed


def sweep(all: bool = False) -> list[str]:  # noqa: A002 - CLI mirrors `sweep --all`
    """Remove leftovers of crashed labs; return what was removed.

    A lab is left alone while the process that built it is alive, and a lab
    detached with ``python -m netns_lab up`` is left alone unless ``all``.
    Leftovers without a state file are found by exact name scheme:
    namespaces/links ``^ml[0-9a-f]{6}-...``, cgroups ``unified/ml[0-9a-f]{6}``.
    """
    removed: list[str] = []
    errors: list[str] = []
    keep: set[str] = set()
    for prefix, st in read_states().items():
        if st is not None and not all and (st.get("detached") or owner_alive(st)):
            keep.add(prefix)
            continue
        st = st or {}
        cg = st.get("cgroup")
        try:
            removed += teardown(prefix, st.get("namespaces", []),
                                Path(cg) if cg and Path(cg).parent == CGROUP_ROOT else None,
                                st.get("pids", []))
        except LabError as e:
            errors.append(str(e))
    names = sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []
    for ns in names:
        m = NAME_RE.match(ns)
        if m and m.group(1) not in keep:
            try:
                if delete_netns(ns):
                    removed.append(f"netns {ns}")
            except LabError as e:
                errors.append(str(e))
    for link in root_links():
        if NAME_RE.match(link).group(1) not in keep:  # type: ignore[union-attr]
            if run_cmd(["ip", "link", "delete", "dev", link], check=False).returncode == 0:
                removed.append(f"link {link}")
    if CGROUP_ROOT.is_dir():
        for d in sorted(CGROUP_ROOT.iterdir()):
            if PREFIX_RE.match(d.name) and d.is_dir() and d.name not in keep:
                try:
                    if remove_cgroup(d):
                        removed.append(f"cgroup {d}")
                except LabError as e:
                    errors.append(str(e))
    if STATE_DIR.is_dir():
        for f in sorted(STATE_DIR.iterdir()):
            p = f.name.split(".", 1)[0]
            if PREFIX_RE.match(p) and p not in keep and f.suffix in (".log", ".json", ".tmp"):
                f.unlink(missing_ok=True)
                removed.append(f"file {f}")
    if errors:
        raise LabError("sweep incomplete: " + "; ".join(errors))
    return removed
