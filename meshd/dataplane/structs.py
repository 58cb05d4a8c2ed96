"""Python mirrors of the C structs in bpf/include/meshd_structs.h — one mirror per struct.

tests/kernel/test_btf_layout.py checks every size and field offset here against the BTF of
the compiled object, so a change on either side that is not made on the other fails CI.
Addresses are 16 bytes, network order, IPv4 stored as ::ffff:a.b.c.d; ports network order.
"""

from __future__ import annotations

import ctypes as C
import ipaddress
import socket

IPPROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in IPPROTO.items()}

Addr16 = C.c_uint8 * 16


class SvcKey(C.Structure):
    _fields_ = [("addr", Addr16), ("port", C.c_uint16), ("proto", C.c_uint8), ("pad", C.c_uint8)]


class SvcVal(C.Structure):
    _fields_ = [("id", C.c_uint32), ("count", C.c_uint16), ("flags", C.c_uint16)]


# SvcVal.flags (MESHD_SVC_F_*): the same bits as meshd.desired G_* / FE_*
SVC_F_DROP_EMPTY, SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_KEEP_SOURCE, SVC_F_SOURCE_RANGES = \
    0x01, 0x02, 0x04, 0x08, 0x10
SVC_F_TABLE_B = 0x20  # the group's Maglev table is in the second half of its inner map
SVC_F_POLICY = 0x40  # a policy selects the group: callers must be allowed (meshd_policy.h)
SVC_F_POLICY_OPEN = 0x80  # with SVC_F_POLICY: deny policies only: no verdict = allowed

TABLE_CHUNK = 16  # MESHD_TABLE_CHUNK: __u32 (member ids, header) per inner-array element
TABLE_SLOTS = 32  # MESHD_TABLE_SLOTS: __u16 slots per inner-array element


class TableChunk(C.Structure):
    """Value of the inner arrays of meshd_maglev_v3 (element 0: M, slot chunks per half,
    member chunks per half; layout in meshd/dataplane/tables.py)."""
    _fields_ = [("slot", C.c_uint32 * TABLE_CHUNK)]


class AffKey(C.Structure):
    _fields_ = [("netns", C.c_uint64), ("addr", Addr16), ("group", C.c_uint32),
                ("pad", C.c_uint32)]


class AffVal(C.Structure):
    _fields_ = [("seen_ns", C.c_uint64), ("backend", C.c_uint32), ("pad", C.c_uint32)]


class MemberKey(C.Structure):
    _fields_ = [("group", C.c_uint32), ("backend", C.c_uint32)]


class SrcRangeKey(C.Structure):
    _fields_ = [("prefixlen", C.c_uint32), ("vip", Addr16), ("port", C.c_uint16),
                ("proto", C.c_uint8), ("pad", C.c_uint8), ("src", Addr16)]


class Backend(C.Structure):
    _fields_ = [("addr", Addr16), ("port", C.c_uint16), ("proto", C.c_uint8),
                ("family", C.c_uint8), ("flags", C.c_uint32)]


class RevnatKey(C.Structure):
    _fields_ = [("cookie", C.c_uint64), ("addr", Addr16), ("port", C.c_uint16),
                ("pad", C.c_uint16), ("pad2", C.c_uint32)]


class RevnatVal(C.Structure):
    _fields_ = [("addr", Addr16), ("port", C.c_uint16), ("pad", C.c_uint16)]


class Cfg(C.Structure):
    _fields_ = [("unused", C.c_uint32), ("flags", C.c_uint32),
                ("self_pidns_dev", C.c_uint64), ("self_pidns_ino", C.c_uint64),
                ("self_tgid", C.c_uint32), ("pad", C.c_uint32)]


class SkNat(C.Structure):
    """Value of meshd_sknat_v1 (socket storage of an older meshd, read only): backend and
    VIP of a connected socket."""
    _fields_ = [("be_addr", Addr16), ("vip_addr", Addr16), ("be_port", C.c_uint16),
                ("vip_port", C.c_uint16)]


