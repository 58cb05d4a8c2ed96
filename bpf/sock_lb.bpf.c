/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Socket-level load balancing: cgroup sock_addr hooks.
 *
 *   connect4/6   TCP and connected UDP: VIP:port -> backend before the first packet exists
 *   sendmsg4/6   unconnected UDP: the same, per datagram
 *   recvmsg4/6   unconnected UDP: the reply's source backend -> VIP
 *   getpeername4/6  backend -> VIP, so applications see the address they asked for
 *
 * All hooks share the reverse-translation map, so they live in one object. Entry points are
 * thin; the *_common workers work on IPv4-mapped 16-byte addresses for both families.
 * Traffic that is not for a known VIP:port/proto is never touched.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "meshd_structs.h"
#include "meshd_maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define MESHD_ECONNREFUSED 111

/* Set by the loader before load (.rodata is frozen, so the verifier knows maglev_m and can
 * bound the table index with it). */
const volatile struct meshd_cfg meshd_cfg = { .maglev_m = MESHD_DEFAULT_MAGLEV_M };

/* murmur3 fmix64: socket cookies are sequential, the table index must not be. */
static __always_inline __u32 meshd_mix64(__u64 k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	k *= 0xc4ceb9fe1a85ec53ULL;
	k ^= k >> 33;
	return (__u32)k;
}

static __always_inline void meshd_map_v4(__u32 addr[4], __u32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0x0000ffff);
	addr[3] = ip4;
}

/* Picks a backend for the frontend `key`. Returns 0 and fills *be, -ENOENT when the
 * destination is not a service (leave the socket alone), -ECONNREFUSED when it is one
 * with no usable backend. */
static __always_inline int meshd_pick(const struct meshd_svc_key *key, __u64 cookie,
				      struct meshd_backend *be)
{
	struct meshd_svc_val *svc;
	struct meshd_backend *found;
	void *inner;
	__u32 *table;
	__u32 zero = 0, slot, m, be_id;

	svc = bpf_map_lookup_elem(&meshd_svc_v1, key);
	if (!svc)
		return -2; /* ENOENT: not a service */
	if (svc->count == 0)
		return -MESHD_ECONNREFUSED;
	inner = bpf_map_lookup_elem(&meshd_maglev_v1, &svc->id);
	if (!inner)
		return -MESHD_ECONNREFUSED;
	table = bpf_map_lookup_elem(inner, &zero);
	if (!table)
		return -MESHD_ECONNREFUSED;
	m = meshd_cfg.maglev_m;
	slot = meshd_mix64(cookie) % m;
	/* Keep the compiler from proving "x % m < m" and dropping the check the verifier needs. */
	barrier_var(slot);
	if (slot >= m)
		return -MESHD_ECONNREFUSED;
	be_id = table[slot];
	found = bpf_map_lookup_elem(&meshd_be_v1, &be_id);
	if (!found)
		return -MESHD_ECONNREFUSED;
	*be = *found;
	return 0;
}

static __always_inline void meshd_remember(__u64 cookie, const struct meshd_backend *be,
					   const struct meshd_svc_key *key)
{
	struct meshd_revnat_key rk = {};
	struct meshd_revnat_val rv = {};

	rk.cookie = cookie;
	__builtin_memcpy(rk.addr, be->addr, sizeof(rk.addr));
	rk.port = be->port;
	__builtin_memcpy(rv.addr, key->addr, sizeof(rv.addr));
	rv.port = key->port;
	bpf_map_update_elem(&meshd_revnat_v1, &rk, &rv, BPF_ANY);
}

/* Shared by connect and sendmsg. Returns 1 (allow) or 0 (reject with the errno set). */
static __always_inline int meshd_xlate4(struct bpf_sock_addr *ctx)
{
	struct meshd_svc_key key = {};
	struct meshd_backend be;
	__u64 cookie;
	int err;

	meshd_map_v4(key.addr, ctx->user_ip4);
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	cookie = bpf_get_socket_cookie(ctx);
	err = meshd_pick(&key, cookie, &be);
	if (err == -2)
		return 1;
	if (err || be.family != AF_INET) {
		bpf_set_retval(-MESHD_ECONNREFUSED);
		return 0;
	}
	ctx->user_ip4 = be.addr[3];
	ctx->user_port = be.port;
	meshd_remember(cookie, &be, &key);
	return 1;
}

