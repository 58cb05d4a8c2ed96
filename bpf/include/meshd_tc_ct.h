/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Conntrack (tc path): the FWD / REV keys of a flow in meshd_tcct_v1 (layout and the
 * scheme in meshd_tc.h), the TCP close state, and forgetting a VIP flow whose tuple a
 * client reuses to reach the backend directly. */
#ifndef MESHD_TC_CT_H
#define MESHD_TC_CT_H

#include "meshd_tc_parse.h"

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

#endif
