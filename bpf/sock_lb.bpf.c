/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Socket-level load balancing: cgroup sock_addr hooks, and the metrics programs.
 *
 *   connect4/6   TCP and connected UDP: VIP:port -> backend before the first packet exists
 *   sendmsg4/6   unconnected UDP: the same, per datagram
 *   recvmsg4/6   unconnected UDP: the reply's source backend -> VIP
 *   getpeername4/6  backend -> VIP, so applications see the address they asked for
 *   sockops      TCP life of translated sockets: latency, outcome, bytes, RTT (metrics);
 *                FAILED and CLOSED events
 *
 * Frontends flagged MESHD_SVC_F_POLICY are checked against the caller's identity first
 * (meshd_policy.h): a denied connect()/sendmsg() fails with EPERM before any packet exists.
 * Connection events (meshd_events.h) go to one ring buffer; off, they cost one array lookup.
 *   udp_out/udp_in  cgroup_skb egress/ingress: UDP datagrams and bytes of translated sockets
 *
 * All hooks share the reverse-translation map and the metrics maps, so they live in one
 * object. Entry points are thin; the *_common workers work on IPv4-mapped 16-byte addresses
 * for both families. Traffic that is not for a known VIP:port/proto is never touched.
 * With meshd_cfg.flags & MESHD_CFG_F_METRICS clear, the verifier drops every metrics path
 * from the socket hooks (.rodata is frozen): they cost what they did before metrics (plus
 * two stores of the ids to the stack).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "meshd_structs.h"
#include "meshd_helpers.h"
#include "meshd_maps.h"
#include "meshd_maglev.h"
#include "meshd_metrics.h"
#include "meshd_sock_affinity.h"
#include "meshd_policy.h"
#include "meshd_events.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define MESHD_ECONNREFUSED 111
#define MESHD_ECONNRESET 104
#define MESHD_ETIMEDOUT 110
#define MESHD_EPIPE 32
#define MESHD_EHOSTUNREACH 113
#define MESHD_EPERM 1

/* Set by the loader before load (.rodata is frozen, so the verifier drops the self check
 * when self_tgid is 0, and the metrics paths when MESHD_CFG_F_METRICS is clear). */
const volatile struct meshd_cfg meshd_cfg = {};

/* True for sockets of the meshd daemon itself: they are never translated, so a VIP that
 * equals an address the daemon needs (an etcd endpoint, the API server) cannot cut the
 * daemon off from the registry that would repair it. The daemon is identified by its
 * process id in its own pid namespace (works when it runs in a container). Only asked for
 * destinations that are services: other connects pay nothing. */
static __always_inline int meshd_is_self(void)
{
	struct bpf_pidns_info ns = {};

	if (!meshd_cfg.self_tgid)
		return 0;
	if (bpf_get_ns_current_pid_tgid(meshd_cfg.self_pidns_dev, meshd_cfg.self_pidns_ino, &ns,
					sizeof(ns)))
		return 0; /* not in the daemon's pid namespace: not the daemon */
	return ns.tgid == meshd_cfg.self_tgid;
}


/* The backend id at the Maglev slot of `cookie` in group `gid`'s table; 0 (never an id)
 * when there is none. The pickers return ids and meshd_pick() copies the backend once:
 * copies of the struct in two inlined branches were merged by clang into one whose other
 * path stored uninitialised registers, which the verifier rejects. */
static __always_inline __u32 meshd_pick_maglev(__u32 gid, __u16 flags, __u64 cookie)
{
	/* cookies are sequential, slots must not be */
	return meshd_maglev_pick(gid, flags, (__u32)meshd_fmix64(cookie));
}

/* Group with session affinity: the client's entry if it may be followed, else Maglev's
 * pick, remembered for the client. Kept apart from the plain path: services without
 * affinity pay one flag test for it. */
