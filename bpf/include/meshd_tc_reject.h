/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* REJECT (tc path): a packet to a frontend with no backend is answered as kube-proxy's
 * REJECT answers it, so the client fails at once instead of retrying into silence:
 *   TCP  a RST built in place (RFC 793 reset generation: to a segment with ACK, seq = its
 *        ack; otherwise RST+ACK with ack = its seq + length); a RST is never answered
 *   UDP  ICMP port unreachable (IPv4 type 3 code 3; IPv6 type 1 code 4) quoting the
 *        datagram as far as the reply stays within 576 (IPv4) / 1280 (IPv6) bytes, as Linux
 * The reply comes from the frontend address, with fresh IP and L4 checksums, and leaves by
 * the interface the packet came in on, to the MAC it came from (bpf_redirect to egress).
 * Replies are not rate-limited (the kernel's own ICMP is): each costs one packet out per
 * packet in, no larger than the request plus 48 bytes.
 *
 * Checksums are computed whole, not patched: a request arriving CHECKSUM_PARTIAL (from a
 * veth whose peer's stack left the checksum to offload) leaves by that same veth, whose
 * peer trusts it; requests from a physical NIC are never PARTIAL.
 *
 * __noinline: these run once per refused packet, and their headers and the checksum
 * buffer get a stack frame of their own instead of growing meshd_nat_fwd's. */
#ifndef MESHD_TC_REJECT_H
#define MESHD_TC_REJECT_H

#include "meshd_tc_parse.h"
#include "meshd_tc_common.h"

#define MESHD_ICMP4_QUOTE_MAX (576 - 20 - 8)	/* RFC 1812 4.3.2.3 */
#define MESHD_ICMP6_QUOTE_MAX (1280 - 40 - 8)	/* RFC 4443 2.4 (c) */
#define MESHD_CSUM_CHUNK 64
#define MESHD_REPLY_TTL 64

/* The TCP header of a RST: 20 bytes, no options. */
struct meshd_tcp_rst {
	__u16 sport;
	__u16 dport;
	__u32 seq;
	__u32 ack;
	__u8 doff;	/* data offset << 4: 5 words */
	__u8 flags;
	__u16 window;
	__u16 check;
	__u16 urg;
};

/* IPv6 pseudo header of the L4 checksum (RFC 8200 8.1). */
struct meshd_pseudo6 {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 len;	/* upper-layer length, network order */
	__u8 zero[3];
	__u8 nexthdr;
};

/* IPv4 pseudo header. */
struct meshd_pseudo4 {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;	/* network order */
};

/* An ICMP / ICMPv6 error header: type, code, checksum, 4 unused bytes. */
struct meshd_icmp_err {
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
};

static __always_inline __u16 meshd_csum_fold(__s64 sum)
{
	__u64 s = (__u64)sum & 0xffffffffULL;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Adds bytes [off, off + len) of the packet to the partial checksum `sum` (a trailing odd
 * byte padded with zero, as the Internet checksum wants). len <= MESHD_ICMP6_QUOTE_MAX.
 * The sum, or < 0. */
static __always_inline __s64 meshd_csum_skb(struct __sk_buff *skb, __u32 off, __u32 len,
					    __s64 sum)
{
	__u8 buf[2 * MESHD_CSUM_CHUNK]; /* twice: the verifier's bound of the last size */
	__u32 i, sz;

	for (i = 0; i < MESHD_ICMP6_QUOTE_MAX / MESHD_CSUM_CHUNK; i++) {
		if (len < MESHD_CSUM_CHUNK)
			break;
		if (bpf_skb_load_bytes(skb, off, buf, MESHD_CSUM_CHUNK))
			return -1;
		sum = bpf_csum_diff(0, 0, (__be32 *)buf, MESHD_CSUM_CHUNK, sum);
		if (sum < 0)
			return -1;
		off += MESHD_CSUM_CHUNK;
		len -= MESHD_CSUM_CHUNK;
	}
	if (len >= MESHD_CSUM_CHUNK)
		return -1;
	barrier_var(len);
	len &= MESHD_CSUM_CHUNK - 1; /* a no-op the verifier needs to see the bound */
	if (!len)
		return sum;
	__builtin_memset(buf, 0, sizeof(buf));
	if (bpf_skb_load_bytes(skb, off, buf, len))
		return -1;
	sz = (len + 3) & (2 * MESHD_CSUM_CHUNK - 4); /* rounded up to words; < sizeof(buf) */
	return bpf_csum_diff(0, 0, (__be32 *)buf, sz, sum);
}

/* The reply goes back where the request came from: the Ethernet addresses swapped. */
static __always_inline int meshd_swap_mac(struct __sk_buff *skb)
{
	__u8 mac[12], swapped[12];

	if (bpf_skb_load_bytes(skb, 0, mac, 12))
		return -1;
	__builtin_memcpy(swapped, mac + 6, 6);
	__builtin_memcpy(swapped + 6, mac, 6);
	return bpf_skb_store_bytes(skb, 0, swapped, 12, 0) ? -1 : 0;
}

/* TCP: the RST for segment `p`, in place of it. */
static __noinline int meshd_reject_tcp(struct __sk_buff *skb, const struct meshd_pkt *p)
{
	struct meshd_tcp_rst in = {}, rst = {};
	__u32 seglen, iplen, hlen;
	__s64 sum;
	__u16 w;

	if (p->tcp_flags & MESHD_TCP_RST)
		return -1; /* never answer a RST */
	if (bpf_skb_load_bytes(skb, p->l4off, &in, sizeof(in)))
		return -1;
	if (p->v6) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 4, &w, 2))
			return -1;
		iplen = bpf_ntohs(w);
		hlen = 0;
	} else {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 2, &w, 2))
			return -1;
		iplen = bpf_ntohs(w);
		hlen = p->l4off - ETH_HLEN;
	}
	hlen += (in.doff >> 4) * 4;
	seglen = iplen > hlen ? iplen - hlen : 0;
	seglen += !!(p->tcp_flags & MESHD_TCP_SYN) + !!(p->tcp_flags & MESHD_TCP_FIN);
	rst.sport = p->dport;
	rst.dport = p->sport;
	rst.doff = 5 << 4;
	if (p->tcp_flags & MESHD_TCP_ACK) {
		rst.seq = in.ack;
		rst.flags = MESHD_TCP_RST;
	} else {
		rst.ack = bpf_htonl(bpf_ntohl(in.seq) + seglen);
		rst.flags = MESHD_TCP_RST | MESHD_TCP_ACK;
	}
	if (p->v6) {
		struct meshd_pseudo6 ph = {};
		struct ipv6hdr ip6 = {};

		meshd_copy16(ph.saddr, p->daddr);
		meshd_copy16(ph.daddr, p->saddr);
		ph.len = bpf_htonl(sizeof(rst));
		ph.nexthdr = IPPROTO_TCP;
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
		if (sum < 0)
			return -1;
		sum = bpf_csum_diff(0, 0, (__be32 *)&rst, sizeof(rst), sum);
		if (sum < 0)
			return -1;
		rst.check = meshd_csum_fold(sum);
		ip6.version = 6;
		ip6.payload_len = bpf_htons(sizeof(rst));
		ip6.nexthdr = IPPROTO_TCP;
		ip6.hop_limit = MESHD_REPLY_TTL;
		__builtin_memcpy(&ip6.saddr, p->daddr, 16);
		__builtin_memcpy(&ip6.daddr, p->saddr, 16);
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip6) + sizeof(rst), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip6), &rst, sizeof(rst), 0))
			return -1;
	} else {
		struct meshd_pseudo4 ph = {};
		struct iphdr ip = {};

		ph.saddr = p->daddr[3];
		ph.daddr = p->saddr[3];
		ph.proto = IPPROTO_TCP;
		ph.len = bpf_htons(sizeof(rst));
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
		if (sum < 0)
			return -1;
		sum = bpf_csum_diff(0, 0, (__be32 *)&rst, sizeof(rst), sum);
		if (sum < 0)
			return -1;
		rst.check = meshd_csum_fold(sum);
		ip.version = 4;
		ip.ihl = 5;
		ip.tot_len = bpf_htons(sizeof(ip) + sizeof(rst));
		ip.frag_off = bpf_htons(0x4000); /* DF, as Linux sends its resets */
		ip.ttl = MESHD_REPLY_TTL;
		ip.protocol = IPPROTO_TCP;
		ip.saddr = p->daddr[3];
		ip.daddr = p->saddr[3];
		sum = bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0);
		if (sum < 0)
			return -1;
		ip.check = meshd_csum_fold(sum);
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + sizeof(rst), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &rst, sizeof(rst), 0))
			return -1;
	}
	return meshd_swap_mac(skb);
}

