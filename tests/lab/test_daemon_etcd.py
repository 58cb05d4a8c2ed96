"""`meshd run` with etcd as the registry, end to end: a real daemon process, a real etcd
(the daemon's embedded one, or one of the test's own), the `meshd service|endpoint` CLI, and
lab traffic through the kernel data plane. Faults a user meets: leases expiring, etcd
restarting, history compacted while the daemon was away, junk in the registry, a crash.

The harness (Meshd, Etcd, TcpProxy, the fixtures) is tests/meshdlib.py.
"""

from __future__ import annotations

import json
import stat
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import yaml

from meshdlib import (PREFIX, Meshd, TcpProxy, alive, backends, be, clean_env, cmdline,
                      embedded_cfg, group, groups, no_drift, reach, tail)

VIP_A, VIP_B, VIP_C, VIP_D = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"


def test_embedded_etcd_cli_registration_reaches_traffic_and_sigterm_stops_etcd(lab, make_meshd):
    m = make_meshd(embedded_cfg())
    m.start()
    rep = m.wait(m.synced, "first sync from the embedded etcd")
    etcd_pid = m.embedded_etcd_pid()
    assert etcd_pid is not None, f"no embedded etcd on {m.etcd_data}:\n{tail(m.log)}"
    url = f"unix://{m.state_dir}/{m.instance}/etcd-sock/client.sock:1"  # root only, no TCP port
    assert rep["daemon"]["etcd"] == [url]
    assert f"pid {etcd_pid}" in m.log.read_text()

    out = m.cli("service", "put", "default/web", "--vip", VIP_A, "--port", "http=80/TCP")
    assert "service default/web written" in out
    rep = m.wait(lambda r: group("web") in groups(r), "the service in the kernel")
    assert backends(rep, group("web")) == set()
    assert reach(lab, VIP_A, count=3)["errors"] == {"ECONNREFUSED": 3}  # no backend yet

    m.cli("endpoint", "add", "default/web", "b1", "--address", lab.backend_addr(1),
          "--port", "http=8080")
    m.wait(lambda r: backends(r, group("web")) == {be(lab, 1)}, "endpoint b1")
    assert reach(lab, VIP_A)["by_backend"] == {"b1": 30}

    m.cli("endpoint", "add", "default/web", "b2", "--address", lab.backend_addr(2),
          "--port", "http=8080")
    m.wait(lambda r: backends(r, group("web")) == {be(lab, 1), be(lab, 2)}, "endpoint b2")
    res = reach(lab, VIP_A, count=60)
    assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2"}
    full = m.report(kernel_only=False)  # the CLI reads etcd too: the kernel equals it
    assert no_drift(full) and groups(full) == {group("web")}, full

    assert "removed" in m.cli("endpoint", "remove", "default/web", "b1")
    m.wait(lambda r: backends(r, group("web")) == {be(lab, 2)}, "b1 removed")
    assert reach(lab, VIP_A)["by_backend"] == {"b2": 30}

    assert "deleted 2 keys" in m.cli("service", "delete", "default/web")
    m.wait(lambda r: group("web") not in groups(r), "the service deleted")
    assert reach(lab, VIP_A, count=3)["errors"] == {"ENETUNREACH": 3}  # VIP not translated

    assert m.stop() == 0
    assert not alive(etcd_pid), f"embedded etcd {etcd_pid} outlived meshd: {cmdline(etcd_pid)}"
    assert not m.etcd_pid_file.exists()
    assert "embedded etcd: stopped pid" in m.log.read_text()


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def test_an_unprivileged_user_cannot_register_an_endpoint_of_roots_service(lab, make_meshd, workdir):
    """Issue 12 item 5, as a new user tried it: as `nobody`, one `etcdctl put` of an endpoint
    into the embedded etcd joined a service registered by root and took a share of its
    connections. Now the registry is only reachable by root: the put and `meshd endpoint add`
    fail, and the data plane keeps sending every connection to root's backend."""
    workdir.chmod(0o755)  # traversable by nobody, so that only meshd's own modes protect etcd
    m = make_meshd(embedded_cfg())
    m.config.chmod(0o644)
    m.start()
    rep = m.wait(m.synced, "first sync from the embedded etcd")
    url = rep["daemon"]["etcd"][0]  # where the daemon itself reaches its registry
    m.cli("service", "put", "default/web", "--vip", VIP_A, "--port", "http=80/TCP")
    m.cli("endpoint", "add", "default/web", "b1", "--address", lab.backend_addr(1), "--port", "http=8080")
    m.wait(lambda r: backends(r, group("web")) == {be(lab, 1)}, "root's endpoint b1")

    evil = json.dumps({"address": lab.backend_addr(2), "ports": {"http": 8080}})
    env = {"PATH": "/usr/bin:/bin", "ETCDCTL_API": "3"}
    put = subprocess.run(AS_NOBODY + ["/usr/bin/etcdctl", f"--endpoints={url}", "--dial-timeout=2s",
                                      "put", f"{PREFIX}endpoints/default/web/evil", evil],
                         capture_output=True, text=True, timeout=30, env=env, cwd="/")
    assert put.returncode != 0, f"nobody wrote an endpoint into {url}: {put.stdout}"
    cli = subprocess.run(AS_NOBODY + [sys.executable, "-m", "meshd", "endpoint", "add", "default/web", "evil",
                                      "--address", lab.backend_addr(2), "--port", "http=8080",
                                      "--config", str(m.config)],
                         capture_output=True, text=True, timeout=30, env=env, cwd="/")
    assert cli.returncode == 1 and "can only be reached by root" in cli.stderr, cli.stderr + cli.stdout

    sock_dir = m.state_dir / m.instance / "etcd-sock"
    st = sock_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    assert stat.S_IMODE(m.etcd_data.stat().st_mode) == 0o700
    etcd_pid = m.embedded_etcd_pid()
    assert etcd_pid is not None and not any(a.startswith(("http://", "https://")) for a in cmdline(etcd_pid))

    time.sleep(1.0)  # what a successful put would have needed to reach the kernel
    assert backends(m.report(), group("web")) == {be(lab, 1)}
    assert reach(lab, VIP_A, count=60)["by_backend"] == {"b1": 60}
    assert "evil" not in m.cli("endpoint", "list", "default/web")
    assert m.stop() == 0