static __always_inline __u32 meshd_pick_affine(struct bpf_sock_addr *ctx, __u32 gid,
					       __u16 flags, __u64 cookie, int v6)
{
	struct meshd_aff_key ak = {};
	__u32 *timeout, id;
	__u64 now;

	timeout = bpf_map_lookup_elem(&meshd_affcfg_v1, &gid);
	if (!timeout) /* written before the flag is set; absent only in a torn state */
		return meshd_pick_maglev(gid, flags, cookie);
	meshd_aff_client(ctx, v6, &ak);
	ak.group = gid;
	now = bpf_ktime_get_ns();
	id = meshd_aff_follow(&ak, *timeout, now);
	if (id)
		return id;
	id = meshd_pick_maglev(gid, flags, cookie);
	if (id)
		meshd_aff_store(&ak, id, now);
	return id;
}

/* The caller as the policy check and the events see it. */
struct meshd_caller {
	__u32 identity;	/* meshd_ident_v1 of the caller's cgroup (policy check only); 0: none
			 * or not looked up */
	__u32 policy;	/* a denial's deciding policy; 0: none allows */
};

/* Picks a backend for the frontend `key`. Returns 0 and fills *be, -ENOENT when the
 * destination is not a service (leave the socket alone), -EPERM when a policy selects the
 * service and does not allow the caller (*who says who and why), -ECONNREFUSED when it is one
 * with no usable backend, -EHOSTUNREACH when it has none and says drop (a Local traffic
 * policy with no local endpoint: kube-proxy DROPs, which would leave connect() hanging;
 * failing it at once is what a client can act on). *ids gets the group id (when it is a
 * service) and the backend id (when one was picked) for the metrics. */
static __always_inline int meshd_pick(struct bpf_sock_addr *ctx, const struct meshd_svc_key *key,
				      __u64 cookie, int v6, struct meshd_backend *be,
				      struct meshd_stats_key *ids, struct meshd_caller *who)
{
	struct meshd_backend *found;
	struct meshd_svc_val *svc;
	__u32 gid, id;

	svc = bpf_map_lookup_elem(&meshd_svc_v1, key);
	if (!svc || meshd_is_self())
		return -2; /* ENOENT: not a service (or the daemon's own socket): leave it */
	gid = svc->id;
	ids->group = gid;
	if (svc->flags & MESHD_SVC_F_POLICY) {
		if (!meshd_policy_allows(gid, svc->flags & MESHD_SVC_F_POLICY_OPEN,
					 &who->identity, &who->policy))
			return -MESHD_EPERM;
	}
	if (svc->count == 0)
		return svc->flags & MESHD_SVC_F_DROP_EMPTY ? -MESHD_EHOSTUNREACH
							    : -MESHD_ECONNREFUSED;
	if (svc->flags & MESHD_SVC_F_AFFINITY)
		id = meshd_pick_affine(ctx, gid, svc->flags, cookie, v6);
	else
		id = meshd_pick_maglev(gid, svc->flags, cookie);
	found = bpf_map_lookup_elem(&meshd_be_v1, &id);
	if (!id || !found)
		return -MESHD_ECONNREFUSED;
	*be = *found;
	ids->backend = id;
	return 0;
}

