/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Session affinity (service session_affinity: ClientIP) on the socket path.
 *
 * Who is "the client" when the hook sees a socket, not a packet: the socket's network
 * namespace (bpf_get_netns_cookie: every pod / container has its own) and, when the socket
 * is bound to a source address, that address. Cilium keys socket-LB affinity on the netns
 * cookie too: before connect() there is no source address to key on (the route picks it
 * later), and all processes of one namespace share the node's addresses anyway. The tc path
 * keys on the packet's source address (netns 0), so the two never share an entry.
 *
 *   meshd_aff_v1      (netns, bound address or zero, group) -> backend, last use
 *   meshd_affcfg_v1   group -> timeout in seconds (present for every group with the flag)
 *   meshd_member_v1   (group, backend) while the backend is in the group's selection
 *
 * An entry is followed while it is younger than the timeout (from its last use, as
 * kube-proxy's `recent` match with --reap counts), its backend is still a member of the
 * group and still exists; otherwise Maglev picks and the entry is (re)written.
 * Include after meshd_maps.h and meshd_helpers.h.
 */
#ifndef MESHD_SOCK_AFFINITY_H
#define MESHD_SOCK_AFFINITY_H

#define MESHD_NSEC_PER_SEC 1000000000ULL

/* The client of a socket: netns cookie, bound source address (IPv4-mapped) or zero. */
static __always_inline void meshd_aff_client(struct bpf_sock_addr *ctx, int v6,
					     struct meshd_aff_key *k)
{
	struct bpf_sock *sk = ctx->sk;

	k->netns = bpf_get_netns_cookie(ctx);
	if (!sk)
		return;
	if (!v6) {
		if (sk->src_ip4)
			meshd_map_v4(k->addr, sk->src_ip4);
		return;
	}
	k->addr[0] = sk->src_ip6[0];
	k->addr[1] = sk->src_ip6[1];
	k->addr[2] = sk->src_ip6[2];
	k->addr[3] = sk->src_ip6[3];
}

/* The backend id this client's entry names, if it may still be followed (young enough,
 * still a member, still a backend): refreshes the entry's last use. Else 0 (never an id). */
static __always_inline __u32 meshd_aff_follow(const struct meshd_aff_key *k, __u32 timeout_s,
					      __u64 now)
{
	struct meshd_member_key mk = {};
	struct meshd_aff_val *av;
	__u32 id;

	av = bpf_map_lookup_elem(&meshd_aff_v1, k);
	/* signed: another CPU may have stamped the entry after this one read `now` (parallel
	 * connects of one client); unsigned, that wrapped and the entry looked expired */
	if (!av || (__s64)(now - av->seen_ns) >= (__s64)timeout_s * MESHD_NSEC_PER_SEC)
		return 0;
	id = av->backend;
	mk.group = k->group;
	mk.backend = id;
	if (!bpf_map_lookup_elem(&meshd_member_v1, &mk))
		return 0; /* left the selection: affinity to it is broken */
	if (!bpf_map_lookup_elem(&meshd_be_v1, &id))
		return 0;
	av->seen_ns = now;
	return id;
}

static __always_inline void meshd_aff_store(const struct meshd_aff_key *k, __u32 be_id, __u64 now)
{
	struct meshd_aff_val v = {};

	v.seen_ns = now;
	v.backend = be_id;
	bpf_map_update_elem(&meshd_aff_v1, k, &v, BPF_ANY);
}

#endif
