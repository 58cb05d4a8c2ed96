"""L4 authorization and connection events, end to end: a real `meshd run` (services file
with `policies:`), client processes in two sub-cgroups of the lab's cgroup (two "units")
in the lab's client netns, backends in their own netns. What is checked is what a user
sees: connect() results, what the backend's kernel received (its netns' /proc/net/snmp),
`meshd observe --json`, `meshd services --json`, and /metrics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meshdlib import scrape, svc, tail, wait_for
from netns_lab.lab import agent_argv

VIP = "10.96.0.40"
GROUP = "default/db:http/ipv4"


def mount_rel(lab, path: Path) -> str:
    from meshd.node import cgroup2_mount
    return "/" + str(Path(path).relative_to(cgroup2_mount()))


def unit(lab, name: str) -> Path:
    """A sub-cgroup of the lab's cgroup (the hooks cover it: programs are inherited)."""
    p = Path(lab.cgroup) / name
    p.mkdir(exist_ok=True)
    return p


def client(lab, cg: Path, kind: str, count: int = 3, uid: int | None = None,
           timeout: float = 2, **opts) -> dict:
    """The lab agent's tcp/udp client run in cgroup `cg` and the client netns."""
    argv = agent_argv(kind) + ["--addr", VIP, "--port", "80", "--count", str(count),
                               "--timeout", str(timeout)]
    for k, v in opts.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] + argv
    script = 'echo $$ > "$0/cgroup.procs" && exec nsenter --net="$1" -- "${@:2}"'
    cp = subprocess.run(["bash", "-c", script, str(cg), f"/run/netns/{lab.client_ns}", *argv],
                        capture_output=True, text=True, timeout=count * timeout + 30)
    try:
        return json.loads(cp.stdout)
    except ValueError:
        pytest.fail(f"client gave no JSON (exit {cp.returncode}): {cp.stdout} {cp.stderr}")