static __always_inline int meshd_eq16(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Remembers backend -> VIP for recvmsg/getpeername. connect(): in the socket's own storage
 * (never evicted while the socket lives); sendmsg (unconnected UDP): in the LRU, looked up
 * first and written only when new or changed -- a socket sending a stream of datagrams
 * does not rewrite (and contend on) the same entry each time, as in Cilium. */
static __always_inline int meshd_remember(struct bpf_sock_addr *ctx, __u64 cookie,
					  const struct meshd_backend *be,
					  const struct meshd_svc_key *key, int is_connect)
{
	struct meshd_revnat_key rk = {};
	struct meshd_revnat_val rv = {}, *old;
	struct meshd_sock *sn;

	if (is_connect && ctx->sk) {
		sn = bpf_sk_storage_get(&meshd_sock_v1, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (sn) {
			__builtin_memcpy(sn->be_addr, be->addr, sizeof(sn->be_addr));
			__builtin_memcpy(sn->vip_addr, key->addr, sizeof(sn->vip_addr));
			sn->be_port = be->port;
			sn->vip_port = key->port;
			return 1;
		}
		/* no memory for the storage: fall back to the LRU */
	}
	rk.cookie = cookie;
	__builtin_memcpy(rk.addr, be->addr, sizeof(rk.addr));
	rk.port = be->port;
	old = bpf_map_lookup_elem(&meshd_revnat_v1, &rk);
	if (old && old->port == key->port && meshd_eq16(old->addr, key->addr))
		return 0;
	__builtin_memcpy(rv.addr, key->addr, sizeof(rv.addr));
	rv.port = key->port;
	bpf_map_update_elem(&meshd_revnat_v1, &rk, &rv, BPF_ANY);
	return 1;
}

/* After a translation decision, when metrics are on: a refusal is counted for the group;
 * a translated socket is tagged with (group, backend) for sockops and the skb programs. */
static __always_inline void meshd_observe(struct bpf_sock_addr *ctx,
					  const struct meshd_stats_key *ids, int refused,
					  int is_connect, __u32 identity)
{
	if (!(meshd_cfg.flags & MESHD_CFG_F_METRICS))
		return;
	if (refused)
		meshd_count_refused(ids->group);
	else
		meshd_tag(ctx->sk, ids->group, ids->backend, is_connect,
			  ctx->protocol == IPPROTO_TCP, identity);
}

/* An event of the socket hooks: CONNECT (with `be`), DENIED or FAILED (`be` NULL). */
static __always_inline void meshd_ev_hook(const struct meshd_evcfg *cfg, __u32 type,
					  const struct meshd_svc_key *key,
					  const struct meshd_backend *be,
					  const struct meshd_stats_key *ids,
					  const struct meshd_caller *who, __u64 cookie, int err,
					  int is_connect)
{
	struct meshd_event *e = meshd_ev_reserve(cfg, type, cookie);

	if (!e)
		return;
	e->cgroup = bpf_get_current_cgroup_id();
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->identity = who->identity;
	e->group = ids->group;
	e->policy = who->policy;
	e->err = err;
	__builtin_memcpy(e->vip, key->addr, sizeof(e->vip));
	e->vip_port = key->port;
	e->proto = key->proto;
	if (be) {
		e->backend = ids->backend;
		__builtin_memcpy(e->be_addr, be->addr, sizeof(e->be_addr));
		e->be_port = be->port;
	}
	e->flags = is_connect ? 0 : MESHD_EV_F_SENDMSG;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	meshd_ev_submit(e);
}

/* After meshd_pick() found a service: the event settings (NULL: events off). The caller's
 * identity is in the event only where the policy check looked it up; elsewhere it is 0 and
 * the daemon names it from the event's cgroup when it reads the event: looked up here it
 * cost every connect ~0.6-1 us of cold cache lines (bench/connect_breakdown.py) for a label. */
static __always_inline const struct meshd_evcfg *meshd_ev_prepare(void)
{
	return meshd_evcfg();
}

/* A connect/sendmsg that does not go through: denied by policy (EPERM: a DENIED event) or
 * no usable backend (a FAILED event, counted as refused). Returns 0 with the errno set. */
static __always_inline int meshd_refuse(struct bpf_sock_addr *ctx, const struct meshd_evcfg *cfg,
					int err, const struct meshd_svc_key *key,
					struct meshd_stats_key *ids, struct meshd_caller *who,
					__u64 cookie, int is_connect)
{
	if (err == -MESHD_EPERM) {
		meshd_ev_hook(cfg, MESHD_EV_DENIED, key, 0, ids, who, cookie, MESHD_EPERM,
			      is_connect);
	} else {
		meshd_observe(ctx, ids, 1, is_connect, who->identity);
		meshd_ev_hook(cfg, MESHD_EV_FAILED, key, 0, ids, who, cookie, -err, is_connect);
	}
	bpf_set_retval(err);
	return 0;
}

/* Shared by connect and sendmsg. Returns 1 (allow) or 0 (reject with the errno set). */
static __always_inline int meshd_xlate4(struct bpf_sock_addr *ctx, int is_connect)
{
	const struct meshd_evcfg *cfg;
	struct meshd_caller who = {};
	struct meshd_stats_key ids = {};
	struct meshd_svc_key key = {};
	struct meshd_backend be;
	__u64 cookie;
	int err;

	meshd_map_v4(key.addr, ctx->user_ip4);
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	cookie = bpf_get_socket_cookie(ctx);
	err = meshd_pick(ctx, &key, cookie, 0, &be, &ids, &who);
	if (err == -2)
		return 1;
	cfg = meshd_ev_prepare();
	if (err || be.family != AF_INET)
		return meshd_refuse(ctx, cfg, err ? err : -MESHD_ECONNREFUSED, &key, &ids, &who,
				    cookie, is_connect);
	ctx->user_ip4 = be.addr[3];
	ctx->user_port = be.port;
	if (meshd_remember(ctx, cookie, &be, &key, is_connect) || is_connect)
		meshd_ev_hook(cfg, MESHD_EV_CONNECT, &key, &be, &ids, &who, cookie, 0, is_connect);
	meshd_observe(ctx, &ids, 0, is_connect, who.identity);
	return 1;
}

static __always_inline int meshd_xlate6(struct bpf_sock_addr *ctx, int is_connect)
{
	const struct meshd_evcfg *cfg;
	struct meshd_caller who = {};
	struct meshd_stats_key ids = {};
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
	err = meshd_pick(ctx, &key, cookie, 1, &be, &ids, &who);
	if (err == -2)
		return 1;
	cfg = meshd_ev_prepare();
	if (err)
		return meshd_refuse(ctx, cfg, err, &key, &ids, &who, cookie, is_connect);
	/* An IPv4-mapped VIP has IPv4 backends, written back mapped: the socket stays AF_INET6. */
	ctx->user_ip6[0] = be.addr[0];
	ctx->user_ip6[1] = be.addr[1];
	ctx->user_ip6[2] = be.addr[2];
	ctx->user_ip6[3] = be.addr[3];
	ctx->user_port = be.port;
	if (meshd_remember(ctx, cookie, &be, &key, is_connect) || is_connect)
		meshd_ev_hook(cfg, MESHD_EV_CONNECT, &key, &be, &ids, &who, cookie, 0, is_connect);
	meshd_observe(ctx, &ids, 0, is_connect, who.identity);
	return 1;
}

/* Shared by recvmsg and getpeername: the VIP for `addr`:`port` (a backend) if this socket
 * was translated to it -- from the socket's storage (connect) or the LRU (sendmsg). */
static __always_inline int meshd_vip_of(struct bpf_sock_addr *ctx, const __u32 *addr,
					__u16 port, __u32 *vip, __u16 *vip_port)
{
	struct meshd_revnat_key rk = {};
	struct meshd_revnat_val *rv;
	struct meshd_sknat *old = 0;
	struct meshd_sock *sn = 0;

	if (ctx->sk)
		sn = bpf_sk_storage_get(&meshd_sock_v1, ctx->sk, 0, 0);
	if (sn && sn->be_port == port && meshd_eq16(sn->be_addr, addr)) {
		__builtin_memcpy(vip, sn->vip_addr, 16);
		*vip_port = sn->vip_port;
		return 1;
	}
	if (ctx->sk) /* a socket an older meshd connected (maybe tagged since by sendmsg) */
		old = bpf_sk_storage_get(&meshd_sknat_v1, ctx->sk, 0, 0);
	if (old && old->be_port == port && meshd_eq16(old->be_addr, addr)) {
		__builtin_memcpy(vip, old->vip_addr, 16);
		*vip_port = old->vip_port;
		return 1;
	}
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, addr, sizeof(rk.addr));
	rk.port = port;
	rv = bpf_map_lookup_elem(&meshd_revnat_v1, &rk);
	if (!rv)
		return 0;
	__builtin_memcpy(vip, rv->addr, 16);
	*vip_port = rv->port;
	return 1;
}

static __always_inline void meshd_restore4(struct bpf_sock_addr *ctx)
{
	__u32 addr[4], vip[4];
	__u16 vip_port;

	meshd_map_v4(addr, ctx->user_ip4);
	if (!meshd_vip_of(ctx, addr, (__u16)ctx->user_port, vip, &vip_port))
		return;
	ctx->user_ip4 = vip[3];
	ctx->user_port = vip_port;
}

static __always_inline void meshd_restore6(struct bpf_sock_addr *ctx)
{
	__u32 addr[4], vip[4];
	__u16 vip_port;

	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	if (!meshd_vip_of(ctx, addr, (__u16)ctx->user_port, vip, &vip_port))
		return;
	ctx->user_ip6[0] = vip[0];
	ctx->user_ip6[1] = vip[1];
	ctx->user_ip6[2] = vip[2];
	ctx->user_ip6[3] = vip[3];
	ctx->user_port = vip_port;
}

SEC("cgroup/connect4")
int meshd_connect4(struct bpf_sock_addr *ctx)
{
	return meshd_xlate4(ctx, 1);
}

SEC("cgroup/connect6")
int meshd_connect6(struct bpf_sock_addr *ctx)
{
	return meshd_xlate6(ctx, 1);
}

SEC("cgroup/sendmsg4")
int meshd_sendmsg4(struct bpf_sock_addr *ctx)
{
	return meshd_xlate4(ctx, 0);
}

SEC("cgroup/sendmsg6")
int meshd_sendmsg6(struct bpf_sock_addr *ctx)
{
	return meshd_xlate6(ctx, 0);
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

/* ---- metrics: TCP life of translated sockets (sockops) ---------------------------------- */

/* The one field of struct sock that sockops does not expose: the error a connection ended
 * with (ECONNREFUSED: RST to our SYN; ETIMEDOUT: retries ran out; ECONNRESET: reset).
 * CO-RE: libbpf relocates the offset against the running kernel's BTF. */
struct sock___meshd {
	int sk_err;
} __attribute__((preserve_access_index));

static __always_inline int meshd_sk_err(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock___meshd *s;

	if (!sk)
		return 0;
	s = (struct sock___meshd *)bpf_skc_to_tcp_sock(sk); /* struct sock is at offset 0 */
	if (!s)
		return 0;
	return s->sk_err;
}

/* Adds the bytes since the last flush and one smoothed-RTT sample. `fin_out`/`fin_in`: 1
 * when the FIN we sent / received is in bytes_acked / bytes_received (not payload). */
static __always_inline void meshd_flush(struct bpf_sock_ops *ctx, struct meshd_sock *m,
					struct meshd_stats *st, __u64 fin_out, __u64 fin_in,
					__u64 now)
{
	__u64 acked = ctx->bytes_acked - fin_out;
	__u64 rcvd = ctx->bytes_received - fin_in;
	__u32 srtt = ctx->srtt_us; /* smoothed RTT << 3, in us */

	if (acked > m->bytes_acked) {
		st->tx_bytes += acked - m->bytes_acked;
		m->bytes_acked = acked;
	}
	if (rcvd > m->bytes_received) {
		st->rx_bytes += rcvd - m->bytes_received;
		m->bytes_received = rcvd;
	}
	if (srtt)
		meshd_hist_add(st->rtt_hist, &st->rtt_sum_us, srtt >> 3);
	m->flushed_ns = now;
}

/* A FAILED or CLOSED event of a translated TCP socket: the caller, VIP and backend from
 * its meshd_sock_v1 storage. */
static __always_inline void meshd_ev_sock(struct bpf_sock_ops *ctx, struct bpf_sock *sk,
					  const struct meshd_sock *m, __u32 type, int err,
					  __u64 tx, __u64 rx)
{
	const struct meshd_evcfg *cfg = meshd_evcfg();
	struct meshd_event *e;

	if (!cfg)
		return;
	e = meshd_ev_reserve(cfg, type, bpf_get_socket_cookie(ctx));
	if (!e)
		return;
	e->cgroup = m->cgroup;
	e->pid = m->pid;
	e->uid = m->uid;
	e->identity = m->identity;
	e->group = m->group;
	e->backend = m->backend;
	e->err = err;
	e->duration_ns = e->ts_ns - m->start_ns;
	e->tx_bytes = tx;
	e->rx_bytes = rx;
	e->proto = IPPROTO_TCP;
	__builtin_memcpy(e->comm, m->comm, sizeof(e->comm));
	__builtin_memcpy(e->vip, m->vip_addr, sizeof(e->vip));
	__builtin_memcpy(e->be_addr, m->be_addr, sizeof(e->be_addr));
	e->vip_port = m->vip_port;
	e->be_port = m->be_port;
	meshd_ev_submit(e);
}

/* TCP_CLOSE is where every connection ends (RST, retries exhausted, close in SYN_SENT,
 * tcp_done after TIME_WAIT starts): its outcome is counted here, once, and is one event. */
static __always_inline void meshd_tcp_closed(struct bpf_sock_ops *ctx, struct bpf_sock *sk,
					     struct meshd_sock *m, __u32 old)
{
	struct meshd_stats *st = meshd_stats_get(m->group, m->backend);
	int err = meshd_sk_err(ctx);
	__u64 fin_out, fin_in, tx, rx;

	m->flags |= MESHD_SK_F_DONE;
	if (!(m->flags & MESHD_SK_F_ESTABLISHED)) {
		/* Handshake never completed. sk_err 0: the application closed the socket while
		 * the SYN was unanswered (its connect timeout ran out) -- a timeout for the user. */
		if (st) {
			if (err == MESHD_ECONNREFUSED)
				st->fail_refused += 1;
			else if (err == 0 || err == MESHD_ETIMEDOUT)
				st->fail_timeout += 1;
			else
				st->fail_other += 1;
		}
		meshd_ev_sock(ctx, sk, m, MESHD_EV_FAILED, err ? err : MESHD_ETIMEDOUT, 0, 0);
		return;
	}
	/* Our FIN was acked when we leave FIN_WAIT2, CLOSING or LAST_ACK; a FIN came in when
	 * we leave CLOSE_WAIT's successors LAST_ACK, or CLOSING, or FIN_WAIT2 (TIME_WAIT). */
	fin_out = (m->flags & MESHD_SK_F_FIN_OUT) &&
		  (old == BPF_TCP_FIN_WAIT2 || old == BPF_TCP_CLOSING || old == BPF_TCP_LAST_ACK);
	fin_in = err == 0 &&
		 (old == BPF_TCP_FIN_WAIT2 || old == BPF_TCP_CLOSING || old == BPF_TCP_LAST_ACK);
	if (st) {
		meshd_flush(ctx, m, st, fin_out, fin_in, bpf_ktime_get_ns());
		st->closed += 1;
		if (err == MESHD_ECONNRESET || err == MESHD_EPIPE)
			st->fail_reset += 1;
		else if (err == MESHD_ETIMEDOUT)
			st->fail_timeout += 1;
		else if (err)
			st->fail_other += 1;
	}
	/* The event's payload bytes each way from the socket itself (the counters only keep
	 * what is left to add): bytes_acked counts our SYN (1) and, once acked, our FIN;
	 * bytes_received counts the peer's FIN, not its SYN. */
	tx = ctx->bytes_acked;
	tx = tx > fin_out + 1 ? tx - fin_out - 1 : 0;
	rx = ctx->bytes_received;
	rx = rx > fin_in ? rx - fin_in : 0;
	meshd_ev_sock(ctx, sk, m, MESHD_EV_CLOSED, err, tx, rx);
}

SEC("sockops")
int meshd_sockops(struct bpf_sock_ops *ctx)
{
	struct meshd_sock *m;
	struct meshd_stats *st;
	struct bpf_sock *sk;
	__u32 op = ctx->op;
	__u64 now;

	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_RTT_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	/* of the state changes only these three matter (SYN_SENT -> ESTABLISHED, on the
	 * connect path, and the others pay no storage lookup) */
	if (op == BPF_SOCK_OPS_STATE_CB && ctx->args[1] != BPF_TCP_FIN_WAIT1 &&
	    ctx->args[1] != BPF_TCP_LAST_ACK && ctx->args[1] != BPF_TCP_CLOSE)
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	m = bpf_sk_storage_get(&meshd_sock_v1, sk, 0, 0);
	if (!m || !(m->flags & MESHD_SK_F_TCP) || (m->flags & MESHD_SK_F_DONE))
		return 1; /* not translated by meshd, or already counted */

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: /* the SYN is about to leave */
		/* State changes from now on (a failure is a SYN_SENT -> CLOSE); RTT samples only
		 * once established, so the handshake pays no RTT callback. */
		bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
		st = meshd_stats_get(m->group, m->backend);
		if (st)
			st->opened += 1;
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: /* SYN-ACK received */
		now = bpf_ktime_get_ns();
		st = meshd_stats_get(m->group, m->backend);
		if (st)
			meshd_hist_add(st->connect_hist, &st->connect_sum_us,
				       (now - m->start_ns) / 1000);
		m->flags |= MESHD_SK_F_ESTABLISHED;
		bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG |
					       BPF_SOCK_OPS_RTT_CB_FLAG);
		m->bytes_acked = ctx->bytes_acked; /* the SYN's sequence number, not payload */
		m->bytes_received = ctx->bytes_received;
		m->flushed_ns = now;
		break;
	case BPF_SOCK_OPS_RTT_CB: /* every RTT sample: keep it cheap */
		if (!(m->flags & MESHD_SK_F_ESTABLISHED) || ctx->state != BPF_TCP_ESTABLISHED)
			break;
		now = bpf_ktime_get_ns();
		if (now - m->flushed_ns < MESHD_FLUSH_NS)
			break;
		st = meshd_stats_get(m->group, m->backend);
		if (st)
			meshd_flush(ctx, m, st, 0, 0, now);
		break;
	case BPF_SOCK_OPS_STATE_CB: /* args[0]: old state, args[1]: new state */
		if (ctx->args[1] == BPF_TCP_FIN_WAIT1 || ctx->args[1] == BPF_TCP_LAST_ACK)
			m->flags |= MESHD_SK_F_FIN_OUT;
		else if (ctx->args[1] == BPF_TCP_CLOSE)
			meshd_tcp_closed(ctx, sk, m, ctx->args[0]);
		break;
	}
	return 1;
}

