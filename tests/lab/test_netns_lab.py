"""The netns lab itself: topology, reachability, isolation, cgroup, cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshd.errors import LabError
from netns_lab import _host
from netns_lab.lab import Lab, sweep
from netns_lab.pytest_plugin import lab, lab_module  # noqa: F401

pytestmark = pytest.mark.lab
PORT = 8080
REPO = Path(__file__).resolve().parents[2]


def fmt(addr: str, port: int = PORT) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def leftovers(prefix: str) -> list[str]:
    """Everything of lab `prefix` still on the machine."""
    out = [f"netns {n}" for n in (os.listdir(_host.NETNS_DIR) if _host.NETNS_DIR.is_dir() else [])
           if n.startswith(f"{prefix}-")]
    out += [f"link {n}" for n in _host.root_links() if n.startswith(f"{prefix}-")]
    if (_host.CGROUP_ROOT / prefix).exists():
        out.append(f"cgroup {_host.CGROUP_ROOT / prefix}")
    out += [f"file {f}" for f in _host.STATE_DIR.glob(f"{prefix}.*")] if _host.STATE_DIR.is_dir() else []
    return out


def wait_dead(pids: list[int], timeout: float = 3.0) -> list[int]:
    end = time.monotonic() + timeout
    while (alive := [p for p in pids if _host.proc_start_time(p) is not None]) and time.monotonic() < end:
        time.sleep(0.05)
    return alive


# ------------------------------------------------------------ topology


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["tcp", "udp-connected", "udp-unconnected"])
def test_client_reaches_each_backend(lab_module: Lab, family: int, mode: str) -> None:
    for i, name in enumerate(lab_module.names, 1):
        addr = lab_module.backend_addr(i, family)
        if mode == "tcp":
            res = lab_module.agent("tcp", addr=addr, port=PORT, count=3)
        else:
            res = lab_module.agent("udp", addr=addr, port=PORT, count=3,
                                   connected=mode == "udp-connected",
                                   unconnected=mode == "udp-unconnected")
            assert res["sources"] == [fmt(addr)]
        assert res["errors"] == {}
        assert res["by_backend"] == {name: 3}
        assert res["peers"] == ([] if mode == "udp-unconnected" else [fmt(addr)])


def test_mapped_ipv4_uses_v6_socket(lab_module: Lab) -> None:
    res = lab_module.agent("tcp", addr=f"::ffff:{lab_module.backend_addr(2)}", port=PORT, count=2)
    assert res["by_backend"] == {"b2": 2}
    assert res["peers"] == [f"[::ffff:{lab_module.backend_addr(2)}]:{PORT}"]


def test_no_route_out(lab_module: Lab) -> None:
    for ns in lab_module.namespaces:
        for fam in ("-4", "-6"):
            assert lab_module.exec(ns, ["ip", fam, "route", "show", "default"]).stdout.strip() == ""
    for addr in ("10.96.0.10", "fd00:96::10", "::ffff:10.96.0.10"):
        res = lab_module.agent("tcp", addr=addr, port=80, count=2, timeout=1)
        assert res["errors"] == {"ENETUNREACH": 2}, addr
    res = lab_module.agent("udp", addr="10.96.0.10", port=80, count=1, timeout=1)
    assert res["errors"] == {"ENETUNREACH": 1}


def test_backends_are_isolated_from_each_other(lab_module: Lab) -> None:
    res = lab_module.agent("tcp", ns="b1", addr=lab_module.backend_addr(2), port=PORT, count=1)
    assert res["errors"] == {"ENETUNREACH": 1}


def test_rr_and_connrate(lab_module: Lab) -> None:
    rr = lab_module.agent("rr", addr=lab_module.backend_addr(1), port=PORT, duration=0.3, max=200)
    assert rr["count"] > 0 and rr["backend"] == "b1" and rr["rtt_us"][0] > 0
    cr = lab_module.agent("connrate", addr=lab_module.backend_addr(3, 6), port=PORT,
                          duration=0.3, max=50)
    assert 0 < cr["count"] <= 50 and cr["errors"] == {} and cr["by_backend"] == {"b3": cr["count"]}


def test_timed_clients_stop_on_sigterm_and_still_report(lab_module: Lab) -> None:
    import signal
    from netns_lab.lab import agent_argv
    for mode in ("rr", "connrate"):
        p = lab_module.run("cli", agent_argv(mode) + ["--addr", lab_module.backend_addr(1),
                                                     "--port", str(PORT), "--duration", "60",
                                                     "--max", "10000000"],
                           stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
        assert time.monotonic() - t0 < 5, f"{mode} ignored SIGTERM"
        res = json.loads(out)
        assert res["count"] > 0 and res["errors"] == {}, (mode, res)


# ------------------------------------------------------------ processes and cgroup


def test_run_in_cgroup(lab_module: Lab) -> None:
    inside = lab_module.run("cli", ["sleep", "30"], cgroup=True)
    outside = lab_module.run("cli", ["sleep", "30"])
    try:
        deadline = time.monotonic() + 3
        while str(inside.pid) not in (lab_module.cgroup / "cgroup.procs").read_text().split():
            assert time.monotonic() < deadline, "cgroup=True process never joined the lab cgroup"
            time.sleep(0.02)
        assert str(outside.pid) not in (lab_module.cgroup / "cgroup.procs").read_text().split()
        cli_ino = _host.netns_inode(lab_module.client_ns)
        for p in (inside, outside):  # (the launcher enters the namespace, then execs: wait)
            while os.readlink(f"/proc/{p.pid}/ns/net") != f"net:[{cli_ino}]":
                assert time.monotonic() < deadline + 3, "the process never entered the netns"
                time.sleep(0.02)
        assert set(lab_module.pids) >= {inside.pid, outside.pid}
        cg = lab_module.exec("b2", ["cat", "/proc/self/cgroup"], cgroup=True).stdout
        assert f"0::/{lab_module.prefix}\n" in cg
    finally:
        for p in (inside, outside):
            p.terminate()
            p.wait(5)


def test_exec_failure_raises(lab_module: Lab) -> None:
    with pytest.raises(LabError, match="exit 3"):
        lab_module.exec("cli", ["sh", "-c", "echo boom >&2; exit 3"])
    assert lab_module.exec("cli", ["false"], check=False).returncode == 1


def test_set_backend_link(lab: Lab) -> None:
    lab.set_backend_link(2, False)  # backend end down: client route stays, packets vanish
    for fam in (4, 6):
        res = lab.agent("tcp", addr=lab.backend_addr(2, fam), port=PORT, count=1, timeout=0.3)
        assert res["errors"] == {"ETIMEDOUT": 1}
    assert lab.agent("tcp", addr=lab.backend_addr(1), port=PORT, count=1)["by_backend"] == {"b1": 1}
    lab.set_backend_link(2, False, side="client")  # client end down: route gone
    res = lab.agent("tcp", addr=lab.backend_addr(2), port=PORT, count=1, timeout=0.3)
    assert res["errors"] == {"ENETUNREACH": 1}
    lab.set_backend_link(2, True, side="client")
    lab.set_backend_link(2, True)
    for fam in (4, 6):
        res = lab.agent("tcp", addr=lab.backend_addr(2, fam), port=PORT, count=2)
        assert res["by_backend"] == {"b2": 2}, res


# ------------------------------------------------------------ lifecycle and cleanup


def test_validation() -> None:
    with pytest.raises(LabError, match="15 chars"):
        Lab("ml01234567890", backends=3)
    with pytest.raises(LabError, match="out of range"):
        Lab("mlabcdef", backends=2).backend_addr(3)
    with pytest.raises(LabError, match="ipv6=False"):
        Lab("mlabcdef", ipv6=False).backend_addr(1, 6)


def test_down_leaves_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab_ = Lab(backends=2).up()
    try:
        lab_.start_backends(PORT)
        pids = list(lab_.pids)
        sleeper = lab_.run("b1", ["sleep", "300"], cgroup=True)
        # a grandchild nobody recorded: down() finds it through its network namespace
        parent = lab_.run("cli", ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE,
                          text=True)
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        state = json.loads(lab_.state_file.read_text())
        assert {r["pid"] for r in state["pids"]} >= {*pids, sleeper.pid, parent.pid}
        assert leftovers(lab_.prefix)
    finally:
        lab_.down()
    assert leftovers(lab_.prefix) == []
    assert wait_dead([*pids, sleeper.pid, parent.pid, grandchild]) == []
    lab_.down()  # idempotent


def test_up_failure_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")

    def broken(self: Lab, links: object, deadline: float = 3.0) -> None:
        raise LabError("injected failure")

    monkeypatch.setattr(Lab, "_wait_links", broken)
    lab_ = Lab(backends=2)
    with pytest.raises(LabError, match="up failed: injected failure"):
        lab_.up()
    assert leftovers(lab_.prefix) == []


def test_prefix_clash_does_not_touch_existing_lab(lab_module: Lab) -> None:
    with pytest.raises(LabError, match="already exists"):
        Lab(lab_module.prefix, backends=lab_module.backends).up()
    assert lab_module.agent("tcp", addr=lab_module.backend_addr(1), port=PORT)["by_backend"] == {"b1": 1}


CRASHER = textwrap.dedent("""
    import json, sys, time
    from netns_lab.lab import Lab
    lab = Lab(backends=2).up()
    lab.start_backends(8080)
    p = lab.run("cli", ["sleep", "300"], cgroup=True)
    print(json.dumps({"prefix": lab.prefix, "pids": lab.pids}), flush=True)
    time.sleep(300)