class Sock(C.Structure):
    """Value of meshd_sock_v1 (socket storage): what connect() translated and, with metrics
    on, the socket's tag."""
    _fields_ = [("be_addr", Addr16), ("vip_addr", Addr16), ("be_port", C.c_uint16),
                ("vip_port", C.c_uint16), ("flags", C.c_uint32), ("start_ns", C.c_uint64),
                ("flushed_ns", C.c_uint64), ("bytes_acked", C.c_uint64),
                ("bytes_received", C.c_uint64), ("cgroup", C.c_uint64),
                ("group", C.c_uint32), ("backend", C.c_uint32), ("identity", C.c_uint32),
                ("pid", C.c_uint32), ("uid", C.c_uint32), ("pad", C.c_uint32),
                ("comm", C.c_char * 16)]


CFG_F_METRICS = 1  # MESHD_CFG_F_METRICS: the socket hooks tag sockets and count refusals


class Meta(C.Structure):
    _fields_ = [("maglev_m", C.c_uint32), ("layout", C.c_uint32)]


class SvcName(C.Structure):
    _fields_ = [("name", C.c_char * 160)]


# ---- metrics (bpf/include/meshd_metrics.h) --------------------------------------------------
HIST_BUCKETS = 24  # MESHD_HIST_BUCKETS: <1us, [1,2), [2,4), ... [2^21, 2^22) us, >= 2^22 us


class StatsKey(C.Structure):
    _fields_ = [("group", C.c_uint32), ("backend", C.c_uint32)]


# Scalar counters of struct meshd_stats, in order; the two histograms follow.
STATS_COUNTERS = ("opened", "closed", "fail_refused", "fail_timeout", "fail_reset",
                  "fail_other", "tx_bytes", "rx_bytes", "tx_packets", "rx_packets",
                  "connect_sum_us", "rtt_sum_us")


class Stats(C.Structure):
    """One CPU's copy of the counters of one (group, backend) pair; all u64."""
    _fields_ = ([(n, C.c_uint64) for n in STATS_COUNTERS]
                + [("connect_hist", C.c_uint64 * HIST_BUCKETS),
                   ("rtt_hist", C.c_uint64 * HIST_BUCKETS)])


STATS_WORDS = C.sizeof(Stats) // 8  # the struct as a flat u64 vector (Python sums CPUs)


# ---- authorization (bpf/include/meshd_policy.h) ----------------------------------------------
UID_ANY = 0xFFFFFFFF  # MESHD_UID_ANY
VERDICT_ALLOW, VERDICT_DENY = 1, 2  # MESHD_VERDICT_*
VERDICT_F_UID = 1  # MESHD_VERDICT_F_UID: some uid has its own entry: look it up


class Ident(C.Structure):
    """Value of meshd_ident_v1 (key: c_uint64 cgroup id)."""
    _fields_ = [("identity", C.c_uint32), ("pad", C.c_uint32)]


class VerdictKey(C.Structure):
    _fields_ = [("identity", C.c_uint32), ("group", C.c_uint32), ("uid", C.c_uint32),
                ("pad", C.c_uint32)]


class Verdict(C.Structure):
    _fields_ = [("action", C.c_uint8), ("flags", C.c_uint8), ("pad", C.c_uint16),
                ("policy", C.c_uint32)]


class DeniedKey(C.Structure):
    """Key of meshd_denied_v1 (value: c_uint64 per CPU)."""
    _fields_ = [("group", C.c_uint32), ("identity", C.c_uint32)]


# ---- connection events (bpf/include/meshd_events.h) -----------------------------------------
EV_CONNECT, EV_DENIED, EV_FAILED, EV_CLOSED = 1, 2, 3, 4  # MESHD_EV_*
EV_NAMES = {EV_CONNECT: "connect", EV_DENIED: "denied", EV_FAILED: "failed",
            EV_CLOSED: "closed"}
EV_F_SENDMSG = 1  # MESHD_EV_F_SENDMSG: from sendmsg (unconnected UDP), not connect
EVENTS_RING_DEFAULT = 1 << 20  # MESHD_EVENTS_RING_DEFAULT


class Event(C.Structure):
    """One record of meshd_events_v1."""
    _fields_ = [("ts_ns", C.c_uint64), ("cookie", C.c_uint64), ("cgroup", C.c_uint64),
                ("duration_ns", C.c_uint64), ("tx_bytes", C.c_uint64),
                ("rx_bytes", C.c_uint64), ("type", C.c_uint32), ("pid", C.c_uint32),
                ("uid", C.c_uint32), ("identity", C.c_uint32), ("group", C.c_uint32),
                ("backend", C.c_uint32), ("policy", C.c_uint32), ("err", C.c_int32),
                ("vip", Addr16), ("be_addr", Addr16), ("vip_port", C.c_uint16),
                ("be_port", C.c_uint16), ("proto", C.c_uint8), ("flags", C.c_uint8),
                ("pad", C.c_uint16), ("comm", C.c_char * 16)]


