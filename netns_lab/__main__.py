"""CLI: ``python -m netns_lab up|down|status|sweep``.

  up [--prefix P] [--backends N] [--no-ipv6] [--port 8080]
        build a lab, start the agents, print it, leave it up (detached: sweep
        leaves it alone until `down` or `sweep --all`)
  down --prefix P      tear one lab down (from its state file, else by name)
  status               labs from state files + leftovers without one
  sweep [--all]        remove leftovers of crashed runs (--all: every lab)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from meshd.errors import LabError

from . import _host
from .lab import Lab, agent_argv


def cmd_up(a: argparse.Namespace) -> int:
    lab = Lab(a.prefix, backends=a.backends, ipv6=not a.no_ipv6).up()
    try:
        lab.start_backends(a.port)
        lab.detach()
    except BaseException:
        lab.down()
        raise
    fams = (4, 6) if lab.ipv6 else (4,)
    print(f"lab {lab.prefix} is up (state {lab.state_file}, cgroup {lab.cgroup})")
    print(f"client  netns {lab.client_ns}")
    for i, name in enumerate(lab.names, 1):
        addrs = "  ".join(lab.backend_addr(i, f) for f in fams)
        print(f"{name:<7} netns {lab.backend_ns(i)}  {addrs}  agent :{a.port} tcp+udp")
    print(f"try:    nsenter --net=/run/netns/{lab.client_ns} -- "
          f"{' '.join(agent_argv('tcp'))} --addr {lab.backend_addr(1)} --port {a.port} --count 3")
    print(f"remove: {sys.executable} -m netns_lab down --prefix {lab.prefix}")
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    if _host.state_path(a.prefix).exists():
        Lab.from_state(a.prefix).down()
        print(f"lab {a.prefix} removed")
        return 0
    # no state file: remove by exact name (namespaces "<prefix>-*", cgroup "<prefix>")
    nss = [n for n in _netns_names() if n.startswith(f"{a.prefix}-")]
    cg = _host.CGROUP_ROOT / a.prefix
    removed = _host.teardown(a.prefix, nss, cg, [])
    print("\n".join(removed) if removed else f"nothing of lab {a.prefix} found")
    return 0


def _netns_names() -> list[str]:
    d = _host.NETNS_DIR
    return sorted(os.listdir(d)) if d.is_dir() else []


def cmd_status(_: argparse.Namespace) -> int:
    states = _host.read_states()
    if not states:
        print("no labs recorded in", _host.STATE_DIR)
    for prefix, st in states.items():
        if st is None:
            print(f"{prefix}: unreadable state file")
            continue
        alive = [r["pid"] for r in st.get("pids", [])
                 if _host.proc_start_time(int(r["pid"])) == r.get("start")]
        present = [n for n in st.get("namespaces", []) if _host.netns_inode(n) is not None]
        owner = ("detached" if st.get("detached") else
                 "owner alive" if _host.owner_alive(st) else "owner gone (sweep will remove)")
        print(f"{prefix}: {st.get('backends')} backends, ipv6={st.get('ipv6')}, {owner}; "
              f"netns {len(present)}/{len(st.get('namespaces', []))}, "
              f"cgroup {'yes' if Path(st.get('cgroup', '/nonexistent')).is_dir() else 'no'}, "
              f"processes {alive}")
    leftovers = [f"netns {n}" for n in _netns_names()
                 if (m := _host.NAME_RE.match(n)) and m.group(1) not in states]
    leftovers += [f"cgroup {d}" for d in sorted(_host.CGROUP_ROOT.glob(f"{_host.LAB_PREFIX_ROOT}*"))
                  if _host.PREFIX_RE.match(d.name) and d.name not in states]
    leftovers += [f"link {n}" for n in _host.root_links()]
    print("leftovers without state: " + (", ".join(leftovers) if leftovers else "none"))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    removed = _host.sweep(all=a.all)
    print("\n".join(removed) if removed else "nothing to sweep")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netns_lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and leave it up")
    up.add_argument("--prefix")
    up.add_argument("--backends", type=int, default=3)
    up.add_argument("--no-ipv6", action="store_true")
    up.add_argument("--port", type=int, default=8080)
    down = sub.add_parser("down", help="tear a lab down")
    down.add_argument("--prefix", required=True)
    sub.add_parser("status", help="list labs and leftovers")
    sw = sub.add_parser("sweep", help="remove leftovers of crashed runs")
    sw.add_argument("--all", action="store_true", help="also labs that are up on purpose")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("netns_lab: needs root", file=sys.stderr)
        return 2
    try:
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "sweep": cmd_sweep}[a.cmd](a)
    except LabError as e:
        print(f"netns_lab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
