"""The embedded etcd: Debian's /usr/bin/etcd, run by `meshd run` when etcd.endpoints is empty.

A single-member cluster listening on loopback only (it has no TLS and no auth). Its data dir is
<state_dir>/<instance>/etcd (the daemon chooses it); next to it are etcd.log (etcd's own log,
appended, rotated at 10 MiB) and etcd.pid (so a start after a crashed daemon can stop the etcd it
left behind — only if that PID is still an etcd on this data dir). History is compacted by etcd
every hour (--auto-compaction-mode periodic); the etcd source re-lists when it needs older
revisions, so nothing is lost.

The process is spawned with subprocess.Popen (no preexec_fn: this process has gRPC threads)
in its own session, so a Ctrl-C at the terminal reaches meshd, which then stops etcd. Nothing
here is bound to an event loop: start() and stop() may run under different loops.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import time
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

from meshd.errors import RegistryError

log = logging.getLogger("meshd.etcd")

ETCD_BINARY = "/usr/bin/etcd"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
STOP_TIMEOUT = 10.0
_ARCH = {"aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def _loopback_url(what: str, url: str) -> tuple[str, int]:
    """(host, port) of an http://<loopback>:<port> URL; RegistryError otherwise."""
    try:
        u = urlsplit(url)
        host, port = u.hostname or "", u.port
    except ValueError:
        host, port, u = "", None, None
    if u is None or u.scheme != "http" or port is None or u.path not in ("", "/"):
        raise RegistryError(f"embedded etcd: the {what} URL must look like http://127.0.0.1:PORT (got {url!r})")
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise RegistryError(f"embedded etcd: the {what} URL {url} is not on loopback; the embedded etcd "
                            "has no TLS or auth, so it only listens on 127.0.0.1/::1. Run your own etcd "
                            "cluster and set etcd.endpoints to serve other machines")
    return host, port


def _port_in_use(host: str, port: int) -> bool:
    """Would etcd's bind fail with EADDRINUSE? (SO_REUSEADDR like Go's listeners: TIME_WAIT is fine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, stype, proto, _, addr in infos:
        with socket.socket(family, stype, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def _owns_listener(pid: int, port: int) -> bool:
    """Does process `pid` hold the socket listening on TCP `port`? (Another process answering
    /health on that port must not pass for our etcd.) True if /proc cannot tell."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(cols[9])
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _log_lines(text: str, n: int = 8) -> str:
    """The last `n` lines of etcd's (zap JSON) log, each as 'level msg key=value...'."""
    out = []
    for line in text.strip().splitlines()[-n:]:
        try:
            rec = json.loads(line)
        except ValueError:
            out.append(line.strip()[:300])
            continue
        if not isinstance(rec, dict):
            out.append(line.strip()[:300])
            continue
        extra = " ".join(f"{k}={v}" for k, v in rec.items() if k in ("error", "address", "data-dir", "path"))
        out.append(f"{rec.get('level', '?')} {rec.get('msg', '')} {extra}".strip()[:300])
    return "\n  ".join(out) if out else "(empty)"


