"""The lab: a client namespace wired to N backend namespaces, plus a cgroup.

See the package docstring for the topology.  Everything is built with ``ip``
and ``nsenter`` subprocesses (no forks of this process, no pyroute2 netns
helpers), and the root namespace's interfaces and routes are never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from meshd.errors import LabError

from . import _host
from ._host import CGROUP_ROOT, ENV_MARK, LAB_PREFIX_ROOT, STATE_DIR, run_cmd

AGENT = Path(__file__).with_name("agent.py")
__all__ = ["Lab", "LAB_PREFIX_ROOT", "sweep"]


def sweep(all: bool = False) -> list[str]:  # noqa: A002
    """Remove leftovers of crashed labs (see :func:`netns_lab._host.sweep`)."""
    return _host.sweep(all=all)


class Lab:
    """A throw-away network lab; use as a context manager or call up()/down().

    Namespaces ``{prefix}-cli`` and ``{prefix}-b{i}``; link i is a veth pair
    ``{prefix}-c{i}`` (in cli, 10.201.i.1/24, fd00:201:i::1/64) <->
    ``{prefix}-b{i}`` (in b{i}, 10.201.i.2/24, fd00:201:i::2/64). No default
    routes anywhere. ``cgroup`` is ``/sys/fs/cgroup/unified/{prefix}``.
    """

    def __init__(self, prefix: str | None = None, backends: int = 3, ipv6: bool = True) -> None:
        self.prefix = prefix or f"{LAB_PREFIX_ROOT}{secrets.token_hex(3)}"
        if not 1 <= backends <= 254:
            raise LabError(f"backends must be 1..254, got {backends}")
        if not self.prefix.replace("_", "").isalnum() or len(f"{self.prefix}-b{backends}") > 15:
            raise LabError(f"prefix {self.prefix!r}: use [A-Za-z0-9_] and keep "
                           f"'{self.prefix}-b{backends}' <= 15 chars (interface name limit)")
        self.backends = backends
        self.ipv6 = ipv6
        self.cgroup: Path = CGROUP_ROOT / self.prefix
        self.state_file: Path = _host.state_path(self.prefix)
        self._procs: list[tuple[subprocess.Popen[Any], int | None, list[str]]] = []
        self._foreign_pids: list[dict[str, Any]] = []  # from a state file (from_state)
        self._detached = False
        self._is_up = False
        self._created = time.time()

    # ------------------------------------------------------------ naming

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-cli"

    def backend_ns(self, i: int) -> str:
        self._check_index(i)
        return f"{self.prefix}-b{i}"

    @property
    def names(self) -> list[str]:
        """Backend names, as the agents answer them: ``b1`` .. ``bN``."""
        return [f"b{i}" for i in range(1, self.backends + 1)]

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns] + [self.backend_ns(i) for i in range(1, self.backends + 1)]

    def client_if(self, i: int) -> str:
        """Client-side veth of link i (lives in the client namespace)."""
        self._check_index(i)
        return f"{self.prefix}-c{i}"

    def backend_if(self, i: int) -> str:
        """Backend-side veth of link i (lives in backend namespace i)."""
        self._check_index(i)
        return f"{self.prefix}-b{i}"

    def backend_addr(self, i: int, family: int = 4) -> str:
        self._check_index(i)
        return self._addr(i, 2, family)

    def client_addr(self, i: int, family: int = 4) -> str:
        self._check_index(i)
        return self._addr(i, 1, family)

    def _addr(self, i: int, host: int, family: int) -> str:
        if family == 4:
            return f"10.201.{i}.{host}"
        if family == 6:
            if not self.ipv6:
                raise LabError(f"lab {self.prefix} was built with ipv6=False")
            return f"fd00:201:{i:x}::{host}"
        raise LabError(f"family must be 4 or 6, got {family}")

    def _check_index(self, i: int) -> None:
        if not 1 <= i <= self.backends:
            raise LabError(f"backend index {i} out of range 1..{self.backends}")

    def resolve_ns(self, ns: str) -> str:
        """Full namespace name; also accepts ``cli``/``client`` and ``b{i}``."""
        if ns in ("cli", "client"):
            return self.client_ns
        if ns in self.names:
            return self.backend_ns(int(ns[1:]))
        if ns in self.namespaces:
            return ns
        raise LabError(f"{ns!r} is not a namespace of lab {self.prefix}: {self.namespaces}")

    # ------------------------------------------------------------ lifecycle

    def up(self) -> Lab:
        """Build namespaces, veths, addresses and the cgroup. On any failure,
        remove what was built and raise LabError naming the failing command."""
        if os.geteuid() != 0:
            raise LabError("the netns lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        for tool in ("ip", "nsenter", "sh"):
            if shutil.which(tool) is None:
                raise LabError(f"`{tool}` not found in PATH (needed by the netns lab)")
        if not (CGROUP_ROOT / "cgroup.procs").exists():
            raise LabError(f"cgroup2 is not mounted at {CGROUP_ROOT}")
        clash = [ns for ns in self.namespaces if _host.netns_inode(ns) is not None]
        if self.state_file.exists() or self.cgroup.exists() or clash:
            raise LabError(f"lab {self.prefix} already exists; run `python -m netns_lab down "
                           f"--prefix {self.prefix}` or `python -m netns_lab sweep`")
        self._is_up = True
        self._save_state()  # first, so a crash at any later point is sweepable
        made: list[str] = []
        made_cg = False
        try:
            for ns in self.namespaces:
                run_cmd(["ip", "netns", "add", ns])
                made.append(ns)
                run_cmd(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
                if self.ipv6:  # no DAD (link-locals usable at once); keep v6 addrs on link down
                    run_cmd(["nsenter", f"--net=/run/netns/{ns}", "--", "sysctl", "-qw",
                             *[f"net.ipv6.conf.{c}.{k}=1" for c in ("all", "default")
                               for k in ("keep_addr_on_down",)],
                             *[f"net.ipv6.conf.{c}.accept_dad=0" for c in ("all", "default")]])
            for i in range(1, self.backends + 1):
                cli, be = self.client_if(i), self.backend_if(i)
                # distinct ifindexes on the two ends: a veth whose ifindex equals its
                # peer's (both 2 in fresh namespaces) gets no urgent linkwatch event
                # and keeps NO-CARRIER for up to 1 s, dropping the first packets
                run_cmd(["ip", "link", "add", cli, "index", str(1000 + i), "netns", self.client_ns,
                         "type", "veth", "peer", "name", be, "index", str(2000 + i),
                         "netns", self.backend_ns(i)])
                self._address_link(i)
                run_cmd(["ip", "-n", self.client_ns, "link", "set", "dev", cli, "up"])
                run_cmd(["ip", "-n", self.backend_ns(i), "link", "set", "dev", be, "up"])
            self._wait_links(range(1, self.backends + 1))
            self.cgroup.mkdir()
            made_cg = True
        except BaseException as e:  # incl. KeyboardInterrupt: never leave half a lab
            self._is_up = False
            try:  # only what this call made: never a clashing lab's items
                _host.teardown(self.prefix, made, self.cgroup if made_cg else None, [])
            except LabError as e2:
                raise LabError(f"lab {self.prefix}: up failed: {e}; cleanup also failed: {e2}") from e
            if isinstance(e, (LabError, OSError)):
                raise LabError(f"lab {self.prefix}: up failed: {e}") from e
            raise
        return self

    def _address_link(self, i: int) -> None:
        """(Re)apply link i's addresses on both ends (idempotent)."""
        for ns, dev, host in ((self.client_ns, self.client_if(i), 1),
                              (self.backend_ns(i), self.backend_if(i), 2)):
            run_cmd(["ip", "-n", ns, "addr", "replace", f"{self._addr(i, host, 4)}/24", "dev", dev])
            if self.ipv6:
                run_cmd(["ip", "-n", ns, "-6", "addr", "replace", f"{self._addr(i, host, 6)}/64",
                         "dev", dev, "nodad"])

    def _wait_links(self, links: Iterable[int], deadline: float = 3.0) -> None:
        """Wait until both ends of the given links have carrier (operstate UP)."""
        want = {(ns, dev) for i in links for ns, dev in ((self.client_ns, self.client_if(i)),
                                                         (self.backend_ns(i), self.backend_if(i)))}
        end = time.monotonic() + deadline
        while True:
            for ns in {ns for ns, _ in want}:
                out = run_cmd(["ip", "-n", ns, "-o", "link", "show"]).stdout
                for line in out.splitlines():
                    dev = line.split(": ", 2)[1].split("@", 1)[0]
                    if (ns, dev) in want and "state UP" in line and "NO-CARRIER" not in line:
                        want.discard((ns, dev))
            if not want:
                return
            if time.monotonic() > end:
                raise LabError(f"links without carrier after {deadline}s: {sorted(want)}")
            time.sleep(0.02)

    def down(self) -> None:
        """Remove everything: processes (TERM, 2 s, KILL), namespaces, cgroup,
        state file. Already-gone items are fine; raises LabError only if
        something is still left afterwards."""
        recorded = [{"pid": p.pid, "start": st} for p, st, _ in self._procs] + self._foreign_pids
        try:
            _host.teardown(self.prefix, self.namespaces, self.cgroup, recorded)
        finally:
            for p, _, _ in self._procs:
                try:
                    p.wait(timeout=1.0)  # reap; teardown already signalled it
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=1.0)
            self._procs.clear()
            self._foreign_pids.clear()
            self._is_up = False

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def detach(self) -> None:
        """Mark the lab as meant to outlive this process: sweep() leaves it
        alone (unless all=True) until `python -m netns_lab down --prefix P`."""
        self._detached = True
        self._save_state()

    @classmethod
    def from_state(cls, prefix: str) -> Lab:
        """Re-open a lab recorded in its state file (e.g. to down() it)."""
        try:
            st = json.loads(_host.state_path(prefix).read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"no readable state for lab {prefix} in {STATE_DIR}: {e}") from e
        lab = cls(prefix, backends=int(st["backends"]), ipv6=bool(st["ipv6"]))
        lab._foreign_pids = list(st.get("pids", []))
        lab._detached = bool(st.get("detached"))
        lab._is_up = True
        return lab

    def state(self) -> dict[str, Any]:
        """What the state file records."""
        pids = [{"pid": p.pid, "start": st, "argv": argv} for p, st, argv in self._procs]
        return {"prefix": self.prefix, "backends": self.backends, "ipv6": self.ipv6,
                "namespaces": self.namespaces, "cgroup": str(self.cgroup),
                "owner": {"pid": os.getpid(), "start": _host.proc_start_time(os.getpid())},
                "detached": self._detached, "pids": pids + self._foreign_pids,
                "created": self._created}

    def _save_state(self) -> None:
        if self._is_up:
            _host.write_state(self.prefix, self.state())

    # ------------------------------------------------------------ processes

    def _wrap(self, ns: str, argv: list[str], cgroup: bool) -> list[str]:
        nsenter = ["nsenter", f"--net=/run/netns/{self.resolve_ns(ns)}", "--"]
        if not cgroup:
            return nsenter + list(argv)
        script = f'echo $$ > {self.cgroup}/cgroup.procs && exec nsenter --net="$0" -- "$@"'
        return ["sh", "-c", script, f"/run/netns/{self.resolve_ns(ns)}", *argv]

    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        out = dict(os.environ if env is None else env)
        out[ENV_MARK] = self.prefix
        return out

    def run(self, ns: str, argv: list[str], *, cgroup: bool = False,
            **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in namespace ``ns`` (optionally in the lab cgroup);
        its PID is recorded so down()/sweep() stop it. The PID is argv's own
        (sh and nsenter exec), so ``proc.pid`` is the process itself."""
        if not self._is_up:
            raise LabError(f"lab {self.prefix} is not up")
        env = self._env(popen_kwargs.pop("env", None))
        wrapped = self._wrap(ns, argv, cgroup)
        try:
            proc = subprocess.Popen(wrapped, env=env, **popen_kwargs)
        except OSError as e:
            raise LabError(f"cannot start {argv} in {ns}: {e}") from e
        self._procs.append((proc, _host.proc_start_time(proc.pid), list(argv)))
        self._save_state()
        return proc

    def exec(self, ns: str, argv: list[str], *, cgroup: bool = False, timeout: float = 30,
             check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``ns`` to completion (text, output captured, ``input`` on stdin)."""
        if not self._is_up:
            raise LabError(f"lab {self.prefix} is not up")
        wrapped = self._wrap(ns, argv, cgroup)
        try:
            cp = subprocess.run(wrapped, env=self._env(None), capture_output=True, text=True,
                                timeout=timeout, input=input)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"{argv} in {ns} timed out after {timeout}s") from e
        if check and cp.returncode != 0:
            raise LabError(f"{argv} in {ns} failed (exit {cp.returncode})\n"
                           f"stdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}")
        return cp

    def agent(self, cmd: str, ns: str = "cli", *, cgroup: bool = False, run_timeout: float = 60,
              **opts: Any) -> dict[str, Any]:
        """Run an agent client (tcp/udp/rr/connrate) in ``ns`` (and in the lab cgroup if
        ``cgroup``); return its JSON.
        ``opts`` become flags: ``count=5`` -> ``--count 5``, ``hold=True`` -> ``--hold``,
        ``also=["a", "b"]`` -> ``--also a --also b``."""
        argv = agent_argv(cmd)
        for k, v in opts.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                argv.append(flag)
            elif isinstance(v, (list, tuple)):  # a repeatable flag
                for x in v:
                    argv += [flag, str(x)]
            elif v not in (False, None):
                argv += [flag, str(v)]
        cp = self.exec(ns, argv, cgroup=cgroup, timeout=run_timeout, check=False)
        try:
            return dict(json.loads(cp.stdout))
        except ValueError as e:
            raise LabError(f"agent {cmd} in {ns} gave no JSON (exit {cp.returncode}): "
                           f"{cp.stdout.strip()} {cp.stderr.strip()}") from e

    @property
    def pids(self) -> list[int]:
        """PIDs started by run() that are still running."""
        return [p.pid for p, _, _ in self._procs if p.poll() is None]

    def start_backends(self, port: int = 8080, *, udp: bool = True, deadline: float = 20.0,
                       sink_port: int | None = None) -> None:
        """Run the agent server as ``b{i}`` in every backend namespace (TCP and,
        if ``udp``, UDP; IPv4+IPv6) and wait until each answers from the client.
        ``sink_port``: the servers also accept and close TCP connections there at once
        (listening before they answer on ``port``)."""
        procs = []
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        for i in range(1, self.backends + 1):
            log = STATE_DIR / f"{self.prefix}.b{i}-{port}.log"
            argv = agent_argv("serve") + ["--name", f"b{i}", "--port", str(port)]
            if sink_port:
                argv += ["--sink-port", str(sink_port)]
            with open(log, "wb") as f:
                procs.append((i, log, self.run(self.backend_ns(i), argv + (["--udp"] if udp else []),
                                               stdin=subprocess.DEVNULL, stdout=f, stderr=f)))
        targets = []
        for i in range(1, self.backends + 1):
            for fam in (4, 6) if self.ipv6 else (4,):
                targets += ["--target", f"{self.backend_addr(i, fam)},{port},b{i}"]
        cp = self.exec("cli", agent_argv("wait") + targets + ["--deadline", str(deadline)]
                       + (["--udp"] if udp else []), timeout=deadline + 10, check=False)
        if cp.returncode != 0:
            dead = [f"b{i} exited {p.poll()}: {log.read_text(errors='replace')[-500:]}"
                    for i, log, p in procs if p.poll() is not None]
            raise LabError(f"lab {self.prefix}: backends on port {port} not ready after "
                           f"{deadline}s: {cp.stdout.strip()} {cp.stderr.strip()} {dead}")

    def set_backend_link(self, i: int, up: bool, *, side: str = "backend") -> None:
        """Take link i down/up. ``side="backend"`` (default) downs the backend
        end: the client keeps its route, so traffic times out like a dead host;
        ``side="client"`` downs the client end: its route goes, ENETUNREACH."""
        if side not in ("backend", "client"):
            raise LabError(f"side must be 'backend' or 'client', got {side!r}")
        ends = [(self.backend_ns(i), self.backend_if(i)), (self.client_ns, self.client_if(i))]
        (ns, dev), (peer_ns, peer_dev) = ends if side == "backend" else ends[::-1]
        run_cmd(["ip", "-n", ns, "link", "set", "dev", dev, "up" if up else "down"])
        if up:
            self._address_link(i)  # in case IPv6 addresses were flushed on link down
            line = run_cmd(["ip", "-n", peer_ns, "-o", "link", "show", "dev", peer_dev]).stdout
            if "UP" in line.split("<", 1)[1].split(">", 1)[0].split(","):
                self._wait_links([i])  # both ends admin-up: wait for carrier


def agent_argv(cmd: str) -> list[str]:
    """argv prefix running the agent with this interpreter (stdlib only: -I -S)."""
    return [sys.executable, "-I", "-S", str(AGENT), cmd]