""")


def test_crash_then_sweep(lab_module: Lab) -> None:
    child = subprocess.Popen([sys.executable, "-c", CRASHER], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
    finally:
        child.kill()  # the "crash": no down(), no finally in the child
        child.wait(5)
    prefix, pids = info["prefix"], info["pids"]
    assert len(pids) == 3 and leftovers(prefix)
    removed = sweep()
    assert any(r == f"netns {prefix}-cli" for r in removed), removed
    assert f"cgroup {_host.CGROUP_ROOT / prefix}" in removed
    assert leftovers(prefix) == []
    assert wait_dead(pids) == []
    # a lab whose owner (this process) is alive is left alone
    assert lab_module.agent("tcp", addr=lab_module.backend_addr(1), port=PORT)["by_backend"] == {"b1": 1}


def test_sweep_matches_names_exactly(lab_module: Lab) -> None:
    """Names that merely look like lab names survive a sweep."""
    nss = ["mlzz1234-cli", "ml1234567-b1", "ml12345-b1"]
    cgs = [_host.CGROUP_ROOT / n for n in ("ml12345", "ml1234567", "mlabcdeg")]
    try:
        for ns in nss:
            _host.run_cmd(["ip", "netns", "add", ns])
        for cg in cgs:
            cg.mkdir()
        sweep()
        assert all(_host.netns_inode(ns) is not None for ns in nss)
        assert all(cg.is_dir() for cg in cgs)
    finally:
        for ns in nss:
            _host.run_cmd(["ip", "netns", "delete", ns], check=False)
        for cg in cgs:
            if cg.is_dir():
                cg.rmdir()


def test_cli_up_status_down() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    prefix = "mlc11c11"
    cli = [sys.executable, "-m", "netns_lab"]
    try:
        up = subprocess.run([*cli, "up", "--prefix", prefix, "--backends", "1", "--no-ipv6"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert "10.201.1.2" in up.stdout and "fd00" not in up.stdout
        status = subprocess.run([*cli, "status"], cwd=REPO, capture_output=True, text=True,
                                timeout=30)
        assert f"{prefix}: 1 backends, ipv6=False, detached" in status.stdout
        sweep()  # a detached lab survives a plain sweep
        assert _host.netns_inode(f"{prefix}-cli") is not None
        down = subprocess.run([*cli, "down", "--prefix", prefix], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert down.returncode == 0, down.stderr
    finally:
        subprocess.run([*cli, "down", "--prefix", prefix], cwd=REPO, capture_output=True, timeout=60)
    assert leftovers(prefix) == []