def snmp(lab, i: int) -> dict[str, int]:
    """TCP and UDP receive counters of backend i's netns (what reached its kernel)."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/{lab.backend_ns(i)}", "cat",
                          "/proc/net/snmp"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    got = {}
    for head, vals in zip(rows[::2], rows[1::2]):
        for k, v in zip(head[1:], vals[1:]):
            got[f"{head[0]}{k}"] = int(v)
    return {k: got[k] for k in ("Tcp:PassiveOpens", "Tcp:InSegs", "Udp:InDatagrams",
                                "Udp:NoPorts")}


def all_backends(lab) -> dict[str, int]:
    tot: dict[str, int] = {}
    for i in range(1, lab.backends + 1):
        for k, v in snmp(lab, i).items():
            tot[k] = tot.get(k, 0) + v
    return tot


def db(lab) -> dict:
    s = svc(lab, "db", VIP, [1, 2])
    s["ports"].append({"name": "dns", "port": 80, "protocol": "UDP"})
    for ep in s["endpoints"]:
        ep["ports"]["dns"] = 8080
    return s


def write(daemon, services: list, policies: list) -> None:
    tmp = daemon.services_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"services": services, "policies": policies}))
    tmp.replace(daemon.services_file)


def policy(name: str, sources: list, action: str = "allow", ports=None) -> dict:
    to = {"service": "db"}
    if ports:
        to["ports"] = ports
    return {"namespace": "default", "name": name, "action": action, "from": sources,
            "to": [to]}


def observe(daemon, *args: str) -> list[dict]:
    out = daemon.cli("observe", "--json", "--no-follow", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def policies_in_report(daemon) -> list[str]:
    for g in daemon.services().get("services", []):
        if g["group"] == "default/db:http/ipv4":
            return g.get("policies") or []
    return []


@pytest.fixture
def started(lab, daemon):
    lab.start_backends()
    a, b = unit(lab, "unit-a"), unit(lab, "unit-b")
    write(daemon, [db(lab)], [])
    daemon.start()
    daemon.wait(lambda r: any(g["group"] == GROUP and g["backends"]
                              for g in r.get("services", [])), "first sync")
    return daemon, a, b


def test_a_policy_lets_one_unit_in_and_the_other_gets_eperm_before_any_packet(lab, started):
    daemon, a, b = started
    # no policy: the service is open to both
    assert client(lab, b, "tcp")["errors"] == {}
    write(daemon, [db(lab)], [policy("a-only", [{"cgroup": mount_rel(lab, a)}])])
    wait_for(lambda: policies_in_report(daemon) == ["default/a-only"], "policy in force", 15)
    before = all_backends(lab)
    denied_tcp = client(lab, b, "tcp", count=5)
    denied_udp = client(lab, b, "udp", count=5, timeout=0.5, unconnected=True)  # sendmsg
    denied_udp_connected = client(lab, b, "udp", count=5, timeout=0.5)  # connect
    after = all_backends(lab)
    assert denied_tcp["errors"] == {"EPERM": 5}, denied_tcp
    assert denied_udp["errors"] == {"EPERM": 5}, denied_udp
    assert denied_udp_connected["errors"] == {"EPERM": 5}, denied_udp_connected
    assert after == before, f"denied traffic reached a backend: {before} -> {after}"
    ok_tcp, ok_udp = client(lab, a, "tcp", count=5), client(lab, a, "udp", count=5)
    assert ok_tcp["errors"] == {} and sum(ok_tcp["by_backend"].values()) == 5
    assert ok_udp["errors"] == {} and sum(ok_udp["by_backend"].values()) == 5

    # what the operator sees: events with identity, service, backend and verdict
    evs = wait_for(lambda: (lambda e: e if len([x for x in e if x["verdict"] == "denied"])
                            >= 15 else None)(observe(daemon, "--since", "5m")),
                   "the denials in meshd observe", 15)
    denied = [e for e in evs if e["verdict"] == "denied"]
    assert {e["cgroup"] for e in denied} == {mount_rel(lab, b)}
    assert {e["service"] for e in denied} == {"default/db:http", "default/db:dns"}
    assert sum(e["sendmsg"] for e in denied) == 5
    assert all(e["policy"] is None and e["backend"] is None for e in denied)
    allowed = [e for e in evs if e["type"] == "connect" and e["cgroup"] == mount_rel(lab, a)]
    assert len(allowed) >= 10 and all(e["backend"] for e in allowed)
    assert all(e["identity"] and "cgroup:" in e["identity"] for e in allowed)
    closed = [e for e in evs if e["type"] == "closed" and e["cgroup"] == mount_rel(lab, a)]
    assert len(closed) == 5 and all(e["tx_bytes"] > 0 and e["rx_bytes"] > 0 for e in closed)
    only = observe(daemon, "--since", "5m", "--verdict", "denied", "--identity",
                   mount_rel(lab, b))
    assert len(only) == 15 and all(e["verdict"] == "denied" for e in only)
    # counted per service and identity in Prometheus
    fam = scrape(daemon.metrics_url)["meshd_policy_denied"]
    n = sum(s.value for s in fam if s.labels["service"] == "db" and s.labels["identity"] == "none")
    assert n == 15, fam


def test_an_explicit_deny_wins_over_allow_and_uid_narrows_a_selector(lab, started):
    daemon, a, b = started
    write(daemon, [db(lab)], [
        policy("units", [{"cgroup": mount_rel(lab, Path(lab.cgroup)) + "/"}]),
        policy("not-b", [{"cgroup": mount_rel(lab, b)}], action="deny")])
    wait_for(lambda: len(policies_in_report(daemon)) == 2, "both policies in force", 15)
    assert client(lab, a, "tcp")["errors"] == {}
    assert client(lab, b, "tcp")["errors"] == {"EPERM": 3}
    evs = observe(daemon, "--since", "5m", "--verdict", "denied")
    assert evs and all(e["policy"] == "default/not-b" for e in evs)
    # uid: the allow for unit-a holds for uid 0 only
    write(daemon, [db(lab)], [policy("a-root", [{"cgroup": mount_rel(lab, a), "uid": 0}])])
    wait_for(lambda: policies_in_report(daemon) == ["default/a-root"], "uid policy", 15)
    assert client(lab, a, "tcp")["errors"] == {}
    assert client(lab, a, "tcp", uid=65534)["errors"] == {"EPERM": 3}
    # ports by name: the policy selects the TCP port "http", the UDP port "dns" stays open
    write(daemon, [db(lab)], [policy("a-http", [{"cgroup": mount_rel(lab, a)}], ports=["http"])])
    wait_for(lambda: policies_in_report(daemon) == ["default/a-http"], "port policy", 15)
    assert client(lab, b, "tcp")["errors"] == {"EPERM": 3}
    assert client(lab, b, "udp")["errors"] == {}
    # a typo selects nothing: said, not silently "in force"
    typo = policy("a-typo", [{"cgroup": mount_rel(lab, a)}])
    typo["to"] = [{"service": "dbb"}]
    write(daemon, [db(lab)], [typo])
    wait_for(lambda: any("default/a-typo" in p and "selects nothing" in p
                         for p in daemon.services().get("policy_problems", [])),
             "the typo reported", 15)
    assert client(lab, b, "tcp")["errors"] == {}  # db untouched
    # deny policies alone close the service only to whom they name
    write(daemon, [db(lab)], [policy("no-b", [{"cgroup": mount_rel(lab, b)}], action="deny")])
    wait_for(lambda: policies_in_report(daemon) == ["default/no-b"], "deny-only policy", 15)
    assert client(lab, b, "tcp")["errors"] == {"EPERM": 3}
    assert client(lab, a, "tcp")["errors"] == {}


def test_policy_changes_take_effect_for_new_connects_and_spare_established_ones(lab, started):
    daemon, a, b = started
    held = HeldConnection(lab, b)
    try:
        assert held.exchange()
        t0 = time.monotonic()
        write(daemon, [db(lab)], [policy("a-only", [{"cgroup": mount_rel(lab, a)}])])
        wait_for(lambda: client(lab, b, "tcp", count=1)["errors"] == {"EPERM": 1},
                 "b denied", 15, step=0.02)
        took = time.monotonic() - t0
        assert held.exchange(), "an established connection was cut by the new policy"
        write(daemon, [db(lab)], [])
        wait_for(lambda: client(lab, b, "tcp", count=1)["errors"] == {}, "b allowed again",
                 15, step=0.02)
        assert held.exchange()
        print(f"policy in force {took * 1000:.0f} ms after the file was written "
              "(file poll 1 s + sync)")
    finally:
        held.close()


def test_a_cgroup_created_after_the_policy_gets_its_verdict(lab, started):
    daemon, a, _b = started
    later = Path(lab.cgroup) / "unit-later"
    write(daemon, [db(lab)], [policy("later-only", [{"unit": "unit-later"}])])
    wait_for(lambda: policies_in_report(daemon) == ["default/later-only"], "policy", 15)
    assert client(lab, a, "tcp", count=1)["errors"] == {"EPERM": 1}
    later.mkdir()
    t0 = time.monotonic()
    wait_for(lambda: client(lab, later, "tcp", count=1)["errors"] == {},
             "the new cgroup allowed", 10, step=0.01)
    print(f"new cgroup allowed {1000 * (time.monotonic() - t0):.0f} ms after mkdir")
    # and a deny for a cgroup that appears later holds as well
    write(daemon, [db(lab)], [policy("all", [{"cgroup": mount_rel(lab, Path(lab.cgroup)) + "/"}]),
                              policy("no-late", [{"unit": "unit-late2"}], action="deny")])
    wait_for(lambda: len(policies_in_report(daemon)) == 2, "policies", 15)
    late2 = unit(lab, "unit-late2")
    wait_for(lambda: client(lab, late2, "tcp", count=1)["errors"] == {"EPERM": 1},
             "the new cgroup denied", 10, step=0.01)
    assert client(lab, a, "tcp", count=1)["errors"] == {}
    # a deny of a subtree holds for a cgroup made below it that the daemon has not seen
    # (the daemon stopped: only the kernel's inheritance from the nearest known ancestor)
    users = unit(lab, "users")
    write(daemon, [db(lab)], [policy("no-users", [{"cgroup": mount_rel(lab, users) + "/"}],
                                     action="deny")])
    wait_for(lambda: policies_in_report(daemon) == ["default/no-users"], "deny-only", 15)
    import signal
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        fresh = users / "fresh"
        fresh.mkdir()
        assert client(lab, fresh, "tcp", count=1)["errors"] == {"EPERM": 1}
        assert client(lab, a, "tcp", count=1)["errors"] == {}  # open to everyone else
    finally:
        daemon.proc.send_signal(signal.SIGCONT)


def test_event_loss_under_a_flood_is_counted_not_silent(lab, make_meshd):
    m = make_meshd(None, services_file=True,
                   extra={"events": {"ring_bytes": 4096, "rate_per_cpu": 0}})
    lab.start_backends()
    flood = unit(lab, "flood")
    write(m, [db(lab)], [])
    m.start()
    m.wait(lambda r: any(g["group"] == GROUP and g["backends"] for g in r.get("services", [])),
           "first sync")
    n = 400
    # the daemon stalls (SIGSTOP: a reader that cannot keep up) while the kernel keeps
    # serving and emitting: the 4 KiB ring (~28 events) fills
    import signal
    m.proc.send_signal(signal.SIGSTOP)
    try:
        res = client(lab, flood, "tcp", count=n)
    finally:
        m.proc.send_signal(signal.SIGCONT)
    assert res["errors"] == {} and sum(res["by_backend"].values()) == n

    def accounted():
        fams = scrape(m.metrics_url)
        read = sum(s.value for s in fams["meshd_events_read"])
        lost = {s.labels["reason"]: s.value for s in fams["meshd_events_lost"]}
        return (read, lost) if read + lost["ring_full"] >= 2 * n else None
    read, lost = wait_for(accounted, "every event read or counted as lost", 20)
    assert read + lost["ring_full"] + lost["rate_limit"] == 2 * n  # a connect and a close each
    assert lost["ring_full"] > 0, "a 4 KiB ring under a flood lost nothing?"
    print(f"{n} connections: {read:.0f} events read, {lost['ring_full']:.0f} lost (ring full)")
    # SIGHUP turns events off live: the kernel stops emitting
    import signal as _signal
    from meshd.dataplane import events as kev
    cfg = yaml.safe_load(m.config.read_text())
    cfg["events"]["types"] = []
    m.config.write_text(yaml.safe_dump(cfg))
    m.proc.send_signal(_signal.SIGHUP)
    m.wait_log("reload: applied events", "the reload")
    from testlib import BPFFS
    assert kev.read_evcfg(BPFFS, m.instance)["mask"] == 0


class HeldConnection:
    """One TCP connection to the VIP from cgroup `cg`, kept open; exchange() does one
    request/reply on it (the lab agent's `rr` protocol: a line in, a line out)."""

    def __init__(self, lab, cg: Path):
        code = ("import socket,sys\n"
                f"s=socket.create_connection(('{VIP}',80),timeout=5)\n"
                "for line in sys.stdin:\n"
                "    s.sendall(b'GET\\n'); d=s.recv(100)\n"
                "    print('ok' if d else 'eof', flush=True)\n")
        script = 'echo $$ > "$0/cgroup.procs" && exec nsenter --net="$1" -- "${@:2}"'
        self.proc = subprocess.Popen(["bash", "-c", script, str(cg),
                                      f"/run/netns/{lab.client_ns}", sys.executable, "-c", code],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def exchange(self) -> bool:
        self.proc.stdin.write("x\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_policies_from_etcd_and_a_live_observe_that_only_root_may_open(lab, make_meshd,
                                                                        tmp_path):
    from meshdlib import embedded_cfg
    m = make_meshd(embedded_cfg())
    lab.start_backends()
    a, b = unit(lab, "unit-a"), unit(lab, "unit-b")
    m.start()
    m.wait(m.synced, "first sync from the embedded etcd")
    m.cli("service", "put", "default/db", "--vip", VIP, "--port", "http=80/TCP")
    for i in (1, 2):
        m.cli("endpoint", "add", "default/db", f"b{i}", "--address", lab.backend_addr(i),
              "--port", "http=8080")
    m.wait(lambda r: len([g for g in r.get("services", []) if g["group"] == GROUP
                          and len(g["backends"]) == 2]) == 1, "db with two backends")
    # follow the stream before the policy exists: its events arrive live
    follow = m.cli_popen("observe", "--json", "--verdict", "denied", "-n", "2")
    rec = tmp_path / "p.yaml"
    rec.write_text(yaml.safe_dump(policy("a-only", [{"cgroup": mount_rel(lab, a)}])))
    assert "default/a-only" in m.cli("policy", "put", str(rec))
    wait_for(lambda: client(lab, b, "tcp", count=1)["errors"] == {"EPERM": 1},
             "the etcd policy enforced", 15, step=0.05)
    assert client(lab, a, "tcp", count=2)["errors"] == {}
    client(lab, b, "tcp", count=1)
    out, _ = follow.communicate(timeout=20)
    live = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(live) == 2 and all(e["verdict"] == "denied" and e["cgroup"] == mount_rel(lab, b)
                                  for e in live), out
    # the stream shows who calls what on this node: root only
    sock = m.state_dir / m.instance / "events" / "observe.sock"
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-m", "meshd", "observe", "--no-follow",
                             "--config", str(m.config)], capture_output=True, text=True,
                            timeout=30)
    assert denied.returncode == 1 and ("permission denied" in denied.stderr.lower()
                                       or "Permission denied" in denied.stderr), denied.stderr
    assert "Traceback" not in denied.stderr
    m.cli("policy", "delete", "default/a-only")
    wait_for(lambda: client(lab, b, "tcp", count=1)["errors"] == {}, "policy gone", 15)
