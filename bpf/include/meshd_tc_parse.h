/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Parsing (tc path): an Ethernet frame into struct meshd_pkt -- IPv4 (options, fragments)
 * or IPv6 without extension headers, carrying TCP, UDP or ICMP. Anything else is SKIP and
 * the programs leave it untouched. */
#ifndef MESHD_TC_PARSE_H
#define MESHD_TC_PARSE_H

#include "meshd_tc_common.h"

/* Linear bytes the parser may need: Ethernet, IPv4 with options, ICMP, quoted IPv4 with
 * options and 8 bytes of it (an ICMPv6 error quotes 40 + 8). */
#define MESHD_MAX_HDR (ETH_HLEN + 60 + 8 + 60 + 8)

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

#endif
