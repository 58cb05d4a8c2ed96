/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* The Maglev pick of both paths: the backend id of the member in slot hash % M of a group's
 * table (meshd_maglev_v3; layout in struct meshd_table_chunk). M is read from the table's
 * own header, so groups may have tables of different sizes; `svc_flags` (the frontend's
 * MESHD_SVC_F_TABLE_B) says which half -- slots and members -- is current. */
#ifndef MESHD_MAGLEV_H
#define MESHD_MAGLEV_H

#include "meshd_maps.h"

/* 0 (never a backend id) when the group has no table. */
static __always_inline __u32 meshd_maglev_pick(__u32 gid, __u16 svc_flags, __u32 hash)
{
	struct meshd_table_chunk *hdr, *chunk;
	__u32 zero = 0, m, n, k, slot, idx, member, second;
	void *inner;

	inner = bpf_map_lookup_elem(&meshd_maglev_v3, &gid);
	if (!inner)
		return 0;
	hdr = bpf_map_lookup_elem(inner, &zero);
	if (!hdr)
		return 0;
	m = hdr->slot[0];
	n = hdr->slot[1];
	k = hdr->slot[2];
	if (!m)
		return 0;
	second = svc_flags & MESHD_SVC_F_TABLE_B ? 1 : 0;
	slot = hash % m;
	idx = 1 + slot / MESHD_TABLE_SLOTS + (second ? n : 0);
	/* an index past the array (a corrupt header) makes the lookup fail, not read beyond */
	chunk = bpf_map_lookup_elem(inner, &idx);
	if (!chunk)
		return 0;
	member = ((__u16 *)chunk->slot)[slot & (MESHD_TABLE_SLOTS - 1)];
	idx = 1 + 2 * n + (second ? k : 0) + member / MESHD_TABLE_CHUNK;
	chunk = bpf_map_lookup_elem(inner, &idx);
	if (!chunk)
		return 0;
	return chunk->slot[member & (MESHD_TABLE_CHUNK - 1)];
}

#endif
