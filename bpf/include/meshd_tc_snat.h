/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* SNAT mode (tc path, meshd_tc_cfg.snat_port_min != 0): the SNAT_OUT / SNAT_REV layer
 * (scheme in meshd_tc.h) -- port choice and reuse, the egress rewrite of requests and the
 * ingress rewrite of their replies. With SNAT off the verifier drops all of it. */
#ifndef MESHD_TC_SNAT_H
#define MESHD_TC_SNAT_H

#include "meshd_tc_rewrite.h"
#include "meshd_tc_ct.h"
#include "meshd_tc_frag.h"

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

/* A new flow to a frontend with MESHD_SVC_F_KEEP_SOURCE (external_traffic_policy Local):
 * it leaves with the client's address even in SNAT mode -- no SNAT_OUT entry, and one left
 * by an earlier flow on the same tuple (before the policy changed) goes. */
static __always_inline void meshd_snat_keep_source(const struct meshd_pkt *p,
						   const __u32 *be_addr, __u16 be_port)
{
	struct meshd_ct_key k = {};

	if (!meshd_snat_on())
		return;
	meshd_snat_out_key(&k, p, be_addr, be_port);
	bpf_map_delete_elem(&meshd_tcct_v1, &k);
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
static __noinline int meshd_snat_out(struct __sk_buff *skb, const struct meshd_pkt *p)
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

#endif
