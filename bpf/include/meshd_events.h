/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Connection events (issue 13): one ring buffer the daemon reads.
 *
 *   meshd_events_v1   RINGBUF of struct meshd_event (size set by the loader before load)
 *   meshd_evcfg_v1    ARRAY[1]: what to emit (mask), sampling, per-CPU rate limit; written
 *                     by the daemon at run time
 *   meshd_evstate_v1  PERCPU_ARRAY[1]: rate window and the loss counters
 *
 * Emitters: connect/sendmsg (CONNECT on translation, DENIED by policy, FAILED when the
 * service has no backend) and sockops (FAILED: the handshake never completed; CLOSED: an
 * established connection ended). With mask 0 an emitter costs one array lookup. CONNECT and
 * CLOSED are sampled by socket cookie (a sampled socket has both, or neither); DENIED and
 * FAILED never are. Then the per-CPU rate limit, then the ring: losses are counted, never
 * silent (lost_rate, lost_full; sampled_out is not a loss).
 * Layout rules as in meshd_structs.h; Python mirrors in meshd/dataplane/structs.py.
 */
#ifndef MESHD_EVENTS_H
#define MESHD_EVENTS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "meshd_structs.h"
#include "meshd_helpers.h"

#define MESHD_EV_CONNECT 1	/* connect()/sendmsg translated to a backend */
#define MESHD_EV_DENIED 2	/* refused by policy (EPERM) */
#define MESHD_EV_FAILED 3	/* refused at the hook (no backend: ECONNREFUSED or
				 * EHOSTUNREACH, backend 0) or by the network (sockops: sk_err),
				 * never established */
#define MESHD_EV_CLOSED 4	/* an established TCP connection closed */
#define MESHD_EV_F_SENDMSG 1	/* event.flags: from sendmsg (unconnected UDP), not connect */

#define MESHD_EVENTS_RING_DEFAULT (1 << 20)
#define MESHD_EV_SEC 1000000000ULL

struct meshd_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 cookie;		/* socket cookie */
	__u64 cgroup;		/* caller's cgroup id */
	__u64 duration_ns;	/* FAILED/CLOSED: from connect() */
	__u64 tx_bytes;		/* CLOSED */
	__u64 rx_bytes;		/* CLOSED */
	__u32 type;		/* MESHD_EV_* */
	__u32 pid;		/* tgid */
	__u32 uid;
	__u32 identity;		/* from the policy check; 0: none, or not looked up (the daemon
				 * then names it from `cgroup`) */
	__u32 group;
	__u32 backend;		/* 0: none */
	__u32 policy;		/* DENIED: deny policy id, 0 = none allows */
	__s32 err;		/* positive errno or 0 */
	__u32 vip[4];		/* network order, IPv4-mapped */
	__u32 be_addr[4];	/* network order, IPv4-mapped; zero if no backend */
	__u16 vip_port;		/* network order */
	__u16 be_port;		/* network order */
	__u8 proto;
	__u8 flags;		/* MESHD_EV_F_* */
	__u16 pad;
	char comm[16];		/* bpf_get_current_comm() at connect */
};

/* Never called, never loaded (libbpf loads only the subprograms a program calls): keeps
 * struct meshd_event in the object's BTF, where tests/kernel/test_btf_layout.py checks its
 * Python mirror. A ring buffer map has no value type that would carry it. */
__attribute__((noinline)) int meshd_event_btf_anchor(struct meshd_event *e)
{
	return e ? 0 : 1;
}

/* Value of meshd_evcfg_v1[0]. */
struct meshd_evcfg {
	__u32 mask;	/* bit (1 << MESHD_EV_*) on = emitted; 0 = events off */
	__u32 sample;	/* CONNECT and CLOSED: 1 in `sample` sockets (by cookie); 0/1 = all */
	__u32 rate;	/* max events per second per CPU; 0 = unlimited */
	__u32 pad;
};

/* Value of meshd_evstate_v1[0], one per CPU. */
struct meshd_evstate {
	__u64 window_ns;	/* start of the current one-second window */
	__u64 in_window;	/* events emitted in it */
	__u64 lost_full;	/* ring buffer full (bpf_ringbuf_reserve failed) */
	__u64 lost_rate;	/* over `rate` */
	__u64 sampled_out;	/* skipped by `sample` (not loss) */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MESHD_EVENTS_RING_DEFAULT);
} meshd_events_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meshd_evcfg);
} meshd_evcfg_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meshd_evstate);
} meshd_evstate_v1 SEC(".maps");

/* The event settings when any event is on, else NULL: the one lookup events cost when
 * they are off. */
static __always_inline struct meshd_evcfg *meshd_evcfg(void)
{
	struct meshd_evcfg *cfg;
	__u32 z = 0;

	cfg = bpf_map_lookup_elem(&meshd_evcfg_v1, &z);
	return cfg && cfg->mask ? cfg : 0;
}

/* A zeroed event of `type` in the ring, or NULL: not wanted, sampled out, over the rate or
 * the ring is full (the last three counted in meshd_evstate_v1). The caller fills it and
 * calls bpf_ringbuf_submit(). */
static __always_inline struct meshd_event *meshd_ev_reserve(const struct meshd_evcfg *cfg,
							    __u32 type, __u64 cookie)
{
	struct meshd_evstate *st;
	struct meshd_event *e;
	__u32 sample, rate, z = 0;
	__u64 now;

	if (!cfg || !(cfg->mask & (1u << type)))
		return 0;
	now = bpf_ktime_get_ns();
	st = bpf_map_lookup_elem(&meshd_evstate_v1, &z);
	if (!st)
		return 0;
	sample = cfg->sample;
	if (sample > 1 && (type == MESHD_EV_CONNECT || type == MESHD_EV_CLOSED) &&
	    meshd_fmix64(cookie) % sample != 0) {
		__sync_fetch_and_add(&st->sampled_out, 1);
		return 0;
	}
	rate = cfg->rate;
	if (rate) {
		if (now - st->window_ns >= MESHD_EV_SEC) {
			st->window_ns = now;
			st->in_window = 0;
		}
		if (st->in_window >= rate) {
			__sync_fetch_and_add(&st->lost_rate, 1);
			return 0;
		}
	}
	e = bpf_ringbuf_reserve(&meshd_events_v1, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&st->lost_full, 1);
		return 0;
	}
	st->in_window += 1;
	__builtin_memset(e, 0, sizeof(*e));
	e->type = type;
	e->ts_ns = now;
	e->cookie = cookie;
	return e;
}

/* Hands a filled event over. No wakeup per event: that is an irq_work and a context switch
 * of the reader per connect (measured: +20 us on a 44 us connect). The reader polls every
 * 100 ms (meshd/dataplane/events.py EventReader.poll); a ring over a quarter full wakes it
 * at once, so a burst is read before the ring fills. */
static __always_inline void meshd_ev_submit(struct meshd_event *e)
{
	__u64 avail = bpf_ringbuf_query(&meshd_events_v1, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&meshd_events_v1, BPF_RB_RING_SIZE);

	bpf_ringbuf_submit(e, avail > size / 4 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

#endif