def test_lease_expiry_after_a_crash_and_revoke_on_a_clean_stop(lab, make_meshd):
    m = make_meshd(embedded_cfg())
    m.start()
    m.wait(m.synced, "first sync")
    m.cli("service", "put", "default/web", "--vip", VIP_A, "--port", "http=80/TCP")
    m.cli("endpoint", "add", "default/web", "b1", "--address", lab.backend_addr(1),
          "--port", "http=8080")
    ttl = 2
    owners: list[subprocess.Popen] = []
    try:
        crashing = m.cli_popen("endpoint", "add", "default/web", "b2", "--address",
                               lab.backend_addr(2), "--port", "http=8080", "--ttl", str(ttl))
        owners.append(crashing)
        m.wait(lambda r: backends(r, group("web")) == {be(lab, 1), be(lab, 2)},
               "the leased endpoint b2")
        time.sleep(ttl + 1)  # the lease is being refreshed: the endpoint outlives its TTL
        assert crashing.poll() is None, crashing.communicate(timeout=10)[0]
        res = reach(lab, VIP_A, count=60)
        assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2"}

        crashing.kill()  # no revoke: etcd expires the lease
        crashing.wait(timeout=10)
        t0 = time.monotonic()
        m.wait(lambda r: backends(r, group("web")) == {be(lab, 1)},
               f"b2 to disappear after its owner was killed (ttl {ttl}s)", timeout=ttl + 4)
        took = time.monotonic() - t0
        assert took <= ttl + 3, f"lease expiry took {took:.1f}s for a {ttl}s TTL"
        assert reach(lab, VIP_A)["by_backend"] == {"b1": 30}

        # a clean stop revokes the lease: gone at once, long before its 30 s TTL
        clean = m.cli_popen("endpoint", "add", "default/web", "b3", "--address",
                            lab.backend_addr(3), "--port", "http=8080", "--ttl", "30")
        owners.append(clean)
        m.wait(lambda r: backends(r, group("web")) == {be(lab, 1), be(lab, 3)},
               "the leased endpoint b3")
        clean.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, _ = clean.communicate(timeout=15)
        assert clean.returncode == 0, out
        assert "lease revoked: endpoint b3 removed" in out
        m.wait(lambda r: backends(r, group("web")) == {be(lab, 1)}, "b3 removed on SIGTERM",
               timeout=5)
        assert time.monotonic() - t0 < 5
        assert reach(lab, VIP_A)["by_backend"] == {"b1": 30}
    finally:
        for p in owners:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)


