/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Structs shared by the BPF programs and the Python control plane.
 *
 * Every struct here has exactly one Python mirror in meshd/dataplane/structs.py, and
 * tests/kernel/test_btf_layout.py compares sizes and field offsets against the BTF of the
 * compiled object. Rules: explicit padding, no bitfields, padding written as zero.
 *
 * Addresses are always 16 bytes in network byte order. IPv4 is stored IPv4-mapped
 * (::ffff:a.b.c.d): a dual-stack AF_INET6 socket connecting to ::ffff:VIP (what Java and many
 * runtimes do) then finds the same service entry as an AF_INET socket, with one lookup.
 */
#ifndef MESHD_STRUCTS_H
#define MESHD_STRUCTS_H

#ifndef __VMLINUX_H__ /* CO-RE programs get the same types from vmlinux.h */
#include <linux/types.h>
#endif

/* A frontend: VIP, port and protocol. Key of meshd_svc_v1. */
struct meshd_svc_key {
	__u32 addr[4];	/* VIP, network order, IPv4 as ::ffff:a.b.c.d */
	__u16 port;	/* VIP port, network order */
	__u8 proto;	/* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;	/* zero */
};

/* Value of meshd_svc_v1 (both paths) and meshd_svc_ext_v1 (the tc path's override of an
 * external frontend whose tc selection differs, e.g. external_traffic_policy Local). */
struct meshd_svc_val {
	__u32 id;	/* frontend group id (host order): key of meshd_maglev_v3 */
	__u16 count;	/* usable backends (host order); 0: refuse (or drop, see flags) */
	__u16 flags;	/* MESHD_SVC_F_*, host order */
};

/* meshd_svc_val.flags: what a frontend does beyond balancing (kube-proxy semantics). The
 * same bits as meshd/desired.py G_* (whole group) and FE_* (one frontend). */
#define MESHD_SVC_F_DROP_EMPTY	  0x01 /* count 0: drop (socket: EHOSTUNREACH), not refuse */
#define MESHD_SVC_F_AFFINITY	  0x02 /* ClientIP affinity; timeout in meshd_affcfg_v1 */
#define MESHD_SVC_F_EXTERNAL	  0x04 /* a node port, external IP or load-balancer IP */
#define MESHD_SVC_F_KEEP_SOURCE	  0x08 /* tc: never SNAT (external_traffic_policy Local) */
#define MESHD_SVC_F_SOURCE_RANGES 0x10 /* tc: the source must match meshd_srcrange_v1 */
#define MESHD_SVC_F_TABLE_B	  0x20 /* the group's table is in the second half (see
					* struct meshd_table_chunk); clear: the first */
#define MESHD_SVC_F_POLICY	  0x40 /* some policy selects this frontend's group: the
					* caller must be allowed (meshd_policy.h) */
#define MESHD_SVC_F_POLICY_OPEN	  0x80 /* with F_POLICY: only deny policies select it: a
					* caller without a verdict is allowed */

/* Value of the inner arrays of meshd_maglev_v3 (layout 3): 64 bytes, read as 16 __u32 or
 * as 32 __u16. A table's slots hold 16-bit indexes into a member list of the group's
 * backend ids (a group has at most M < 65536 members), so a table of M slots takes 2 * M
 * bytes per half, not 4 * M (at 10,000 groups of M = 1021: ~44 MB of kernel memory less).
 *   element 0                  header: slot[0] = M (prime), slot[1] = n = slot chunks per
 *                              half = ceil(M / 32), slot[2] = k = member chunks per half
 *   elements 1 .. n            first half's slots: slot s is __u16 (s % 32) of element
 *                              1 + s / 32 (slots past M are zero)
 *   elements n + 1 .. 2n       second half's slots
 *   elements 2n + 1 .. 2n + k  first half's members: member i is slot[i % 16] of element
 *                              2n + 1 + i / 16 (a backend id, host order)
 *   elements 2n + k + 1 .. 2n + 2k   second half's members
 * Each half has its own members, so a change writes the idle half's slots and members
 * together and the frontends flip to it (MESHD_SVC_F_TABLE_B). */
#define MESHD_TABLE_CHUNK 16	/* __u32 per element: member ids, header */
#define MESHD_TABLE_SLOTS 32	/* __u16 slots per element */
struct meshd_table_chunk {
	__u32 slot[MESHD_TABLE_CHUNK];	/* member ids; or 32 __u16 slot indexes; header */
};

/* Key of meshd_aff_v1 (LRU): one client's session affinity in one frontend group. */
struct meshd_aff_key {
	__u64 netns;	/* socket path: the client's netns cookie; tc path: 0 */
	__u32 addr[4];	/* client address, network order, IPv4-mapped (tc: the packet's source;
			 * socket path: the socket's bound source address, zero if unbound) */
	__u32 group;	/* frontend group id (host order) */
	__u32 pad;	/* zero */
};

/* Value of meshd_aff_v1. */
struct meshd_aff_val {
	__u64 seen_ns;	/* bpf_ktime_get_ns() of the last connection that used it */
	__u32 backend;	/* backend id (host order) */
	__u32 pad;	/* zero */
};

/* Key of meshd_member_v1: (group, backend) while the backend is in the group's current
 * selection; written only for groups with MESHD_SVC_F_AFFINITY, so that an affinity entry
 * to a backend that left the selection is not followed. Value: __u32 weight. */
struct meshd_member_key {
	__u32 group;	/* frontend group id (host order) */
	__u32 backend;	/* backend id (host order) */
};

