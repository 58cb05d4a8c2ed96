/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Per-packet load balancing on tc (clsact), for traffic that never passes a socket hook:
 * clients on other hosts or in other network namespaces whose packets cross this node.
 *
 *   meshd_tc_in   ingress: a TCP/UDP packet for a VIP:port gets its destination rewritten
 *                 to a backend (Maglev over a hash of saddr, sport, dport, proto -- not daddr,
 *                 so every node with the same maps picks the same backend); conntrack pins
 *                 the flow while its backend exists
 *   meshd_tc_out  egress: a reply from a tracked backend gets the VIP back as its source
 *
 * Routed mode: both programs sit on the same interface (the one clients come in on), and
 * the node is on the reply path (clients route the service range via the node; backends
 * route the clients via the node). The kernel routes the rewritten packet; no redirect.
 * SNAT mode (meshd_tc_cfg.snat_port_min != 0) adds a layer for backends that would answer
 * the client directly: the request leaves with the address of its egress interface and a
 * port of the range (meshd_snat_out), the reply to it gets the client back on ingress
 * (meshd_unsnat) and meets the routed layer's REV entry on its way out. NodePort needs no
 * code here: node address:port frontends are ordinary entries of meshd_svc_v1.
 *
 * Shares meshd_svc_v1 / meshd_be_v1 / meshd_maglev_v1 with the socket LB (the loader
 * reuses the instance's pinned maps). Verdicts: a translated packet returns TC_ACT_UNSPEC
 * too, never TC_ACT_OK: OK would end the filter chain, and filters of other tools at later
 * priorities on the same hook (policy, accounting, mirroring) would never see the packet;
 * with UNSPEC they see it translated, and the packet goes on as with OK when no filter
 * follows. Only TC_ACT_SHOT (a drop) is final. Edge cases, each deliberate (docs/tc.md):
 *   - not TCP/UDP/ICMP, not IPv4/IPv6, not a VIP:port/proto: untouched, TC_ACT_UNSPEC (so
 *     filters of other tools at later priorities still run); one hash lookup
 *   - IPv4 options: the L4 header is found at ihl * 4
 *   - IPv4 fragments: the first (offset 0, MF) is translated and records its datagram in
 *     meshd_tcfrag_v1; later fragments (no L4 header) follow that record or pass untouched.
 *     IPv6 extension headers (fragments included): untouched
 *   - ICMP errors (unreachable, time exceeded, parameter problem, packet too big) quoting a
 *     tracked flow are translated both ways, the quoted headers and their checksums included
 *   - TCP RST, or FIN both ways, marks the flow closed; a later SYN on the same tuple is
 *     balanced afresh, other packets keep their backend; LRU reclaims the entry
 *   - a VIP:port with no usable backend: dropped (counted), not ICMP-rejected
 *   - a client reaching a backend directly on a tuple a VIP flow holds: that flow is
 *     forgotten (meshd_forget_shadowed)
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "meshd_structs.h"
#include "meshd_helpers.h"
#include "meshd_maps.h"
#include "meshd_tc.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define MESHD_IP_MF 0x2000
#define MESHD_IP_OFFMASK 0x1fff
#define MESHD_TCP_FIN 0x01
#define MESHD_TCP_SYN 0x02
#define MESHD_TCP_RST 0x04
#define MESHD_TCP_ACK 0x10
#define MESHD_NEXTHDR_ICMP6 58
/* Linear bytes the parser may need: Ethernet, IPv4 with options, ICMP, quoted IPv4 with
 * options and 8 bytes of it (an ICMPv6 error quotes 40 + 8). */
#define MESHD_MAX_HDR (ETH_HLEN + 60 + 8 + 60 + 8)
/* A flow's REV entry is rewritten at most this often by its forward packets, so a reply
 * direction that LRU evicted while the flow only sent one way comes back. */
#define MESHD_CT_REFRESH_NS 1000000000ULL
#define MESHD_HASH_SEED 0x9e3779b97f4a7c15ULL

/* Set by the loader before load: the Maglev table size of the instance's pinned maps, and
 * the SNAT port range (0: routed mode only; the verifier then drops every SNAT path). */
const volatile struct meshd_tc_cfg meshd_tc_cfg = { .maglev_m = MESHD_DEFAULT_MAGLEV_M };

/* Ports tried for a new SNAT flow before it is dropped (snat_fail). */
#define MESHD_SNAT_TRIES 32
/* A SNAT port held by another flow may be taken over once that flow is a TCP flow closed
 * (RST, or FIN both ways) this long ago -- stragglers (the last ACK, a retransmitted FIN)
 * have passed -- or a UDP flow idle this long (as netfilter's UDP timeout). */
#define MESHD_SNAT_REUSE_CLOSED_NS 1000000000LL
#define MESHD_SNAT_REUSE_UDP_NS 30000000000LL
/* ... or an open TCP flow without a packet either way this long (a client that vanished
 * without FIN or RST; Cilium's TCP conntrack lifetime) */
#define MESHD_SNAT_REUSE_TCP_IDLE_NS 21600000000000LL

enum { MESHD_FRAG_NONE, MESHD_FRAG_FIRST, MESHD_FRAG_LATER };
enum { MESHD_PARSE_OK, MESHD_PARSE_SKIP, MESHD_PARSE_SHORT };

/* What the parser found; addresses IPv4-mapped, ports network order. */
struct meshd_pkt {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;	/* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP or 58 (ICMPv6) */
	__u8 v6;	/* 1: IPv6 */
	__u8 tcp_flags;	/* TCP: the flags byte */
	__u8 frag;	/* MESHD_FRAG_* (IPv4 only) */
	__u32 l4off;	/* offset of the L4 header from the start of the frame */
	__u32 frag_id;	/* IPv4 identification (network order) */
};

/* ---- hashing: must equal meshd/dataplane/tc.py flow_slot() ----------------------------- */


/* Host-order words, so the slot does not depend on the CPU's byte order: nodes of any
 * architecture agree. daddr is left out on purpose: the same client flow reaching two VIPs
 * of one service, or two nodes, lands on the same backend. */
static __always_inline __u32 meshd_flow_hash(const struct meshd_pkt *p)
{
	__u64 h;

	h = meshd_fmix64((((__u64)bpf_ntohl(p->saddr[0]) << 32) | bpf_ntohl(p->saddr[1])) ^
			 MESHD_HASH_SEED);
	h = meshd_fmix64(h ^ (((__u64)bpf_ntohl(p->saddr[2]) << 32) | bpf_ntohl(p->saddr[3])));
	h = meshd_fmix64(h ^ (((__u64)bpf_ntohs(p->sport) << 24) |
			      ((__u64)bpf_ntohs(p->dport) << 8) | p->proto));
	return (__u32)h;
}

/* ---- small helpers ------------------------------------------------------------------- */


static __always_inline void meshd_copy16(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int meshd_eq16(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline struct meshd_tc_stats *meshd_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&meshd_tcstat_v1, &zero);
}

#define MESHD_COUNT(st, field) do { if (st) (st)->field += 1; } while (0)

static __always_inline int meshd_drop_err(struct meshd_tc_stats *st)
{
	MESHD_COUNT(st, errors);
	return TC_ACT_SHOT;
}

static __always_inline int meshd_snat_on(void)
{
	return meshd_tc_cfg.snat_port_min != 0;
}

/* A port (network order) inside the SNAT range. */
static __always_inline int meshd_snat_port(__u16 port)
{
	__u16 h = bpf_ntohs(port);

	return h >= meshd_tc_cfg.snat_port_min && h <= meshd_tc_cfg.snat_port_max;
}

/* ---- parsing --------------------------------------------------------------------------- */

/* The L4 part both parsers share: TCP needs its 20-byte header (for the flags), UDP and
 * ICMP 8 bytes; ports for everything but ICMP (`icmp` is the family's ICMP protocol). */
static __always_inline int meshd_parse_l4(struct meshd_pkt *p, __u8 *l4, void *end, __u8 icmp)
{
	if (p->proto == IPPROTO_TCP) {
		if ((void *)(l4 + 20) > end)
			return MESHD_PARSE_SHORT;
		p->tcp_flags = l4[13];
	} else if ((void *)(l4 + 8) > end) {
		return MESHD_PARSE_SHORT;
	}
	if (p->proto != icmp) {
		p->sport = *(__u16 *)l4;
		p->dport = *(__u16 *)(l4 + 2);
	}
	return MESHD_PARSE_OK;
}

static __always_inline int meshd_parse4(struct __sk_buff *skb, struct meshd_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 ihl, l4off;
	__u16 frag;
	__u8 *l4;

	if ((void *)(ip + 1) > end)
		return MESHD_PARSE_SHORT;
	if (ip->version != 4 || ip->ihl < 5)
		return MESHD_PARSE_SKIP;
	p->proto = ip->protocol;
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->proto != IPPROTO_ICMP)
		return MESHD_PARSE_SKIP;
	meshd_map_v4(p->saddr, ip->saddr);
	meshd_map_v4(p->daddr, ip->daddr);
	ihl = ip->ihl * 4; /* options: the L4 header starts after them */
	l4off = ETH_HLEN + ihl;
	p->l4off = l4off;
	frag = bpf_ntohs(ip->frag_off);
	if (frag & MESHD_IP_OFFMASK) {
		p->frag = MESHD_FRAG_LATER; /* no L4 header in this packet */
		p->frag_id = ip->id;
		return MESHD_PARSE_OK;
	}
	if (frag & MESHD_IP_MF) {
		p->frag = MESHD_FRAG_FIRST;
		p->frag_id = ip->id;
	}
	l4 = data + l4off;
	return meshd_parse_l4(p, l4, end, IPPROTO_ICMP);
}