def test_external_etcd_restart_keeps_serving_and_the_watch_resumes(lab, etcd, make_meshd):
    m = make_meshd({"endpoints": [etcd.url], "dial_timeout": 2})
    m.start()
    m.wait(m.synced, "first sync")
    m.cli("service", "put", "default/web", "--vip", VIP_A, "--port", "http=80/TCP")
    m.cli("endpoint", "add", "default/web", "b1", "--address", lab.backend_addr(1),
          "--port", "http=8080")
    m.wait(lambda r: backends(r, group("web")) == {be(lab, 1)}, "endpoint b1")
    assert reach(lab, VIP_A)["by_backend"] == {"b1": 30}

    etcd.stop()
    m.wait_log("etcd: lost the watch", "the daemon to notice etcd is gone")
    assert reach(lab, VIP_A)["by_backend"] == {"b1": 30}  # the kernel state is kept
    rep = m.report(kernel_only=False)  # as a user types it: tries etcd (5 s), shows the kernel
    assert rep is not None and backends(rep, group("web")) == {be(lab, 1)}, rep
    assert "desired state unknown" in (rep.get("desired_error") or ""), rep
    assert m.proc.poll() is None
    # the daemon's own status says etcd is gone (not just the CLI's read)
    rep = m.wait(lambda r: "not connected" in ((r.get("daemon") or {}).get("source_error") or ""),
                 "the daemon to report etcd as not connected")
    assert rep["daemon"]["sources"]["etcd"]["synced"] is True

    etcd.start()
    m.cli("endpoint", "add", "default/web", "b2", "--address", lab.backend_addr(2),
          "--port", "http=8080")
    m.wait(lambda r: backends(r, group("web")) == {be(lab, 1), be(lab, 2)},
           "the change made after etcd came back", timeout=20)
    m.wait(lambda r: not (r.get("daemon") or {}).get("source_error"), "etcd error cleared")
    res = reach(lab, VIP_A, count=60)
    assert res["errors"] == {} and set(res["by_backend"]) == {"b1", "b2"}
    log = m.log.read_text()
    assert "resumed watching" in log
    assert log.count("etcd: listed ") == 1, "resuming must not list the prefix again"


def _two_services(m: Meshd, lab) -> None:
    for name, vip, i in (("web-a", VIP_A, 1), ("web-b", VIP_B, 2)):
        m.cli("service", "put", f"default/{name}", "--vip", vip, "--port", "http=80/TCP")
        m.cli("endpoint", "add", f"default/{name}", f"b{i}", "--address", lab.backend_addr(i),
              "--port", "http=8080")
    m.wait(lambda r: backends(r, group("web-a")) == {be(lab, 1)}
           and backends(r, group("web-b")) == {be(lab, 2)}, "web-a and web-b")


