/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Per-service, per-backend metrics collected in the kernel: structs, maps and the small
 * helpers the socket hooks, the sockops program and the cgroup skb programs share.
 *
 *   connect4/6, sendmsg4/6   tag the socket (socket storage): group, backend, start time;
 *                            count refusals (no usable backend) under backend id 0
 *   sockops                  TCP: opened (SYN about to leave), connect latency (connect()
 *                            to ESTABLISHED), failures by kind at TCP_CLOSE, closed, bytes
 *                            and smoothed RTT (at close, and at most once a second while open)
 *   cgroup_skb ingress/egress  UDP datagrams and payload bytes of tagged sockets
 *
 * Every counter lives in ONE per-CPU hash keyed by (group id, backend id): one lookup per
 * event, no locks, no atomics. Python sums the CPUs at read time. Layout rules as in
 * meshd_structs.h (explicit padding, no bitfields); each struct has a Python mirror in
 * meshd/dataplane/structs.py checked against BTF by tests/kernel/test_btf_layout.py.
 */
#ifndef MESHD_METRICS_H
#define MESHD_METRICS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "meshd_structs.h"
#include "meshd_maps.h"

/* Histogram buckets: bucket 0 counts values < 1 us; bucket i (1..22) counts values in
 * [2^(i-1), 2^i) us; bucket 23 counts everything >= 2^22 us (4.19 s). Prometheus upper
 * bounds ("le") are 2^i us for i = 0..22, then +Inf. */
#define MESHD_HIST_BUCKETS 24
/* (group, backend) pairs with counters, at most: the map is not preallocated, so memory
 * follows the pairs that saw traffic (88 + 480 x possible CPUs bytes each); this caps it.
 * Pairs of removed groups/backends are pruned by the control plane. When full, events of
 * new pairs are not counted (meshd_metrics_pairs shows it). See docs/metrics.md. */
#define MESHD_MAX_STATS 65536
/* While a TCP connection is open, its bytes and RTT are added to the counters at most this
 * often (on an RTT sample), so long-lived connections show up before they close. */
#define MESHD_FLUSH_NS 1000000000ULL

/* meshd_cfg.flags */
#define MESHD_CFG_F_METRICS 1	/* socket hooks tag sockets and count refusals */

/* meshd_sock.flags (the tag in meshd_sock_v1, meshd_structs.h) */
#define MESHD_SK_F_TCP 1	/* a TCP connect: sockops owns the rest of its life */
#define MESHD_SK_F_ESTABLISHED 2	/* handshake completed and counted */
#define MESHD_SK_F_DONE 4	/* outcome (failure or close) counted: never count twice */
#define MESHD_SK_F_FIN_OUT 8	/* we sent a FIN (its sequence number is in bytes_acked) */
#define MESHD_SK_F_TAGGED 16	/* group, backend and caller are set (metrics were on) */

/* Key of meshd_stats_v1. */
struct meshd_stats_key {
	__u32 group;	/* frontend group id (host order) */
	__u32 backend;	/* backend id (host order); 0: refused before a backend was chosen */
};

/* Value of meshd_stats_v1: one per CPU. All counters only grow. */
struct meshd_stats {
	__u64 opened;		/* TCP: SYN about to be sent; UDP: connect() translated */
	__u64 closed;		/* TCP connections closed after they were established */
	__u64 fail_refused;	/* RST answering the SYN; backend 0: no usable backend */
	__u64 fail_timeout;	/* SYN never answered: retries ran out or the client gave up */
	__u64 fail_reset;	/* established connection reset by the peer (ECONNRESET) */
	__u64 fail_other;	/* handshake ended by another error (ICMP unreachable, ...) */
	__u64 tx_bytes;		/* payload sent: TCP bytes acked, UDP datagram payload */
	__u64 rx_bytes;		/* payload received: TCP bytes received, UDP datagram payload */
	__u64 tx_packets;	/* UDP datagrams sent */
	__u64 rx_packets;	/* UDP datagrams received */
	__u64 connect_sum_us;	/* sum of TCP connect latencies (histogram _sum) */
	__u64 rtt_sum_us;	/* sum of smoothed-RTT samples (histogram _sum) */
	__u64 connect_hist[MESHD_HIST_BUCKETS];	/* TCP connect latency, log2 us buckets */
	__u64 rtt_hist[MESHD_HIST_BUCKETS];	/* smoothed RTT samples, log2 us buckets */
};

