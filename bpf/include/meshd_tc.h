/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Structs and maps of the per-packet (tc) load balancer, bpf/tc_lb.bpf.c.
 *
 * The tc programs share meshd_svc_v1, meshd_be_v1 and meshd_maglev_v3 with the socket LB
 * (the loader adopts the instance's pinned maps); the maps below are the tc path's own and
 * are pinned beside them under <bpffs>/meshd/<instance>/. Layout rules as in
 * meshd_structs.h: explicit padding, no bitfields, padding written as zero. Every struct
 * has one Python mirror in meshd/dataplane/tc.py, checked against this object's BTF by
 * tests/kernel/test_tc_packets.py.
 *
 * Conntrack: two entries per flow in one LRU hash, so each direction costs one lookup:
 *   FWD  key = the packet as the client sent it (client -> VIP)    value: backend
 *   REV  key = the reply as the backend sends it (backend -> client) value: the VIP
 * A reply's FWD key is its REV key reversed with the VIP put back, so either direction can
 * reach the FWD entry (where the TCP state flags live).
 *
 * SNAT mode (meshd_tc_cfg.snat_port_min != 0) adds a second layer on the interface the
 * request leaves by, for flows whose replies would not come back through the node:
 *   SNAT_OUT key = the translated request as it leaves (client -> backend)
 *            value: the node address and port it leaves with (port 0: not chosen yet)
 *   SNAT_REV key = the reply as it arrives (backend -> node:port)  value: the client
 * Ingress DNAT writes SNAT_OUT with port 0; egress picks the address of the interface and a
 * free port, writes SNAT_REV and rewrites the source; ingress restores the client as the
 * reply's destination, and the reply then meets the routed layer's REV entry on its way out.
 */
#ifndef MESHD_TC_H
#define MESHD_TC_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "meshd_structs.h"

/* Default sizes; the loader may resize before load (a pinned map keeps its size). */
#define MESHD_TC_CT_MAX 262144	/* conntrack entries (2 per flow): 131,072 flows */
#define MESHD_TC_FRAG_MAX 8192	/* IPv4 datagrams in fragments at once */
#define MESHD_TC_IF_MAX 256	/* interfaces with meshd tc filters (userspace record) */

/* meshd_ct_key.dir, meshd_frag_key.dir */
#define MESHD_CT_FWD 0	/* client -> VIP, as received */
#define MESHD_CT_REV 1	/* backend -> client, as the backend sends it */
#define MESHD_CT_SNAT_OUT 2	/* client -> backend as it leaves the node (SNAT mode) */
#define MESHD_CT_SNAT_REV 3	/* backend -> node:port as it arrives (SNAT mode) */

/* Key of meshd_tcct_v1. */
struct meshd_ct_key {
	__u32 saddr[4];	/* source address, network order, IPv4 as ::ffff:a.b.c.d */
	__u32 daddr[4];	/* destination address, network order, IPv4-mapped */
	__u16 sport;	/* source port, network order */
	__u16 dport;	/* destination port, network order */
	__u8 proto;	/* IPPROTO_TCP or IPPROTO_UDP */
	__u8 dir;	/* MESHD_CT_FWD or MESHD_CT_REV */
	__u16 pad;	/* zero */
};

/* Value of meshd_tcct_v1. The TCP state is one byte per event, not a flags word: ingress
 * and egress run on different CPUs, BPF v1 has no atomic OR, and a plain byte store of 1
 * cannot lose the other direction's byte. A flow is closed once rst, or fin_fwd and fin_rev,
 * are set; a new SYN on a closed flow's tuple is balanced afresh. */
struct meshd_ct_val {
	__u32 nat_addr[4];	/* FWD: backend address; REV: the VIP; SNAT_OUT: the node address;
				 * SNAT_REV: the client (network order, mapped) */
	__u16 nat_port;		/* the port beside nat_addr (network order); SNAT_OUT: 0 until the
				 * egress program chose one */
	__u8 fin_fwd;		/* FWD: 1 once the client sent a FIN; REV: zero */
	__u8 fin_rev;		/* FWD: 1 once the backend sent a FIN; REV: zero */
	__u8 rst;		/* FWD: 1 once either side sent a RST; SNAT_REV: 1 once the flow
				 * closed (its port may go to another flow a second later) */
	__u8 pad[3];		/* zero */
	__u32 backend;		/* backend id in meshd_be_v1 (host order), both entries */
	__u32 group;		/* frontend group id (host order), both entries */
	__u64 refreshed_ns;	/* FWD / SNAT_OUT: coarse clock when the REV / SNAT_REV entry was
				 * last (re)written; SNAT_REV: last use (a packet either way, at
				 * most once a second), or when the flow closed (rst set) */
};

/* Load-time settings of the tc object (.rodata, set before load). */
struct meshd_tc_cfg {
	__u32 unused;		/* zero (was the Maglev table size; now in each table's header) */
	__u16 snat_port_min;	/* SNAT source ports, host order, inclusive; 0: SNAT mode off */
	__u16 snat_port_max;
};

/* Key of meshd_tcfrag_v1: one IPv4 datagram in fragments. The first fragment (offset 0,
 * MF set) carries the ports and is translated like any packet; it records here where the
 * rest of the datagram goes, because later fragments have no L4 header to look up. */
struct meshd_frag_key {
	__u32 saddr[4];	/* source address of the datagram as received, network order, mapped */
	__u32 daddr[4];	/* destination address as received, network order, mapped */
	__u32 id;	/* IPv4 identification, network order in the low 16 bits' memory */
	__u8 proto;	/* IPPROTO_TCP or IPPROTO_UDP */
	__u8 dir;	/* MESHD_CT_FWD (rewrite daddr) or MESHD_CT_REV (rewrite saddr) */
	__u16 pad;	/* zero */
};

/* Value of meshd_tcfrag_v1. */
struct meshd_frag_val {
	__u32 addr[4];	/* FWD: the backend (new daddr); REV: the VIP (new saddr); mapped */
};

/* Value of meshd_tcstat_v1[0], one copy per CPU; counters only grow. */
struct meshd_tc_stats {
	__u64 dnat;		/* packets to a VIP:port translated to a backend (ingress) */
	__u64 revnat;		/* replies translated back to the VIP (egress) */
	__u64 ct_new;		/* flows given a conntrack entry (new, or after LRU eviction) */
	__u64 ct_repick;	/* tracked flows re-balanced: backend gone, or a SYN after close */
	__u64 ct_closed;	/* TCP flows marked closed (RST, or FIN both ways) */
	__u64 no_backend;	/* packets to a frontend whose backends are not usable (no Maglev
				 * table, or a backend of the other family): dropped */
	__u64 frag_xlate;	/* non-first IPv4 fragments translated via meshd_tcfrag_v1 */
	__u64 icmp_xlate;	/* ICMP errors about a tracked flow translated (both ways) */
	__u64 ct_shadowed;	/* VIP flows forgotten: their client reached the backend directly
				 * on the same tuple (port reuse) */
	__u64 errors;		/* a map update or packet write failed: packet dropped */
	__u64 snat;		/* requests whose source became node address:port (egress) */
	__u64 unsnat;		/* replies to node address:port given the client back (ingress) */
	__u64 snat_new;		/* SNAT ports chosen */
	__u64 snat_fail;	/* no free SNAT port after MESHD_SNAT_TRIES, or no address on the
				 * interface: packet dropped */
	__u64 reject;		/* packets to a frontend with no backend answered as kube-proxy's
				 * REJECT: TCP RST, or ICMP port unreachable (UDP); a RST to it
				 * is dropped, never answered */
	__u64 drop_no_local;	/* packets to a frontend with no backend and MESHD_SVC_F_DROP_EMPTY
				 * (external_traffic_policy Local, no local endpoint): dropped */
	__u64 src_range;	/* new flows from a source outside load_balancer_source_ranges:
				 * dropped */
	__u64 aff_follow;	/* new flows given their client's backend by session affinity */
};

/* Value of meshd_tcaddr_v1, keyed by ifindex (__u32): the source addresses SNAT uses on
 * that interface (its first global address per family), written by userspace at attach. */
struct meshd_tc_addr {
	__u32 v4[4];	/* IPv4, mapped, network order; all zero: none */
	__u32 v6[4];	/* IPv6, network order; all zero: none */
};

/* Key of meshd_tcif_v1 (never read by BPF): where this instance has tc filters, so that
 * cleanup and a changed `tc.interfaces` can detach without knowing the old config. */
struct meshd_tc_if_key {
	__u64 netns_ino;	/* inode of the network namespace (stat /proc/self/ns/net) */
	__u32 ifindex;		/* interface index in that namespace */
	__u32 pad;		/* zero */
};

/* Value of meshd_tcif_v1. */
struct meshd_tc_if_val {
	char name[16];		/* interface name at attach time, NUL-terminated */
	__u32 handle;		/* tc filter handle (both directions) */
	__u32 priority;		/* tc filter priority (both directions) */
	__u16 snat_port_min;	/* the SNAT range the attached programs were loaded with (host */
	__u16 snat_port_max;	/* order); 0: routed mode */
};

/* The flow -> backend pins and their reverse entries. LRU: when full, the least recently
 * used entries go first -- closed and idle flows before active ones; an active flow that
 * lost its entry gets the same backend again from Maglev unless the table changed. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESHD_TC_CT_MAX);
	__type(key, struct meshd_ct_key);
	__type(value, struct meshd_ct_val);
} meshd_tcct_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESHD_TC_FRAG_MAX);
	__type(key, struct meshd_frag_key);
	__type(value, struct meshd_frag_val);
} meshd_tcfrag_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meshd_tc_stats);
} meshd_tcstat_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_TC_IF_MAX);
	__type(key, __u32);
	__type(value, struct meshd_tc_addr);
} meshd_tcaddr_v1 SEC(".maps");

/* Userspace-only record (see struct meshd_tc_if_key); defined here so its layout is in BTF. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_TC_IF_MAX);
	__type(key, struct meshd_tc_if_key);
	__type(value, struct meshd_tc_if_val);
} meshd_tcif_v1 SEC(".maps");

#endif
