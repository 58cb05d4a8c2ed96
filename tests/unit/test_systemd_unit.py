"""The shipped systemd unit passes `systemd-analyze verify` and says what the daemon does."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "meshd.service"


def test_unit_verifies(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    meshd = REPO / ".venv" / "bin" / "meshd"
    assert meshd.exists(), "run scripts/setup first"
    unit = tmp_path / "meshd.service"  # the install path, pointed at this checkout
    unit.write_text(UNIT.read_text().replace("/usr/bin/meshd", str(meshd)))
    # --man=no: Documentation=man:meshd(8) is installed by the package, not by a checkout
    # (tests/package/test_deb.py checks the installed page)
    r = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and "meshd.service" not in r.stderr, r.stderr


def test_unit_is_notify_with_watchdog_and_least_capabilities():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert line in text
    caps = next(l for l in text.splitlines() if l.startswith("CapabilityBoundingSet="))
    assert set(caps.split("=", 1)[1].split()) <= {
        "CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_SYS_RESOURCE",
        "CAP_SYS_PTRACE"}


def _seconds(text: str, key: str) -> float:
    return float(next(l for l in text.splitlines() if l.startswith(key + "=")).split("=")[1])


def test_stop_timeout_exceeds_the_daemons_own_stop_wait():
    from meshd.daemon import SYNC_STOP_WAIT_SECONDS
    from meshd.sources.etcd_server import STOP_TIMEOUT
    text = UNIT.read_text()
    assert _seconds(text, "TimeoutStopSec") > SYNC_STOP_WAIT_SECONDS + STOP_TIMEOUT
    # the watchdog stops only after syncs have failed past the stuck limit
    from meshd.config import SyncConfig
    assert _seconds(text, "TimeoutStartSec") > SyncConfig().ready_grace_seconds