/* IPv6 without extension headers: anything else (fragments included) is left alone. */
static __always_inline int meshd_parse6(struct __sk_buff *skb, struct meshd_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u8 *l4 = (void *)(ip6 + 1);

	if ((void *)(ip6 + 1) > end)
		return MESHD_PARSE_SHORT;
	p->proto = ip6->nexthdr;
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->proto != MESHD_NEXTHDR_ICMP6)
		return MESHD_PARSE_SKIP;
	p->v6 = 1;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	p->l4off = ETH_HLEN + sizeof(*ip6);
	return meshd_parse_l4(p, l4, end, MESHD_NEXTHDR_ICMP6);
}

/* MESHD_PARSE_OK with *p filled, or MESHD_PARSE_SKIP: leave the packet alone. */
static __always_inline int meshd_parse(struct __sk_buff *skb, struct meshd_pkt *p)
{
	__u32 len = skb->len < MESHD_MAX_HDR ? skb->len : MESHD_MAX_HDR;
	int ret;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		ret = meshd_parse4(skb, p);
		if (ret == MESHD_PARSE_SHORT) { /* headers not linear (rare): pull, try again */
			if (bpf_skb_pull_data(skb, len))
				return MESHD_PARSE_SKIP;
			ret = meshd_parse4(skb, p);
		}
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		ret = meshd_parse6(skb, p);
		if (ret == MESHD_PARSE_SHORT) {
			if (bpf_skb_pull_data(skb, len))
				return MESHD_PARSE_SKIP;
			ret = meshd_parse6(skb, p);
		}
	} else {
		return MESHD_PARSE_SKIP;
	}
	return ret == MESHD_PARSE_OK ? MESHD_PARSE_OK : MESHD_PARSE_SKIP;
}

/* ---- rewriting ------------------------------------------------------------------------- */

/* Offset of the L4 checksum, 0 when the packet has none we may touch. */
static __always_inline __u32 meshd_l4_csum_off(const struct meshd_pkt *p)
{
	if (p->frag == MESHD_FRAG_LATER)
		return 0;
	if (p->proto == IPPROTO_TCP)
		return p->l4off + 16;
	if (p->proto == IPPROTO_UDP)
		return p->l4off + 6;
	return 0;
}