/* UDP: ICMP port unreachable quoting datagram `p`, in place of it: the datagram is cut to
 * the quote, and room for the new IP and ICMP headers is made in front of it. */
static __noinline int meshd_reject_udp(struct __sk_buff *skb, const struct meshd_pkt *p)
{
	struct meshd_icmp_err icmp = {};
	__u32 qlen, room, max;
	__s64 sum;
	__u16 w;

	if (bpf_skb_load_bytes(skb, ETH_HLEN + (p->v6 ? 4 : 2), &w, 2))
		return -1;
	qlen = bpf_ntohs(w) + (p->v6 ? sizeof(struct ipv6hdr) : 0);
	if (qlen > skb->len - ETH_HLEN)
		qlen = skb->len - ETH_HLEN;
	max = p->v6 ? MESHD_ICMP6_QUOTE_MAX : MESHD_ICMP4_QUOTE_MAX;
	if (qlen > max)
		qlen = max;
	room = (p->v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) + sizeof(icmp);
	if (bpf_skb_change_tail(skb, ETH_HLEN + qlen, 0) ||
	    bpf_skb_adjust_room(skb, room, BPF_ADJ_ROOM_MAC, 0))
		return -1;
	if (p->v6) {
		struct meshd_pseudo6 ph = {};
		struct ipv6hdr ip6 = {};

		icmp.type = 1; /* destination unreachable */
		icmp.code = 4; /* port unreachable */
		meshd_copy16(ph.saddr, p->daddr);
		meshd_copy16(ph.daddr, p->saddr);
		ph.len = bpf_htonl(sizeof(icmp) + qlen);
		ph.nexthdr = MESHD_NEXTHDR_ICMP6;
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
		if (sum < 0)
			return -1;
		sum = bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), sum);
		if (sum < 0)
			return -1;
		sum = meshd_csum_skb(skb, ETH_HLEN + room, qlen, sum);
		if (sum < 0)
			return -1;
		icmp.check = meshd_csum_fold(sum);
		ip6.version = 6;
		ip6.payload_len = bpf_htons(sizeof(icmp) + qlen);
		ip6.nexthdr = MESHD_NEXTHDR_ICMP6;
		ip6.hop_limit = MESHD_REPLY_TTL;
		__builtin_memcpy(&ip6.saddr, p->daddr, 16);
		__builtin_memcpy(&ip6.daddr, p->saddr, 16);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip6), &icmp, sizeof(icmp), 0))
			return -1;
	} else {
		struct iphdr ip = {};

		icmp.type = 3; /* destination unreachable */
		icmp.code = 3; /* port unreachable */
		sum = bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), 0);
		if (sum < 0)
			return -1;
		sum = meshd_csum_skb(skb, ETH_HLEN + room, qlen, sum);
		if (sum < 0)
			return -1;
		icmp.check = meshd_csum_fold(sum);
		ip.version = 4;
		ip.ihl = 5;
		ip.tot_len = bpf_htons(sizeof(ip) + sizeof(icmp) + qlen);
		ip.ttl = MESHD_REPLY_TTL;
		ip.protocol = IPPROTO_ICMP;
		ip.saddr = p->daddr[3];
		ip.daddr = p->saddr[3];
		sum = bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0);
		if (sum < 0)
			return -1;
		ip.check = meshd_csum_fold(sum);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &icmp, sizeof(icmp), 0))
			return -1;
	}
	return meshd_swap_mac(skb);
}

/* Answers packet `p` (to a frontend with no backend) as REJECT does, sent back out the
 * interface it came in on; counted (reject). A RST, or a reply that cannot be built: the
 * packet is dropped (reject / errors). */
static __always_inline int meshd_reject(struct __sk_buff *skb, const struct meshd_pkt *p,
					struct meshd_tc_stats *st)
{
	int err;

	MESHD_COUNT(st, reject);
	if (p->proto == IPPROTO_TCP) {
		if (p->tcp_flags & MESHD_TCP_RST)
			return TC_ACT_SHOT;
		err = meshd_reject_tcp(skb, p);
	} else if (p->frag == MESHD_FRAG_NONE || p->frag == MESHD_FRAG_FIRST) {
		err = meshd_reject_udp(skb, p);
	} else {
		return TC_ACT_SHOT;
	}
	if (err)
		return meshd_drop_err(st);
	return bpf_redirect(skb->ifindex, 0);
}

#endif
