"""The harness of the daemon tests (tests/lab/test_daemon*.py, tests/faults/): a real
`meshd run` process, a real etcd of the test's own, a loopback TCP proxy, and the small
helpers that read `meshd services --json`. Registered as a pytest plugin by tests/conftest.py,
so its fixtures (workdir, etcd, make_meshd, daemon) are available to every test module.

Every helper owns what it starts and removes it, also on failure: the daemon (by PID), etcd
processes (by PID; an embedded etcd a killed daemon left behind is found through its etcd.pid
file and checked to run on this test's data dir before it is killed), the TCP proxy, the pins
of the instance and the test's temporary directory (etcd preallocates 64 MB of WAL). Every wait
is bounded. etcd and the metrics exporter listen on free loopback ports. etcd is written to
directly through its HTTP/JSON gateway (/v3/kv/...) where a test needs raw bytes, many records
or compaction: that keeps gRPC out of the pytest process (grpc.aio binds to event loops; see
docs/etcd.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
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


def svc(lab, name: str, vip: str, backends: list[int], port: int = 80) -> dict:
    """A services-file record: default/<name> on vip:port, endpoints b<i>:8080 of the lab."""
    return {"namespace": "default", "name": name, "vips": [vip],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"address": lab.backend_addr(i), "ports": {"http": 8080}}
                          for i in backends]}


def meshd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`meshd <args>` (no config implied), output captured."""
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True,
                          text=True, timeout=60, check=check, env=clean_env())


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

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, "etcd is not running"
        return self.proc.pid

    def kill(self) -> None:
        """kill -9 by PID (no clean shutdown; the data dir keeps what was committed)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the process stays, its sockets accept and then hang (an unreachable
        etcd, as a partition or a stalled disk makes it)."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a frozen etcd cannot act on SIGTERM
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

    def put_many(self, items: list[tuple[str, str]], batch: int = 100) -> None:
        """Many puts, `batch` per transaction (etcd's --max-txn-ops default is 128)."""
        for i in range(0, len(items), batch):
            self.txn([("put", k, v) for k, v in items[i:i + batch]])

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
    """A `meshd run` process of the lab's instance: etcd as its source (`etcd` = the config's
    etcd section), a services file (`services_file=True`: <root>/services.yaml, see write()),
    or both. `etcd=None` with a services file is the file-only daemon."""

    def __init__(self, lab, root: Path, etcd: dict | None, services_file: bool = False,
                 extra: dict | None = None):
        self.lab = lab
        self.root = root
        self.instance = TEST_PREFIX + lab.prefix
        claim(self.instance)
        self.state_dir = root / "state"
        self.config = root / "meshd.yaml"
        self.services_file = root / "services.yaml"
        cfg = {"instance": self.instance, "cgroup": str(lab.cgroup), "bpffs": str(BPFFS),
               "state_dir": str(self.state_dir), "maglev": {"table_size": 1021},
               "metrics": {"listen": f"127.0.0.1:{free_ports(1)[0]}"}, "etcd": etcd,
               "healthz": {"listen": "127.0.0.1:0"}}
        if services_file:
            cfg["services_file"] = str(self.services_file)
        cfg.update(extra or {})
        self.config.write_text(yaml.safe_dump(cfg))
        # a daemon reading only a file: `meshd services` is fast and exact with the desired
        # state; with etcd, reading the registry too can take the CLI 5 s when etcd is away
        self.kernel_only = etcd is not None
        self.log = root / "meshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://{yaml.safe_load(self.config.read_text())['metrics']['listen']}/metrics"

    # embedded etcd files (etcd_server.py): <state_dir>/<instance>/etcd{,.pid,-sock/}
    @property
    def etcd_data(self) -> Path:
        return self.state_dir / self.instance / "etcd"

    @property
    def etcd_pid_file(self) -> Path:
        return self.state_dir / self.instance / "etcd.pid"

    def embedded_etcd_pid(self) -> int | None:
        return embedded_etcd_pid(self.etcd_pid_file, self.etcd_data)

    def write(self, *services: dict, raw: str | None = None) -> None:
        """Replace the services file atomically (the daemon's poll sees one version or the
        other, never half a file)."""
        tmp = self.services_file.with_suffix(".tmp")
        tmp.write_text(raw if raw is not None else yaml.safe_dump({"services": list(services)}))
        tmp.replace(self.services_file)

    def start(self, env: dict | None = None) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "meshd", "run", "--config",
                                          str(self.config)], stdout=f, stderr=f,
                                         env=clean_env(**(env or {})))

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

    def run_cli(self, *args: str, env: dict | None = None,
                timeout: float = 30) -> subprocess.CompletedProcess:
        """`meshd <args> --config CFG`, whatever its exit code."""
        return subprocess.run([sys.executable, "-m", "meshd", *args, "--config",
                               str(self.config)], capture_output=True, text=True,
                              timeout=timeout, env=clean_env(**(env or {})))

    def cli(self, *args: str, env: dict | None = None) -> str:
        """`meshd <args> --config CFG`; fails the test (with stderr) if it fails."""
        r = self.run_cli(*args, env=env)
        if r.returncode != 0:
            pytest.fail(f"meshd {' '.join(args)} exited {r.returncode}: {r.stderr}{r.stdout}")
        return r.stdout

    def cli_popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "meshd", *args, "--config",
                                 str(self.config)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=clean_env())

    def report(self, kernel_only: bool | None = None) -> dict | None:
        """`meshd services --json` (None if it fails); --kernel-only (what the kernel maps
        hold, fast and independent of etcd) by default for an etcd daemon; without it the CLI
        also reads the sources itself and flags drift (up to 5 s when etcd does not answer)."""
        ko = self.kernel_only if kernel_only is None else kernel_only
        r = self.run_cli("services", "--json", *(["--kernel-only"] if ko else []))
        return json.loads(r.stdout) if r.returncode == 0 else None

    def services(self) -> dict:
        """`meshd services --json` with the desired state; fails the test if it fails."""
        return json.loads(self.cli("services", "--json"))

    def wait(self, pred: Callable[[dict], object], what: str, timeout: float = 15,
             kernel_only: bool | None = None) -> dict:
        """Poll `meshd services --json` until pred(report) holds (the daemon must stay up)."""
        end = time.monotonic() + timeout
        last = None
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"meshd exited {self.proc.returncode} while waiting for {what}:\n"
                            f"{tail(self.log)}")
            last = self.report(kernel_only)
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

    def __init__(self, target_port: int, on_reply: Callable[[int], None] | None = None):
        """`on_reply(n)`: called (in a proxy thread) after every chunk the target sent back,
        with the total of such bytes so far over all connections."""
        self.target_port = target_port
        self.paused = False
        self.on_reply = on_reply
        self.replied = 0
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
            for a, b, back in ((c, u, False), (u, c, True)):
                t = threading.Thread(target=self._pipe, args=(a, b, back), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, a: socket.socket, b: socket.socket, back: bool) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
                if back:
                    with self._lock:
                        self.replied += len(data)
                        n = self.replied
                    if self.on_reply is not None:
                        self.on_reply(n)
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
def make_meshd(lab, workdir: Path) -> Iterator[Callable[..., Meshd]]:
    """make(etcd_cfg, services_file=False, extra=None) -> Meshd (not started); one per test."""
    made: list[Meshd] = []

    def make(etcd_cfg: dict | None, services_file: bool = False,
             extra: dict | None = None) -> Meshd:
        assert not made, "one daemon (one instance) per test"
        m = Meshd(lab, workdir, etcd_cfg, services_file=services_file, extra=extra)
        made.append(m)
        return m
    try:
        yield make
    finally:
        for m in made:
            m.close()