/* UDP over IPv4 may carry no checksum (0): keep it 0, and write a computed 0 as 0xffff. */
static __always_inline __u64 meshd_l4_flags(const struct meshd_pkt *p)
{
	return p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Replaces the source (`dst` = 0) or destination (`dst` = 1) address and fixes the IPv4
 * header checksum and the L4 checksum's pseudo header (l4_csum_off 0: no L4 checksum). */
static __always_inline int meshd_set_addr(struct __sk_buff *skb, const struct meshd_pkt *p,
					  int dst, const __u32 *new_addr, __u32 l4_csum_off,
					  __u64 l4_flags)
{
	const __u32 *old = dst ? p->daddr : p->saddr;
	__u32 off;
	__s64 diff;

	if (!p->v6) {
		off = ETH_HLEN + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
		if (l4_csum_off && bpf_l4_csum_replace(skb, l4_csum_off, old[3], new_addr[3],
						       l4_flags | BPF_F_PSEUDO_HDR | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old[3],
					new_addr[3], 4))
			return -1;
		return bpf_skb_store_bytes(skb, off, &new_addr[3], 4, 0) ? -1 : 0;
	}
	off = ETH_HLEN + (dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
	if (l4_csum_off) {
		diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new_addr, 16, 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, l4_csum_off, 0, diff,
						    l4_flags | BPF_F_PSEUDO_HDR))
			return -1;
	}
	return bpf_skb_store_bytes(skb, off, new_addr, 16, 0) ? -1 : 0;
}

static __always_inline int meshd_set_port(struct __sk_buff *skb, __u32 off, __u16 old, __u16 new,
					  __u32 l4_csum_off, __u64 l4_flags)
{
	if (old == new)
		return 0;
	if (l4_csum_off && bpf_l4_csum_replace(skb, l4_csum_off, old, new, l4_flags | 2))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 2, 0) ? -1 : 0;
}

/* ---- backend choice -------------------------------------------------------------------- */

/* Maglev: the backend in slot hash % M of the group's table. 0 and *be set, or -1. */
static __always_inline int meshd_pick(const struct meshd_svc_val *svc, const struct meshd_pkt *p,
				      __u32 *be_id, struct meshd_backend **be)
{
	__u32 zero = 0, slot, m = meshd_tc_cfg.maglev_m;
	struct meshd_backend *found;
	__u32 *table;
	void *inner;

	inner = bpf_map_lookup_elem(&meshd_maglev_v1, &svc->id);
	if (!inner)
		return -1;
	table = bpf_map_lookup_elem(inner, &zero);
	if (!table)
		return -1;
	slot = meshd_flow_hash(p) % m;
	barrier_var(slot); /* keep the bound check the verifier needs */
	if (slot >= m)
		return -1;
	*be_id = table[slot];
	found = bpf_map_lookup_elem(&meshd_be_v1, be_id);
	if (!found || found->family != (p->v6 ? AF_INET6 : AF_INET))
		return -1;
	*be = found;
	return 0;
}

/* A conntrack key: addresses IPv4-mapped, ports network order (padding stays zero). */
static __always_inline void meshd_ct_key_set(struct meshd_ct_key *k, const __u32 *saddr,
					     const __u32 *daddr, __u16 sport, __u16 dport,
					     __u8 proto, __u8 dir)
{
	meshd_copy16(k->saddr, saddr);
	meshd_copy16(k->daddr, daddr);
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->dir = dir;
}

/* The FWD key of a packet as the client sent it. */
static __always_inline void meshd_fwd_key(struct meshd_ct_key *k, const struct meshd_pkt *p)
{
	meshd_ct_key_set(k, p->saddr, p->daddr, p->sport, p->dport, p->proto, MESHD_CT_FWD);
}

/* The REV key of the replies of flow `p` (as received) served by backend addr:port. */
static __always_inline void meshd_rev_key(struct meshd_ct_key *k, const struct meshd_pkt *p,
					  const __u32 *be_addr, __u16 be_port)
{
	meshd_ct_key_set(k, be_addr, p->saddr, be_port, p->sport, p->proto, MESHD_CT_REV);
}

static __always_inline int meshd_ct_closed(const struct meshd_ct_val *v)
{
	return v->rst || (v->fin_fwd && v->fin_rev);
}

/* Notes a TCP FIN or RST in the flow's FWD entry (`from_client`: the direction). */
static __always_inline void meshd_ct_tcp(struct meshd_ct_val *fwd, __u8 flags, int from_client,
					 struct meshd_tc_stats *st)
{
	int was = meshd_ct_closed(fwd);

	if (flags & MESHD_TCP_RST)
		fwd->rst = 1;
	else if (flags & MESHD_TCP_FIN) {
		if (from_client)
			fwd->fin_fwd = 1;
		else
			fwd->fin_rev = 1;
	} else {
		return;
	}
	if (!was && meshd_ct_closed(fwd))
		MESHD_COUNT(st, ct_closed);
}

static __always_inline int meshd_frag_note(const struct meshd_pkt *p, __u8 dir, const __u32 *addr)
{
	struct meshd_frag_key fk = {};
	struct meshd_frag_val fv = {};

	meshd_copy16(fk.saddr, p->saddr);
	meshd_copy16(fk.daddr, p->daddr);
	fk.id = p->frag_id;
	fk.proto = p->proto;
	fk.dir = dir;
	meshd_copy16(fv.addr, addr);
	return bpf_map_update_elem(&meshd_tcfrag_v1, &fk, &fv, BPF_ANY);
}