static __always_inline int meshd_xlate6(struct bpf_sock_addr *ctx)
{
	struct meshd_svc_key key = {};
	struct meshd_backend be;
	__u64 cookie;
	int err;

	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	cookie = bpf_get_socket_cookie(ctx);
	err = meshd_pick(&key, cookie, &be);
	if (err == -2)
		return 1;
	if (err) {
		bpf_set_retval(-MESHD_ECONNREFUSED);
		return 0;
	}
	/* An IPv4-mapped VIP has IPv4 backends, written back mapped: the socket stays AF_INET6. */
	ctx->user_ip6[0] = be.addr[0];
	ctx->user_ip6[1] = be.addr[1];
	ctx->user_ip6[2] = be.addr[2];
	ctx->user_ip6[3] = be.addr[3];
	ctx->user_port = be.port;
	meshd_remember(cookie, &be, &key);
	return 1;
}

/* Shared by recvmsg and getpeername: backend -> VIP if this socket was translated. */
static __always_inline void meshd_restore4(struct bpf_sock_addr *ctx)
{
	struct meshd_revnat_key rk = {};
	struct meshd_revnat_val *rv;

	rk.cookie = bpf_get_socket_cookie(ctx);
	meshd_map_v4(rk.addr, ctx->user_ip4);
	rk.port = (__u16)ctx->user_port;
	rv = bpf_map_lookup_elem(&meshd_revnat_v1, &rk);
	if (!rv)
		return;
	ctx->user_ip4 = rv->addr[3];
	ctx->user_port = rv->port;
}

static __always_inline void meshd_restore6(struct bpf_sock_addr *ctx)
{
	struct meshd_revnat_key rk = {};
	struct meshd_revnat_val *rv;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr[0] = ctx->user_ip6[0];
	rk.addr[1] = ctx->user_ip6[1];
	rk.addr[2] = ctx->user_ip6[2];
	rk.addr[3] = ctx->user_ip6[3];
	rk.port = (__u16)ctx->user_port;
	rv = bpf_map_lookup_elem(&meshd_revnat_v1, &rk);
	if (!rv)
		return;
	ctx->user_ip6[0] = rv->addr[0];
	ctx->user_ip6[1] = rv->addr[1];
	ctx->user_ip6[2] = rv->addr[2];
	ctx->user_ip6[3] = rv->addr[3];
	ctx->user_port = rv->port;
}

SEC("cgroup/connect4")
int meshd_connect4(struct bpf_sock_addr *ctx)
{
	return meshd_xlate4(ctx);
}

SEC("cgroup/connect6")
int meshd_connect6(struct bpf_sock_addr *ctx)
{
	return meshd_xlate6(ctx);
}

SEC("cgroup/sendmsg4")
int meshd_sendmsg4(struct bpf_sock_addr *ctx)
{
	return meshd_xlate4(ctx);
}

SEC("cgroup/sendmsg6")
int meshd_sendmsg6(struct bpf_sock_addr *ctx)
{
	return meshd_xlate6(ctx);
}

SEC("cgroup/recvmsg4")
int meshd_recvmsg4(struct bpf_sock_addr *ctx)
{
	meshd_restore4(ctx);
	return 1;
}

SEC("cgroup/recvmsg6")
int meshd_recvmsg6(struct bpf_sock_addr *ctx)
{
	meshd_restore6(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int meshd_getpeer4(struct bpf_sock_addr *ctx)
{
	meshd_restore4(ctx);
	return 1;
}

SEC("cgroup/getpeername6")
int meshd_getpeer6(struct bpf_sock_addr *ctx)
{
	meshd_restore6(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
