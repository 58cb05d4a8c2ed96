"""meshd.sources.etcd_server.EmbeddedEtcd: Debian's etcd on root-only unix sockets, started and stopped by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from meshd.config import EtcdConfig
from meshd.errors import RegistryError
from meshd.registry import Registry
from meshd.sources.etcd_server import EmbeddedEtcd


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie has no cmdline
    except OSError:
        return False


def _tcp_listeners(pid: int) -> list[str]:
    """The TCP ports process `pid` listens on (from /proc/net/tcp{,6} and its fds)."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A":  # LISTEN
                inodes[cols[9]] = cols[1]
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            out.append(inodes[link[8:-1]])
    return out


def test_start_serves_on_a_root_only_unix_socket_and_stop_ends_the_process(tmp_path: Path, etcdlib) -> None:
    etcd = EmbeddedEtcd(tmp_path / "state" / "etcd")
    sock_dir = tmp_path / "state" / "etcd-sock"

    async def body() -> None:
        await etcd.start()
        pid = etcd.pid
        try:
            assert pid and _alive(pid) and etcd.url == f"unix://{sock_dir}/client.sock:1"
            await etcd.start()  # already running: no second process
            assert etcd.pid == pid
            assert stat.S_IMODE((tmp_path / "state" / "etcd").stat().st_mode) == 0o700
            st = sock_dir.stat()
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
            assert stat.S_ISSOCK((sock_dir / "client.sock:1").stat().st_mode)
            assert stat.S_ISSOCK((sock_dir / "peer.sock:2").stat().st_mode)
            assert _tcp_listeners(pid) == [], "the embedded etcd must not listen on TCP at all"
            assert (tmp_path / "state" / "etcd.pid").read_text().strip() == str(pid)
            assert "starting an etcd server" in (tmp_path / "state" / "etcd.log").read_text()
            cfg = EtcdConfig(endpoints=[etcd.url], dial_timeout=3)
            async with Registry(cfg) as reg:
                await reg.put_service({"namespace": "a", "name": "b", "vips": ["10.96.0.1"],
                                       "ports": [{"name": "p", "port": 1}]})
        finally:
            await etcd.stop()
        assert etcd.pid is None and not _alive(pid)
        assert not (tmp_path / "state" / "etcd.pid").exists()
        await etcd.stop()  # idempotent
        await etcd.start()  # same data dir: the data is still there
        try:
            async with Registry(EtcdConfig(endpoints=[etcd.url], dial_timeout=3)) as reg:
                assert [r["key"] for r in await reg.list_services()] == ["/meshd/services/a/b"]
        finally:
            await etcd.stop()
    etcdlib.run(body())