/* A later IPv4 fragment: follow its datagram's first fragment, or pass untouched. */
static __always_inline int meshd_frag_xlate(struct __sk_buff *skb, const struct meshd_pkt *p,
					    __u8 dir)
{
	struct meshd_frag_key fk = {};
	struct meshd_frag_val *fv;
	struct meshd_tc_stats *st;

	meshd_copy16(fk.saddr, p->saddr);
	meshd_copy16(fk.daddr, p->daddr);
	fk.id = p->frag_id;
	fk.proto = p->proto;
	fk.dir = dir;
	fv = bpf_map_lookup_elem(&meshd_tcfrag_v1, &fk);
	if (!fv)
		return TC_ACT_UNSPEC;
	st = meshd_stats();
	if (meshd_set_addr(skb, p, dir == MESHD_CT_FWD, fv->addr, 0, 0))
		return meshd_drop_err(st);
	MESHD_COUNT(st, frag_xlate);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

/* ---- ICMP errors quoting a tracked flow ------------------------------------------------ */

static __always_inline int meshd_icmp_is_error(const struct meshd_pkt *p, __u8 type)
{
	if (p->v6) /* destination unreachable, packet too big, time exceeded, parameter problem */
		return type >= 1 && type <= 4;
	return type == 3 || type == 11 || type == 12;
}

/* The quoted packet is the flow as the peer saw it: going in (`dir` FWD) the client quotes
 * a reply VIP -> client, going out (REV) the backend quotes a request client -> backend.
 * Both give the tracked entry's key reversed. The quoted source (FWD: VIP -> backend) or
 * destination (REV: backend -> VIP) and its port are rewritten, and the outer destination
 * (FWD: the VIP) or source (REV: if the backend itself sent the error, not a router). */
static __always_inline int meshd_icmp_xlate(struct __sk_buff *skb, const struct meshd_pkt *p,
					    __u8 dir)
{
	__u32 icmp_csum_off = p->l4off + 2, qoff = p->l4off + 8, ql4, qaddr_off, qport_off;
	__u32 qaddr[4], new_addr[4];
	struct meshd_ct_key k = {};
	struct meshd_tc_stats *st;
	struct meshd_ct_val *v;
	__u16 qports[2], qport, old_qcsum, new_qcsum, old_l4, new_l4;
	__u32 ql4_csum_off;
	__u64 q_flags;
	__u8 type, qproto;
	__s64 diff;
	int fwd = dir == MESHD_CT_FWD;

	if (p->frag != MESHD_FRAG_NONE)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p->l4off, &type, 1) || !meshd_icmp_is_error(p, type))
		return TC_ACT_UNSPEC;
	if (!p->v6) {
		struct iphdr q;

		if (bpf_skb_load_bytes(skb, qoff, &q, sizeof(q)) || q.version != 4 || q.ihl < 5 ||
		    (bpf_ntohs(q.frag_off) & MESHD_IP_OFFMASK))
			return TC_ACT_UNSPEC;
		qproto = q.protocol;
		ql4 = qoff + q.ihl * 4;
		meshd_map_v4(k.saddr, q.daddr);
		meshd_map_v4(k.daddr, q.saddr);
		qaddr_off = qoff + (fwd ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		old_qcsum = q.check;
	} else {
		struct ipv6hdr q;

		if (bpf_skb_load_bytes(skb, qoff, &q, sizeof(q)) || q.version != 6)
			return TC_ACT_UNSPEC;
		qproto = q.nexthdr;
		ql4 = qoff + sizeof(q);
		__builtin_memcpy(k.saddr, &q.daddr, 16);
		__builtin_memcpy(k.daddr, &q.saddr, 16);
		qaddr_off = qoff + (fwd ? offsetof(struct ipv6hdr, saddr) :
				    offsetof(struct ipv6hdr, daddr));
		old_qcsum = 0;
	}
	if (qproto != IPPROTO_TCP && qproto != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, ql4, qports, 4))
		return TC_ACT_UNSPEC;
	k.sport = qports[1];
	k.dport = qports[0];
	k.proto = qproto;
	k.dir = dir;
	v = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (!v && meshd_snat_on()) {
		/* The SNAT layer: the same key shape, the same rewrite (FWD: the quoted node
		 * address:port back to the client; REV: the quoted client to node address:port). */
		k.dir = fwd ? MESHD_CT_SNAT_REV : MESHD_CT_SNAT_OUT;
		v = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
		if (v && !v->nat_port)
			v = 0; /* SNAT_OUT whose port is not chosen yet: nothing left the node */
	}
	if (!v)
		return TC_ACT_UNSPEC;
	st = meshd_stats();
	/* k.daddr / k.saddr are the quoted source / destination (FWD / REV) as it is now. */
	meshd_copy16(qaddr, fwd ? k.daddr : k.saddr);
	meshd_copy16(new_addr, v->nat_addr);
	qport_off = ql4 + (fwd ? 0 : 2);
	qport = fwd ? qports[0] : qports[1];

	/* The quoted address; the ICMP checksum covers it as data (ICMPv6: also the outer
	 * addresses as pseudo header, fixed with the outer address below). */
	diff = bpf_csum_diff(p->v6 ? qaddr : &qaddr[3], p->v6 ? 16 : 4,
			     p->v6 ? new_addr : &new_addr[3], p->v6 ? 16 : 4, 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, icmp_csum_off, 0, diff, 0))
		return meshd_drop_err(st);
	if (bpf_skb_store_bytes(skb, qaddr_off, p->v6 ? new_addr : &new_addr[3], p->v6 ? 16 : 4, 0))
		return meshd_drop_err(st);
	if (!p->v6) { /* the quoted IPv4 header checksum follows its address */
		if (bpf_l3_csum_replace(skb, qoff + offsetof(struct iphdr, check), qaddr[3],
					new_addr[3], 4) ||
		    bpf_skb_load_bytes(skb, qoff + offsetof(struct iphdr, check), &new_qcsum, 2) ||
		    bpf_l4_csum_replace(skb, icmp_csum_off, old_qcsum, new_qcsum, 2))
			return meshd_drop_err(st);
	}
	if (meshd_set_port(skb, qport_off, qport, v->nat_port, icmp_csum_off, 0))
		return meshd_drop_err(st);
	/* The quoted L4 checksum, when it is quoted (a TCP quote of 8 bytes has none) and is not
	 * a UDP "no checksum": it covers the quoted address (pseudo header) and port. The ICMP
	 * checksum covers the quoted checksum in turn. */
	ql4_csum_off = ql4 + (qproto == IPPROTO_TCP ? 16 : 6);
	if (!bpf_skb_load_bytes(skb, ql4_csum_off, &old_l4, 2) &&
	    (qproto == IPPROTO_TCP || old_l4 != 0)) {
		q_flags = qproto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
		if (p->v6) {
			diff = bpf_csum_diff(qaddr, 16, new_addr, 16, 0);
			if (diff < 0 || bpf_l4_csum_replace(skb, ql4_csum_off, 0, diff, q_flags))
				return meshd_drop_err(st);
		} else if (bpf_l4_csum_replace(skb, ql4_csum_off, qaddr[3], new_addr[3],
					       q_flags | 4)) {
			return meshd_drop_err(st);
		}
		if ((qport != v->nat_port &&
		     bpf_l4_csum_replace(skb, ql4_csum_off, qport, v->nat_port, q_flags | 2)) ||
		    bpf_skb_load_bytes(skb, ql4_csum_off, &new_l4, 2) ||
		    bpf_l4_csum_replace(skb, icmp_csum_off, old_l4, new_l4, 2))
			return meshd_drop_err(st);
	}
	/* The outer address, when it is the one being translated. */
	if (meshd_eq16(fwd ? p->daddr : p->saddr, qaddr) &&
	    meshd_set_addr(skb, p, fwd, new_addr, p->v6 ? icmp_csum_off : 0, 0))
		return meshd_drop_err(st);
	MESHD_COUNT(st, icmp_xlate);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

