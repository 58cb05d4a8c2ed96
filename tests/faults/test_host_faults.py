"""Faults of the host around a running `meshd run` (services file source): its bpffs pins
removed, its cgroup removed and made again, a SIGHUP storm. Each test keeps a client in the
lab's namespace and cgroup connecting through the kernel data plane and says what it lost,
and waits (bounded) for the daemon to converge or to fail loudly (exit non-zero, naming what
is gone, so systemd restarts it). Harness: tests/meshdlib.py. Figures: docs/faults.md."""

from __future__ import annotations

import signal
import time

import pytest

from meshd import names
from meshdlib import ConnectLoop, backends, be, reach, scrape, svc, tail, wait_for
from testlib import BPFFS

VIP = "10.96.0.10"
GROUP = "default/web:http/ipv4"


def start_serving(lab, daemon, *backends_: int) -> None:
    daemon.write(svc(lab, "web", VIP, list(backends_)))
    daemon.start()
    daemon.wait(lambda r: backends(r, GROUP) == {be(lab, i) for i in backends_}
                and (r.get("daemon") or {}).get("pid") == daemon.proc.pid, "first sync")


def log_since(daemon, offset: int) -> str:
    return daemon.log.read_bytes()[offset:].decode(errors="replace")


# ---- 3. bpffs pins removed ------------------------------------------------------------------

REPIN_SECONDS = 15


def test_pins_removed_behind_the_daemons_back(lab, daemon):
    start_serving(lab, daemon, 1, 2)
    held = ConnectLoop(lab, VIP, duration=90, hold=True)
    try:
        time.sleep(0.5)
        pin_dir = names.pin_dir(BPFFS, daemon.instance)
        before = sorted(p.name for p in pin_dir.iterdir())
        offset = daemon.log.stat().st_size
        for p in pin_dir.iterdir():
            p.unlink()
        lost = reach(lab, VIP, count=3)["errors"]
        # the daemon holds its links open: removing their pins detaches nothing
        assert lost == {}, f"new connects failed right after the pins went: {lost}"

        def outcome():
            if daemon.proc.poll() is not None:
                return "exited"
            have = sorted(p.name for p in pin_dir.iterdir()) if pin_dir.is_dir() else []
            if have == before and daemon.report() is not None:
                return "re-pinned"
            return None
        end = time.monotonic() + REPIN_SECONDS
        got = outcome()
        while got is None and time.monotonic() < end:
            time.sleep(0.2)
            got = outcome()
        if got is None:
            have = sorted(p.name for p in pin_dir.iterdir()) if pin_dir.is_dir() else []
            pytest.fail(
                f"{REPIN_SECONDS}s after its {len(before)} pins were removed the daemon (pid "
                f"{daemon.proc.pid}) still runs, did not re-pin (pin dir holds {have}) and "
                f"logged nothing about it: {log_since(daemon, offset)!r}; new connects to the "
                f"VIP failed with {lost} right after the removal and now with "
                f"{reach(lab, VIP, count=3)['errors']}; `meshd services`: "
                f"{daemon.run_cli('services').stderr.strip()}")
        if got == "exited":  # failed loudly: systemd restarts it, the restart serves again
            rc = daemon.proc.returncode
            assert rc != 0 and str(pin_dir) in log_since(daemon, offset), (rc, tail(daemon.log))
            daemon.proc = None
            daemon.start()
            daemon.wait(lambda r: len(backends(r, GROUP)) == 2, "the restarted daemon")
        res = reach(lab, VIP, count=40)
        assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2"}, res
        assert held.running()
        hres = held.stop()
    finally:
        held.close()
    assert hres["errors"] == {} and hres["count"] > 100, hres  # established: never touched


# ---- 4. the cgroup removed (and made again) -------------------------------------------------

def test_cgroup_removed_and_made_again(lab, daemon):
    start_serving(lab, daemon, 1)
    assert reach(lab, VIP)["by_backend"] == {"b1": 30}
    cg = lab.cgroup
    assert (cg / "cgroup.procs").read_text().split() == [], "a lab process is still in it"
    offset = daemon.log.stat().st_size
    cg.rmdir()

    def told() -> str | None:
        """How the daemon told a user: it exited non-zero naming the cgroup, or it runs and
        its log and `meshd services` status name the cgroup."""
        log = log_since(daemon, offset)
        if daemon.proc.poll() is not None:
            return "exited" if daemon.proc.returncode != 0 and str(cg) in log else "exited-0"
        rep = daemon.report()
        status = str((rep or {}).get("daemon") or {})
        return "reported" if str(cg) in log and str(cg) in status else None
    try:
        how = wait_for(told, "the daemon to report the removed cgroup (or exit naming it)", 15,
                       step=0.3, detail=lambda: f"daemon log since the removal: "
                       f"{log_since(daemon, offset)!r}; status: "
                       f"{((daemon.report() or {}).get('daemon'))}")
    finally:
        cg.mkdir(exist_ok=True)  # the lab's teardown and the next steps need it back
    assert how != "exited-0", f"exited 0 without a word: {tail(daemon.log)}"
    if how == "exited":
        daemon.proc = None
        daemon.start()  # systemd's restart: attaches to the new cgroup
    wait_for(lambda: reach(lab, VIP, count=3)["by_backend"] == {"b1": 3},
             "clients of the re-made cgroup to be balanced again", 15, step=0.5,
             detail=lambda: tail(daemon.log))
    assert daemon.stop() == 0


# ---- 5. a SIGHUP storm ----------------------------------------------------------------------

def test_sighup_storm_under_load(lab, daemon):
    """100 SIGHUPs in one second while a client connects and the services file changes in
    the middle: no failed connect, the daemon stays up with its config, the change lands."""
    start_serving(lab, daemon, 1)
    load = ConnectLoop(lab, VIP, duration=90)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        for i in range(100):
            daemon.proc.send_signal(signal.SIGHUP)
            if i == 50:
                daemon.write(svc(lab, "web", VIP, [1, 3]))
            time.sleep(max(0.0, t0 + (i + 1) * 0.01 - time.monotonic()))
        storm = time.monotonic() - t0
        assert storm < 1.5, f"the storm took {storm:.2f}s"
        daemon.wait(lambda r: backends(r, GROUP) == {be(lab, 1), be(lab, 3)},
                    "the change made during the storm", timeout=20)
        time.sleep(0.5)
        res = load.stop()
    finally:
        load.close()
    assert daemon.proc.poll() is None
    assert res["errors"] == {} and res["count"] > 100, res
    assert set(reach(lab, VIP, count=60)["by_backend"]) == {"b1", "b3"}
    fams = scrape(daemon.metrics_url)  # the config's exporter still serves
    assert fams["meshd_dataplane_up"][0].value == 1
    log = daemon.log.read_text()
    assert "SIGHUP: reloading" in log and "reload refused" not in log
    assert "Traceback" not in log, tail(daemon.log)
    print(f"\nSIGHUP storm: 100 signals in {storm:.2f}s, {log.count('SIGHUP: reloading')} "
          f"reloads logged; client: {res['count']} connects, 0 failed")
    assert daemon.stop() == 0
