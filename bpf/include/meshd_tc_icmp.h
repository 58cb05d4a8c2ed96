/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* ICMP errors (tc path) quoting a tracked flow (routed or SNAT layer): the quoted
 * headers, their checksums and the outer address translated both ways. */
#ifndef MESHD_TC_ICMP_H
#define MESHD_TC_ICMP_H

#include "meshd_tc_rewrite.h"
#include "meshd_tc_ct.h"

static __always_inline int meshd_icmp_is_error(const struct meshd_pkt *p, __u8 type)
{
	if (p->v6) /* destination unreachable, packet too big, time exceeded, parameter problem */
		return type >= 1 && type <= 4;
	return type == 3 || type == 11 || type == 12;
}

/* The quoted packet is the flow as the peer saw it: going in (`dir` FWD) the client quotes
 * a reply VIP -> client, going out (REV) the backend quotes a request client -> backend.
 * Both give the tracked entry's key reversed. The quoted source (FWD: VIP -> backend) or
 * destination (REV: backend -> VIP) and its port are rewritten, and the outer destination
 * (FWD: the VIP) or source (REV: if the backend itself sent the error, not a router). */
static __noinline int meshd_icmp_xlate(struct __sk_buff *skb, const struct meshd_pkt *p,
					    __u8 dir)
{
	__u32 icmp_csum_off = p->l4off + 2, qoff = p->l4off + 8, ql4, qaddr_off, qport_off;
	__u32 qaddr[4], new_addr[4];
	struct meshd_ct_key k = {};
	struct meshd_tc_stats *st;
	struct meshd_ct_val *v;
	__u16 qports[2], qport, old_qcsum, new_qcsum, old_l4, new_l4;
	__u32 ql4_csum_off;
	__u64 q_flags;
	__u8 type, qproto;
	__s64 diff;
	int fwd = dir == MESHD_CT_FWD;

	if (p->frag != MESHD_FRAG_NONE)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p->l4off, &type, 1) || !meshd_icmp_is_error(p, type))
		return TC_ACT_UNSPEC;
	if (!p->v6) {
		struct iphdr q;

		if (bpf_skb_load_bytes(skb, qoff, &q, sizeof(q)) || q.version != 4 || q.ihl < 5 ||
		    (bpf_ntohs(q.frag_off) & MESHD_IP_OFFMASK))
			return TC_ACT_UNSPEC;
		qproto = q.protocol;
		ql4 = qoff + q.ihl * 4;
		meshd_map_v4(k.saddr, q.daddr);
		meshd_map_v4(k.daddr, q.saddr);
		qaddr_off = qoff + (fwd ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		old_qcsum = q.check;
	} else {
		struct ipv6hdr q;

		if (bpf_skb_load_bytes(skb, qoff, &q, sizeof(q)) || q.version != 6)
			return TC_ACT_UNSPEC;
		qproto = q.nexthdr;
		ql4 = qoff + sizeof(q);
		__builtin_memcpy(k.saddr, &q.daddr, 16);
		__builtin_memcpy(k.daddr, &q.saddr, 16);
		qaddr_off = qoff + (fwd ? offsetof(struct ipv6hdr, saddr) :
				    offsetof(struct ipv6hdr, daddr));
		old_qcsum = 0;
	}
	if (qproto != IPPROTO_TCP && qproto != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, ql4, qports, 4))
		return TC_ACT_UNSPEC;
	k.sport = qports[1];
	k.dport = qports[0];
	k.proto = qproto;
	k.dir = dir;
	v = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
	if (!v && meshd_snat_on()) {
		/* The SNAT layer: the same key shape, the same rewrite (FWD: the quoted node
		 * address:port back to the client; REV: the quoted client to node address:port). */
		k.dir = fwd ? MESHD_CT_SNAT_REV : MESHD_CT_SNAT_OUT;
		v = bpf_map_lookup_elem(&meshd_tcct_v1, &k);
		if (v && !v->nat_port)
			v = 0; /* SNAT_OUT whose port is not chosen yet: nothing left the node */
	}
	if (!v)
		return TC_ACT_UNSPEC;
	st = meshd_stats();
	/* k.daddr / k.saddr are the quoted source / destination (FWD / REV) as it is now. */
	meshd_copy16(qaddr, fwd ? k.daddr : k.saddr);
	meshd_copy16(new_addr, v->nat_addr);
	qport_off = ql4 + (fwd ? 0 : 2);
	qport = fwd ? qports[0] : qports[1];

	/* The quoted address; the ICMP checksum covers it as data (ICMPv6: also the outer
	 * addresses as pseudo header, fixed with the outer address below). */
	diff = bpf_csum_diff(p->v6 ? qaddr : &qaddr[3], p->v6 ? 16 : 4,
			     p->v6 ? new_addr : &new_addr[3], p->v6 ? 16 : 4, 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, icmp_csum_off, 0, diff, 0))
		return meshd_drop_err(st);
	if (bpf_skb_store_bytes(skb, qaddr_off, p->v6 ? new_addr : &new_addr[3], p->v6 ? 16 : 4, 0))
		return meshd_drop_err(st);
	if (!p->v6) { /* the quoted IPv4 header checksum follows its address */
		if (bpf_l3_csum_replace(skb, qoff + offsetof(struct iphdr, check), qaddr[3],
					new_addr[3], 4) ||
		    bpf_skb_load_bytes(skb, qoff + offsetof(struct iphdr, check), &new_qcsum, 2) ||
		    bpf_l4_csum_replace(skb, icmp_csum_off, old_qcsum, new_qcsum, 2))
			return meshd_drop_err(st);
	}
	if (meshd_set_port(skb, qport_off, qport, v->nat_port, icmp_csum_off, 0))
		return meshd_drop_err(st);
	/* The quoted L4 checksum, when it is quoted (a TCP quote of 8 bytes has none) and is not
	 * a UDP "no checksum": it covers the quoted address (pseudo header) and port. The ICMP
	 * checksum covers the quoted checksum in turn. */
	ql4_csum_off = ql4 + (qproto == IPPROTO_TCP ? 16 : 6);
	if (!bpf_skb_load_bytes(skb, ql4_csum_off, &old_l4, 2) &&
	    (qproto == IPPROTO_TCP || old_l4 != 0)) {
		q_flags = qproto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
		if (p->v6) {
			diff = bpf_csum_diff(qaddr, 16, new_addr, 16, 0);
			if (diff < 0 || bpf_l4_csum_replace(skb, ql4_csum_off, 0, diff, q_flags))
				return meshd_drop_err(st);
		} else if (bpf_l4_csum_replace(skb, ql4_csum_off, qaddr[3], new_addr[3],
					       q_flags | 4)) {
			return meshd_drop_err(st);
		}
		if ((qport != v->nat_port &&
		     bpf_l4_csum_replace(skb, ql4_csum_off, qport, v->nat_port, q_flags | 2)) ||
		    bpf_skb_load_bytes(skb, ql4_csum_off, &new_l4, 2) ||
		    bpf_l4_csum_replace(skb, icmp_csum_off, old_l4, new_l4, 2))
			return meshd_drop_err(st);
	}
	/* The outer address, when it is the one being translated. */
	if (meshd_eq16(fwd ? p->daddr : p->saddr, qaddr) &&
	    meshd_set_addr(skb, p, fwd, new_addr, p->v6 ? icmp_csum_off : 0, 0))
		return meshd_drop_err(st);
	MESHD_COUNT(st, icmp_xlate);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

#endif
