/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* IPv4 fragments (tc path): the first fragment records where its datagram went
 * (meshd_tcfrag_v1); later fragments, which carry no L4 header, follow that record. */
#ifndef MESHD_TC_FRAG_H
#define MESHD_TC_FRAG_H

#include "meshd_tc_rewrite.h"

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

#endif
