"""The Debian package, as an SRE uses it (README "Quick start on a VM", docs/install.md), in
a fresh Debian 12 root (debootstrap --variant=minbase, a chroot sharing this kernel):

  apt install ./meshd_0.1.0-1.deb; edit /etc/meshd/meshd.yaml; systemctl enable --now
  meshd; meshd service put / endpoint add; meshd services; traffic from the lab's client
  -> dpkg -i meshd_0.1.0-2.deb while a client connects: 0 failed connections
  -> apt remove: the daemon stops, the pinned data plane keeps serving
  -> apt purge: pins, links, cgroup attachments, state dir, config: all gone
  and apt purge straight from installed: `meshd cleanup` runs in prerm.

No systemd runs in a chroot: `systemctl` there is tests/package/systemctl_shim.py, which
runs the unit's own ExecStart= and waits for READY=1 like systemd, so the maintainer
scripts' deb-systemd-invoke calls act. The daemon gets the lab's instance name and
sub-cgroup through the one file edited (and, belt and braces, a drop-in's Environment=);
it never attaches to the cgroup2 root.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshdlib import ConnectLoop, wait_for
from testlib import BPFFS, TEST_PREFIX, claim, free_ports, release

import pkglib
from debroot import DebRoot

V1, V2 = "0.1.0-1", "0.1.0-2"
VIP = "10.96.0.10"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    """Both versions, built side by side (each is mostly waiting on pip and compression)."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip((V1, V2), pool.map(pkglib.build_deb, (V1, V2))))


@pytest.fixture
def debroot(debs):
    tmp = Path(tempfile.mkdtemp(prefix="meshd-pkg-"))
    root = DebRoot(tmp / "root")
    try:
        pkglib.debian_root(root.path)
        root.mount()
        for v, deb in debs.items():
            shutil.copy(deb, root.file(f"/tmp/meshd_{v}_amd64.deb"))
        # apt runs maintainer scripts with PATH=/usr/sbin:/usr/bin:/sbin:/bin: the stand-in
        # must be /usr/bin/systemctl itself
        root.run("dpkg-divert", "--local", "--rename", "--add", "/usr/bin/systemctl")
        shim = root.file("/usr/bin/systemctl")
        shutil.copy(HERE / "systemctl_shim.py", shim)
        shim.chmod(0o755)
        root.file("/run/systemd/system").mkdir(parents=True, exist_ok=True)
        yield root
    finally:
        try:
            root.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def test_lintian_finds_no_errors(debs, require_tool):
    lintian = require_tool("lintian")
    r = subprocess.run([lintian, "--no-tag-display-limit", str(debs[V1])], capture_output=True,
                       text=True, timeout=300)
    errors = [l for l in r.stdout.splitlines() if l.startswith("E:")]
    assert not errors, "\n".join(errors)
    # the warnings left are the ones docs/install.md explains
    tags = {l.split()[2] for l in r.stdout.splitlines() if l.startswith("W:")}
    documented = (pkglib.REPO / "docs/install.md").read_text()
    assert all(f"`{t}`" in documented for t in tags), tags


def _edit_config(root: DebRoot, instance: str, cgroup: Path) -> None:
    """The one file the quick start edits: instance, cgroup, and loopback ports of our own."""
    cfg = root.file("/etc/meshd/meshd.yaml")
    text = cfg.read_text()
    metrics, = free_ports(1)
    for old, new in (("instance: default\n", f"instance: {instance}\n"),
                     ("# cgroup: /sys/fs/cgroup/unified\n", f"cgroup: {cgroup}\n"),
                     ("  listen: 127.0.0.1:9469\n", f"  listen: 127.0.0.1:{metrics}\n"),
                     ("  listen: 0.0.0.0:10256 ", "  listen: 127.0.0.1:0 ")):
        assert old in text, f"config/meshd.yaml no longer has {old!r}"
        text = text.replace(old, new)
    cfg.write_text(text)
    dropin = root.file("/etc/systemd/system/meshd.service.d/test.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Service]\nEnvironment=MESHD_CGROUP={cgroup} MESHD_INSTANCE={instance}\n")


