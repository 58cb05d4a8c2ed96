"""meshd.registry (the CLI's write side) against a real etcd: services, endpoints, leases,
validation before writing, connection errors, and etcd with auth and with TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from meshd.config import EtcdConfig, load_config
from meshd.errors import RecordError, RegistryError
from meshd.registry import Registry
from meshd.sources.etcd import EtcdSource, close_client, open_client


def svc(ns: str = "shop", name: str = "web", vip: str = "10.96.0.10", **extra: Any) -> dict[str, Any]:
    return {"namespace": ns, "name": name, "vips": [vip], "ports": [{"name": "http", "port": 80}], **extra}


def ep(addr: str = "10.1.0.1", port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"address": addr, "ports": {"http": port}, **extra}


async def all_keys(cfg: EtcdConfig) -> dict[str, bytes]:
    c = await open_client(cfg, cfg.endpoints[0])
    try:
        return {kv.key.decode(): kv.value for kv in (await c.get_prefix(cfg.prefix.encode())).kvs}
    finally:
        await close_client(c)


def test_put_list_delete_service(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            s = await reg.put_service(svc(session_affinity="ClientIP"))
            assert s.key == "shop/web" and s.session_affinity == "ClientIP"
            await reg.put_service(svc(name="api", vip="10.96.0.11"))
            await reg.put_service(svc(vip="10.96.0.12"))  # replaces
            stored = await all_keys(cfg)
            assert json.loads(stored[f"{cfg.prefix}services/shop/web"])["vips"] == ["10.96.0.12"]
            # a broken record written by someone else is listed with the daemon's reason
            c = await open_client(cfg, cfg.endpoints[0])
            await c.put(f"{cfg.prefix}services/shop/broken".encode(), b"{nope")
            await close_client(c)
            listed = await reg.list_services()
            assert [r["key"] for r in listed] == [f"{cfg.prefix}services/shop/{n}" for n in ("api", "broken", "web")]
            assert listed[0]["error"] is None and listed[0]["value"]["name"] == "api"
            assert listed[1]["value"] == "{nope" and "not valid JSON" in listed[1]["error"]
            assert (listed[1]["namespace"], listed[1]["name"]) == ("shop", "broken")

            await reg.add_endpoint("shop", "web", "a", ep("10.1.0.1"))
            await reg.add_endpoint("shop", "web", "b", ep("10.1.0.2"))
            await reg.add_endpoint("shop", "web2", "a", ep("10.1.0.3"))  # another service: prefix is not a match
            assert await reg.delete_service("shop", "web") == 3  # the service key and its 2 endpoints
            assert await reg.delete_service("shop", "web") == 0
            left = await all_keys(cfg)
            assert sorted(left) == [f"{cfg.prefix}endpoints/shop/web2/a", f"{cfg.prefix}services/shop/api",
                                    f"{cfg.prefix}services/shop/broken"]
    etcdlib.run(body())


def test_what_the_registry_writes_is_what_the_source_reads(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            await reg.put_service({**svc(), "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53,
                                                                                     "protocol": "UDP"}],
                                   "vips": ["10.96.0.10", "fd00:96::10"]})
            await reg.add_endpoint("shop", "web", "n1-a", {"address": "fd00::1", "ports": {"http": 8080, "dns": 5353},
                                                           "weight": 3, "zone": "z1", "node": "n1", "ready": True,
                                                           "terminating": False})
            await reg.add_endpoint("shop", "web", "n1-b", ep("10.1.0.2", weight=0))
            src = EtcdSource(cfg)
            async with etcdlib.running(src) as snaps:
                snap = await snaps.wait(lambda s: True)
            assert snap.errors == ()
            (web,) = snap.services
            assert [str(v) for v in web.vips] == ["10.96.0.10", "fd00:96::10"]
            assert [(str(e.address), e.weight, e.zone) for e in web.endpoints] == [("fd00::1", 3, "z1"),
                                                                                  ("10.1.0.2", 0, None)]
    etcdlib.run(body())


def test_endpoint_add_remove_list(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            await reg.put_service(svc())
            assert await reg.add_endpoint("shop", "web", "a", ep("10.1.0.1")) is None  # no ttl: no lease
            await reg.add_endpoint("shop", "web", "b", ep("10.1.0.2", zone="z1"))
            await reg.add_endpoint("shop", "api", "a", ep("10.1.0.3"))  # before its service: allowed (orphan)
            await reg.add_endpoint("dev", "web", "a", ep("10.1.0.4"))
            everything = await reg.list_endpoints()
            assert [(r["namespace"], r["name"], r["endpoint_id"]) for r in everything] == [
                ("dev", "web", "a"), ("shop", "api", "a"), ("shop", "web", "a"), ("shop", "web", "b")]
            assert all(r["error"] is None and r["lease"] is None for r in everything)
            assert len(await reg.list_endpoints("shop")) == 3
            web = await reg.list_endpoints("shop", "web")
            assert [r["value"]["address"] for r in web] == ["10.1.0.1", "10.1.0.2"] and web[1]["value"]["zone"] == "z1"
            assert await reg.remove_endpoint("shop", "web", "a") is True
            assert await reg.remove_endpoint("shop", "web", "a") is False
            assert [r["endpoint_id"] for r in await reg.list_endpoints("shop", "web")] == ["b"]
            with pytest.raises(RecordError):
                await reg.list_endpoints(name="web")
    etcdlib.run(body())


@pytest.mark.parametrize("call, reason", [
    (lambda r: r.put_service(svc(endpoints=[ep()])), "'endpoints' is not allowed"),
    (lambda r: r.put_service(svc(vip="not-an-ip")), "vips[0]: must be an IPv4 or IPv6 address"),
    (lambda r: r.put_service(svc(ns="Shop")), "namespace:"),
    (lambda r: r.put_service(svc(colour="red")), "unknown key"),
    (lambda r: r.put_service(["not", "a", "mapping"]), "must be a mapping"),
    (lambda r: r.add_endpoint("shop", "web", "bad id", ep()), "endpoint id 'bad id'"),
    (lambda r: r.add_endpoint("shop", "web", "", ep()), "endpoint id ''"),
    (lambda r: r.add_endpoint("shop", "web", "x" * 254, ep()), "endpoint id"),
    (lambda r: r.add_endpoint("Shop", "web", "a", ep()), "namespace 'Shop'"),
    (lambda r: r.add_endpoint("shop", "web/x", "a", ep()), "name 'web/x'"),
    (lambda r: r.add_endpoint("shop", "web", "a", ep(weight=-1)), "weight: must be 0-65535"),
    (lambda r: r.add_endpoint("shop", "web", "a", {"ports": {"http": 1}}), "address: required"),
    (lambda r: r.add_endpoint("shop", "web", "a", ep(), ttl=0), "ttl must be"),
    (lambda r: r.add_endpoint("shop", "web", "a", {"address": "10.1.0.1", "ports": {"grpc": 1}}),
     "unknown port name 'grpc'"),  # the service exists and has no such port
])
def test_invalid_input_is_rejected_before_anything_is_written(cfg, etcdlib, call, reason) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            await reg.put_service(svc())
            before = await all_keys(cfg)
            with pytest.raises(RecordError) as err:
                await call(reg)
            assert reason in str(err.value)
            assert await all_keys(cfg) == before
    etcdlib.run(body())


def test_ttl_endpoint_lives_while_kept_alive_and_expires_after(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            await reg.put_service(svc())
            lease = await reg.add_endpoint("shop", "web", "leased", ep(), ttl=2)
            assert lease
            key = f"{cfg.prefix}endpoints/shop/web/leased"
            (listed,) = await reg.list_endpoints("shop", "web")
            assert listed["lease"] == lease
            keeper = asyncio.create_task(reg.keep_alive(lease, 2))
            await asyncio.sleep(3.2)  # longer than the ttl
            assert key in await all_keys(cfg) and not keeper.done()
            keeper.cancel()
            with pytest.raises(asyncio.CancelledError):
                await keeper
            t0 = time.monotonic()
            while key in await all_keys(cfg):
                assert time.monotonic() - t0 < 5, "leased key did not expire"
                await asyncio.sleep(0.1)
            # keep_alive on a lease that is gone says so instead of spinning
            with pytest.raises(RegistryError, match="does not exist any more"):
                await asyncio.wait_for(reg.keep_alive(lease, 1), 3)
            # revoke: the key goes at once (a clean exit of `endpoint add --ttl`)
            lease2 = await reg.add_endpoint("shop", "web", "leased2", ep("10.1.0.2"), ttl=30)
            assert f"{cfg.prefix}endpoints/shop/web/leased2" in await all_keys(cfg)
            await reg.revoke_lease(lease2)
            assert f"{cfg.prefix}endpoints/shop/web/leased2" not in await all_keys(cfg)
    etcdlib.run(body())


def test_unreachable_etcd_names_the_endpoints_and_the_fix(etcdlib) -> None:
    a, b = etcdlib.free_ports(2)
    cfg = EtcdConfig(endpoints=[f"http://127.0.0.1:{a}", f"http://127.0.0.1:{b}"], dial_timeout=2)

    async def body() -> None:
        with pytest.raises(RegistryError) as err:
            async with Registry(cfg):
                pass
        msg = str(err.value)
        assert f"http://127.0.0.1:{a}" in msg and f"http://127.0.0.1:{b}" in msg
        assert "connection refused" in msg and "meshd run" in msg and "etcd.endpoints" in msg
        with pytest.raises(RegistryError, match="not connected"):
            await Registry(cfg).list_services()
    etcdlib.run(body())


def test_the_cli_reaches_the_embedded_etcd_on_its_root_only_socket(tmp_path: Path) -> None:
    from meshd.cli_registry import registry_urls
    from meshd.config import Config
    from meshd.sources.etcd_server import EmbeddedEtcd
    cfg = Config(state_dir=tmp_path, instance="edge")
    assert registry_urls(cfg) == [f"unix://{tmp_path}/edge/etcd-sock/client.sock:1"]
    assert registry_urls(cfg) == [EmbeddedEtcd(tmp_path / "edge" / "etcd").url]  # where the daemon starts it
    assert registry_urls(Config(etcd=EtcdConfig(endpoints=["10.0.0.1:2379"]))) == ["http://10.0.0.1:2379"]
    with pytest.raises(RegistryError, match="no etcd endpoint"):
        Registry(EtcdConfig())
    with pytest.raises(RegistryError, match="no endpoint"):
        EtcdSource(EtcdConfig())
    assert Registry(EtcdConfig(), endpoints=["http://127.0.0.1:1"]).endpoints == ["http://127.0.0.1:1"]


def test_a_local_endpoint_is_refused_before_writing_unless_the_service_allows_it(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            await reg.put_service(svc())
            assert "allow_local_endpoints" not in json.loads((await all_keys(cfg))[f"{cfg.prefix}services/shop/web"])
            for addr in ("127.0.0.1", "169.254.169.254", "fe80::1"):
                with pytest.raises(RecordError, match=f"address {addr} is a .*set allow_local_endpoints: true"):
                    await reg.add_endpoint("shop", "web", "evil", ep(addr, 22))
            assert f"{cfg.prefix}endpoints/shop/web/evil" not in await all_keys(cfg)
            await reg.put_service(svc(allow_local_endpoints=True))
            await reg.add_endpoint("shop", "web", "local", ep("127.0.0.1", 8080))
            stored = await all_keys(cfg)
            assert json.loads(stored[f"{cfg.prefix}services/shop/web"])["allow_local_endpoints"] is True
            assert f"{cfg.prefix}endpoints/shop/web/local" in stored
    etcdlib.run(body())


# ---- auth and TLS ------------------------------------------------------------------------------

def test_username_password_auth(tmp_path: Path, etcdlib, caplog) -> None:
    server = etcdlib.EtcdServer(tmp_path)
    server.start()
    try:
        ctl = server.etcdctl
        ctl("user", "add", "root", "--new-user-password=rootpw")
        ctl("role", "add", "meshd")
        ctl("role", "grant-permission", "meshd", "--prefix=true", "readwrite", "/meshd/")
        ctl("user", "add", "meshd", "--new-user-password=meshdpw")
        ctl("user", "grant-role", "meshd", "meshd")
        ctl("user", "add", "nobody", "--new-user-password=nobodypw")
        ctl("auth", "enable")

        def conf(**kw: Any) -> EtcdConfig:
            return EtcdConfig(endpoints=[server.url], dial_timeout=3, **kw)

        async def body() -> None:
            async with Registry(conf(username="meshd", password="meshdpw")) as reg:
                await reg.put_service(svc())
                await reg.add_endpoint("shop", "web", "a", ep(), ttl=5)
            src = EtcdSource(conf(username="meshd", password="meshdpw"))
            async with etcdlib.running(src) as snaps:
                await snaps.wait(lambda s: [x.key for x in s.services] == ["shop/web"])
                async with Registry(conf(username="meshd", password="meshdpw")) as reg:
                    await reg.add_endpoint("shop", "web", "b", ep("10.1.0.2"))
                await snaps.wait(lambda s: len(s.services[0].endpoints) == 2)
            with pytest.raises(RegistryError, match="check etcd.username and etcd.password"):
                async with Registry(conf(username="meshd", password="wrong")):
                    pass
            with pytest.raises(RegistryError, match="grant the etcd user read/write"):
                async with Registry(conf(username="nobody", password="nobodypw")):
                    pass
            with pytest.raises(RegistryError):
                async with Registry(conf()):  # no credentials at all
                    pass
            assert "plain http" not in caplog.text  # a unix socket: nothing crosses a network
            # etcd.password_file (read by load_config), over plain http through a TCP proxy:
            # it works, and the risk is logged with the fix
            pw = tmp_path / "etcd-password"
            pw.write_text("meshdpw\n")
            pw.chmod(0o600)
            proxy = await etcdlib.TcpProxy(server.url).start()
            try:
                loaded = load_config(None, env={"MESHD_ETCD__ENDPOINTS": proxy.url.removeprefix("http://"),
                                                "MESHD_ETCD__USERNAME": "meshd",
                                                "MESHD_ETCD__PASSWORD_FILE": str(pw)})
                assert loaded.etcd is not None and loaded.etcd.endpoints == [proxy.url]
                async with Registry(loaded.etcd) as reg:
                    assert [r["name"] for r in await reg.list_services()] == ["web"]
            finally:
                await proxy.close()
            assert (f"the password for user meshd goes to {proxy.url} over plain http" in caplog.text
                    and "use an https:// endpoint" in caplog.text)
            assert "meshdpw" not in caplog.text
            # the source never gives up: it reports the reason and keeps retrying
            bad = EtcdSource(conf(username="meshd", password="wrong"))
            task = asyncio.create_task(bad.run(etcdlib.Snapshots()))
            try:
                await etcdlib.until(lambda: bad.last_error is not None, what="an error")
                assert "check etcd.username" in bad.last_error and not bad.connected
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        etcdlib.run(body())
    finally:
        server.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_pki(d: Path) -> None:
    """A CA, a server cert for 127.0.0.1 and a client cert (EC keys: fast)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=meshd-test-ca",
             cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=meshd-test-{name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


def test_tls_with_client_certificates(tmp_path: Path, etcdlib) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    _make_pki(tmp_path)
    client_port, peer_port = etcdlib.free_ports(2)
    url = f"https://127.0.0.1:{client_port}"
    log = open(tmp_path / "etcd.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    proc = subprocess.Popen(
        ["/usr/bin/etcd", "--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"tls=http://127.0.0.1:{peer_port}",
         "--cert-file", str(tmp_path / "server.pem"), "--key-file", str(tmp_path / "server.key"),
         "--client-cert-auth", "--trusted-ca-file", str(tmp_path / "ca.pem"), "--logger", "zap",
         "--log-outputs", "stderr"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        good = EtcdConfig(endpoints=[url], ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "client.pem",
                          key_file=tmp_path / "client.key", dial_timeout=3)

        async def body() -> None:
            deadline = time.monotonic() + 15
            while True:  # wait for etcd (over TLS, with the client cert)
                try:
                    async with Registry(good) as reg:
                        await reg.put_service(svc())
                    break
                except RegistryError:
                    assert proc.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
                    assert time.monotonic() < deadline, "TLS etcd did not come up"
                    await asyncio.sleep(0.1)
            src = EtcdSource(good)
            async with etcdlib.running(src) as snaps:
                await snaps.wait(lambda s: [x.key for x in s.services] == ["shop/web"])
            no_cert = good.model_copy(update={"cert_file": None, "key_file": None})
            with pytest.raises(RegistryError, match=f"{url}.*TLS failed: check etcd.ca_file"):
                async with Registry(no_cert):  # etcd requires a client certificate
                    pass
            plaintext = EtcdConfig(endpoints=[url.replace("https", "http")], dial_timeout=2)
            with pytest.raises(RegistryError, match="if it serves TLS, use an https:// endpoint"):
                async with Registry(plaintext):
                    pass
            missing = good.model_copy(update={"ca_file": tmp_path / "nope.pem"})
            with pytest.raises(RegistryError, match="ca_file .*nope.pem: cannot read"):
                async with Registry(missing):
                    pass
        etcdlib.run(body())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ---- policies ----------------------------------------------------------------------------------

POLICY = {"namespace": "shop", "name": "web-to-db", "from": [{"unit": "web.service"}, {"cgroup": "/lab/", "uid": 1000}],
          "to": [{"service": "db", "ports": [5432, "http"]}]}


def meshd_cli(cfg: EtcdConfig, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    import sys
    env = {"PATH": "/usr/bin:/bin", "MESHD_ETCD__ENDPOINTS": cfg.endpoints[0], "MESHD_ETCD__PREFIX": cfg.prefix,
           "MESHD_ETCD__DIAL_TIMEOUT": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "meshd", "policy", *args, "--config", "/dev/null"],
                          input=stdin, capture_output=True, text=True, timeout=60, env=env, cwd="/")


def test_policy_put_list_delete_and_the_source_reads_what_was_written(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            pol = await reg.put_policy(POLICY)
            assert pol.key == "shop/web-to-db" and pol.to[0].service == "shop/db"
            stored = json.loads((await all_keys(cfg))[f"{cfg.prefix}policies/shop/web-to-db"])
            assert stored == {"namespace": "shop", "name": "web-to-db", "action": "allow",
                              "from": [{"unit": "web.service"}, {"cgroup": "/lab/", "uid": 1000}],
                              "to": [{"service": "shop/db", "ports": [5432, "http"]}]}
            src = EtcdSource(cfg)
            async with etcdlib.running(src) as snaps:
                snap = await snaps.wait(lambda s: s.policies, what="the written policy")
                assert snap.policies == (pol,) and snap.errors == ()
            c = await open_client(cfg, cfg.endpoints[0])
            await c.put(f"{cfg.prefix}policies/shop/broken".encode(), b'{"namespace": "shop"}')
            await close_client(c)
            listed = await reg.list_policies()
            assert [(r["namespace"], r["name"]) for r in listed] == [("shop", "broken"), ("shop", "web-to-db")]
            assert listed[0]["error"].startswith("name: required") and listed[1]["error"] is None
            assert listed[1]["value"] == stored
            assert await reg.delete_policy("shop", "web-to-db") and not await reg.delete_policy("shop", "web-to-db")
            assert list(await all_keys(cfg)) == [f"{cfg.prefix}policies/shop/broken"]
    etcdlib.run(body())


def test_a_bad_policy_is_refused_with_the_reason_and_nothing_is_written(cfg, etcdlib) -> None:
    async def body() -> None:
        async with Registry(cfg) as reg:
            with pytest.raises(RecordError) as err:
                await reg.put_policies([POLICY, {**POLICY, "name": "two", "from": [{"cgroup": "lab"}]}],
                                       where=["f.yaml: record[0]", "f.yaml: record[1]"])
            assert str(err.value) == ("f.yaml: record[1]: from[0].cgroup: must be a path below the cgroup2 mount "
                                      "starting with '/', such as /system.slice/web.service (got 'lab')")
            with pytest.raises(RecordError, match="policy shop/web-to-db is given twice"):
                await reg.put_policies([POLICY, POLICY])
            with pytest.raises(RecordError, match=r"policies/shop/x: to\[0\].ports\[0\]: port numbers must be 1-65535"):
                await reg.put_policy({**POLICY, "name": "x", "to": [{"service": "db", "ports": [0]}]})
            assert await all_keys(cfg) == {}  # the good first record was not written either
    etcdlib.run(body())


def test_the_policy_cli(cfg, tmp_path: Path) -> None:
    good = tmp_path / "p.yaml"
    good.write_text("policies:\n  - namespace: shop\n    name: web-to-db\n    from: [{unit: web.service}]\n"
                    "    to: [{service: db}]\n  - namespace: shop\n    name: no-batch\n    action: deny\n"
                    "    from: [{cgroup: /batch/}]\n    to: [{service: db, ports: [5432]}]\n")
    put = meshd_cli(cfg, "put", str(good))
    assert put.returncode == 0, put.stderr
    assert put.stdout.splitlines() == ["policy shop/web-to-db written", "policy shop/no-batch written"]
    # from stdin, JSON; a bad one: one line with the field and the fix, exit 1, nothing written
    bad = meshd_cli(cfg, "put", "-", stdin=json.dumps({**POLICY, "name": "bad", "action": "permit"}))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "meshd: error: stdin: action: must be 'allow' or 'deny' (got 'permit')"
    listed = meshd_cli(cfg, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "shop/no-batch  deny  from cgroup=/batch/  to shop/db:5432",
        "shop/web-to-db  allow  from unit=web.service  to shop/db"]
    rows = json.loads(meshd_cli(cfg, "list", "--json").stdout)
    assert [r["name"] for r in rows] == ["no-batch", "web-to-db"] and all(r["error"] is None for r in rows)
    assert meshd_cli(cfg, "delete", "shop/no-batch").stdout.strip() == "policy shop/no-batch deleted"
    assert meshd_cli(cfg, "delete", "shop/no-batch").stdout.strip() == "policy shop/no-batch was not registered"
    assert [r["name"] for r in json.loads(meshd_cli(cfg, "list", "--json").stdout)] == ["web-to-db"]
    nofile = meshd_cli(cfg, "put", str(tmp_path / "absent.yaml"))
    assert nofile.returncode == 1 and nofile.stderr.strip().endswith("absent.yaml: no such file")
