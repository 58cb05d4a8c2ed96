/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Per-packet load balancing on tc (clsact), for traffic that never passes a socket hook:
 * clients on other hosts or in other network namespaces whose packets cross this node.
 *
 *   meshd_tc_in   ingress: a TCP/UDP packet for a VIP:port gets its destination rewritten
 *                 to a backend (Maglev over a hash of saddr, sport, dport, proto -- not daddr,
 *                 so every node with the same maps picks the same backend); conntrack pins
 *                 the flow while its backend exists
 *   meshd_tc_out  egress: a reply from a tracked backend gets the VIP back as its source
 *
 * Routed mode: both programs sit on the same interface (the one clients come in on), and
 * the node is on the reply path (clients route the service range via the node; backends
 * route the clients via the node). The kernel routes the rewritten packet; no redirect.
 * SNAT mode (meshd_tc_cfg.snat_port_min != 0) adds a layer for backends that would answer
 * the client directly: the request leaves with the address of its egress interface and a
 * port of the range (meshd_snat_out), the reply to it gets the client back on ingress
 * (meshd_unsnat) and meets the routed layer's REV entry on its way out. NodePort needs no
 * code here: node address:port frontends are ordinary entries of meshd_svc_v1.
 *
 * Shares meshd_svc_v1 / meshd_be_v1 / meshd_maglev_v3 with the socket LB (the loader
 * reuses the instance's pinned maps). Verdicts: a translated packet returns TC_ACT_UNSPEC
 * too, never TC_ACT_OK: OK would end the filter chain, and filters of other tools at later
 * priorities on the same hook (policy, accounting, mirroring) would never see the packet;
 * with UNSPEC they see it translated, and the packet goes on as with OK when no filter
 * follows. Only TC_ACT_SHOT (a drop) and TC_ACT_REDIRECT (a REJECT reply) are final.
 * Edge cases, each deliberate (docs/tc.md):
 *   - not TCP/UDP/ICMP, not IPv4/IPv6, not a VIP:port/proto: untouched, TC_ACT_UNSPEC (so
 *     filters of other tools at later priorities still run); two hash lookups
 *   - IPv4 options: the L4 header is found at ihl * 4
 *   - IPv4 fragments: the first (offset 0, MF) is translated and records its datagram in
 *     meshd_tcfrag_v1; later fragments (no L4 header) follow that record or pass untouched.
 *     IPv6 extension headers (fragments included): untouched
 *   - ICMP errors (unreachable, time exceeded, parameter problem, packet too big) quoting a
 *     tracked flow are translated both ways, the quoted headers and their checksums included
 *   - TCP RST, or FIN both ways, marks the flow closed; a later SYN on the same tuple is
 *     balanced afresh, other packets keep their backend; LRU reclaims the entry
 *   - the frontend: meshd_svc_ext_v1 (the tc path's group of an external frontend) first,
 *     then meshd_svc_v1
 *   - a new flow to a frontend with no backend: answered as kube-proxy's REJECT (TCP RST,
 *     ICMP port unreachable), or dropped when the frontend says so (MESHD_SVC_F_DROP_EMPTY:
 *     external_traffic_policy Local with no local endpoint); a new flow from a source
 *     outside load_balancer_source_ranges: dropped; all counted
 *   - a tracked flow keeps its backend while the backend's id exists in meshd_be_v1 with
 *     the same address, even after it left the Maglev table (draining)
 *   - ClientIP affinity (new flows only): by source address, meshd_select()
 *   - MESHD_SVC_F_KEEP_SOURCE (external_traffic_policy Local): never SNAT
 *   - a client reaching a backend directly on a tuple a VIP flow holds: that flow is
 *     forgotten (meshd_forget_shadowed)
 *
 * This file holds the two directions; the work is in headers under bpf/include/, one
 * concern each (as Cilium's bpf/lib/), included in dependency order:
 *   meshd_tc.h         structs and maps of the tc path (conntrack scheme, SNAT layer)
 *   meshd_tc_common.h  constants, load-time settings (meshd_tc_cfg), counters, helpers
 *   meshd_tc_parse.h   Ethernet/IPv4/IPv6 + TCP/UDP/ICMP into struct meshd_pkt
 *   meshd_tc_rewrite.h address and port rewrites with incremental checksums
 *   meshd_tc_select.h  frontend lookup, source ranges, session affinity, Maglev pick
 *   meshd_tc_ct.h      conntrack keys, TCP close state, shadowed flows
 *   meshd_tc_frag.h    IPv4 fragments after the first
 *   meshd_tc_icmp.h    ICMP errors quoting a tracked flow
 *   meshd_tc_snat.h    SNAT mode
 *   meshd_tc_reject.h  REJECT replies (TCP RST, ICMP port unreachable)
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "meshd_tc_common.h"
#include "meshd_tc_parse.h"
#include "meshd_tc_rewrite.h"
#include "meshd_tc_select.h"
#include "meshd_tc_ct.h"
#include "meshd_tc_frag.h"
#include "meshd_tc_icmp.h"
#include "meshd_tc_snat.h"
#include "meshd_tc_reject.h"

/* ---- the two directions ---------------------------------------------------------------- */

/* meshd_nat_fwd's verdict for a packet to be answered as REJECT (no TC_ACT_* value). */
#define MESHD_DO_REJECT 0x100
/* meshd_nat_rev's verdict for a packet that is no tracked reply, in SNAT mode: maybe a
 * request leaving (meshd_tc_out calls meshd_snat_out, each with its own frame). */
#define MESHD_DO_SNAT_OUT 0x101

/* Ingress, a TCP or UDP packet with its L4 header (parsed by meshd_tc_in): DNAT of a packet
 * to a frontend, SNAT mode's reverse translation, or nothing. MESHD_DO_REJECT: answer it
 * (meshd_tc_in does, so the reply's stack frame is not stacked on this one's). Not inlined
 * for the same reason: the verifier limits a call chain's frames to 512 bytes in all. */
static __noinline int meshd_nat_fwd(struct __sk_buff *skb, struct meshd_pkt *pp)
{
	struct meshd_ct_key fk = {}, rk = {};
	struct meshd_ct_val *ct, nv = {};
	struct meshd_backend *be = 0;
	struct meshd_svc_val *svc;
	struct meshd_tc_stats *st;
	struct meshd_pkt p = *pp;
	__u32 nat_addr[4], csum_off, be_id = 0;
	__u16 nat_port;
	__u64 now, l4_flags;
	int repick = 0;

	svc = meshd_frontend(&p);
	if (!svc) { /* not a service: the common case, two lookups (TCP) */
		if (meshd_snat_on() && meshd_snat_port(p.dport)) {
			int ret = meshd_unsnat(skb, &p);

			if (ret != TC_ACT_UNSPEC)
				return ret;
		}
		if (p.proto == IPPROTO_UDP ||
		    (p.tcp_flags & (MESHD_TCP_SYN | MESHD_TCP_ACK)) == MESHD_TCP_SYN)
			meshd_forget_shadowed(&p);
		return TC_ACT_UNSPEC;
	}
	st = meshd_stats();
	now = bpf_ktime_get_coarse_ns();

	meshd_fwd_key(&fk, &p);
	ct = bpf_map_lookup_elem(&meshd_tcct_v1, &fk);
	if (ct) {
		/* Pinned while its backend exists: the id still names the same address (ids are
		 * reused after a removal), and a TCP SYN does not reopen a closed flow. */
		be = bpf_map_lookup_elem(&meshd_be_v1, &ct->backend);
		if (!be || !meshd_eq16(be->addr, ct->nat_addr) || be->port != ct->nat_port ||
		    ((p.tcp_flags & (MESHD_TCP_SYN | MESHD_TCP_ACK)) == MESHD_TCP_SYN &&
		     p.proto == IPPROTO_TCP && meshd_ct_closed(ct)))
			repick = 1;
	}
	if (!ct || repick) {
		if ((svc->flags & MESHD_SVC_F_SOURCE_RANGES) && !meshd_source_allowed(&p)) {
			MESHD_COUNT(st, src_range);
			return TC_ACT_SHOT;
		}
		if (svc->count == 0) {
			if (svc->flags & MESHD_SVC_F_DROP_EMPTY) { /* kube-proxy's DROP */
				MESHD_COUNT(st, drop_no_local);
				return TC_ACT_SHOT;
			}
			return MESHD_DO_REJECT;
		}
		if (meshd_select(svc, &p, &be_id, &be, st)) {
			MESHD_COUNT(st, no_backend);
			return TC_ACT_SHOT;
		}
		if (repick) { /* the old backend's replies are no longer expected */
			meshd_rev_key(&rk, &p, ct->nat_addr, ct->nat_port);
			bpf_map_delete_elem(&meshd_tcct_v1, &rk);
		}
		meshd_copy16(nat_addr, be->addr);
		nat_port = be->port;
		/* REV first: a reply can never arrive before its entry exists. */
		meshd_rev_key(&rk, &p, nat_addr, nat_port);
		meshd_copy16(nv.nat_addr, p.daddr);
		nv.nat_port = p.dport;
		nv.backend = be_id;
		nv.group = svc->id;
		if (bpf_map_update_elem(&meshd_tcct_v1, &rk, &nv, BPF_ANY))
			return meshd_drop_err(st);
		meshd_copy16(nv.nat_addr, nat_addr);
		nv.nat_port = nat_port;
		nv.refreshed_ns = now;
		if (p.proto == IPPROTO_TCP) {
			nv.rst = !!(p.tcp_flags & MESHD_TCP_RST);
			nv.fin_fwd = !!(p.tcp_flags & MESHD_TCP_FIN);
		}
		if (bpf_map_update_elem(&meshd_tcct_v1, &fk, &nv, BPF_ANY))
			return meshd_drop_err(st);
		if (svc->flags & MESHD_SVC_F_KEEP_SOURCE)
			meshd_snat_keep_source(&p, nat_addr, nat_port);
		else if (meshd_snat_prepare(&p, nat_addr, nat_port, be_id, svc->id,
					    p.proto == IPPROTO_TCP && (p.tcp_flags & (MESHD_TCP_SYN |
						MESHD_TCP_ACK)) == MESHD_TCP_SYN, now))
			return meshd_drop_err(st);
		if (repick)
			MESHD_COUNT(st, ct_repick);
		else
			MESHD_COUNT(st, ct_new);
	} else {
		meshd_copy16(nat_addr, ct->nat_addr);
		nat_port = ct->nat_port;
		if (now - ct->refreshed_ns > MESHD_CT_REFRESH_NS) {
			meshd_rev_key(&rk, &p, nat_addr, nat_port);
			meshd_copy16(nv.nat_addr, p.daddr);
			nv.nat_port = p.dport;
			nv.backend = ct->backend;
			nv.group = ct->group;
			bpf_map_update_elem(&meshd_tcct_v1, &rk, &nv, BPF_ANY);
			ct->refreshed_ns = now;
		}
		if (p.proto == IPPROTO_TCP && (p.tcp_flags & (MESHD_TCP_FIN | MESHD_TCP_RST))) {
			meshd_ct_tcp(ct, p.tcp_flags, 1, st);
			if (meshd_snat_on() && meshd_ct_closed(ct))
				meshd_snat_closed(p.saddr, p.sport, ct->nat_addr, ct->nat_port, now);
		}
	}
	if (p.frag == MESHD_FRAG_FIRST && meshd_frag_note(&p, MESHD_CT_FWD, nat_addr))
		return meshd_drop_err(st);

	csum_off = meshd_l4_csum_off(&p);
	l4_flags = meshd_l4_flags(&p);
	if (meshd_set_addr(skb, &p, 1, nat_addr, csum_off, l4_flags) ||
	    meshd_set_port(skb, p.l4off + 2, p.dport, nat_port, csum_off, l4_flags))
		return meshd_drop_err(st);
	MESHD_COUNT(st, dnat);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

/* Egress, a TCP or UDP packet with its L4 header (parsed by meshd_tc_out): a reply of a
 * tracked flow gets the VIP back; MESHD_DO_SNAT_OUT: not one (SNAT mode). Not inlined: its
 * frame is never stacked on meshd_icmp_xlate's or meshd_snat_out's. */
static __noinline int meshd_nat_rev(struct __sk_buff *skb, struct meshd_pkt *pp)
{
	struct meshd_ct_key rk = {}, fk = {};
	struct meshd_ct_val *rv, *fwd;
	struct meshd_tc_stats *st;
	struct meshd_pkt p = *pp;
	__u32 csum_off;
	__u64 l4_flags;

	meshd_ct_key_set(&rk, p.saddr, p.daddr, p.sport, p.dport, p.proto, MESHD_CT_REV);
	rv = bpf_map_lookup_elem(&meshd_tcct_v1, &rk);
	if (!rv) /* not a reply of a tracked flow; in SNAT mode maybe a request leaving */
		return meshd_snat_on() ? MESHD_DO_SNAT_OUT : TC_ACT_UNSPEC;
	st = meshd_stats();
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & (MESHD_TCP_FIN | MESHD_TCP_RST))) {
		meshd_ct_key_set(&fk, p.daddr, rv->nat_addr, p.dport, rv->nat_port, p.proto,
				 MESHD_CT_FWD);
		fwd = bpf_map_lookup_elem(&meshd_tcct_v1, &fk);
		if (fwd)
			meshd_ct_tcp(fwd, p.tcp_flags, 0, st);
		/* a RST from the backend closes the flow even if its FWD entry is gone */
		if (meshd_snat_on() && ((fwd && meshd_ct_closed(fwd)) || (p.tcp_flags & MESHD_TCP_RST)))
			meshd_snat_closed(p.daddr, p.dport, p.saddr, p.sport,
					  bpf_ktime_get_coarse_ns());
	}
	if (p.frag == MESHD_FRAG_FIRST && meshd_frag_note(&p, MESHD_CT_REV, rv->nat_addr))
		return meshd_drop_err(st);

	csum_off = meshd_l4_csum_off(&p);
	l4_flags = meshd_l4_flags(&p);
	if (meshd_set_addr(skb, &p, 0, rv->nat_addr, csum_off, l4_flags) ||
	    meshd_set_port(skb, p.l4off, p.sport, rv->nat_port, csum_off, l4_flags))
		return meshd_drop_err(st);
	MESHD_COUNT(st, revnat);
	return TC_ACT_UNSPEC; /* translated: later filters still run */
}

SEC("tc")
int meshd_tc_in(struct __sk_buff *skb)
{
	struct meshd_pkt p = {};
	int ret;

	if (meshd_parse(skb, &p) != MESHD_PARSE_OK)
		return TC_ACT_UNSPEC;
	if (p.frag == MESHD_FRAG_LATER)
		return meshd_frag_xlate(skb, &p, MESHD_CT_FWD);
	if (p.proto == IPPROTO_ICMP || p.proto == MESHD_NEXTHDR_ICMP6)
		return meshd_icmp_xlate(skb, &p, MESHD_CT_FWD);
	ret = meshd_nat_fwd(skb, &p);
	if (ret == MESHD_DO_REJECT)
		return meshd_reject(skb, &p, meshd_stats());
	return ret;
}

SEC("tc")
int meshd_tc_out(struct __sk_buff *skb)
{
	struct meshd_pkt p = {};
	int ret;

	if (meshd_parse(skb, &p) != MESHD_PARSE_OK)
		return TC_ACT_UNSPEC;
	if (p.frag == MESHD_FRAG_LATER)
		return meshd_frag_xlate(skb, &p, MESHD_CT_REV);
	if (p.proto == IPPROTO_ICMP || p.proto == MESHD_NEXTHDR_ICMP6)
		return meshd_icmp_xlate(skb, &p, MESHD_CT_REV);
	ret = meshd_nat_rev(skb, &p);
	if (ret == MESHD_DO_SNAT_OUT)
		return meshd_snat_out(skb, &p);
	return ret;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
