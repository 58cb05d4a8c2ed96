"""Connection events from the kernel (bpf/include/meshd_events.h): read, decode, configure.

The socket hooks and sockops write struct meshd_event records into the pinned ring buffer
meshd_events_v1; `EventReader` consumes them (one consumer per ring: the daemon, which
serves them to `meshd observe`). `write_evcfg` sets what is emitted (meshd_evcfg_v1, read
by the programs on every event: takes effect at once); `read_evstate` sums the per-CPU
loss counters of meshd_evstate_v1 (for meshd_events_lost_total).
"""

from __future__ import annotations

import ctypes as C
import errno as _errno
import socket
import struct
from pathlib import Path
from typing import NamedTuple

import logging

from meshd import names
from meshd.errors import DataplaneError
from meshd.dataplane import libbpf as bpf
from meshd.dataplane import structs as S

log = logging.getLogger("meshd.daemon")

TYPES = dict(S.EV_NAMES)  # 1 -> "connect", ...
TYPE_IDS = {v: k for k, v in TYPES.items()}
U32 = 0xFFFFFFFF


def event_mask(types) -> int:
    """The meshd_evcfg.mask bits of event type names ("connect", "denied", "failed",
    "closed"); ValueError naming the known ones for anything else."""
    mask = 0
    for t in types:
        if t not in TYPE_IDS:
            raise ValueError(f"event type {t!r}: must be one of {', '.join(TYPE_IDS)}")
        mask |= 1 << TYPE_IDS[t]
    return mask


ALL = event_mask(TYPE_IDS)  # every event type


class Event(NamedTuple):
    """One decoded event. Addresses as strings ("10.96.0.10", "fd00::10"), ports as host
    ints; backend_addr is None (and backend_port 0) when no backend was picked."""
    type: str  # "connect" | "denied" | "failed" | "closed"
    ts_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns())
    cookie: int  # socket cookie
    cgroup: int  # caller's cgroup id
    pid: int
    uid: int
    comm: str
    identity: int  # 0: none
    group: int  # frontend group id
    backend: int  # backend id, 0: none
    policy: int  # DENIED: the deny policy's id; 0: no policy allows
    err: int  # positive errno, 0: none
    vip: str
    vip_port: int
    backend_addr: str | None
    backend_port: int
    proto: str  # "TCP" | "UDP"
    sendmsg: bool  # from sendmsg (unconnected UDP), not connect
    duration_ns: int  # FAILED (sockops) / CLOSED: since connect()
    tx_bytes: int  # CLOSED: payload sent
    rx_bytes: int  # CLOSED: payload received

    @property
    def err_name(self) -> str:
        """"ECONNREFUSED", ...; "" for 0."""
        return _errno.errorcode.get(self.err, str(self.err)) if self.err else ""

    def to_dict(self) -> dict:
        return {**self._asdict(), "err_name": self.err_name}


# struct meshd_event, read with one struct.unpack_from (a ctypes copy and ipaddress objects
# per event cost ~13 us; this ~3 us: a busy node emits thousands a second). The layout is
# checked against the ctypes mirror (itself checked against BTF) at import.
_EVENT = struct.Struct("<6Q7Ii16s16s2s2sBBH16s")
assert _EVENT.size == C.sizeof(S.Event), "struct meshd_event and its decoder differ"
_MAPPED = bytes(10) + b"\xff\xff"
_ntop = socket.inet_ntop
_INET, _INET6 = socket.AF_INET, socket.AF_INET6
_PROTO = {6: "TCP", 17: "UDP"}


def _addr(b: bytes) -> str:
    return _ntop(_INET, b[12:]) if b[:12] == _MAPPED else _ntop(_INET6, b)


def decode(raw: bytes) -> Event:
    """An Event from one ring buffer record; DataplaneError if it is too short."""
    if len(raw) < C.sizeof(S.Event):
        raise DataplaneError(f"event record of {len(raw)} bytes, struct meshd_event has "
                             f"{C.sizeof(S.Event)}: the BPF object and meshd differ")
    (ts, cookie, cgroup, duration, tx, rx, kind, pid, uid, identity, group, backend, policy,
     err, vip, be, vport, bport, proto, flags, _pad, comm) = _EVENT.unpack_from(raw)
    has_be = backend or bport != b"\0\0" or any(be)
    return Event(TYPES.get(kind, str(kind)), ts, cookie, cgroup, pid, uid,
                 comm.split(b"\0", 1)[0].decode(errors="replace"), identity, group, backend,
                 policy, err, _addr(vip), int.from_bytes(vport, "big"),
                 _addr(be) if has_be else None, int.from_bytes(bport, "big"),
                 _PROTO.get(proto, str(proto)), bool(flags & S.EV_F_SENDMSG), duration, tx, rx)