class EmbeddedEtcd:
    def __init__(self, data_dir: Path, client_url: str = "http://127.0.0.1:2379",
                 peer_url: str = "http://127.0.0.1:2380", name: str = "meshd", binary: str = ETCD_BINARY):
        self.data_dir = Path(data_dir)
        self.client_url = client_url.rstrip("/")
        self.peer_url = peer_url.rstrip("/")
        self.name = name
        self.binary = binary
        self._client = _loopback_url("client", self.client_url)
        self._peer = _loopback_url("peer", self.peer_url)
        if self._client[1] == self._peer[1]:
            raise RegistryError(f"embedded etcd: client and peer URLs use the same port {self._client[1]}")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise RegistryError(f"embedded etcd: member name {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.pid_path = self.data_dir.parent / f"{self.data_dir.name}.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL to give the etcd source / registry."""
        return self.client_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _command(self) -> list[str]:
        return [self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"{self.name}={self.peer_url}", "--initial-cluster-state", "new",
                "--initial-cluster-token", f"meshd-{self.name}",
                "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
                "--logger", "zap", "--log-outputs", "stderr"]

    def _env(self) -> dict[str, str]:
        # ETCD_* variables are flags to etcd: an inherited ETCD_DATA_DIR or ETCD_LISTEN_CLIENT_URLS
        # would fight the command line. Keep only the one a non-amd64 build needs to start at all.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
        arch = os.environ.get("ETCD_UNSUPPORTED_ARCH") or _ARCH.get(platform.machine())
        if arch:
            env["ETCD_UNSUPPORTED_ARCH"] = arch
        return env

    async def start(self, timeout: float = 15) -> None:
        """Spawn etcd and wait until GET <client_url>/health says healthy. RegistryError (with the
        reason, the fix and etcd's last log lines) if it exits or is not healthy in `timeout` s."""
        if self.pid is not None:
            return
        if not os.access(self.binary, os.X_OK):
            raise RegistryError(f"embedded etcd: {self.binary} is not installed or not executable; install "
                                "it (apt-get install etcd-server) or set etcd.endpoints to an etcd cluster")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.data_dir, 0o700)  # etcd warns about (and 3.5 refuses) a group/world-readable dir
        except OSError as e:
            raise RegistryError(f"embedded etcd: cannot create data dir {self.data_dir}: {e.strerror or e}") \
                from None
        await self._stop_stale()
        for what, (host, port), key in (("client", self._client, "embedded_listen"),
                                        ("peer", self._peer, "embedded_peer_listen")):
            if _port_in_use(host, port):
                raise RegistryError(self._port_message(what, host, port, key))
        logf, offset = self._open_log()
        try:
            self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=subprocess.STDOUT, env=self._env(), start_new_session=True,
                                          close_fds=True)
        except OSError as e:
            raise RegistryError(f"embedded etcd: cannot run {self.binary}: {e.strerror or e}") from None
        finally:
            logf.close()
        try:
            self.pid_path.write_text(f"{self._proc.pid}\n")
        except OSError:
            log.debug("embedded etcd: cannot write %s", self.pid_path, exc_info=True)
        log.info("embedded etcd: started pid %d, client %s, data %s, log %s", self._proc.pid, self.client_url,
                 self.data_dir, self.log_path)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RegistryError(self._exit_message(offset))
                if await self._healthy() and _owns_listener(self._proc.pid, self._client[1]):
                    log.info("embedded etcd: healthy at %s", self.client_url)
                    return
                if time.monotonic() > deadline:
                    raise RegistryError(f"embedded etcd (pid {self._proc.pid}) was not healthy at "
                                        f"{self.client_url}/health within {timeout:g}s; last lines of "
                                        f"{self.log_path}:\n  {_log_lines(self._read_log(offset))}")
                await asyncio.sleep(0.05)
        except BaseException:
            await self.stop()
            raise

    def _port_message(self, what: str, host: str, port: int, key: str) -> str:
        return (f"embedded etcd: {what} port {port} on {host} is already in use (another meshd instance, "
                f"a stray etcd, or another service); stop what holds it (`ss -ltnp 'sport = :{port}'`) or "
                f"set etcd.{key} to a free port")

    def _open_log(self):  # type: ignore[no-untyped-def]
        try:
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        except OSError:
            pass
        try:
            logf = open(self.log_path, "ab")
        except OSError as e:
            raise RegistryError(f"embedded etcd: cannot open its log {self.log_path}: {e.strerror or e}") \
                from None
        offset = logf.tell()
        return logf, offset

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(offset, 0))
                return f.read()[-65536:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _exit_message(self, offset: int) -> str:
        assert self._proc is not None
        text = self._read_log(offset)
        code = self._proc.returncode
        m = re.search(r"listen tcp ([^\"\s]*?):(\d+): bind: address already in use", text)
        if m:
            port = int(m.group(2))
            what, key = ("client", "embedded_listen") if port == self._client[1] else ("peer", "embedded_peer_listen")
            return self._port_message(what, m.group(1).strip("[]"), port, key)
        why = ""
        if "permission denied" in text:
            why = f" (permission denied: check the owner and mode of {self.data_dir} and {self.log_path})"
        elif "has already been bootstrapped" in text or "member count is unequal" in text:
            why = (f" (the data dir {self.data_dir} belongs to another cluster configuration; move it "
                   "away to start a new, empty registry)")
        return (f"embedded etcd exited with status {code} during start{why}; last lines of "
                f"{self.log_path}:\n  {_log_lines(text)}")

    async def _healthy(self) -> bool:
        host, port = self._client
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            writer.write(f"GET /health HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(65536), 2.0)
            head, _, body = data.partition(b"\r\n\r\n")
            return b" 200 " in head.split(b"\r\n", 1)[0] and json.loads(body).get("health") == "true"
        except (OSError, asyncio.TimeoutError, ValueError, AttributeError):
            return False
        finally:
            if writer is not None:
                writer.close()

    async def stop(self) -> None:
        """SIGTERM our etcd (by PID), wait up to 10 s, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                log.warning("embedded etcd: pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, STOP_TIMEOUT)
                proc.kill()
                proc.wait()
            log.info("embedded etcd: stopped pid %d (status %s)", proc.pid, proc.returncode)
        self._remove_pid_file(proc.pid)

    def _remove_pid_file(self, pid: int) -> None:
        try:
            if self.pid_path.read_text().strip() == str(pid):
                self.pid_path.unlink()
        except (OSError, ValueError):
            pass

    def _stale_pid(self) -> int | None:
        """The PID in etcd.pid if it is still an etcd running on our data dir (a crashed daemon's)."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        args = [a.decode("utf-8", "replace") for a in cmdline]
        if not args or Path(args[0]).name != "etcd":
            return None
        if "--data-dir" in args[:-1] and Path(args[args.index("--data-dir") + 1]) == self.data_dir:
            return pid
        return None

    async def _stop_stale(self) -> None:
        pid = self._stale_pid()
        if pid is None:
            try:
                self.pid_path.unlink()
            except OSError:
                pass
            return
        log.warning("embedded etcd: stopping pid %d, an etcd left running on %s by a previous meshd", pid,
                    self.data_dir)
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and self._stale_pid() == pid:
                await asyncio.sleep(0.05)
            if Path(f"/proc/{pid}").exists() and self._stale_pid() == pid:
                os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.2)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            raise RegistryError(f"embedded etcd: pid {pid} (an etcd on {self.data_dir}) is still running and "
                                f"cannot be stopped: {e.strerror}; stop it by hand") from None
        try:
            self.pid_path.unlink()
        except OSError:
            pass
