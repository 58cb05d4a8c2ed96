/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Destroys connected UDP sockets that meshd translated to a backend that is gone.
 *
 * Socket LB picks a backend once per socket: a connected UDP socket (a resolver, a metrics
 * client) would keep sending to a removed backend forever. After the reconciler removes
 * backends from a UDP service, the daemon fills meshd_doomed with (backend, VIP) pairs and
 * reads this iterator in each network namespace of the cgroup's processes. A socket is
 * destroyed only if meshd translated it (its socket storage, or for sockets connected by an
 * older meshd its reverse-translation entry, names that VIP), so
 * sockets that connected to a backend address on their own are never touched. The socket
 * is aborted and disconnected: the application's next send() fails with EDESTADDRREQ (a
 * receive reports ECONNABORTED), and when it reconnects it lands on a live backend.
 * TCP is left alone on purpose: established connections finish gracefully.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "meshd_structs.h"

#define AF_INET 2
#define AF_INET6 10
#define TCP_ESTABLISHED 1 /* a connected UDP socket's state */

/* A (backend, VIP) pair whose translation is no longer valid. The daemon writes at most
 * MESHD_DOOMED_MAX pairs per iterator pass and runs as many passes as it needs. */
#define MESHD_DOOMED_MAX 65536
struct meshd_doomed_key {
	__u32 be_addr[4];	/* backend address, network order, IPv4-mapped */
	__u32 vip_addr[4];	/* VIP, network order, IPv4-mapped */
	__u16 be_port;		/* network order */
	__u16 vip_port;		/* network order */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MESHD_DOOMED_MAX);
	__type(key, struct meshd_doomed_key);
	__type(value, __u8);
} meshd_doomed SEC(".maps");

/* Reused from the socket LB's pinned map (same definition as in meshd_maps.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* the pinned map's size is adopted whatever this says */
	__type(key, struct meshd_revnat_key);
	__type(value, struct meshd_revnat_val);
} meshd_revnat_v1 SEC(".maps");

/* Reused from the socket LB's pinned socket storage (same definitions as in meshd_maps.h):
 * where connect() keeps (backend, VIP) of a translated socket; meshd_sknat_v1 for sockets
 * an older meshd connected. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct meshd_sock);
} meshd_sock_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct meshd_sknat);
} meshd_sknat_v1 SEC(".maps");

/* 1 and the VIP in *dk if `addr`:`port` is the backend the storage says it translated to. */
static __always_inline int meshd_stored_vip(const __u32 *be_addr, __u16 be_port,
					    const __u32 *vip_addr, __u16 vip_port,
					    const __u32 *addr, __u16 port,
					    struct meshd_doomed_key *dk)
{
	if (be_port != port || be_addr[0] != addr[0] || be_addr[1] != addr[1] ||
	    be_addr[2] != addr[2] || be_addr[3] != addr[3])
		return 0;
	__builtin_memcpy(dk->vip_addr, vip_addr, sizeof(dk->vip_addr));
	dk->vip_port = vip_port;
	return 1;
}

/* [0] -> sockets destroyed by this run (one reader at a time). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} meshd_destroyed SEC(".maps");

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

SEC("iter/udp")
int meshd_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp_sk = ctx->udp_sk;
	struct meshd_revnat_key rk = {};
	struct meshd_doomed_key dk = {};
	struct meshd_revnat_val *rv;
	struct meshd_sknat *sn;
	struct meshd_sock *sock;
	struct sock_common *skc;
	int found;
	__u32 zero = 0;
	__u64 *n;

	if (!udp_sk)
		return 0;
	skc = &udp_sk->inet.sk.__sk_common;
	if (skc->skc_state != TCP_ESTABLISHED)
		return 0;
	if (skc->skc_family == AF_INET) {
		rk.addr[2] = bpf_htonl(0x0000ffff);
		rk.addr[3] = skc->skc_daddr;
	} else if (skc->skc_family == AF_INET6) {
		rk.addr[0] = skc->skc_v6_daddr.in6_u.u6_addr32[0];
		rk.addr[1] = skc->skc_v6_daddr.in6_u.u6_addr32[1];
		rk.addr[2] = skc->skc_v6_daddr.in6_u.u6_addr32[2];
		rk.addr[3] = skc->skc_v6_daddr.in6_u.u6_addr32[3];
	} else {
		return 0;
	}
	rk.port = skc->skc_dport;
	__builtin_memcpy(dk.be_addr, rk.addr, sizeof(dk.be_addr));
	dk.be_port = rk.port;
	/* connect() of this meshd keeps (backend, VIP) in the socket's storage; a socket
	 * connected by an older meshd has it in meshd_sknat_v1 or in the LRU */
	sock = bpf_sk_storage_get(&meshd_sock_v1, &udp_sk->inet.sk, 0, 0);
	found = sock && meshd_stored_vip(sock->be_addr, sock->be_port, sock->vip_addr,
					 sock->vip_port, rk.addr, rk.port, &dk);
	if (!found) {
		sn = bpf_sk_storage_get(&meshd_sknat_v1, &udp_sk->inet.sk, 0, 0);
		found = sn && meshd_stored_vip(sn->be_addr, sn->be_port, sn->vip_addr,
					       sn->vip_port, rk.addr, rk.port, &dk);
	}
	if (!found) {
		rk.cookie = bpf_get_socket_cookie(&udp_sk->inet.sk);
		rv = bpf_map_lookup_elem(&meshd_revnat_v1, &rk);
		if (!rv)
			return 0; /* not translated by meshd */
		__builtin_memcpy(dk.vip_addr, rv->addr, sizeof(dk.vip_addr));
		dk.vip_port = rv->port;
	}
	if (!bpf_map_lookup_elem(&meshd_doomed, &dk))
		return 0;
	if (bpf_sock_destroy(skc) == 0) {
		n = bpf_map_lookup_elem(&meshd_destroyed, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
