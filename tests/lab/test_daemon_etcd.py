"""`meshd run` with etcd as the registry, end to end: a real daemon process, a real etcd
(the daemon's embedded one, or one of the test's own), the `meshd service|endpoint` CLI, and
lab traffic through the kernel data plane. Faults a user meets: leases expiring, etcd
restarting, history compacted while the daemon was away, junk in the registry, a crash.

Every test owns everything it starts and removes it, also on failure: the daemon (by PID),
etcd processes (by PID; an embedded etcd a killed daemon left behind is found through its
etcd.pid file and checked to run on this test's data dir before it is killed), the TCP
proxy, the pins of the instance and the test's temporary directory (etcd preallocates 64 MB
of WAL). Every wait is bounded. A test's own etcd and the metrics exporter listen on free
loopback ports; the embedded etcd on unix sockets under the test's state_dir (root only).
etcd is written to directly through its HTTP/JSON gateway (/v3/kv/...) where a test needs raw
bytes or compaction: that keeps gRPC out of the pytest process (grpc.aio binds to event loops;
see docs/etcd.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from meshd.dataplane import loader

from testlib import BPFFS, TEST_PREFIX, claim, free_ports, release

ETCD = "/usr/bin/etcd"
VIP_A, VIP_B, VIP_C, VIP_D = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"
PREFIX = "/meshd/"


# ---- small helpers ---------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """The environment for meshd/etcd children: no MESHD_*/ETCD*_ overrides from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MESHD_", "ETCD_", "ETCDCTL_"))}
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace")
                for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def wait_for(pred: Callable[[], object], what: str, timeout: float, step: float = 0.05,
             detail: Callable[[], str] = lambda: "") -> object:
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(step)


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


def b64(b: bytes | str) -> str:
    return base64.b64encode(b.encode() if isinstance(b, str) else b).decode()


def group(name: str) -> str:
    return f"default/{name}:http/ipv4"


def backends(report: dict | None, grp: str) -> set[str]:
    for g in (report or {}).get("services", []):
        if g["group"] == grp:
            return {b["backend"] for b in g["backends"]}
    return set()


def groups(report: dict | None) -> set[str]:
    """Groups in the kernel maps (not the desired-only ones `meshd services` adds)."""
    return {g["group"] for g in (report or {}).get("services", []) if g.get("state") != "missing"}


def no_drift(report: dict) -> bool:
    """`meshd services` read the registry itself and found the kernel equal to it."""
    return report.get("desired_error") is None and all(
        g.get("drift") == [] for g in report["services"])


def reach(lab, vip: str, count: int = 30) -> dict:
    return lab.agent("tcp", cgroup=True, addr=vip, port=80, count=count, timeout=2)


def be(lab, i: int) -> str:
    return f"{lab.backend_addr(i)}:8080/TCP"


# ---- processes the tests own ------------------------------------------------------------------

