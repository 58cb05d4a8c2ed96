"""meshd.sources.etcd_server.EmbeddedEtcd: Debian's etcd on loopback, started and stopped by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
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


def _urls(etcdlib) -> tuple[str, str]:
    c, p = etcdlib.free_ports(2)
    return f"http://127.0.0.1:{c}", f"http://127.0.0.1:{p}"


def test_start_serves_on_loopback_and_stop_ends_the_process(tmp_path: Path, etcdlib) -> None:
    client, peer = _urls(etcdlib)
    etcd = EmbeddedEtcd(tmp_path / "state" / "etcd", client, peer)

    async def body() -> None:
        await etcd.start()
        pid = etcd.pid
        try:
            assert pid and _alive(pid) and etcd.url == client
            await etcd.start()  # already running: no second process
            assert etcd.pid == pid
            assert stat.S_IMODE((tmp_path / "state" / "etcd").stat().st_mode) == 0o700
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


def test_a_used_port_gives_an_error_naming_it(tmp_path: Path, etcd_server, etcdlib) -> None:
    _, peer = _urls(etcdlib)
    second = EmbeddedEtcd(tmp_path / "etcd", etcd_server.url, peer)
    with pytest.raises(RegistryError) as err:
        etcdlib.run(second.start())
    msg = str(err.value)
    assert f"client port {etcd_server.client_port}" in msg and "already in use" in msg
    assert "etcd.embedded_listen" in msg
    assert second.pid is None

    client, _ = _urls(etcdlib)
    third = EmbeddedEtcd(tmp_path / "etcd3", client, f"http://127.0.0.1:{etcd_server.peer_port}")
    with pytest.raises(RegistryError, match=f"peer port {etcd_server.peer_port} .*etcd.embedded_peer_listen"):
        etcdlib.run(third.start())


def test_a_port_taken_after_the_check_is_reported_from_etcds_log(tmp_path: Path, etcd_server, etcdlib,
                                                                  monkeypatch) -> None:
    import meshd.sources.etcd_server as mod
    monkeypatch.setattr(mod, "_port_in_use", lambda host, port: False)  # lose the race on purpose
    _, peer = _urls(etcdlib)
    late = EmbeddedEtcd(tmp_path / "etcd", etcd_server.url, peer)
    with pytest.raises(RegistryError, match=f"client port {etcd_server.client_port} .* already in use"):
        etcdlib.run(late.start())
    assert late.pid is None


@pytest.mark.parametrize("client, peer, reason", [
    ("http://10.1.2.3:2379", "http://127.0.0.1:2380", "not on loopback"),
    ("http://0.0.0.0:2379", "http://127.0.0.1:2380", "not on loopback"),
    ("http://127.0.0.1:2379", "http://192.168.1.1:2380", "peer URL http://192.168.1.1:2380 is not on loopback"),
    ("https://127.0.0.1:2379", "http://127.0.0.1:2380", "must look like http://127.0.0.1:PORT"),
    ("http://127.0.0.1", "http://127.0.0.1:2380", "must look like"),
    ("http://127.0.0.1:2379", "http://127.0.0.1:2379", "same port"),
])
def test_only_loopback_http_urls_are_accepted(tmp_path: Path, client: str, peer: str, reason: str) -> None:
    with pytest.raises(RegistryError, match=reason):
        EmbeddedEtcd(tmp_path, client, peer)


def test_ipv6_loopback_and_config_urls() -> None:
    cfg = EtcdConfig(embedded_listen="[::1]:2379", embedded_peer_listen="[::1]:2380")
    etcd = EmbeddedEtcd(Path("/nonexistent"), cfg.embedded_client_url, cfg.embedded_peer_url)
    assert etcd.url == "http://[::1]:2379"


def test_an_etcd_that_exits_during_start_is_reported_with_its_status(tmp_path: Path, etcdlib) -> None:
    client, peer = _urls(etcdlib)
    etcd = EmbeddedEtcd(tmp_path / "etcd", client, peer, binary="/bin/false")
    with pytest.raises(RegistryError, match="exited with status 1 during start"):
        etcdlib.run(etcd.start())
    missing = EmbeddedEtcd(tmp_path / "etcd", client, peer, binary="/nonexistent/etcd")
    with pytest.raises(RegistryError, match="not installed.*etcd.endpoints"):
        etcdlib.run(missing.start())


def test_an_etcd_left_running_by_a_crashed_daemon_is_stopped_by_its_pid(tmp_path: Path, etcdlib) -> None:
    client, peer = _urls(etcdlib)
    first = EmbeddedEtcd(tmp_path / "etcd", client, peer)
    etcdlib.run(first.start())
    stale = first.pid
    assert stale
    try:
        # the daemon dies without stopping etcd; the next daemon starts with a new object
        second = EmbeddedEtcd(tmp_path / "etcd", client, peer)
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
    client, peer = _urls(etcdlib)
    (tmp_path / "etcd").mkdir(mode=0o700)
    (tmp_path / "etcd.pid").write_text(f"{os.getpid()}\n")  # pytest itself: not an etcd
    etcd = EmbeddedEtcd(tmp_path / "etcd", client, peer)
    etcdlib.run(etcd.start())
    try:
        assert etcd.pid and etcd.pid != os.getpid()
    finally:
        etcdlib.run(etcd.stop())


def test_stop_and_start_are_loop_independent(tmp_path: Path, etcdlib) -> None:
    client, peer = _urls(etcdlib)
    etcd = EmbeddedEtcd(tmp_path / "etcd", client, peer)
    asyncio.run(etcd.start())  # one loop ...
    asyncio.run(etcd.stop())  # ... and another
    assert etcd.pid is None
