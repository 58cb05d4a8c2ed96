/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Frontend lookup and backend selection (tc path), for a flow without a conntrack entry:
 * the frontend (the tc override map first), load_balancer_source_ranges, ClientIP session
 * affinity, and the Maglev pick over the flow hash. The hash must equal
 * meshd/dataplane/tc.py flow_hash(): tests compute the expected backend from it. */
#ifndef MESHD_TC_SELECT_H
#define MESHD_TC_SELECT_H

#include "meshd_tc_parse.h"
#include "meshd_tc_common.h"
#include "meshd_maglev.h"

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
	struct meshd_backend *found;

	*be_id = meshd_maglev_pick(svc->id, svc->flags, meshd_flow_hash(p));
	if (!*be_id)
		return -1;
	found = bpf_map_lookup_elem(&meshd_be_v1, be_id);
	if (!found || found->family != (p->v6 ? AF_INET6 : AF_INET))
		return -1;
	*be = found;
	return 0;
}

/* The frontend of a packet: meshd_svc_ext_v1 first (the tc path's own group of an
 * external frontend whose tc selection differs, e.g. external_traffic_policy Local), then
 * meshd_svc_v1. NULL: not a service. */
static __always_inline struct meshd_svc_val *meshd_frontend(const struct meshd_pkt *p)
{
	struct meshd_svc_key sk = {};
	struct meshd_svc_val *svc;

	meshd_copy16(sk.addr, p->daddr);
	sk.port = p->dport;
	sk.proto = p->proto;
	svc = bpf_map_lookup_elem(&meshd_svc_ext_v1, &sk);
	if (svc)
		return svc;
	return bpf_map_lookup_elem(&meshd_svc_v1, &sk);
}

/* load_balancer_source_ranges: is the packet's source in one of the networks allowed on
 * its frontend (an LPM match on frontend + source, all 128 source bits given)? */
static __always_inline int meshd_source_allowed(const struct meshd_pkt *p)
{
	struct meshd_srcrange_key k = {};

	k.prefixlen = 160 + 128;
	meshd_copy16(k.vip, p->daddr);
	k.port = p->dport;
	k.proto = p->proto;
	meshd_copy16(k.src, p->saddr);
	return bpf_map_lookup_elem(&meshd_srcrange_v1, &k) != 0;
}

/* The backend of a new flow. Groups with ClientIP affinity: the client's entry in
 * meshd_aff_v1 is followed while it is younger than the group's timeout
 * (meshd_affcfg_v1, seconds) and its backend is still a member of the group
 * (meshd_member_v1) and exists in meshd_be_v1 -- then seen_ns is refreshed; otherwise
 * Maglev picks and the choice is stored. A group without a timeout entry balances by
 * Maglev alone. Only new flows look here: a tracked flow keeps its backend, as kube-proxy's
 * `recent` match only sees a connection's first packet. 0 and *be set, or -1. */
static __always_inline int meshd_select(const struct meshd_svc_val *svc,
					const struct meshd_pkt *p, __u32 *be_id,
					struct meshd_backend **be, struct meshd_tc_stats *st)
{
	struct meshd_member_key mk = {};
	struct meshd_aff_key ak = {};
	struct meshd_aff_val av = {}, *cur;
	struct meshd_backend *found;
	__u32 *timeout = 0;
	__u64 now = 0;
	__s64 age;

	if (svc->flags & MESHD_SVC_F_AFFINITY)
		timeout = bpf_map_lookup_elem(&meshd_affcfg_v1, &svc->id);
	if (timeout) {
		meshd_copy16(ak.addr, p->saddr); /* netns 0: the tc path keys on the address */
		ak.group = svc->id;
		now = bpf_ktime_get_ns();
		cur = bpf_map_lookup_elem(&meshd_aff_v1, &ak);
		if (cur) {
			age = (__s64)(now - cur->seen_ns); /* another CPU may have stamped later */
			mk.group = svc->id;
			mk.backend = cur->backend;
			if (age < (__s64)*timeout * 1000000000LL &&
			    bpf_map_lookup_elem(&meshd_member_v1, &mk)) {
				found = bpf_map_lookup_elem(&meshd_be_v1, &mk.backend);
				if (found && found->family == (p->v6 ? AF_INET6 : AF_INET)) {
					cur->seen_ns = now;
					*be_id = mk.backend;
					*be = found;
					MESHD_COUNT(st, aff_follow);
					return 0;
				}
			}
		}
	}
	if (meshd_pick(svc, p, be_id, be))
		return -1;
	if (timeout) {
		av.seen_ns = now;
		av.backend = *be_id;
		bpf_map_update_elem(&meshd_aff_v1, &ak, &av, BPF_ANY); /* full LRU: evicts */
	}
	return 0;
}

#endif