/* Key of meshd_srcrange_v1 (LPM trie): a source network allowed on one frontend with
 * MESHD_SVC_F_SOURCE_RANGES (load_balancer_source_ranges). prefixlen counts from `vip`:
 * 160 (vip, port, proto, pad) + the source prefix (IPv4: 96 + its prefix). Value: __u8 1. */
struct meshd_srcrange_key {
	__u32 prefixlen;	/* LPM prefix length in bits, host order */
	__u32 vip[4];		/* frontend address, network order, IPv4-mapped */
	__u16 port;		/* frontend port, network order */
	__u8 proto;		/* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;		/* zero */
	__u32 src[4];		/* allowed source network, network order, IPv4-mapped */
};

/* Value of meshd_be_v1, keyed by a backend id (__u32, host order, never 0). */
struct meshd_backend {
	__u32 addr[4];	/* backend address, network order, IPv4 as ::ffff:a.b.c.d */
	__u16 port;	/* backend port, network order */
	__u8 proto;	/* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;	/* AF_INET or AF_INET6: the backend's own family */
	__u32 flags;	/* zero today */
};

/* Reverse translation for one socket talking to one backend: key of meshd_revnat_v1.
 * Written by connect/sendmsg, read by recvmsg/getpeername to show the VIP, not the backend. */
struct meshd_revnat_key {
	__u64 cookie;	/* bpf_get_socket_cookie() of the client socket */
	__u32 addr[4];	/* backend address, network order, IPv4-mapped */
	__u16 port;	/* backend port, network order */
	__u16 pad;	/* zero */
	__u32 pad2;	/* zero */
};

/* Value of meshd_revnat_v1: the address the application asked for. */
struct meshd_revnat_val {
	__u32 addr[4];	/* VIP, network order, IPv4-mapped */
	__u16 port;	/* VIP port, network order */
	__u16 pad;	/* zero */
};

/* Load-time settings (.rodata, set before load; the verifier sees them as constants). */
struct meshd_cfg {
	__u32 unused;	/* zero (was the one Maglev table size; now in each table's header) */
	__u32 flags;	/* MESHD_CFG_F_* (meshd_metrics.h); was padding (zero: no metrics) */
	__u64 self_pidns_dev;	/* the daemon's pid namespace: nsfs device (kernel dev_t) */
	__u64 self_pidns_ino;	/* ... and inode */
	__u32 self_tgid;	/* the daemon's process id in that namespace; 0: translate everyone */
	__u32 pad;		/* zero */
};

/* Value of meshd_sknat_v1: the socket storage connect() kept (backend, VIP) in before
 * meshd_sock_v1 held it. Only read now (getpeername, recvmsg, sock_destroy), for sockets
 * an older meshd connected; nothing creates entries any more. */
struct meshd_sknat {
	__u32 be_addr[4];	/* backend address, network order, IPv4-mapped */
	__u32 vip_addr[4];	/* VIP, network order, IPv4-mapped */
	__u16 be_port;		/* backend port, network order */
	__u16 vip_port;		/* VIP port, network order */
};

/* Value of meshd_sock_v1, the one socket storage of every socket meshd translated: what
 * connect() translated (lives and dies with the socket, so a connected socket's
 * getpeername() shows the VIP however many other sockets come and go; the LRU
 * meshd_revnat_v1 is only for unconnected UDP, keyed per datagram peer) and, with metrics
 * on, the socket's tag (group, backend, start, caller) for sockops and the skb programs.
 * One storage, not two: each is an allocation on connect() and a free with the socket
 * (~0.5 us a connect, bench/connect_breakdown.py). */
struct meshd_sock {
	__u32 be_addr[4];	/* connect(): backend address, network order, IPv4-mapped */
	__u32 vip_addr[4];	/* connect(): VIP, network order, IPv4-mapped; be_port 0: none */
	__u16 be_port;		/* backend port, network order */
	__u16 vip_port;		/* VIP port, network order */
	__u32 flags;		/* metrics: MESHD_SK_F_* (meshd_metrics.h); 0: not tagged */
	__u64 start_ns;		/* metrics: bpf_ktime_get_ns() in connect() */
	__u64 flushed_ns;	/* last time bytes and RTT went into the counters */
	__u64 bytes_acked;	/* TCP: bytes_acked already counted (incl. the SYN's 1) */
	__u64 bytes_received;	/* TCP: bytes_received already counted */
	__u64 cgroup;		/* the caller at connect(), for sockops' events: cgroup id */
	__u32 group;		/* frontend group id (host order) */
	__u32 backend;		/* backend id (host order); 0: none */
	__u32 identity;		/* policy identity if the policy check looked it up; else 0 */
	__u32 pid;		/* tgid */
	__u32 uid;
	__u32 pad;		/* zero */
	char comm[16];		/* bpf_get_current_comm() */
};

/* Value of meshd_meta_v1[0]: what the pinned maps were created with, so a restarted
 * daemon can refuse to adopt maps of an incompatible layout instead of corrupting them. */
struct meshd_meta {
	__u32 maglev_m;	/* layout 1: the size of every table; layout 2: maglev.table_size if
			 * fixed, 0 for auto (each table's header has its own M) */
	__u32 layout;	/* MESHD_LAYOUT_VERSION of the maps (the loader migrates 1 -> 2) */
};

#define MESHD_LAYOUT_VERSION 3
#define MESHD_SVC_NAME_LEN 160

/* Value of meshd_names_v1 keyed by frontend group id: the group key, e.g.
 * "namespace/name:port-name/ipv4", NUL-terminated.
 * Not read by BPF; kept in the kernel so `meshd services` can label what the maps hold. */
struct meshd_svc_name {
	char name[MESHD_SVC_NAME_LEN];
};

#endif