class EvCfg(C.Structure):
    """Value of meshd_evcfg_v1[0]."""
    _fields_ = [("mask", C.c_uint32), ("sample", C.c_uint32), ("rate", C.c_uint32),
                ("pad", C.c_uint32)]


class EvState(C.Structure):
    """Value of meshd_evstate_v1[0], one per CPU."""
    _fields_ = [("window_ns", C.c_uint64), ("in_window", C.c_uint64),
                ("lost_full", C.c_uint64), ("lost_rate", C.c_uint64),
                ("sampled_out", C.c_uint64)]


LAYOUT_VERSION = 3  # 1: meshd_maglev_v1 (one M); 2: meshd_maglev_v2; 3: meshd_maglev_v3

# C struct name -> mirror, for the BTF layout test.
MIRRORS = {
    "meshd_svc_key": SvcKey,
    "meshd_svc_val": SvcVal,
    "meshd_aff_key": AffKey,
    "meshd_aff_val": AffVal,
    "meshd_member_key": MemberKey,
    "meshd_srcrange_key": SrcRangeKey,
    "meshd_backend": Backend,
    "meshd_revnat_key": RevnatKey,
    "meshd_revnat_val": RevnatVal,
    "meshd_cfg": Cfg,
    "meshd_sknat": SkNat,
    "meshd_sock": Sock,
    "meshd_meta": Meta,
    "meshd_svc_name": SvcName,
    "meshd_stats_key": StatsKey,
    "meshd_stats": Stats,
    "meshd_ident": Ident,
    "meshd_verdict_key": VerdictKey,
    "meshd_verdict": Verdict,
    "meshd_denied_key": DeniedKey,
    "meshd_event": Event,
    "meshd_evcfg": EvCfg,
    "meshd_evstate": EvState,
}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def pack_addr(ip: IPAddress) -> Addr16:
    """16-byte network-order address; IPv4 as ::ffff:a.b.c.d."""
    raw = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
    return Addr16.from_buffer_copy(raw)


def unpack_addr(a: Addr16) -> IPAddress:
    v6 = ipaddress.IPv6Address(bytes(a))
    return v6.ipv4_mapped or v6


def port_be(port: int) -> int:
    """A host-order port as the c_uint16 whose memory holds it in network order."""
    return socket.htons(port)


def port_host(raw: int) -> int:
    return socket.ntohs(raw)


def svc_key(vip: IPAddress, port: int, protocol: str) -> SvcKey:
    return SvcKey(addr=pack_addr(vip), port=port_be(port), proto=IPPROTO[protocol])


def srcrange_key(vip: IPAddress, port: int, protocol: str, net) -> SrcRangeKey:
    """LPM key of one allowed source network of one frontend: prefixlen counts the 160 bits
    of (vip, port, proto, pad), then the network's bits, IPv4 as ::ffff:0:0/96 + prefix."""
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    return SrcRangeKey(prefixlen=160 + bits, vip=pack_addr(vip), port=port_be(port),
                       proto=IPPROTO[protocol], src=pack_addr(net.network_address))


def parse_srcrange_key(k: SrcRangeKey):
    """(vip, port, protocol, network) of a key srcrange_key() made; None for anything else."""
    proto = PROTO_NAME.get(k.proto)
    bits = k.prefixlen - 160
    if proto is None or not 0 <= bits <= 128:
        return None
    vip = unpack_addr(k.vip)
    raw = ipaddress.IPv6Address(bytes(k.src))
    # by the frontend's family, not by the look of the source: an IPv6 range inside
    # ::ffff:0:0/96 stays IPv6 (review finding: it came back as IPv4 and was rewritten)
    if vip.version == 4:
        if raw.ipv4_mapped is None or bits < 96:
            return None
        net = ipaddress.IPv4Network((raw.ipv4_mapped, bits - 96))
    else:
        net = ipaddress.IPv6Network((raw, bits))
    return vip, port_host(k.port), proto, net


def backend(addr: IPAddress, port: int, protocol: str) -> Backend:
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return Backend(addr=pack_addr(addr), port=port_be(port), proto=IPPROTO[protocol],
                   family=family)