def _change_while_away(m: Meshd, lab) -> None:
    """Delete web-b, move web-a from b1 to b3, and a service that comes and goes."""
    m.cli("service", "delete", "default/web-b")
    m.cli("endpoint", "add", "default/web-a", "b3", "--address", lab.backend_addr(3),
          "--port", "http=8080")
    m.cli("endpoint", "remove", "default/web-a", "b1")
    m.cli("service", "put", "default/short-lived", "--vip", VIP_C, "--port", "http=80/TCP")
    m.cli("service", "delete", "default/short-lived")


def _converged(lab) -> Callable[[dict], bool]:
    return lambda r: groups(r) == {group("web-a")} and backends(r, group("web-a")) == {be(lab, 3)}


def _check_converged_traffic(lab) -> None:
    assert reach(lab, VIP_A)["by_backend"] == {"b3": 30}
    assert reach(lab, VIP_B, count=3)["errors"] == {"ENETUNREACH": 3}
    assert reach(lab, VIP_C, count=3)["errors"] == {"ENETUNREACH": 3}


def test_restart_after_changes_and_compaction_while_stopped_converges(lab, etcd, make_meshd):
    m = make_meshd({"endpoints": [etcd.url], "dial_timeout": 2})
    m.start()
    m.wait(m.synced, "first sync")
    _two_services(m, lab)
    assert m.stop() == 0
    assert reach(lab, VIP_B)["by_backend"] == {"b2": 30}  # pinned, no daemon

    _change_while_away(m, lab)
    etcd.compact()
    m.start()
    m.wait(lambda r: m.synced(r) and _converged(lab)(r), "the restarted daemon to converge")
    _check_converged_traffic(lab)
    assert no_drift(m.report(kernel_only=False))