/* (group, backend) -> counters, one copy per CPU. Not preallocated: memory follows the
 * pairs that saw traffic (480 bytes x possible CPUs each). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_STATS);
	__type(key, struct meshd_stats_key);
	__type(value, struct meshd_stats);
} meshd_stats_v1 SEC(".maps");

/* [0] -> all zeros: the initial value of a new stats entry (too big for the BPF stack).
 * Never written; not pinned (a fresh one per load is as good). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meshd_stats);
} meshd_zero_v1 SEC(".maps");

/* Bucket of a value in microseconds: 0 for < 1, else min(floor(log2(us)) + 1, 23). */
static __always_inline __u32 meshd_hist_bucket(__u64 us)
{
	__u32 b = 0;

	if (us == 0)
		return 0;
	if (us >> 32) { us >>= 32; b += 32; }
	if (us >> 16) { us >>= 16; b += 16; }
	if (us >> 8) { us >>= 8; b += 8; }
	if (us >> 4) { us >>= 4; b += 4; }
	if (us >> 2) { us >>= 2; b += 2; }
	if (us >> 1) { b += 1; }
	b += 1; /* b was floor(log2(us)) */
	return b < MESHD_HIST_BUCKETS - 1 ? b : MESHD_HIST_BUCKETS - 1;
}

/* This CPU's counters of (group, backend), created zeroed on first use. NULL when the map
 * is full (the event is not counted). */
static __always_inline struct meshd_stats *meshd_stats_get(__u32 group, __u32 backend)
{
	struct meshd_stats_key key = { .group = group, .backend = backend };
	struct meshd_stats *st, *zero;
	__u32 z = 0;

	st = bpf_map_lookup_elem(&meshd_stats_v1, &key);
	if (st)
		return st;
	zero = bpf_map_lookup_elem(&meshd_zero_v1, &z);
	if (!zero)
		return 0;
	bpf_map_update_elem(&meshd_stats_v1, &key, zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&meshd_stats_v1, &key);
}

static __always_inline void meshd_hist_add(__u64 *hist, __u64 *sum, __u64 us)
{
	__u32 b = meshd_hist_bucket(us);

	/* b < MESHD_HIST_BUCKETS by construction; the check keeps the verifier sure of it. */
	if (b < MESHD_HIST_BUCKETS)
		hist[b] += 1;
	*sum += us;
}

/* Tags a socket just translated to (group, backend). Called by connect (start of a
 * connection) and sendmsg (each unconnected UDP datagram: rewritten only on change).
 * Also keeps who connected (cgroup, pid, uid, comm and the `identity` the caller knows:
 * from the policy check; else 0), so that sockops,
 * which runs in softirq, can emit FAILED and CLOSED events naming the caller. */
static __always_inline void meshd_tag(void *sk, __u32 group, __u32 backend, int is_connect,
				      int is_tcp, __u32 identity)
{
	struct meshd_sock *m;
	struct meshd_stats *st;

	if (!sk)
		return;
	/* connect(): the storage meshd_remember() just made (found in the socket's cache) */
	m = bpf_sk_storage_get(&meshd_sock_v1, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!m)
		return;
	if (!is_connect && m->group == group && m->backend == backend)
		return;
	m->group = group;
	m->backend = backend;
	m->flags = MESHD_SK_F_TAGGED | (is_tcp ? MESHD_SK_F_TCP : 0);
	m->start_ns = is_connect ? bpf_ktime_get_ns() : 0;
	m->flushed_ns = 0;
	m->bytes_acked = 0;
	m->bytes_received = 0;
	m->cgroup = bpf_get_current_cgroup_id();
	m->identity = identity;
	m->pid = bpf_get_current_pid_tgid() >> 32;
	m->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(m->comm, sizeof(m->comm));
	if (is_connect && !is_tcp) { /* connected UDP: opened here (TCP: when the SYN leaves) */
		st = meshd_stats_get(group, backend);
		if (st)
			st->opened += 1;
	}
}

/* A VIP:port of `group` refused the socket: no usable backend. */
static __always_inline void meshd_count_refused(__u32 group)
{
	struct meshd_stats *st = meshd_stats_get(group, 0);

	if (st)
		st->fail_refused += 1;
}

#endif
