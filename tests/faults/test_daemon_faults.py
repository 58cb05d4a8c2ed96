"""Issue 12's silent failures, against a real `meshd run`: a sync that raises is logged,
counted and retried; the systemd watchdog goes quiet only while syncs fail; READY means
installed; one daemon per instance; SIGHUP applies every live key (etcd-only config too);
liveness figures on /metrics and in `meshd services`.

systemd is played by the test: a unix datagram socket as $NOTIFY_SOCKET records READY,
WATCHDOG and STATUS messages exactly as systemd would receive them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml

from meshdlib import Meshd, backends as backends_of, groups, meshd, reach as _reach, svc

VIP = "10.96.0.10"


def reach(lab, vip=VIP, count=30) -> dict:
    return _reach(lab, vip, count)

GROUP = "default/web:http/ipv4"


class FakeSystemd:
    """Receives sd_notify datagrams, timestamped."""

    def __init__(self, tmp):
        self.path = str(tmp / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def env(self, watchdog_s: float | None = None) -> dict:
        e = {"NOTIFY_SOCKET": self.path}
        if watchdog_s:
            e["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        return e

    def times(self, word: str) -> list[float]:
        return [t for t, m in self.messages if word in m]

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    s = FakeSystemd(tmp_path)
    yield s
    s.close()


def set_config(d: Meshd, **changes) -> None:
    doc = yaml.safe_load(d.config.read_text())
    doc.update(changes)
    d.config.write_text(yaml.safe_dump(doc))


def scrape(d: Meshd) -> str:
    return urllib.request.urlopen(d.metrics_url, timeout=5).read().decode()


def metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return None


def test_a_sync_that_raises_is_logged_counted_retried_and_converges(lab, daemon):
    daemon.write(svc(lab, "web", VIP, [1, 2]))
    daemon.start(env={"MESHD_FAULT_SYNC_ERRORS": "3"})
    rep = daemon.wait(lambda r: len(backends_of(r, GROUP)) == 2, "convergence after 3 faults",
                      timeout=30)
    assert set(reach(lab, count=30)["by_backend"]) == {"b1", "b2"}
    log = daemon.log.read_text()
    assert log.count("sync failed in stage apply: InjectedFault") == 3
    text = scrape(daemon)
    assert metric(text, "meshd_sync_errors_total", stage="apply") == 3
    assert metric(text, "meshd_source_up", source="file") == 1
    assert metric(text, "meshd_sync_stuck") == 0
    assert 0 <= metric(text, "meshd_sync_age_seconds") < 30
    assert metric(text, "meshd_map_fill_ratio", map="meshd_svc_v1") > 0
    # every fillable map, LRUs included (Cilium's map pressure), not only the three the
    # daemon counts itself
    for m in ("meshd_revnat_v1", "meshd_stats_v1", "meshd_names_v1"):
        assert metric(text, "meshd_map_fill_ratio", map=m) is not None, m
    assert rep["daemon"]["sync_failing"] is None and rep["daemon"]["stuck"] is None
    # later changes still reach the kernel (the loop did not die)
    daemon.write(svc(lab, "web", VIP, [3]))
    daemon.wait(lambda r: backends_of(r, GROUP) == {"10.201.3.2:8080/TCP"}, "a later change")


def test_watchdog_goes_quiet_while_syncs_keep_failing(lab, daemon, systemd):
    set_config(daemon, sync={"stuck_after_seconds": 2.0})
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start(env={**systemd.env(watchdog_s=0.4), "MESHD_FAULT_SYNC_ERRORS": "100000"})
    time.sleep(6)
    pings = systemd.times("WATCHDOG=1")
    assert pings, "no watchdog ping at all"
    assert not systemd.times("READY=1"), "READY sent although nothing was installed"
    # pinged while young, silent after the stuck limit (2 s) and since
    assert pings[-1] - pings[0] < 4.0 and time.monotonic() - pings[-1] > 1.5, pings
    rep = json.loads(meshd("services", "--json", "--config", str(daemon.config)).stdout)
    assert "syncs have failed for" in rep["daemon"]["stuck"]
    assert metric(scrape(daemon), "meshd_sync_stuck") == 1
    assert "watchdog pings stopped" in daemon.log.read_text()


def test_ready_waits_for_a_slow_first_sync_of_a_reachable_source(lab, daemon, systemd):
    # a grace of 0.5 s: far shorter than reading and installing 2,000 services
    set_config(daemon, sync={"ready_grace_seconds": 0.5})
    n = 2000
    many = [{"namespace": "bulk", "name": f"s{i}", "vips": [f"10.97.{i // 250}.{i % 250 + 1}"],
             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
             "endpoints": [{"address": lab.backend_addr(1), "ports": {"http": 8080}}]}
            for i in range(n)]
    daemon.write(*many)
    set_config(daemon, service_cidrs=["10.96.0.0/12"])
    daemon.start(env=systemd.env())
    end = time.monotonic() + 60
    while not systemd.times("READY=1") and time.monotonic() < end:
        time.sleep(0.1)
    ready = [m for _, m in systemd.messages if "READY=1" in m]
    assert ready and f"STATUS=serving {n} services" in ready[0], systemd.messages


def test_a_second_daemon_on_the_same_instance_refuses_to_start(lab, daemon):
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start()
    daemon.wait(lambda r: backends_of(r, GROUP), "first sync")
    second = subprocess.run([sys.executable, "-m", "meshd", "run", "--config",
                             str(daemon.config)], capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"already run by pid {daemon.proc.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert daemon.proc.poll() is None
    # `meshd cleanup` under a running daemon would pull the data plane out from under it
    # (and its guard would put the pins back over a detached program): refused the same way
    cleanup = meshd("cleanup", "--config", str(daemon.config), check=False)
    assert cleanup.returncode == 1 and f"already run by pid {daemon.proc.pid}" in cleanup.stderr
    assert set(reach(lab, count=20)["by_backend"]) == {"b1"}


def test_sighup_applies_live_keys_and_names_the_restart_ones(lab, daemon, tmp_path):
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start()
    daemon.wait(lambda r: backends_of(r, GROUP), "first sync")
    from testlib import free_port
    new_listen = f"127.0.0.1:{free_port()}"
    set_config(daemon, service_cidrs=["10.100.0.0/16"], log_level="debug",
               metrics={"listen": new_listen}, maglev={"table_size": 2039})
    daemon.proc.send_signal(signal.SIGHUP)
    # the VIP is outside the new service_cidrs: rejected and gone from the kernel
    rep = daemon.wait(lambda r: not backends_of(r, GROUP) and r.get("rejected"),
                      "service_cidrs applied")
    assert "outside service_cidrs" in json.dumps(rep["rejected"]) or rep["rejected"]
    # the status file names the exporter's address once the reload has re-listened (the
    # sync that rejects the VIP can finish before that)
    daemon.wait(lambda r: (r.get("daemon") or {}).get("metrics") == new_listen,
                "the exporter on its new address")
    log = daemon.log.read_text()
    assert "reload: applied service_cidrs, log_level, metrics" in log
    assert "NOT applied (need a restart of meshd): maglev" in log
    assert "meshd_sync_age_seconds" in urllib.request.urlopen(
        f"http://{new_listen}/metrics", timeout=5).read().decode()


def test_metrics_on_port_0_and_off_with_null(lab, daemon):
    set_config(daemon, metrics={"listen": "127.0.0.1:0"})
    daemon.write(svc(lab, "web", VIP, [1]))
    daemon.start()
    rep = daemon.wait(lambda r: (r.get("daemon") or {}).get("metrics"), "the exporter's port")
    addr = rep["daemon"]["metrics"]
    assert addr.startswith("127.0.0.1:") and int(addr.rsplit(":", 1)[1]) > 0
    assert f"metrics on http://{addr}/metrics" in daemon.log.read_text()
    assert "meshd_source_up" in urllib.request.urlopen(f"http://{addr}/metrics",
                                                       timeout=5).read().decode()
    text = meshd("services", "--config", str(daemon.config)).stdout
    assert f"metrics http://{addr}/metrics" in text and "sources: file up" in text
    set_config(daemon, metrics={"listen": None})
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait(lambda r: (r.get("daemon") or {}).get("metrics") is None, "exporter off")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{addr}/metrics", timeout=2)


def test_a_full_frontend_map_rejects_the_overflow_reports_it_and_serves_the_rest(lab, daemon):
    set_config(daemon, maps={"max_frontends": 16, "max_backends": 64})
    many = [svc(lab, f"s{i:02d}", f"10.96.1.{i + 1}", [1 + i % 3]) for i in range(20)]
    daemon.write(*many)
    daemon.start()
    rep = daemon.wait(lambda r: len(groups(r)) == 16 and r.get("errors"),
                      "16 services in, 4 reported", timeout=30)
    assert sorted(rep["errors"]) == [f"default/s{i}:http/ipv4" for i in range(16, 20)]
    assert all("the map is full" in e for e in rep["errors"].values()), rep["errors"]
    text = scrape(daemon)
    assert metric(text, "meshd_map_fill_ratio", map="meshd_svc_v1") == 1.0
    assert metric(text, "meshd_sync_errors_total", stage="dataplane") >= 4
    assert metric(text, "meshd_sync_stuck") == 0  # a full map is the data's problem
    for i in (0, 7, 15):  # installed ones serve
        assert reach(lab, f"10.96.1.{i + 1}", count=5)["errors"] == {}
    # one not installed: no translation at all (never a half-written service)
    assert reach(lab, "10.96.1.20", count=2)["errors"] == {"ENETUNREACH": 2}
    assert "error: default/s19:http/ipv4:" in meshd("services", "--config",
                                                    str(daemon.config)).stdout
    # two services leave: the retries (with backoff) take the room, no other change needed
    daemon.write(*many[2:])
    rep = daemon.wait(lambda r: len(groups(r)) == 16 and len(r.get("errors") or {}) == 2,
                      "two freed slots taken by the retried services", timeout=45)
    assert "default/s16:http/ipv4" in groups(rep) and "default/s17:http/ipv4" in groups(rep)
