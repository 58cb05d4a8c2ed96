"""The embedded etcd: Debian's /usr/bin/etcd, run by `meshd run` when etcd.endpoints is empty.

A single-member cluster with no TCP port at all: its client and peer listeners are unix sockets
(client.sock:1, peer.sock:2) in <data dir>-sock, a directory of mode 0700 owned by meshd (root),
so only root can read or write the registry — it has no TLS and no auth of its own, and a
loopback port would let any local user redirect root's connections. The daemon and the CLI reach
it at unix:///<state_dir>/<instance>/etcd-sock/client.sock:1 (client_url()); so does etcdctl, as
root. Its data dir is <state_dir>/<instance>/etcd (data_dir_of()); next to it are etcd.log (etcd's own log,
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
import json
import logging
import os
import platform
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from meshd.errors import RegistryError

log = logging.getLogger("meshd.etcd")

ETCD_BINARY = "/usr/bin/etcd"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
STOP_TIMEOUT = 10.0
_ARCH = {"aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


CLIENT_SOCKET = "client.sock:1"  # etcd 3.4 takes unix://NAME:PORT only, and binds NAME:PORT as a
PEER_SOCKET = "peer.sock:2"  # path relative to its working directory (the socket dir)
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the NUL


def socket_dir(data_dir: Path) -> Path:
    """The 0700 directory holding the embedded etcd's sockets: <data dir>-sock beside the data dir."""
    data_dir = Path(data_dir)
    return data_dir.parent / f"{data_dir.name}-sock"


def client_url(data_dir: Path) -> str:
    """unix:///<socket dir>/client.sock:1: how the daemon and the CLI reach the embedded etcd
    (grpc and etcdctl take this form)."""
    return f"unix://{socket_dir(data_dir) / CLIENT_SOCKET}"


def data_dir_of(state_dir: Path, instance: str) -> Path:
    """Where `meshd run` keeps the embedded etcd of an instance."""
    return Path(state_dir) / instance / "etcd"


def _secure_dir(path: Path) -> None:
    """Create `path` (mode 0700) or make an existing one 0700; refuse one that is a symlink or not
    owned by us (someone else could swap the sockets in it). RegistryError naming the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(path)
    except OSError as e:
        raise RegistryError(f"embedded etcd: cannot create {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RegistryError(f"embedded etcd: {path} is not a directory (a symlink?); remove it")
    if st.st_uid != os.geteuid():
        raise RegistryError(f"embedded etcd: {path} is owned by uid {st.st_uid}, not by meshd (uid "
                            f"{os.geteuid()}); anyone owning it could intercept the registry: remove it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _socket_answers(path: Path) -> bool:
    """Does something accept connections on the unix socket `path`?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _owns_listener(pid: int, name: str) -> bool:
    """Does process `pid` hold a listening unix socket bound to `name`? (Another process answering
    /health on our socket must not pass for our etcd.) True if /proc cannot tell."""
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return True
    for row in rows:
        cols = row.split()
        # Num RefCount Protocol Flags Type St Inode Path; St 01 = SS_UNCONNECTED (a listener)
        if len(cols) > 7 and cols[5] == "01" and cols[7].rsplit("/", 1)[-1] == name:
            inodes.add(cols[6])
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
    """`client_url`/`peer_url` are accepted for callers written for the old TCP listener and
    ignored: the embedded etcd listens on unix sockets only (see the module docstring)."""

    def __init__(self, data_dir: Path, client_url: str | None = None, peer_url: str | None = None,
                 name: str = "meshd", binary: str = ETCD_BINARY):
        self.data_dir = Path(data_dir).absolute()
        self.socket_dir = socket_dir(self.data_dir)
        self.client_socket = self.socket_dir / CLIENT_SOCKET
        self.name = name
        self.binary = binary
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise RegistryError(f"embedded etcd: member name {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if len(os.fsencode(self.client_socket)) > UNIX_PATH_MAX:
            raise RegistryError(f"embedded etcd: its socket path {self.client_socket} is "
                                f"{len(os.fsencode(self.client_socket))} bytes, more than the {UNIX_PATH_MAX} a "
                                "unix socket allows; set state_dir to a shorter path")
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.pid_path = self.data_dir.parent / f"{self.data_dir.name}.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL to give the etcd source / registry: unix:///<socket dir>/client.sock:1."""
        return client_url(self.data_dir)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _command(self) -> list[str]:
        # Relative NAME:PORT socket names, bound in the working directory (the socket dir).
        client, peer = f"unix://{CLIENT_SOCKET}", f"unix://{PEER_SOCKET}"
        return [self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
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
        """Spawn etcd and wait until GET /health on its client socket says healthy. RegistryError
        (with the reason, the fix and etcd's last log lines) if it exits or is not healthy in
        `timeout` s."""
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
        _secure_dir(self.socket_dir)  # only its owner (root) may reach the sockets in it
        await self._stop_stale()
        if _socket_answers(self.client_socket):
            raise RegistryError(f"embedded etcd: another process already serves {self.client_socket} (another "
                                "meshd with the same state_dir and instance?); stop it, or give this one "
                                "another instance name")
        logf, offset = self._open_log()
        try:
            self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=subprocess.STDOUT, env=self._env(), start_new_session=True,
                                          close_fds=True, cwd=self.socket_dir)
        except OSError as e:
            raise RegistryError(f"embedded etcd: cannot run {self.binary}: {e.strerror or e}") from None
        finally:
            logf.close()
        try:
            self.pid_path.write_text(f"{self._proc.pid}\n")
        except OSError:
            log.debug("embedded etcd: cannot write %s", self.pid_path, exc_info=True)
        log.info("embedded etcd: started pid %d, client %s, data %s, log %s", self._proc.pid, self.url,
                 self.data_dir, self.log_path)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RegistryError(self._exit_message(offset))
                if await self._healthy() and _owns_listener(self._proc.pid, CLIENT_SOCKET):
                    log.info("embedded etcd: healthy at %s", self.url)
                    return
                if time.monotonic() > deadline:
                    raise RegistryError(f"embedded etcd (pid {self._proc.pid}) was not healthy at "
                                        f"{self.client_socket} within {timeout:g}s; last lines of "
                                        f"{self.log_path}:\n  {_log_lines(self._read_log(offset))}")
                await asyncio.sleep(0.05)
        except BaseException:
            await self.stop()
            raise

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
        why = ""
        if "permission denied" in text:
            why = f" (permission denied: check the owner and mode of {self.data_dir} and {self.log_path})"
        elif "has already been bootstrapped" in text or "member count is unequal" in text:
            why = (f" (the data dir {self.data_dir} belongs to another cluster configuration; move it "
                   "away to start a new, empty registry)")
        return (f"embedded etcd exited with status {code} during start{why}; last lines of "
                f"{self.log_path}:\n  {_log_lines(text)}")

    async def _healthy(self) -> bool:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.client_socket)), 1.0)
            writer.write(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
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