class Etcd:
    """An etcd of the test's own (the `etcd.endpoints` case), on free loopback ports; stop() /
    start() keep the ports and the data dir (history survives a restart)."""

    def __init__(self, root: Path):
        self.client_port, self.peer_port = free_ports(2)
        self.data = root / "etcd-data"
        self.log = root / "etcd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "t", "--data-dir", str(self.data),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"t={peer}", "--initial-cluster-state", "new",
                 "--logger", "zap", "--log-outputs", "stderr"],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=clean_env(),
                start_new_session=True)
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"etcd exited {proc.returncode}:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    return json.loads(r.read()).get("health") == "true"
            except (OSError, ValueError):
                return False
        wait_for(healthy, "etcd /health", timeout, detail=lambda: tail(self.log))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def api(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"etcd {path}: {e.code} {e.read()[:500]!r}") from None

    def put(self, key: bytes | str, value: bytes | str) -> None:
        self.api("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def txn(self, ops: list[tuple[str, str, str | None]]) -> None:
        """One transaction of ("put", key, value) / ("delete", key, None) /
        ("delete_prefix", prefix, None)."""
        reqs = []
        for op, key, value in ops:
            if op == "put":
                reqs.append({"request_put": {"key": b64(key), "value": b64(value or "")}})
            else:
                rng = {"key": b64(key)}
                if op == "delete_prefix":
                    end = bytearray(key.encode())
                    end[-1] += 1
                    rng["range_end"] = b64(bytes(end))
                reqs.append({"request_delete_range": rng})
        assert self.api("/v3/kv/txn", {"success": reqs}).get("succeeded") is True

    def revision(self) -> int:
        return int(self.api("/v3/kv/range", {"key": b64("/"), "count_only": True})
                   ["header"]["revision"])

    def compact(self) -> int:
        """Compact the history up to the current revision (physically); returns it."""
        rev = self.revision()
        self.api("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev


def embedded_etcd_pid(pid_file: Path, data_dir: Path) -> int | None:
    """The PID in an embedded etcd's pid file, if it is an etcd running on `data_dir`."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    args = cmdline(pid)
    if alive(pid) and args and Path(args[0]).name == "etcd" and "--data-dir" in args[:-1] \
            and Path(args[args.index("--data-dir") + 1]) == data_dir:
        return pid
    return None


class Meshd:
    """A `meshd run` process with etcd as its only source."""

    def __init__(self, lab, root: Path, etcd: dict):
        self.lab = lab
        self.root = root
        self.instance = TEST_PREFIX + lab.prefix
        claim(self.instance)
        self.state_dir = root / "state"
        self.config = root / "meshd.yaml"
        self.config.write_text(yaml.safe_dump({
            "instance": self.instance, "cgroup": str(lab.cgroup), "bpffs": str(BPFFS),
            "state_dir": str(self.state_dir), "maglev": {"table_size": 1021},
            "metrics": {"listen": f"127.0.0.1:{free_ports(1)[0]}"}, "etcd": etcd}))
        self.log = root / "meshd.log"
        self.proc: subprocess.Popen | None = None

    # embedded etcd files (etcd_server.py): <state_dir>/<instance>/etcd{,.pid,-sock/}
    @property
    def etcd_data(self) -> Path:
        return self.state_dir / self.instance / "etcd"

    @property
    def etcd_pid_file(self) -> Path:
        return self.state_dir / self.instance / "etcd.pid"

    def embedded_etcd_pid(self) -> int | None:
        return embedded_etcd_pid(self.etcd_pid_file, self.etcd_data)

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "meshd", "run", "--config",
                                          str(self.config)], stdout=f, stderr=f, env=clean_env())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            pytest.fail(f"meshd ignored signal {sig} for 20 s:\n{tail(self.log)}")
        self.proc = None
        return rc

    def cli(self, *args: str, env: dict | None = None) -> str:
        """`meshd <args> --config CFG`; fails the test (with stderr) if it fails."""
        r = subprocess.run([sys.executable, "-m", "meshd", *args, "--config", str(self.config)],
                           capture_output=True, text=True, timeout=30,
                           env=clean_env(**(env or {})))
        if r.returncode != 0:
            pytest.fail(f"meshd {' '.join(args)} exited {r.returncode}: {r.stderr}{r.stdout}")
        return r.stdout

    def cli_popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "meshd", *args, "--config",
                                 str(self.config)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=clean_env())

    def report(self, kernel_only: bool = True) -> dict | None:
        """`meshd services --json`; by default --kernel-only (what the kernel maps hold, fast
        and independent of etcd); without it the CLI also reads the registry itself and flags
        drift (up to 5 s when etcd does not answer)."""
        r = subprocess.run([sys.executable, "-m", "meshd", "services", "--json", "--config",
                            str(self.config)] + (["--kernel-only"] if kernel_only else []),
                           capture_output=True, text=True, timeout=30, env=clean_env())
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait(self, pred: Callable[[dict], object], what: str, timeout: float = 15) -> dict:
        """Poll `meshd services --json` until pred(report) holds (the daemon must stay up)."""
        end = time.monotonic() + timeout
        last = None
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"meshd exited {self.proc.returncode} while waiting for {what}:\n"
                            f"{tail(self.log)}")
            last = self.report()
            if last is not None and pred(last):
                return last
            if time.monotonic() > end:
                pytest.fail(f"timed out after {timeout}s waiting for {what}; last report "
                            f"{json.dumps(last)[:3000]}\nmeshd log:\n{tail(self.log)}")
            time.sleep(0.1)

    def synced(self, report: dict) -> bool:
        """This very process applied a full etcd snapshot."""
        d = report.get("daemon") or {}
        return (self.proc is not None and d.get("pid") == self.proc.pid
                and (d.get("sources") or {}).get("etcd", {}).get("synced") is True)

    def wait_log(self, text: str, what: str, timeout: float = 15, count: int = 1) -> None:
        wait_for(lambda: self.log.exists() and self.log.read_text(errors="replace").count(text)
                 >= count, what, timeout, step=0.05, detail=lambda: tail(self.log))

    def close(self) -> None:
        """Remove everything, in an order that works after any failure: the daemon (SIGTERM
        stops its embedded etcd; SIGKILL if it hangs), an embedded etcd a killed daemon left
        behind, the pins."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            pid = self.embedded_etcd_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not alive(pid), f"stray etcd {pid} to die", 10)
        finally:
            loader.remove(BPFFS, self.instance)
            release(self.instance)


class TcpProxy:
    """127.0.0.1:<port> -> target port, in threads. pause(): every connection is cut and new
    ones are accepted and closed at once (the daemon loses etcd while etcd itself stays up and
    writable for the test); resume(): forward again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.paused = False
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self._lsock.settimeout(0.1)
        self.port = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _cut(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # RST
            s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.paused:
                self._cut(c)
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                u.settimeout(None)
            except OSError:
                self._cut(c)
                continue
            c.settimeout(None)
            with self._lock:
                self._conns.update((c, u))
            for a, b in ((c, u), (u, c)):
                t = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            self._cut(a)
            self._cut(b)

    def pause(self) -> None:
        self.paused = True
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            self._cut(s)

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        self._stop.set()
        self.pause()
        self._lsock.close()
        for t in self._threads:
            t.join(timeout=5)


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory removed after the test, also on failure (etcd data dirs are big)."""
    d = Path(tempfile.mkdtemp(prefix="meshd-etcd-lab-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def etcd(workdir: Path) -> Iterator[Etcd]:
    e = Etcd(workdir)
    try:
        e.start()
        yield e
    finally:
        e.stop()


@pytest.fixture
def make_meshd(lab, workdir: Path) -> Iterator[Callable[[dict], Meshd]]:
    made: list[Meshd] = []

    def make(etcd_cfg: dict) -> Meshd:
        assert not made, "one daemon (one instance) per test"
        m = Meshd(lab, workdir, etcd_cfg)
        made.append(m)
        return m
    try:
        yield make
    finally:
        for m in made:
            m.close()


def embedded_cfg() -> dict:
    return {"dial_timeout": 2}  # the embedded etcd: unix sockets under the test's state_dir


# ---- tests ----------------------------------------------------------------------------------

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
    assert "adopted 6 pinned maps" in log
    assert m.stop() == 0
    assert not alive(new_etcd)