def _pin(bpffs: Path, instance: str, name: str) -> Path:
    pin = names.pin_dir(bpffs, instance) / name
    if not pin.exists():
        raise DataplaneError(f"instance {instance!r} has no {name} at {pin.parent}: is a "
                             "`meshd run` of this version started?")
    return pin


class EventReader:
    """Consumes the pinned ring buffer of `instance`. poll(timeout_ms) -> list[Event]."""

    def __init__(self, bpffs: Path, instance: str):
        self.undecodable = 0
        fd = bpf.obj_get(_pin(bpffs, instance, names.MAP_EVENTS))
        try:
            self._rb = bpf.RingBuffer(fd, names.MAP_EVENTS)
        finally:
            bpf.close_fd(fd)  # libbpf keeps its own mapping of the ring

    def poll(self, timeout_ms: int) -> list[Event]:
        """Waits up to `timeout_ms` for a wakeup, then returns the events in the ring. The
        kernel wakes readers only when the ring is a quarter full (a wakeup per event costs
        the connect path ~20 us), so events arrive at most `timeout_ms` late: call this in
        a loop with a short timeout (100 ms). -1 would wait for that quarter."""
        got = self._rb.poll(timeout_ms)
        out = []
        for r in got or self._rb.consume():
            try:
                out.append(decode(r))
            except DataplaneError as e:  # one bad record never stops the stream
                self.undecodable += 1
                if self.undecodable == 1:
                    log.error("connection events: %s (skipped; counted as undecodable)", e)
        return out

    def consume(self) -> list[Event]:
        """Every event in the ring now, without waiting."""
        return [decode(r) for r in self._rb.consume()]

    def fileno(self) -> int:
        """Readable when the ring is a quarter full (not on every event: see poll())."""
        return self._rb.epoll_fd()

    def close(self) -> None:
        self._rb.close()

    def __enter__(self) -> "EventReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_evcfg(bpffs: Path, instance: str, mask: int, sample: int, rate: int) -> None:
    """Sets what the programs emit: `mask` bits 1 << S.EV_* (0: events off; event_mask()),
    CONNECT and CLOSED of 1 in `sample` sockets (0 or 1: all), at most `rate` events per
    second per CPU (0: no limit). Takes effect for the next event."""
    for what, v in (("mask", mask), ("sample", sample), ("rate", rate)):
        if not isinstance(v, int) or not 0 <= v <= U32:
            raise DataplaneError(f"events {what}={v!r}: must be an integer from 0 to {U32}")
    if mask & ~ALL:
        raise DataplaneError(f"events mask {mask:#x}: only bits {ALL:#x} are event types")
    m = bpf.Map(bpf.obj_get(_pin(bpffs, instance, names.MAP_EVCFG)), names.MAP_EVCFG,
                C.c_uint32, S.EvCfg)
    try:
        m.update(C.c_uint32(0), S.EvCfg(mask=mask, sample=sample, rate=rate))
    finally:
        m.close()


def read_evcfg(bpffs: Path, instance: str) -> dict[str, int]:
    """{"mask", "sample", "rate"} as the programs see them."""
    m = bpf.Map(bpf.obj_get(_pin(bpffs, instance, names.MAP_EVCFG)), names.MAP_EVCFG,
                C.c_uint32, S.EvCfg)
    try:
        v = m.lookup(C.c_uint32(0)) or S.EvCfg()
    finally:
        m.close()
    return {"mask": v.mask, "sample": v.sample, "rate": v.rate}


def read_evstate(bpffs: Path, instance: str) -> dict[str, int]:
    """{"lost_full", "lost_rate", "sampled_out"} summed over CPUs, since the maps were
    created: lost_full (the ring was full), lost_rate (over the per-CPU rate), sampled_out
    (skipped by sampling: not a loss)."""
    m = bpf.PercpuMap(bpf.obj_get(_pin(bpffs, instance, names.MAP_EVSTATE)),
                      names.MAP_EVSTATE, C.c_uint32, S.EvState)
    try:
        value = m.lookup(C.c_uint32(0))
        copies = m.copies(value) if value is not None else []
    finally:
        m.close()
    return {k: sum(getattr(c, k) for c in copies)
            for k in ("lost_full", "lost_rate", "sampled_out")}


def monotonic_to_wall(ts_ns: int) -> float:
    """An event's ts_ns (CLOCK_MONOTONIC) as a wall-clock time.time() value (approximate:
    the two clocks are read once, now)."""
    import time
    return time.time() - (time.monotonic_ns() - ts_ns) / 1e9


__all__ = ["Event", "EventReader", "decode", "event_mask", "write_evcfg", "read_evcfg",
           "read_evstate", "monotonic_to_wall", "ALL"]