def test_a_data_dir_made_by_the_old_tcp_listener_is_served_on_the_socket(tmp_path: Path, etcdlib) -> None:
    """Upgrade: an embedded etcd data dir created when it listened on 127.0.0.1 keeps its data."""
    import subprocess
    c, p = etcdlib.free_ports(2)
    data = tmp_path / "etcd"
    old = subprocess.Popen(["/usr/bin/etcd", "--name", "meshd", "--data-dir", str(data),
                            "--listen-client-urls", f"http://127.0.0.1:{c}",
                            "--advertise-client-urls", f"http://127.0.0.1:{c}",
                            "--listen-peer-urls", f"http://127.0.0.1:{p}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                            "--initial-cluster", f"meshd=http://127.0.0.1:{p}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ctl = ["/usr/bin/etcdctl", f"--endpoints=127.0.0.1:{c}", "--dial-timeout=2s"]
        for _ in range(100):
            if subprocess.run(ctl + ["put", "/meshd/old", "kept"], capture_output=True,
                              env={"ETCDCTL_API": "3"}, timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the old-style etcd did not start")
    finally:
        old.terminate()
        old.wait(10)
    etcd = EmbeddedEtcd(data)

    async def body() -> None:
        await etcd.start()
        try:
            async with Registry(EtcdConfig(endpoints=[etcd.url], dial_timeout=3)) as reg:
                got = await reg._need().get(b"/meshd/old")
                assert got is not None and got.value == b"kept"
        finally:
            await etcd.stop()
    etcdlib.run(body())


def test_a_socket_someone_else_serves_is_not_taken_over(tmp_path: Path, etcdlib) -> None:
    import socket as so
    etcd = EmbeddedEtcd(tmp_path / "etcd")
    etcd.socket_dir.mkdir(mode=0o700)
    squatter = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    try:
        squatter.bind(str(etcd.client_socket))
        squatter.listen()
        with pytest.raises(RegistryError, match="another process already serves .*client.sock:1"):
            etcdlib.run(etcd.start())
        assert etcd.pid is None
    finally:
        squatter.close()


def test_a_socket_dir_owned_by_another_user_is_refused_and_a_loose_mode_is_fixed(tmp_path: Path,
                                                                                 etcdlib) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd", binary="/bin/false")
    etcd.socket_dir.mkdir(mode=0o755)
    os.chown(etcd.socket_dir, 65534, 65534)  # nobody: could swap the socket for its own
    with pytest.raises(RegistryError, match="owned by uid 65534.*remove it"):
        etcdlib.run(etcd.start())
    os.chown(etcd.socket_dir, 0, 0)
    os.chmod(etcd.socket_dir, 0o777)
    with pytest.raises(RegistryError, match="exited with status 1"):  # /bin/false: after the dir checks
        etcdlib.run(etcd.start())
    assert stat.S_IMODE(etcd.socket_dir.stat().st_mode) == 0o700


def test_a_socket_path_too_long_for_unix_sockets_is_refused_with_the_fix() -> None:
    with pytest.raises(RegistryError, match="more than the 107 a unix socket allows; set state_dir"):
        EmbeddedEtcd(Path("/" + "d" * 100) / "etcd")


def test_old_client_and_peer_url_arguments_are_ignored(tmp_path: Path) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_url="http://127.0.0.1:2379", peer_url="http://127.0.0.1:2380")
    assert etcd.url == f"unix://{tmp_path}/etcd-sock/client.sock:1"
    assert not any("127.0.0.1" in a for a in etcd._command())


def test_an_etcd_that_exits_during_start_is_reported_with_its_status(tmp_path: Path, etcdlib) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd", binary="/bin/false")
    with pytest.raises(RegistryError, match="exited with status 1 during start"):
        etcdlib.run(etcd.start())
    missing = EmbeddedEtcd(tmp_path / "etcd", binary="/nonexistent/etcd")
    with pytest.raises(RegistryError, match="not installed.*etcd.endpoints"):
        etcdlib.run(missing.start())


def test_an_etcd_left_running_by_a_crashed_daemon_is_stopped_by_its_pid(tmp_path: Path, etcdlib) -> None:
    first = EmbeddedEtcd(tmp_path / "etcd")
    etcdlib.run(first.start())
    stale = first.pid
    assert stale
    try:
        # the daemon dies without stopping etcd; the next daemon starts with a new object
        second = EmbeddedEtcd(tmp_path / "etcd")
        etcdlib.run(second.start())
        try:
            assert second.pid and second.pid != stale
            first._proc.wait(10)  # it was ours in this test: reap it
            assert not _alive(stale)
        finally:
            etcdlib.run(second.stop())
    finally:
        if _alive(stale):
            os.kill(stale, signal.SIGKILL)
        first._proc = None


def test_an_unrelated_process_in_a_stale_pid_file_is_left_alone(tmp_path: Path, etcdlib) -> None:
    (tmp_path / "etcd").mkdir(mode=0o700)
    (tmp_path / "etcd.pid").write_text(f"{os.getpid()}\n")  # pytest itself: not an etcd
    etcd = EmbeddedEtcd(tmp_path / "etcd")
    etcdlib.run(etcd.start())
    try:
        assert etcd.pid and etcd.pid != os.getpid()
    finally:
        etcdlib.run(etcd.stop())


def test_stop_and_start_are_loop_independent(tmp_path: Path, etcdlib) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd")
    asyncio.run(etcd.start())  # one loop ...
    asyncio.run(etcd.stop())  # ... and another
    assert etcd.pid is None


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def test_an_unprivileged_user_cannot_register_an_endpoint(etcdlib) -> None:
    """Issue 12 item 5: as `nobody`, one `etcdctl put` into the embedded etcd used to join a
    service registered by root. Now neither etcdctl nor `meshd endpoint add` gets through."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    from meshd.cli_registry import registry_urls
    from meshd.config import Config
    from meshd.sources.etcd_server import data_dir_of

    # a world-traversable root, so that only meshd's own modes stand between nobody and etcd
    root = Path(tempfile.mkdtemp(prefix="meshd-sec-"))
    root.chmod(0o755)
    state = root / "state"
    etcd = EmbeddedEtcd(data_dir_of(state, "edge"))
    url = registry_urls(Config(state_dir=state, instance="edge"))[0]
    evil = json.dumps({"address": "10.1.0.66", "ports": {"http": 22}})
    try:
        etcdlib.run(etcd.start())
        assert url == etcd.url

        async def register() -> None:
            async with Registry(EtcdConfig(endpoints=[url], dial_timeout=3)) as reg:
                await reg.put_service({"namespace": "shop", "name": "web", "vips": ["10.96.0.10"],
                                       "ports": [{"name": "http", "port": 80}]})
                await reg.add_endpoint("shop", "web", "good", {"address": "10.1.0.1", "ports": {"http": 8080}})
        etcdlib.run(register())
        assert stat.S_IMODE((state / "edge").stat().st_mode) & 0o005 == 0o005  # traversable: not the barrier

        env = {"PATH": "/usr/bin:/bin", "ETCDCTL_API": "3"}
        put = subprocess.run(AS_NOBODY + ["/usr/bin/etcdctl", f"--endpoints={url}", "--dial-timeout=2s",
                                          "put", "/meshd/endpoints/shop/web/evil", evil],
                             capture_output=True, text=True, timeout=30, env=env, cwd="/")
        assert put.returncode != 0, f"nobody wrote to the registry: {put.stdout}"
        cli = subprocess.run(AS_NOBODY + [sys.executable, "-m", "meshd", "endpoint", "add", "shop/web", "evil",
                                          "--address", "10.1.0.66", "--port", "http=22"],
                             capture_output=True, text=True, timeout=30, cwd="/",
                             env={**env, "MESHD_STATE_DIR": str(state), "MESHD_INSTANCE": "edge",
                                  "MESHD_ETCD__DIAL_TIMEOUT": "2"})
        assert cli.returncode == 1, cli.stdout + cli.stderr
        assert "permission denied; the embedded etcd can only be reached by root" in cli.stderr
        assert "run this command as root" in cli.stderr and "Traceback" not in cli.stderr

        async def endpoints() -> list[str]:
            async with Registry(EtcdConfig(endpoints=[url], dial_timeout=3)) as reg:
                return [r["key"] for r in await reg.list_endpoints("shop", "web")]
        assert etcdlib.run(endpoints()) == ["/meshd/endpoints/shop/web/good"]
    finally:
        etcdlib.run(etcd.stop())
        shutil.rmtree(root, ignore_errors=True)