/* ---- metrics: UDP datagrams of translated sockets (cgroup skb) ------------------------- */

/* Counts one datagram of a tagged UDP socket. skb->len is the IP packet (the hook runs at
 * the network header both ways); payload = len - IP header - 8. IPv6 extension headers
 * are not parsed (counted as payload). */
static __always_inline void meshd_udp_count(struct __sk_buff *skb, int egress)
{
	struct meshd_sock *m;
	struct meshd_stats *st;
	struct bpf_sock *sk;
	__u32 hdr = 40 + 8;
	__u8 vihl;

	sk = skb->sk;
	if (!sk)
		return;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_UDP)
		return;
	m = bpf_sk_storage_get(&meshd_sock_v1, sk, 0, 0);
	if (!m || !(m->flags & MESHD_SK_F_TAGGED))
		return; /* not translated, or while metrics were off */
	st = meshd_stats_get(m->group, m->backend);
	if (!st)
		return;
	if (skb->protocol == bpf_htons(0x0800)) { /* ETH_P_IP */
		if (bpf_skb_load_bytes(skb, 0, &vihl, 1))
			return;
		hdr = (vihl & 0x0f) * 4 + 8;
	}
	if (egress) {
		st->tx_packets += 1;
		st->tx_bytes += skb->len > hdr ? skb->len - hdr : 0;
	} else {
		st->rx_packets += 1;
		st->rx_bytes += skb->len > hdr ? skb->len - hdr : 0;
	}
}

SEC("cgroup_skb/egress")
int meshd_udp_out(struct __sk_buff *skb)
{
	meshd_udp_count(skb, 1);
	return 1;
}

SEC("cgroup_skb/ingress")
int meshd_udp_in(struct __sk_buff *skb)
{
	meshd_udp_count(skb, 0);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