def test_watch_cut_during_changes_and_compaction_relists_and_converges(lab, etcd, make_meshd):
    """The same daemon process (the same EtcdSource) loses only its own connection: a proxy
    cuts it while etcd stays up. Changes and a compaction happen meanwhile, so its resume
    revision is gone; it must list again and converge (docs/etcd.md, 'Compaction'). (A restart
    of etcd alone cannot do this deterministically: events sent before the restart may
    already sit in the daemon's socket buffer.)"""
    proxy = TcpProxy(etcd.client_port)
    try:
        m = make_meshd({"endpoints": [proxy.url], "dial_timeout": 2})
        m.start()
        m.wait(m.synced, "first sync")
        _two_services(m, lab)

        proxy.pause()
        m.wait_log("etcd: lost the watch", "the daemon to lose its watch")
        # the changes of _change_while_away, written straight to etcd: two requests, so the
        # outage (and the daemon's reconnect backoff) stays short
        ep = {"address": lab.backend_addr(3), "ports": {"http": 8080}}
        short = {"namespace": "default", "name": "short-lived", "vips": [VIP_C],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        etcd.txn([("put", f"{PREFIX}endpoints/default/web-a/b3", json.dumps(ep)),
                  ("delete", f"{PREFIX}endpoints/default/web-a/b1", None),
                  ("delete_prefix", f"{PREFIX}endpoints/default/web-b/", None),
                  ("delete", f"{PREFIX}services/default/web-b", None),
                  ("put", f"{PREFIX}services/default/short-lived", json.dumps(short))])
        etcd.txn([("delete", f"{PREFIX}services/default/short-lived", None)])
        rev = etcd.compact()
        assert m.report() is not None and groups(m.report()) == {group("web-a"), group("web-b")}
        assert reach(lab, VIP_B)["by_backend"] == {"b2": 30}  # nothing seen yet: kept serving
        proxy.resume()
        m.wait(_converged(lab), "the daemon to re-list and converge", timeout=20)
        _check_converged_traffic(lab)
        log = m.log.read_text()
        assert "is compacted" in log and f"listing {PREFIX} again" in log, tail(m.log)
        assert log.count("etcd: listed ") == 2
        assert f"at revision {rev}" in log  # the re-list read the compacted revision
        full = m.report(kernel_only=False)  # the CLI reads etcd (through the proxy) itself
        assert no_drift(full), full
        assert m.stop() == 0
    finally:
        proxy.close()


def _junk(lab) -> list[tuple[bytes, bytes, str | None]]:
    """~200 bad records: (key, value, a fragment of the reason the daemon must report)."""
    P = PREFIX.encode()

    def svc(ns: str, name: str, **over) -> dict:
        d = {"namespace": ns, "name": name, "vips": ["10.96.1.1"],
             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        d.update(over)
        return d

    def j(d) -> bytes:
        return json.dumps(d).encode()

    bad_values: list[tuple[Callable[[str], bytes], str]] = [
        (lambda n: b"{", "not valid JSON"),
        (lambda n: b"not json at all", "not valid JSON"),
        (lambda n: b"", "value is empty"),
        (lambda n: b"  \n", "value is empty"),
        (lambda n: b"\xff\xfe{}", "not UTF-8"),
        (lambda n: b"[1, 2]", "must be a JSON object"),
        (lambda n: b"null", "must be a JSON object"),
        (lambda n: b'"a string"', "must be a JSON object"),
        (lambda n: b'{"name": "x", "name": "y"}', "appears twice"),
        (lambda n: b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (lambda n: j(svc("default", n, vips="10.96.1.1")), "vips"),
        (lambda n: j(svc("default", n, vips=[123])), "vips"),
        (lambda n: j(svc("default", n, ports=[{"name": "http", "port": 0}])),
         "ports[0].port: must be 1-65535"),
        (lambda n: j(svc("default", n, ports=[{"name": "http", "port": "eighty"}])), "port"),
        (lambda n: j(svc("default", n, ports="http=80")), "ports"),
        (lambda n: j(svc("default", n, bogus=1)), "bogus"),
        (lambda n: j(svc("default", "someone-else")), "they must match"),
        (lambda n: j(svc("other", n)), "they must match"),
        (lambda n: j(svc("default", n, endpoints=[])), "'endpoints' is not allowed"),
    ]
    out: list[tuple[bytes, bytes, str | None]] = []
    for i in range(150):
        make, why = bad_values[i % len(bad_values)]
        name = f"junk{i}"
        out.append((P + f"services/default/{name}".encode(), make(name), why))
    out.append((P + b"services/default/huge", b'{"x": "' + b"a" * 300_000 + b'"}', "at most"))
    good = j(svc("default", "x"))
    for key, why in [(b"services/default", "malformed key"),
                     (b"services/default/a/b", "malformed key"),
                     (b"services//x", "malformed key"),
                     (b"services/default/", "malformed key"),
                     (b"services/Default/x", "namespace"),
                     (b"services/default/under_score", "name"),
                     (b"services/default/" + b"a" * 64, "name"),
                     (b"services/default/\xff\xfe", "key is not UTF-8"),
                     (b"endpoints/default/web-a", "malformed key"),
                     (b"endpoints/default/web-a/x/y", "malformed key"),
                     (b"endpoints/default/web-a/bad id", "endpoint id"),
                     (b"endpoints/default/web-a/" + b"e" * 254, "endpoint id")]:
        out.append((P + key, good, why))
    bad_eps: list[tuple[dict | bytes, str]] = [
        ({"address": "not-an-ip", "ports": {"http": 8080}}, "address"),
        ({"address": "10.201.1.2", "ports": {"http": 0}}, "ports"),
        ({"address": "10.201.1.2", "ports": {"http": 8080}, "weight": -1}, "weight"),
        ({"address": "10.201.1.2", "ports": {"http": 8080}, "weight": 70000}, "weight"),
        ({"address": "10.201.1.2", "ports": "http=8080"}, "ports"),
        ({"ports": {"http": 8080}}, "address"),
        (b"{", "not valid JSON"),
    ]
    for i in range(28):
        rec, why = bad_eps[i % len(bad_eps)]
        out.append((P + f"endpoints/default/ejunk{i}/e{i}".encode(),
                    rec if isinstance(rec, bytes) else j(rec), why))
    # bad endpoints of services that otherwise serve: only the endpoint is skipped
    b1 = lab.backend_addr(1)
    out += [(P + b"endpoints/default/web-a/zz-unknown-port",
             j({"address": lab.backend_addr(2), "ports": {"nope": 8080}}), "unknown port name"),
            (P + b"endpoints/default/web-a/zz-dup", j({"address": b1, "ports": {"http": 8080}}),
             "duplicates endpoint"),
            (P + b"endpoints/default/web-b/zz-bad-json", b'{"address": ', "not valid JSON"),
            (P + b"endpoints/default/web-c/zz-weight",
             j({"address": lab.backend_addr(1), "ports": {"http": 8080}, "weight": "heavy"}),
             "weight")]
    # not errors: keys outside services/ and endpoints/ (ignored), an orphan endpoint
    out += [(P + b"other/thing", b"{", None), (P + b"servicesX/y", b"{", None),
            (P + b"endpoints/default/ghost/e1", j({"address": b1, "ports": {"http": 8080}}), None)]
    return out


def test_junk_records_next_to_valid_ones(lab, etcd, make_meshd):
    m = make_meshd({"endpoints": [etcd.url], "dial_timeout": 2})
    junk = _junk(lab)
    assert len(junk) >= 190
    half = len(junk) // 2
    for key, value, _ in junk[:half]:  # read by the first list
        etcd.put(key, value)
    services_file = m.root / "valid.yaml"
    services_file.write_text(yaml.safe_dump({"services": [
        {"namespace": "default", "name": name, "vips": [vip],
         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
         "endpoints": [{"address": lab.backend_addr(i), "ports": {"http": 8080}}]}
        for name, vip, i in (("web-a", VIP_A, 1), ("web-b", VIP_B, 2), ("web-c", VIP_C, 3),
                             ("outside", "192.168.77.1", 1))]}))
    out = m.cli("service", "put", "-f", str(services_file))
    assert out.count("written") == 8, out
    m.start()
    m.wait(m.synced, "first sync")
    for key, value, _ in junk[half:]:  # arrive through the watch
        etcd.put(key, value)

    expected = {k.decode("utf-8", "backslashreplace"): why for k, _, why in junk if why}
    valid = {group("web-a"): {be(lab, 1)}, group("web-b"): {be(lab, 2)},
             group("web-c"): {be(lab, 3)}}

    def settled(r: dict) -> bool:
        where = {x["where"] for x in r.get("rejected", [])}
        return expected.keys() <= where and all(backends(r, g) == b for g, b in valid.items())
    rep = m.wait(settled, "every junk record reported and the valid services serving",
                 timeout=20)
    assert m.proc.poll() is None
    assert groups(rep) == set(valid), "only the three valid services may be in the kernel"
    reasons = {x["where"]: x["reason"] for x in rep["rejected"]}
    wrong = {k: (why, reasons[k]) for k, why in expected.items() if why not in reasons[k]}
    assert not wrong, f"unexpected reasons: {wrong}"
    outside = [(w, r) for w, r in reasons.items() if w.endswith("default/outside")]
    assert len(outside) == 1 and "outside service_cidrs" in outside[0][1], outside
    extra = set(reasons) - set(expected) - {outside[0][0]}
    assert not extra, f"reported but not junk: {extra}"  # ignored keys, orphans: not errors
    assert not rep["errors"]
    assert no_drift(m.report(kernel_only=False))
    for vip, name in ((VIP_A, "b1"), (VIP_B, "b2"), (VIP_C, "b3")):
        assert reach(lab, vip, count=20)["by_backend"] == {name: 20}
    assert reach(lab, "192.168.77.1", count=3)["errors"] == {"ENETUNREACH": 3}
    text = subprocess.run([sys.executable, "-m", "meshd", "services", "--config",
                           str(m.config)], capture_output=True, text=True, timeout=30,
                          env=clean_env()).stdout
    assert f"rejected: {PREFIX}services/default/junk0: value is not valid JSON" in text

    # repairing a rejected record through the watch: it serves, its error is gone
    fixed = f"{PREFIX}services/default/junk0"
    m.cli("service", "put", "default/junk0", "--vip", VIP_D, "--port", "http=80/TCP")
    m.cli("endpoint", "add", "default/junk0", "b2", "--address", lab.backend_addr(2),
          "--port", "http=8080")
    rep = m.wait(lambda r: backends(r, group("junk0")) == {be(lab, 2)}, "the repaired record")
    assert fixed not in {x["where"] for x in rep["rejected"]}
    assert len(rep["rejected"]) == len(reasons) - 1
    assert reach(lab, VIP_D, count=20)["by_backend"] == {"b2": 20}
    assert m.stop() == 0


def test_kill_9_and_restart_with_the_embedded_etcd_under_load(lab, make_meshd):
    m = make_meshd(embedded_cfg())
    m.start()
    m.wait(m.synced, "first sync")
    m.cli("service", "put", "default/web", "--vip", VIP_A, "--port", "http=80/TCP")
    for i in (1, 2, 3):
        m.cli("endpoint", "add", "default/web", f"b{i}", "--address", lab.backend_addr(i),
              "--port", "http=8080")
    m.wait(lambda r: len(backends(r, group("web"))) == 3, "three endpoints")
    old_etcd = m.embedded_etcd_pid()
    assert old_etcd is not None

    client = lab.run("cli", [sys.executable, "-m", "netns_lab.agent", "connrate", "--addr", VIP_A,
                             "--port", "80", "--duration", "8", "--max", "200000",
                             "--timeout", "2"],
                     cgroup=True, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert m.stop(signal.SIGKILL) == -signal.SIGKILL
        assert alive(old_etcd), "a killed daemon cannot stop its etcd"
        m.start()  # finds the etcd the killed daemon left (etcd.pid) and replaces it
        rep = m.wait(m.synced, "the new daemon's sync", timeout=10)
        assert len(backends(rep, group("web"))) == 3
        assert client.poll() is None, "the client must still be connecting after the restart"
        out, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate(timeout=10)
    res = json.loads(out)
    assert res["errors"] == {} and res["count"] > 500, res
    assert set(res["by_backend"]) == {"b1", "b2", "b3"}
    new_etcd = m.embedded_etcd_pid()
    assert new_etcd is not None and new_etcd != old_etcd and not alive(old_etcd)
    log = m.log.read_text()
    assert f"stopping pid {old_etcd}, an etcd left running" in log
    from meshd import names
    assert f"adopted {len(names.SOCK_LB_MAPS)} pinned maps" in log
    assert m.stop() == 0
    assert not alive(new_etcd)


def test_sighup_with_an_etcd_only_config_applies_service_cidrs(lab, etcd, make_meshd):
    """Issue 12 item 4: with etcd as the only source, a SIGHUP used to apply nothing (no
    source woke the sync) while logging "other settings applied"."""
    m = make_meshd({"endpoints": [etcd.url], "dial_timeout": 2})
    m.start()
    m.wait(m.synced, "first sync")
    _two_services(m, lab)
    doc = yaml.safe_load(m.config.read_text())
    doc["service_cidrs"] = ["10.96.0.11/32"]  # VIP_B only: web-a's VIP is now outside
    doc["log_level"] = "debug"
    m.config.write_text(yaml.safe_dump(doc))
    m.proc.send_signal(signal.SIGHUP)
    m.wait(lambda r: groups(r) == {group("web-b")}, "web-a dropped by the new service_cidrs")
    assert reach(lab, VIP_B)["by_backend"] == {"b2": 30}
    assert reach(lab, VIP_A, count=3)["errors"] == {"ENETUNREACH": 3}
    m.wait_log("reload: applied service_cidrs, log_level", "the reload's message")
