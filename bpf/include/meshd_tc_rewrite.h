/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Rewriting (tc path): an address or a port of the parsed packet, with the IPv4 header
 * checksum and the L4 checksum (pseudo header included) patched incrementally. */
#ifndef MESHD_TC_REWRITE_H
#define MESHD_TC_REWRITE_H

#include "meshd_tc_parse.h"

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

#endif
