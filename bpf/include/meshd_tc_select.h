/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Backend selection (tc path): the flow hash and the Maglev pick. The hash must equal
 * meshd/dataplane/tc.py flow_hash(): tests compute the expected backend from it. */
#ifndef MESHD_TC_SELECT_H
#define MESHD_TC_SELECT_H

#include "meshd_tc_parse.h"

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

#endif