def _main_pid(root: DebRoot) -> int | None:
    try:
        return int(root.file("/run/meshd.pid").read_text())
    except (OSError, ValueError):
        return None


def _report(root: DebRoot) -> dict | None:
    r = root.run("meshd", "services", "--json", "--kernel-only", "--config",
                 "/etc/meshd/meshd.yaml", check=False, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 else None


def _backends(report: dict | None) -> set[str]:
    for g in (report or {}).get("services", []):
        if g["group"] == "default/web:http/ipv4":
            return {b["backend"] for b in g["backends"]}
    return set()


def _cgroup_progs(cgroup: Path) -> list:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def _links_on(cgroup: Path) -> list:
    cg_id = cgroup.stat().st_ino
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout or "[]")
    return [l for l in links if l.get("cgroup_id") == cg_id]


def _gone(root: DebRoot, instance: str, cgroup: Path) -> None:
    """Nothing of meshd is left: package, files, state, pins, links, attachments, processes."""
    assert root.run("dpkg-query", "-W", "-f=${Status}", "meshd", check=False).stdout in (
        "", "unknown ok not-installed"), "meshd is still known to dpkg"
    for path in ("/usr/lib/meshd", "/usr/bin/meshd", "/etc/meshd", "/var/lib/meshd",
                 "/lib/systemd/system/meshd.service",
                 "/etc/systemd/system/multi-user.target.wants/meshd.service"):
        assert not root.file(path).exists() and not root.file(path).is_symlink(), path
    assert not (BPFFS / "meshd" / instance).exists(), "pins left"
    assert _cgroup_progs(cgroup) == [], "programs still attached to the lab's cgroup"
    assert _links_on(cgroup) == [], "links still on the lab's cgroup"
    assert root.pids() == [], "processes left running in the root"


def test_install_serve_upgrade_remove_purge(lab, debroot, require_tool):
    root = debroot
    instance = TEST_PREFIX + "p" + secrets.token_hex(3)
    claim(instance)
    try:
        _scenario(lab, root, instance, require_tool)
    finally:
        root.kill_all()
        from meshd.dataplane import loader
        loader.remove(BPFFS, instance)
        release(instance)


def _install_and_start(lab, root: DebRoot, instance: str, version: str) -> None:
    root.run("apt-get", "install", "-y", f"/tmp/meshd_{version}_amd64.deb")
    _edit_config(root, instance, lab.cgroup)
    r = root.run("systemctl", "enable", "--now", "meshd", timeout=120)
    assert _main_pid(root), r.stderr


