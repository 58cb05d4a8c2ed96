"""Compile time of meshd.policy.compile_policies: 10,000 cgroups x 100 policies (a VM-like
tree of slices and units, every selector kind, some uid items, one policy selecting
every unit). Prints ms per compile, the
first and a recompile with `previous`. Pure Python, no root: python bench/policy_compile.py"""

from __future__ import annotations

import time

from meshd.policy import compile_policies
from meshd.policy_model import parse_policy


def tree(n: int) -> dict[str, int]:
    cg = {"/": 1, "/system.slice": 2, "/user.slice": 3}
    i = 0
    while len(cg) < n:
        unit = f"/system.slice/svc{i}.service"
        cg[unit] = len(cg) + 1
        for j in range(3):
            cg[f"{unit}/worker{j}"] = len(cg) + 1
        i += 1
    return cg


def policies(n: int) -> list:
    # one broad policy: every cgroup below /system.slice has an identity
    out = [parse_policy({"namespace": "default", "name": "broad", "from": [{"cgroup": "/system.slice/"}],
                         "to": [{"service": "s1"}]}, "bench")]
    for i in range(n - 1):
        frm = [{"unit": f"svc{i}.service"}, {"cgroup": f"/system.slice/svc{i + 1}.service"},
               {"cgroup": f"/system.slice/svc{i + 2}.service/"}]
        if i % 5 == 0:
            frm.append({"unit": f"svc{i + 3}.service", "uid": 1000 + i})
        out.append(parse_policy({"namespace": "default", "name": f"p{i}", "action": "deny" if i % 10 == 9 else "allow",
                                 "from": frm, "to": [{"service": f"s{i % 50}", "ports": [80, "http"]}]}, "bench"))
    return out


def groups_of(ns: str, name: str, ports) -> set[int]:
    base = int(name[1:]) * 4
    return {base + 1, base + 2, base + 3}


def main() -> None:
    cg, pols = tree(10_000), policies(100)
    best = first = None
    for _ in range(5):
        t0 = time.perf_counter()
        t = compile_policies(pols, groups_of, cg)
        dt = (time.perf_counter() - t0) * 1000
        first = first or t
        best = dt if best is None else min(best, dt)
    t0 = time.perf_counter()
    again = compile_policies(pols, groups_of, cg, previous=first)
    re_ms = (time.perf_counter() - t0) * 1000
    assert again.ident == first.ident and again.verdicts == first.verdicts
    print(f"{len(cg)} cgroups x {len(pols)} policies: compile {best:.1f} ms (best of 5), recompile "
          f"with previous {re_ms:.1f} ms; {len(t.ident)} cgroups with an identity, "
          f"{len(t.identities)} identities, {len(t.verdicts)} verdicts, {len(t.selected)} groups")


if __name__ == "__main__":
    main()
