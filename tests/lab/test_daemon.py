"""`meshd run` as users run it: a real daemon process, a services file, signals, the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import yaml

from meshdlib import backends as backends_of, meshd, reach as _reach, svc
from testlib import BPFFS

VIP = "10.96.0.10"


def reach(lab, vip=VIP, count=30) -> dict:
    return _reach(lab, vip, count)


def test_bad_entry_is_reported_with_position_and_skipped(lab, daemon):
    good = svc(lab, "web", VIP, [1, 2])
    bad = svc(lab, "broken", "10.96.0.11", [3])
    bad["ports"][0]["port"] = 70000
    outside = svc(lab, "outside", "192.168.77.1", [3])  # not in service_cidrs
    daemon.write(good, bad, outside)
    daemon.start()
    rep = daemon.wait(lambda r: r.get("rejected") and r["services"], "first sync")
    reasons = {r["where"]: r["reason"] for r in rep["rejected"]}
    assert any("services[1] (default/broken)" in w and "ports[0].port: must be 1-65535" in r
               for w, r in reasons.items()), reasons
    assert any("default/outside" in w and "service_cidrs" in r for w, r in reasons.items())
    assert [g["group"] for g in rep["services"]] == ["default/web:http/ipv4"]
    assert set(reach(lab)["by_backend"]) == {"b1", "b2"}
    text = meshd("services", "--config", str(daemon.config)).stdout
    assert "rejected:" in text and "ports[0].port" in text


def test_file_edit_and_sighup_reach_the_kernel(lab, daemon):
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start()
    daemon.wait(lambda r: backends_of(r, "default/web:http/ipv4") == {"10.201.1.2:8080/TCP"},
                "first sync")
    daemon.write(svc(lab, "web", VIP, [1, 3]))  # picked up by the file watch
    daemon.wait(lambda r: len(backends_of(r, "default/web:http/ipv4")) == 2, "file watch")
    assert set(reach(lab, count=60)["by_backend"]) == {"b1", "b3"}
    daemon.write(svc(lab, "web", VIP, [2]))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait(lambda r: backends_of(r, "default/web:http/ipv4") == {"10.201.2.2:8080/TCP"},
                "SIGHUP reload")
    assert reach(lab)["by_backend"] == {"b2": 30}


def test_broken_file_keeps_serving_what_the_kernel_has(lab, daemon):
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start()
    daemon.wait(lambda r: r["services"], "first sync")
    daemon.write(raw="services: [ {unclosed\n")
    rep = daemon.wait(lambda r: (r.get("daemon") or {}).get("source_error"), "source error")
    assert "services.yaml" in rep["daemon"]["source_error"]
    assert reach(lab)["by_backend"] == {"b1": 30}


def test_sigterm_leaves_the_data_plane_serving_and_restart_adopts_it(lab, daemon):
    daemon.write(svc(lab, "web", VIP, [1, 2, 3]))
    daemon.start()
    daemon.wait(lambda r: len(backends_of(r, "default/web:http/ipv4")) == 3, "first sync")
    assert daemon.stop() == 0
    assert set(reach(lab, count=60)["by_backend"]) == {"b1", "b2", "b3"}  # no daemon
    # a new daemon adopts the pins; a client connecting all through the restart sees no error
    client = lab.run("cli", [sys.executable, "-m", "netns_lab.agent", "connrate", "--addr", VIP,
                             "--port", "80", "--duration", "6", "--max", "200000",
                             "--timeout", "2"],
                     cgroup=True, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    daemon.start()
    daemon.wait(lambda r: (r.get("daemon") or {}).get("pid") == daemon.proc.pid, "restart sync")
    assert client.poll() is None, "the client must still be connecting after the restart"
    out, _ = client.communicate(timeout=60)
    res = json.loads(out)
    assert res["errors"] == {} and res["count"] > 1000
    assert set(res["by_backend"]) == {"b1", "b2", "b3"}
    from meshd import names
    assert f"adopted {len(names.SOCK_LB_MAPS)} pinned maps" in daemon.log.read_text()


def test_kill_9_and_cleanup(lab, daemon):
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start()
    daemon.wait(lambda r: r["services"], "first sync")
    daemon.stop(signal.SIGKILL)
    assert reach(lab)["by_backend"] == {"b1": 30}  # pinned: survives a crash
    pin_dir = BPFFS / "meshd" / daemon.instance
    assert pin_dir.is_dir()
    out = meshd("cleanup", "--config", str(daemon.config)).stdout
    assert out.startswith("removed ") and not pin_dir.exists()
    assert reach(lab, count=3)["errors"] == {"ENETUNREACH": 3}
    r = meshd("services", "--config", str(daemon.config), check=False)
    assert r.returncode == 1 and "is `meshd run` started?" in r.stderr


def test_bad_config_is_one_line_naming_the_key(tmp_path):
    cfg = tmp_path / "meshd.yaml"
    cfg.write_text("maglev:\n  table_size: 1000\nbogus: 1\n")
    r = meshd("run", "--config", str(cfg), check=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("meshd: error: ")
    assert "bogus" in r.stderr and "table_size" in r.stderr


def test_services_flags_drift_between_kernel_and_sources(lab, daemon):
    daemon.write(svc(lab, "web", VIP, [1]), svc(lab, "old", "10.96.0.11", [2]))
    daemon.start()
    # the first sync is over once the daemon has stamped it. `meshd services` reads the kernel
    # first and the status file after, so one report can pair a mid-sync kernel view (no
    # frontends yet) with the stamp of the sync that finished in between: wait for both
    rep = daemon.wait(lambda r: len(r["services"]) == 2 and (r.get("daemon") or {}).get("synced_at")
                      and all(g["drift"] == [] for g in r["services"]), "first sync, no drift")
    assert all(g["drift"] == [] for g in rep["services"]), rep["services"]
    assert daemon.stop() == 0
    # while no daemon runs, the sources change: the kernel is now behind them
    daemon.write(svc(lab, "web", VIP, [1, 3]), svc(lab, "new", "10.96.0.12", [2]))
    by = {g["group"]: g for g in daemon.services()["services"]}
    assert by["default/web:http/ipv4"]["drift"] == [
        f"backends: -{lab.backend_addr(3)}:8080/TCP (+ in the kernel only, - desired only)"]
    assert by["default/old:http/ipv4"]["drift"] == [
        "not desired: no source has it (stale kernel entry)"]
    assert by["default/new:http/ipv4"]["drift"] == ["not in the kernel"]
    text = meshd("services", "--config", str(daemon.config)).stdout
    assert "DRIFT" in text and "drift: not in the kernel" in text
    daemon.start()  # a daemon converges the kernel: no drift left
    daemon.wait(lambda r: all(not g["drift"] for g in r["services"])
                and len(r["services"]) == 2, "convergence")


def test_systemd_notify_ready_after_first_sync_and_watchdog_pings(lab, daemon, tmp_path):
    import socket
    daemon.write(svc(lab, "web", VIP, [1]))
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        daemon.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
        got: list[str] = []
        while not any("READY=1" in m for m in got) or \
                sum("WATCHDOG=1" in m for m in got) < 2:
            got.append(sock.recv(4096).decode())
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=serving 1 services" in ready
        # READY came after the first sync: the service was in the kernel by then
        assert backends_of(daemon.services(), "default/web:http/ipv4") == {
            f"{lab.backend_addr(1)}:8080/TCP"}
        assert daemon.stop() == 0
        sock.settimeout(0.5)
        after = []
        try:
            while True:
                after.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any("STOPPING=1" in m for m in after), after


def test_scraping_the_daemon_agrees_with_what_the_client_measured(lab, daemon):
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    daemon.write(svc(lab, "web", VIP, [1, 2]))
    daemon.start()
    daemon.wait(lambda r: r["services"], "first sync")
    res = reach(lab, count=300)
    assert res["errors"] == {}
    listen = yaml.safe_load(daemon.config.read_text())["metrics"]["listen"]
    body = urllib.request.urlopen(f"http://{listen}/metrics", timeout=5).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    svc_labels = {"namespace": "default", "service": "web"}

    def samples(family, suffix, **labels):
        return [s for s in fams[family].samples if s.name == family + suffix
                and all(s.labels.get(k) == v for k, v in {**svc_labels, **labels}.items())]

    hist = "meshd_service_connect_latency_seconds"
    (count,) = samples(hist, "_count")
    assert count.value == 300  # every connection the client made, no more
    per_backend = samples("meshd_backend_connect_latency_seconds", "_count")
    assert sorted(s.value for s in per_backend) == sorted(res["by_backend"].values())
    # the kernel's median connect latency lies in the same log2 range as the client's own
    buckets = sorted((float(s.labels["le"]), s.value) for s in samples(hist, "_bucket"))
    kernel_p50 = next(le for le, c in buckets if c >= 150)
    client_p50 = res["connect_us"][0] * 1e-6
    assert client_p50 / 4 <= kernel_p50 <= client_p50 * 4, (kernel_p50, client_p50)
    assert fams["meshd_sync_lag_seconds"].samples[0].value >= 0


def test_unknown_tc_interface_fails_fast_naming_it(lab, daemon):
    cfg = yaml.safe_load(daemon.config.read_text())
    cfg["tc"] = {"interfaces": ["nosuchif0"]}  # never a real interface: nothing is attached
    daemon.config.write_text(yaml.safe_dump(cfg))
    daemon.write(svc(lab, "web", VIP, [1]))
    r = meshd("run", "--config", str(daemon.config), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nosuchif0" in r.stderr and "tc.interfaces" in r.stderr
