/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Small helpers shared by the socket LB and the tc LB (one copy, so both hash and map
 * addresses the same way). Include after bpf_helpers.h and bpf_endian.h. */
#ifndef MESHD_HELPERS_H
#define MESHD_HELPERS_H

/* murmur3 fmix64: spreads sequential inputs (socket cookies, addresses) over the table. */
static __always_inline __u64 meshd_fmix64(__u64 k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	k *= 0xc4ceb9fe1a85ec53ULL;
	k ^= k >> 33;
	return k;
}

/* IPv4 stored IPv4-mapped (::ffff:a.b.c.d), as every meshd map keeps addresses. */
static __always_inline void meshd_map_v4(__u32 addr[4], __u32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0x0000ffff);
	addr[3] = ip4;
}

#endif