/* ---- SNAT mode ------------------------------------------------------------------------- */

/* The SNAT_OUT key of the request `p` leaves with: client -> backend:port after DNAT. */
static __always_inline void meshd_snat_out_key(struct meshd_ct_key *k, const struct meshd_pkt *p,
					       const __u32 *be_addr, __u16 be_port)
{
	meshd_ct_key_set(k, p->saddr, be_addr, p->sport, be_port, p->proto, MESHD_CT_SNAT_OUT);
}

/* The SNAT_REV key of the replies to node:port of request `p` (as it leaves, before SNAT). */
static __always_inline void meshd_snat_rev_key(struct meshd_ct_key *k, const struct meshd_pkt *p,
					       const __u32 *node, __u16 port)
{
	meshd_ct_key_set(k, p->daddr, node, p->dport, port, p->proto, MESHD_CT_SNAT_REV);
}

/* Does SNAT_REV entry `held` give its port to client:cport? */
static __always_inline int meshd_snat_owns(const struct meshd_ct_val *held, const __u32 *client,
					   __u16 cport)
{
	return meshd_eq16(held->nat_addr, client) && held->nat_port == cport;
}

/* May the port of another flow's SNAT_REV entry, stamped `seen`, be taken over? Signed: a
 * CPU may have stamped a time after `now`. A stamp of 0 (an entry of an older object) is
 * of unknown age: never. */
static __always_inline int meshd_snat_reusable(const struct meshd_ct_val *held, __u64 seen,
					       __u8 proto, __u64 now)
{
	__s64 idle = (__s64)(now - seen);

	if (!seen)
		return 0;
	if (proto == IPPROTO_UDP)
		return idle > MESHD_SNAT_REUSE_UDP_NS;
	return idle > (held->rst ? MESHD_SNAT_REUSE_CLOSED_NS : MESHD_SNAT_REUSE_TCP_IDLE_NS);
}

/* Ingress DNAT of a new or re-picked flow in SNAT mode. Without a SNAT_OUT entry, its
 * translated request gets one without a port: the egress program of the interface it
 * leaves by chooses address and port. With one whose port its SNAT_REV entry still gives
 * to this client (its FWD entry was evicted, or a SYN reopens it after a close), the port
 * stays, and a reopening SYN clears the close mark; if the port went to another flow
 * meanwhile, it is chosen again. Entries are changed in place (an update of an LRU map may
 * evict another entry). Not called for a tracked flow: a flow that started before SNAT
 * mode was turned on keeps leaving with the client's address, as it began. 0, or a map
 * error. */
static __always_inline int meshd_snat_prepare(const struct meshd_pkt *p, const __u32 *be_addr,
					      __u16 be_port, __u32 be_id, __u32 group, int syn,
					      __u64 now)
{
	struct meshd_ct_key k = {};
	struct meshd_ct_val v = {}, *out, *held;
	int err;

	if (!meshd_snat_on())
		return 0;
	meshd_snat_out_key(&k, p, be_addr, be_port);
	out = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (!out) {
		v.backend = be_id;
		v.group = group;
		err = bpf_map_update_elem(&meshd_tcct_v1, &k, &v, BPF_NOEXIST);
		return err == -17 /* EEXIST: another CPU meanwhile */ ? 0 : err;
	}
	if (!out->nat_port)
		return 0;
	meshd_ct_key_set(&k, be_addr, out->nat_addr, be_port, out->nat_port, p->proto,
			 MESHD_CT_SNAT_REV);
	held = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (held && meshd_snat_owns(held, p->saddr, p->sport)) {
		if (syn && held->rst) {
			held->rst = 0;
			held->refreshed_ns = now;
		}
		return 0;
	}
	out->nat_port = 0; /* its port is gone: choose again */
	return 0;
}

/* A TCP flow client:cport -> backend:bport (as after DNAT) is closed: mark its SNAT_REV
 * entry (rst = closed, refreshed_ns = when), so its port can serve another flow a second
 * later. Called for every FIN or RST once the flow is closed, so a mark one CPU missed
 * (FINs crossing) is made by the next. */
static __always_inline void meshd_snat_closed(const __u32 *client, __u16 cport, const __u32 *be,
					      __u16 bport, __u64 now)
{
	struct meshd_ct_key k = {};
	struct meshd_ct_val *out, *rv;

	meshd_ct_key_set(&k, client, be, cport, bport, IPPROTO_TCP, MESHD_CT_SNAT_OUT);
	out = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (!out || !out->nat_port)
		return;
	meshd_ct_key_set(&k, be, out->nat_addr, bport, out->nat_port, IPPROTO_TCP,
			 MESHD_CT_SNAT_REV);
	rv = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (!rv || rv->rst || !meshd_snat_owns(rv, client, cport))
		return; /* marked once: a retransmitted FIN does not push the reuse back */
	rv->rst = 1;
	rv->refreshed_ns = now;
}