@pytest.fixture
def daemon(make_meshd) -> Meshd:
    """A file-only daemon (etcd: null, services_file: <workdir>/services.yaml), not started."""
    return make_meshd(None, services_file=True)


def embedded_cfg() -> dict:
    return {"dial_timeout": 2}  # the embedded etcd: unix sockets under the test's state_dir



class ConnectLoop:
    """A client in the lab's client namespace and cgroup, opening new TCP connections to
    vip:port one after another (connect, one request, reply, close) for `duration` seconds
    (bounded in count too); result() is the agent's JSON: count, errors by errno name,
    by_backend. With `hold`, one persistent connection doing request/response instead (an
    established connection that must outlive the fault)."""

    def __init__(self, lab, vip: str, duration: float, port: int = 80, hold: bool = False):
        mode = ["rr"] if hold else ["connrate"]
        self.proc = lab.run("cli", [sys.executable, "-m", "netns_lab.agent", *mode,
                                    "--addr", vip, "--port", str(port), "--duration",
                                    str(duration), "--max", "1000000", "--timeout", "2"],
                            cgroup=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
        self.duration = duration

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> dict:
        try:
            out, err = self.proc.communicate(timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=10)
            pytest.fail(f"client ran past its {self.duration}s by 60 s: {out} {err}")
        try:
            return json.loads(out)
        except ValueError:
            pytest.fail(f"client gave no JSON (exit {self.proc.returncode}): {out!r} {err!r}")

    def stop(self) -> dict:
        """End the loop now (SIGTERM: the agent finishes its current connection and prints)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.result()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


def scrape(url: str) -> dict[str, list]:
    """Prometheus text at `url`: family name -> samples."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(body)}