def _scenario(lab, root: DebRoot, instance: str, require_tool) -> None:
    # ---- install: what the package put where; no compiler needed
    _install_and_start(lab, root, instance, V1)
    for path in ("/usr/bin/meshd", "/usr/lib/meshd/bin/python3", "/usr/share/man/man8/meshd.8.gz",
                 "/usr/share/doc/meshd/examples/services.yaml",
                 "/usr/share/doc/meshd/python-packages.txt"):
        assert root.file(path).exists(), path
    # enabled the Debian way (deb-systemd-helper): a symlink, absolute inside the root
    assert root.file("/etc/systemd/system/multi-user.target.wants/meshd.service").is_symlink()
    assert "/etc/meshd/meshd.yaml" in root.run("dpkg-query", "-W", "-f=${Conffiles}",
                                               "meshd").stdout
    assert root.run("sh", "-c", "command -v clang clang-19 cc gcc", check=False).returncode != 0
    assert root.run("meshd", "--version").stdout.strip() == "meshd 0.1.0"
    r = subprocess.run([require_tool("systemd-analyze"), "verify", f"--root={root.path}",
                        "--man=no", "meshd.service"], capture_output=True, text=True)
    assert r.returncode == 0 and "meshd.service" not in r.stderr, r.stderr
    man = subprocess.run(["man", "--warnings", "-l", str(root.file("/usr/share/man/man8/meshd.8.gz"))],
                         capture_output=True, text=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert man.returncode == 0 and not man.stderr and "meshd service" in man.stdout, man.stderr

    # ---- the quick start: register a service, see it, reach it
    cfg = ["--config", "/etc/meshd/meshd.yaml"]
    root.run("meshd", "service", "put", "default/web", "--vip", VIP, "--port", "http=80/TCP", *cfg)
    for i in (1, 2, 3):
        root.run("meshd", "endpoint", "add", "default/web", f"b{i}", "--address",
                 lab.backend_addr(i), "--port", "http=8080", *cfg)
    want = {f"{lab.backend_addr(i)}:8080/TCP" for i in (1, 2, 3)}
    wait_for(lambda: _backends(_report(root)) == want, "the service in the kernel maps", 30,
             step=0.2)
    assert "default/web" in root.run("meshd", "services", *cfg).stdout
    res = lab.agent("tcp", cgroup=True, addr=VIP, port=80, count=30, timeout=2)
    assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2", "b3"}, res

    # ---- upgrade while a client connects: postinst restarts meshd, which adopts the pins
    old_pid = _main_pid(root)
    client = ConnectLoop(lab, VIP, duration=120)
    try:
        time.sleep(1)
        root.run("dpkg", "-i", f"/tmp/meshd_{V2}_amd64.deb", timeout=240)
        new_pid = _main_pid(root)
        assert new_pid and new_pid != old_pid, "the upgrade did not restart the daemon"
        wait_for(lambda: ((_report(root) or {}).get("daemon") or {}).get("pid") == new_pid,
                 "the new daemon to report", 30, step=0.2)
        time.sleep(1)
        result = client.stop()
    finally:
        client.close()
    assert result["count"] > 20 and result["errors"] == {}, result
    assert root.run("dpkg-query", "-W", "-f=${Version}", "meshd").stdout == V2
    log = root.file("/run/systemctl-shim.log").read_text()
    assert "try-restart meshd.service" in log, log
    assert f"instance: {instance}" in root.file("/etc/meshd/meshd.yaml").read_text()

    # ---- remove: the daemon stops, the data plane keeps serving
    pid = _main_pid(root)
    root.run("apt-get", "remove", "-y", "meshd")
    assert "stop meshd.service" in root.file("/run/systemctl-shim.log").read_text()
    wait_for(lambda: pid not in root.pids(), "the daemon to stop", 30)
    assert not root.file("/usr/lib/meshd").exists()
    assert root.file("/etc/meshd/meshd.yaml").exists(), "remove keeps the configuration"
    assert (BPFFS / "meshd" / instance).is_dir()
    res = lab.agent("tcp", cgroup=True, addr=VIP, port=80, count=30, timeout=2)
    assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2", "b3"}, res

    # ---- purge after remove: the pins go (the socket programs detach), state and config too
    root.run("apt-get", "purge", "-y", "meshd")
    _gone(root, instance, lab.cgroup)
    res = lab.agent("tcp", cgroup=True, addr=VIP, port=80, count=3, timeout=2)
    assert res["errors"] and not res["by_backend"], res  # no route out of the lab's client

    # ---- purge straight from installed: prerm runs `meshd cleanup` while meshd is there
    _install_and_start(lab, root, instance, V2)
    wait_for(lambda: _cgroup_progs(lab.cgroup), "programs attached to the lab's cgroup", 30)
    r = root.run("apt-get", "purge", "-y", "meshd")
    assert f"pins and links of instance '{instance}'" in r.stdout + r.stderr, r.stdout
    _gone(root, instance, lab.cgroup)