static __always_inline __u32 meshd_snat_hash(const struct meshd_pkt *p)
{
	__u64 h;

	h = meshd_fmix64((((__u64)bpf_ntohl(p->saddr[3]) << 32) | bpf_ntohl(p->daddr[3])) ^
			 MESHD_HASH_SEED);
	h = meshd_fmix64(h ^ (((__u64)bpf_ntohl(p->saddr[2]) << 32) | bpf_ntohl(p->saddr[1])));
	h = meshd_fmix64(h ^ (((__u64)bpf_ntohs(p->sport) << 16) | bpf_ntohs(p->dport)));
	return (__u32)h;
}

/* Chooses the source for the SNAT_OUT entry `out` (key `ok`) of request `p` leaving by
 * skb->ifindex: the interface's address of the family, and the first free port of the
 * range from a hash of the flow on. Writes SNAT_REV, then the completed SNAT_OUT (copied to
 * *chosen). 0, or -1: no address, or no free port in MESHD_SNAT_TRIES (snat_fail), or -2:
 * a map update failed. */
static __always_inline int meshd_snat_pick(struct __sk_buff *skb, const struct meshd_pkt *p,
					   struct meshd_ct_val *out, __u64 now)
{
	struct meshd_ct_key rk = {}, old = {};
	struct meshd_ct_val rv = {}, *held;
	struct meshd_tc_addr *a;
	__u32 ifindex = skb->ifindex, h, size, i;
	__u32 node[4];
	__u64 seen;
	__u16 port;

	a = bpf_map_lookup_elem(&meshd_tcaddr_v1, &ifindex);
	if (!a)
		return -1;
	meshd_copy16(node, p->v6 ? a->v6 : a->v4);
	if (!(node[0] | node[1] | node[2] | node[3]))
		return -1;
	meshd_copy16(rv.nat_addr, p->saddr);
	rv.nat_port = p->sport;
	rv.backend = out->backend;
	rv.group = out->group;
	rv.refreshed_ns = now;
	h = meshd_snat_hash(p);
	size = (__u32)meshd_tc_cfg.snat_port_max - meshd_tc_cfg.snat_port_min + 1;
	for (i = 0; i < MESHD_SNAT_TRIES; i++) {
		port = bpf_htons((__u16)(meshd_tc_cfg.snat_port_min + (h + i) % size));
		meshd_snat_rev_key(&rk, p, node, port);
		/* Look first: a failed NOEXIST insert into a full LRU map still evicts an entry.
		 * A port held for this very client tuple is this flow's own (another CPU picked
		 * it for a packet in flight, or its SNAT_OUT was evicted): take it again. A port
		 * of a flow closed (TCP) or idle long enough: take it over -- one CPU only (the
		 * stamp is swapped atomically), in place, and the old flow's SNAT_OUT goes, so
		 * its stragglers cannot leave by the port. */
		held = bpf_map_lookup_elem(&meshd_tcct_v1, &rk);
		if (held) {
			if (!meshd_snat_owns(held, p->saddr, p->sport)) {
				seen = held->refreshed_ns;
				if (!meshd_snat_reusable(held, seen, p->proto, now) ||
				    __sync_val_compare_and_swap(&held->refreshed_ns, seen, now) != seen)
					continue;
				meshd_ct_key_set(&old, held->nat_addr, p->daddr, held->nat_port, p->dport,
						 p->proto, MESHD_CT_SNAT_OUT);
				bpf_map_delete_elem(&meshd_tcct_v1, &old);
				held->backend = out->backend;
				held->group = out->group;
				meshd_copy16(held->nat_addr, p->saddr);
				held->nat_port = p->sport;
			}
			held->rst = 0;
		} else if (bpf_map_update_elem(&meshd_tcct_v1, &rk, &rv, BPF_NOEXIST)) {
			continue;
		}
		/* In place; the port last: a reader that sees it sees the address. */
		meshd_copy16(out->nat_addr, node);
		out->refreshed_ns = now;
		barrier();
		out->nat_port = port;
		return 0;
	}
	return -1;
}

/* Egress, SNAT mode: a translated request of a SNAT flow leaves with node address:port as
 * its source. Anything else: untouched. */
