"""Names shared by the BPF C code, pin paths and Python. Change them only with a layout bump."""

from __future__ import annotations

from pathlib import Path

OBJ_SOCK_LB = "sock_lb.bpf.o"

# Maps (C identifiers in bpf/include/meshd_maps.h; also the pin file names).
MAP_SVC = "meshd_svc_v1"
MAP_BACKENDS = "meshd_be_v1"
MAP_MAGLEV = "meshd_maglev_v3"  # per-group size, two halves of 16-bit slots (layout 3)
MAP_MAGLEV_V2 = "meshd_maglev_v2"  # layout 2: 32-bit slots; migrated by the loader
MAP_MAGLEV_V1 = "meshd_maglev_v1"  # layout 1: one M for all; migrated by the loader
MAP_REVNAT = "meshd_revnat_v1"
MAP_META = "meshd_meta_v1"
MAP_NAMES = "meshd_names_v1"
MAP_SVC_EXT = "meshd_svc_ext_v1"  # tc-path overrides of external frontends
MAP_AFFINITY = "meshd_aff_v1"  # (client, group) -> backend, last use
MAP_AFFCFG = "meshd_affcfg_v1"  # group -> affinity timeout (s)
MAP_MEMBERS = "meshd_member_v1"  # (group, backend) of groups with affinity
MAP_SRCRANGES = "meshd_srcrange_v1"  # LPM: frontend + allowed source network
SOCK_LB_MAPS = (MAP_SVC, MAP_BACKENDS, MAP_MAGLEV, MAP_REVNAT, MAP_META, MAP_NAMES,
                MAP_SVC_EXT, MAP_AFFINITY, MAP_AFFCFG, MAP_MEMBERS, MAP_SRCRANGES)

# Socket storage of translated sockets (one per socket): connect() keeps (backend, VIP)
# there, so a connected socket's getpeername() never depends on the LRU meshd_revnat_v1
# (which only unconnected UDP uses), and with metrics on the socket's tag. In
# bpf/include/meshd_maps.h; reused by bpf/sock_destroy.bpf.c. MAP_SKNAT: where an older
# meshd kept (backend, VIP); read for the sockets it connected, never written.
MAP_SOCK = "meshd_sock_v1"
MAP_SKNAT = "meshd_sknat_v1"

# Metrics maps (bpf/include/meshd_metrics.h), in the same object and pin dir. The zero-value
# map (meshd_zero_v1) is not pinned: a fresh one per load is as good.
MAP_STATS = "meshd_stats_v1"  # per-CPU hash: (group, backend) -> counters and histograms
METRICS_MAPS = (MAP_STATS,)
# Pins an older meshd made that nothing reads any more: removed when a pin dir is adopted.
# meshd_skmeta_v1: the metrics tag, now in meshd_sock_v1 (a socket tagged by an older
# meshd is not counted at its close).
RETIRED_MAPS = ("meshd_skmeta_v1",)

# Authorization (bpf/include/meshd_policy.h), same object and pin dir.
MAP_IDENT = "meshd_ident_v1"  # hash: cgroup id -> identity
MAP_VERDICT = "meshd_verdict_v1"  # hash: (identity, group, uid) -> verdict
MAP_DENIED = "meshd_denied_v1"  # per-CPU hash: (group, identity) -> denials
MAP_SUBTREE = "meshd_subtree_v1"  # hash: cgroup id -> identity its new children inherit
POLICY_MAPS = (MAP_IDENT, MAP_VERDICT, MAP_DENIED, MAP_SUBTREE)

# Connection events (bpf/include/meshd_events.h), same object and pin dir.
MAP_EVENTS = "meshd_events_v1"  # ring buffer of struct meshd_event
MAP_EVCFG = "meshd_evcfg_v1"  # array[1]: mask, sample, rate
MAP_EVSTATE = "meshd_evstate_v1"  # per-CPU array[1]: rate window, loss counters
EVENT_MAPS = (MAP_EVENTS, MAP_EVCFG, MAP_EVSTATE)

# Every map the loader pins and adopts across restarts. Maps a newer meshd added are
# created (and pinned) when an older pin dir is adopted: the others keep their entries.
PINNED_MAPS = (SOCK_LB_MAPS + (MAP_SOCK, MAP_SKNAT) + METRICS_MAPS + POLICY_MAPS
               + EVENT_MAPS)

# Name of each Maglev inner map the reconciler creates (kernel names are at most 15 chars).
MAGLEV_INNER_NAME = "meshd_mglv_tbl"

# Programs (C function names in bpf/sock_lb.bpf.c) and the cgroup attach point each one uses.
# The pinned link of a program is called "link_<program>".
SOCK_LB_PROGRAMS: dict[str, str] = {
    "meshd_connect4": "cgroup_inet4_connect",
    "meshd_connect6": "cgroup_inet6_connect",
    "meshd_sendmsg4": "cgroup_udp4_sendmsg",
    "meshd_sendmsg6": "cgroup_udp6_sendmsg",
    "meshd_recvmsg4": "cgroup_udp4_recvmsg",
    "meshd_recvmsg6": "cgroup_udp6_recvmsg",
    "meshd_getpeer4": "cgroup_inet4_getpeername",
    "meshd_getpeer6": "cgroup_inet6_getpeername",
}

# Metrics programs (same object) and their cgroup attach points; attached only while
# metrics are on (loader.load(..., metrics=True), the default; loader.set_metrics()).
METRICS_PROGRAMS: dict[str, str] = {
    "meshd_sockops": "cgroup_sock_ops",
    "meshd_udp_out": "cgroup_inet_egress",
    "meshd_udp_in": "cgroup_inet_ingress",
}

RODATA = ".rodata"


def pin_dir(bpffs: Path, instance: str) -> Path:
    """Where one instance pins its maps and links: <bpffs>/meshd/<instance>."""
    return Path(bpffs) / "meshd" / instance


def link_pin_name(program: str) -> str:
    return f"link_{program}"


# ---- tc (per-packet) load balancer: bpf/tc_lb.bpf.c, bpf/include/meshd_tc.h -----------------
OBJ_TC_LB = "tc_lb.bpf.o"
MAP_TC_CT = "meshd_tcct_v1"  # LRU hash: conntrack, FWD and REV entry per flow
MAP_TC_FRAG = "meshd_tcfrag_v1"  # LRU hash: IPv4 datagram in fragments -> new address
MAP_TC_STATS = "meshd_tcstat_v1"  # per-CPU array [1]: struct meshd_tc_stats
MAP_TC_IFS = "meshd_tcif_v1"  # hash, userspace only: (netns, ifindex) with our filters
MAP_TC_ADDRS = "meshd_tcaddr_v1"  # hash: ifindex -> the addresses SNAT uses there
# Pinned beside the socket LB's maps (adopted across restarts, removed by loader.remove()).
TC_MAPS = (MAP_TC_CT, MAP_TC_FRAG, MAP_TC_STATS, MAP_TC_IFS, MAP_TC_ADDRS)
TC_PROG_INGRESS = "meshd_tc_in"  # clsact ingress: VIP -> backend
TC_PROG_EGRESS = "meshd_tc_out"  # clsact egress: backend -> VIP (replies)