static __always_inline int meshd_snat_out(struct __sk_buff *skb, const struct meshd_pkt *p)
{
	struct meshd_ct_key k = {}, rk = {};
	struct meshd_ct_val *out, rv = {}, *held;
	struct meshd_tc_stats *st;
	__u32 nat_addr[4], csum_off;
	__u16 nat_port;
	__u64 now, l4_flags;
	int pick;

	meshd_snat_out_key(&k, p, p->daddr, p->dport);
	out = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (!out)
		return TC_ACT_UNSPEC;
	st = meshd_stats();
	now = bpf_ktime_get_coarse_ns();
	pick = !out->nat_port;
	if (!pick && (__s64)(now - out->refreshed_ns) > (__s64)MESHD_CT_REFRESH_NS) {
		/* The reply entry: back if LRU evicted it while the flow only sent one way; if
		 * meanwhile another flow took the port, this one moves to a new port rather than
		 * share node:port (the backend would mix the two). */
		meshd_snat_rev_key(&rk, p, out->nat_addr, out->nat_port);
		held = bpf_map_lookup_elem(&meshd_tcct_v1, &rk);
		if (!held) {
			meshd_copy16(rv.nat_addr, p->saddr);
			rv.nat_port = p->sport;
			rv.backend = out->backend;
			rv.group = out->group;
			rv.refreshed_ns = now;
			bpf_map_update_elem(&meshd_tcct_v1, &rk, &rv, BPF_NOEXIST);
		} else if (!meshd_snat_owns(held, p->saddr, p->sport)) {
			pick = 1;
		} else if (!held->rst) {
			held->refreshed_ns = now; /* in use: not idle (UDP) */
		}
		out->refreshed_ns = now;
	}
	if (pick) {
		if (meshd_snat_pick(skb, p, out, now)) {
			MESHD_COUNT(st, snat_fail);
			return TC_ACT_SHOT;
		}
		MESHD_COUNT(st, snat_new);
	}
	meshd_copy16(nat_addr, out->nat_addr);
	nat_port = out->nat_port;
	if (p->frag == MESHD_FRAG_FIRST && meshd_frag_note(p, MESHD_CT_REV, nat_addr))
		return meshd_drop_err(st);
	csum_off = meshd_l4_csum_off(p);
	l4_flags = meshd_l4_flags(p);
	if (meshd_set_addr(skb, p, 0, nat_addr, csum_off, l4_flags) ||
	    meshd_set_port(skb, p->l4off, p->sport, nat_port, csum_off, l4_flags))
		return meshd_drop_err(st);
	MESHD_COUNT(st, snat);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

/* Ingress, SNAT mode: a reply to node address:port of a SNAT flow gets its client back as
 * destination (the routed layer's REV entry restores the VIP as it leaves). */
static __always_inline int meshd_unsnat(struct __sk_buff *skb, const struct meshd_pkt *p)
{
	struct meshd_ct_key k = {};
	struct meshd_ct_val *v;
	struct meshd_tc_stats *st;
	__u32 csum_off;
	__u64 l4_flags, now;

	meshd_ct_key_set(&k, p->saddr, p->daddr, p->sport, p->dport, p->proto, MESHD_CT_SNAT_REV);
	v = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (!v)
		return TC_ACT_UNSPEC;
	st = meshd_stats();
	now = bpf_ktime_get_coarse_ns();
	if (!v->rst && (__s64)(now - v->refreshed_ns) > (__s64)MESHD_CT_REFRESH_NS)
		v->refreshed_ns = now; /* in use: not idle (UDP); at most one write a second */
	if (p->frag == MESHD_FRAG_FIRST && meshd_frag_note(p, MESHD_CT_FWD, v->nat_addr))
		return meshd_drop_err(st);
	csum_off = meshd_l4_csum_off(p);
	l4_flags = meshd_l4_flags(p);
	if (meshd_set_addr(skb, p, 1, v->nat_addr, csum_off, l4_flags) ||
	    meshd_set_port(skb, p->l4off + 2, p->dport, v->nat_port, csum_off, l4_flags))
		return meshd_drop_err(st);
	MESHD_COUNT(st, unsnat);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

/* ---- the two directions ---------------------------------------------------------------- */

/* A packet that is not for a service goes to backend:port from a client tuple a tracked
 * VIP flow holds (the client reuses a source port, e.g. after a RST): at the backend both
 * are the same connection, and the newest wins. Forget the VIP flow, or its REV entry
 * would rewrite the direct flow's replies to come from the VIP. TCP: checked on a SYN
 * only; UDP has no SYN: checked per datagram (one more lookup for non-service UDP). */
static __always_inline void meshd_forget_shadowed(const struct meshd_pkt *p)
{
	struct meshd_ct_key rk = {}, fk = {};
	struct meshd_ct_val *rv;

	meshd_ct_key_set(&rk, p->daddr, p->saddr, p->dport, p->sport, p->proto, MESHD_CT_REV);
	rv = bpf_map_lookup_elem(&meshd_tcct_v1, &rk);
	if (!rv)
		return;
	meshd_ct_key_set(&fk, p->saddr, rv->nat_addr, p->sport, rv->nat_port, p->proto,
			 MESHD_CT_FWD);
	bpf_map_delete_elem(&meshd_tcct_v1, &fk);
	bpf_map_delete_elem(&meshd_tcct_v1, &rk);
	MESHD_COUNT(meshd_stats(), ct_shadowed);
}

static __always_inline int meshd_nat_fwd(struct __sk_buff *skb)
{
	struct meshd_ct_key fk = {}, rk = {};
	struct meshd_ct_val *ct, nv = {};
	struct meshd_backend *be = 0;
	struct meshd_svc_key sk = {};
	struct meshd_svc_val *svc;
	struct meshd_tc_stats *st;
	struct meshd_pkt p = {};
	__u32 nat_addr[4], csum_off, be_id = 0;
	__u16 nat_port;
	__u64 now, l4_flags;
	int repick = 0;

	if (meshd_parse(skb, &p) != MESHD_PARSE_OK)
		return TC_ACT_UNSPEC;
	if (p.frag == MESHD_FRAG_LATER)
		return meshd_frag_xlate(skb, &p, MESHD_CT_FWD);
	if (p.proto == IPPROTO_ICMP || p.proto == MESHD_NEXTHDR_ICMP6)
		return meshd_icmp_xlate(skb, &p, MESHD_CT_FWD);

	meshd_copy16(sk.addr, p.daddr);
	sk.port = p.dport;
	sk.proto = p.proto;
	svc = bpf_map_lookup_elem(&meshd_svc_v1, &sk);
	if (!svc) { /* not a service: the common case, one lookup (TCP) */
		if (meshd_snat_on() && meshd_snat_port(p.dport)) {
			int ret = meshd_unsnat(skb, &p);

			if (ret != TC_ACT_UNSPEC)
				return ret;
		}
		if (p.proto == IPPROTO_UDP ||
		    (p.tcp_flags & (MESHD_TCP_SYN | MESHD_TCP_ACK)) == MESHD_TCP_SYN)
			meshd_forget_shadowed(&p);
		return TC_ACT_UNSPEC;
	}
	st = meshd_stats();
	now = bpf_ktime_get_coarse_ns();

	meshd_fwd_key(&fk, &p);
	ct = bpf_map_lookup_elem(&meshd_tcct_v1, &fk);
	if (ct) {
		/* Pinned while its backend exists: the id still names the same address (ids are
		 * reused after a removal), and a TCP SYN does not reopen a closed flow. */
		be = bpf_map_lookup_elem(&meshd_be_v1, &ct->backend);
		if (!be || !meshd_eq16(be->addr, ct->nat_addr) || be->port != ct->nat_port ||
		    ((p.tcp_flags & (MESHD_TCP_SYN | MESHD_TCP_ACK)) == MESHD_TCP_SYN &&
		     p.proto == IPPROTO_TCP && meshd_ct_closed(ct)))
			repick = 1;
	}
	if (!ct || repick) {
		if (svc->count == 0 || meshd_pick(svc, &p, &be_id, &be)) {
			MESHD_COUNT(st, no_backend);
			return TC_ACT_SHOT;
		}
		if (repick) { /* the old backend's replies are no longer expected */
			meshd_rev_key(&rk, &p, ct->nat_addr, ct->nat_port);
			bpf_map_delete_elem(&meshd_tcct_v1, &rk);
		}
		meshd_copy16(nat_addr, be->addr);
		nat_port = be->port;
		/* REV first: a reply can never arrive before its entry exists. */
		meshd_rev_key(&rk, &p, nat_addr, nat_port);
		meshd_copy16(nv.nat_addr, p.daddr);
		nv.nat_port = p.dport;
		nv.backend = be_id;
		nv.group = svc->id;
		if (bpf_map_update_elem(&meshd_tcct_v1, &rk, &nv, BPF_ANY))
			return meshd_drop_err(st);
		meshd_copy16(nv.nat_addr, nat_addr);
		nv.nat_port = nat_port;
		nv.refreshed_ns = now;
		if (p.proto == IPPROTO_TCP) {
			nv.rst = !!(p.tcp_flags & MESHD_TCP_RST);
			nv.fin_fwd = !!(p.tcp_flags & MESHD_TCP_FIN);
		}
		if (bpf_map_update_elem(&meshd_tcct_v1, &fk, &nv, BPF_ANY) ||
		    meshd_snat_prepare(&p, nat_addr, nat_port, be_id, svc->id,
				       p.proto == IPPROTO_TCP && (p.tcp_flags & (MESHD_TCP_SYN |
						MESHD_TCP_ACK)) == MESHD_TCP_SYN, now))
			return meshd_drop_err(st);
		if (repick)
			MESHD_COUNT(st, ct_repick);
		else
			MESHD_COUNT(st, ct_new);
	} else {
		meshd_copy16(nat_addr, ct->nat_addr);
		nat_port = ct->nat_port;
		if (now - ct->refreshed_ns > MESHD_CT_REFRESH_NS) {
			meshd_rev_key(&rk, &p, nat_addr, nat_port);
			meshd_copy16(nv.nat_addr, p.daddr);
			nv.nat_port = p.dport;
			nv.backend = ct->backend;
			nv.group = ct->group;
			bpf_map_update_elem(&meshd_tcct_v1, &rk, &nv, BPF_ANY);
			ct->refreshed_ns = now;
		}
		if (p.proto == IPPROTO_TCP && (p.tcp_flags & (MESHD_TCP_FIN | MESHD_TCP_RST))) {
			meshd_ct_tcp(ct, p.tcp_flags, 1, st);
			if (meshd_snat_on() && meshd_ct_closed(ct))
				meshd_snat_closed(p.saddr, p.sport, ct->nat_addr, ct->nat_port, now);
		}
	}
	if (p.frag == MESHD_FRAG_FIRST && meshd_frag_note(&p, MESHD_CT_FWD, nat_addr))
		return meshd_drop_err(st);

	csum_off = meshd_l4_csum_off(&p);
	l4_flags = meshd_l4_flags(&p);
	if (meshd_set_addr(skb, &p, 1, nat_addr, csum_off, l4_flags) ||
	    meshd_set_port(skb, p.l4off + 2, p.dport, nat_port, csum_off, l4_flags))
		return meshd_drop_err(st);
	MESHD_COUNT(st, dnat);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

static __always_inline int meshd_nat_rev(struct __sk_buff *skb)
{
	struct meshd_ct_key rk = {}, fk = {};
	struct meshd_ct_val *rv, *fwd;
	struct meshd_tc_stats *st;
	struct meshd_pkt p = {};
	__u32 csum_off;
	__u64 l4_flags;

	if (meshd_parse(skb, &p) != MESHD_PARSE_OK)
		return TC_ACT_UNSPEC;
	if (p.frag == MESHD_FRAG_LATER)
		return meshd_frag_xlate(skb, &p, MESHD_CT_REV);
	if (p.proto == IPPROTO_ICMP || p.proto == MESHD_NEXTHDR_ICMP6)
		return meshd_icmp_xlate(skb, &p, MESHD_CT_REV);

	meshd_ct_key_set(&rk, p.saddr, p.daddr, p.sport, p.dport, p.proto, MESHD_CT_REV);
	rv = bpf_map_lookup_elem(&meshd_tcct_v1, &rk);
	if (!rv) /* not a reply of a tracked flow; in SNAT mode maybe a request leaving */
		return meshd_snat_on() ? meshd_snat_out(skb, &p) : TC_ACT_UNSPEC;
	st = meshd_stats();
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & (MESHD_TCP_FIN | MESHD_TCP_RST))) {
		meshd_ct_key_set(&fk, p.daddr, rv->nat_addr, p.dport, rv->nat_port, p.proto,
				 MESHD_CT_FWD);
		fwd = bpf_map_lookup_elem(&meshd_tcct_v1, &fk);
		if (fwd)
			meshd_ct_tcp(fwd, p.tcp_flags, 0, st);
		/* a RST from the backend closes the flow even if its FWD entry is gone */
		if (meshd_snat_on() && ((fwd && meshd_ct_closed(fwd)) || (p.tcp_flags & MESHD_TCP_RST)))
			meshd_snat_closed(p.daddr, p.dport, p.saddr, p.sport,
					  bpf_ktime_get_coarse_ns());
	}
	if (p.frag == MESHD_FRAG_FIRST && meshd_frag_note(&p, MESHD_CT_REV, rv->nat_addr))
		return meshd_drop_err(st);

	csum_off = meshd_l4_csum_off(&p);
	l4_flags = meshd_l4_flags(&p);
	if (meshd_set_addr(skb, &p, 0, rv->nat_addr, csum_off, l4_flags) ||
	    meshd_set_port(skb, p.l4off, p.sport, rv->nat_port, csum_off, l4_flags))
		return meshd_drop_err(st);
	MESHD_COUNT(st, revnat);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

SEC("tc")
int meshd_tc_in(struct __sk_buff *skb)
{
	return meshd_nat_fwd(skb);
}

SEC("tc")
int meshd_tc_out(struct __sk_buff *skb)
{
	return meshd_nat_rev(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
