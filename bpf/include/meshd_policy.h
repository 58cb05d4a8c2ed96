/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* L4 authorization at connect()/sendmsg() by workload identity (issue 13).
 *
 *   meshd_ident_v1    cgroup id -> identity (a small int per distinct set of matching
 *                     policy selectors; 0 is never stored: "no identity")
 *   meshd_verdict_v1  (identity, frontend group, uid or MESHD_UID_ANY) -> verdict
 *   meshd_denied_v1   (group, identity) -> denials, one counter per CPU
 *
 * Only frontends flagged MESHD_SVC_F_POLICY are checked (other services pay one flag test):
 * the caller's identity is looked up by its cgroup, then the verdict of (identity, group,
 * any uid); when that entry says some uid has an entry of its own (MESHD_VERDICT_F_UID), the
 * verdict of (identity, group, uid) replaces it if there is one. A verdict with an action
 * decides (the control plane merges deny-over-allow before writing); without one (no entry,
 * or action 0) the frontend decides: MESHD_SVC_F_POLICY_OPEN (only deny policies select the
 * service, as in Istio: they close it to the callers they name, not to everyone) allows,
 * else denied (an allow policy selects the service: only what it allows gets through).
 * Include after meshd_maps.h. Layout rules as in meshd_structs.h; Python mirrors in
 * meshd/dataplane/structs.py.
 */
#ifndef MESHD_POLICY_H
#define MESHD_POLICY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "meshd_structs.h"

#define MESHD_MAX_IDENT 65536
#define MESHD_MAX_VERDICTS 262144
#define MESHD_MAX_DENIED 65536
#define MESHD_CGROUP_DEPTH 24 /* ancestors looked at for a cgroup the daemon has not seen */

/* Value of meshd_ident_v1, keyed by a __u64 cgroup id (host order, as
 * bpf_get_current_cgroup_id() returns it). */
struct meshd_ident {
	__u32 identity;	/* never 0 */
	__u32 pad;	/* zero */
};

#define MESHD_UID_ANY 0xffffffffu

/* Key of meshd_verdict_v1. */
struct meshd_verdict_key {
	__u32 identity;	/* 0: callers with no identity */
	__u32 group;	/* frontend group id */
	__u32 uid;	/* MESHD_UID_ANY, or one uid (low 32 bits of bpf_get_current_uid_gid) */
	__u32 pad;	/* zero */
};

#define MESHD_VERDICT_ALLOW 1 /* 0: no verdict, the frontend's default decides */
#define MESHD_VERDICT_DENY 2
#define MESHD_VERDICT_F_UID 1 /* on a uid=ANY entry: some uid has its own (complete, already
			       * merged) entry: look up (identity, group, uid) */

/* Value of meshd_verdict_v1. */
struct meshd_verdict {
	__u8 action;	/* MESHD_VERDICT_* */
	__u8 flags;	/* MESHD_VERDICT_F_* */
	__u16 pad;	/* zero */
	__u32 policy;	/* policy id that decided (DENY: the deny policy; 0: none allows) */
};

/* Key of meshd_denied_v1; value: __u64 count per CPU. */
struct meshd_denied_key {
	__u32 group;
	__u32 identity;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_IDENT);
	__type(key, __u64);
	__type(value, struct meshd_ident);
} meshd_ident_v1 SEC(".maps");

/* cgroup id -> the identity every cgroup below it has at least (the prefix and unit
 * selectors that cover its whole subtree): what a cgroup made since the daemon's last scan
 * gets from its nearest known ancestor, so a deny of a subtree holds for a child made a
 * microsecond before the connect. Same value type as meshd_ident_v1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_IDENT);
	__type(key, __u64);
	__type(value, struct meshd_ident);
} meshd_subtree_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_VERDICTS);
	__type(key, struct meshd_verdict_key);
	__type(value, struct meshd_verdict);
} meshd_verdict_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_DENIED);
	__type(key, struct meshd_denied_key);
	__type(value, __u64);
} meshd_denied_v1 SEC(".maps");

/* The identity of the current task's cgroup; 0 when it has none. A cgroup with no entry
 * may be one the daemon has not seen yet: it gets what its nearest ancestor in
 * meshd_subtree_v1 hands down (only then: a known cgroup costs one lookup). The walk goes
 * from the root down and stops at the cgroup itself: one helper call and one lookup per
 * level the cgroup really has (from the leaf up it paid a call for each of the
 * MESHD_CGROUP_DEPTH levels, most of them deeper than any cgroup: ~1 us a connect,
 * bench/connect_breakdown.py). */
static __always_inline __u32 meshd_identity(void)
{
	__u64 cg = bpf_get_current_cgroup_id(), anc;
	struct meshd_ident *id = bpf_map_lookup_elem(&meshd_ident_v1, &cg);
	__u32 found = 0;
	int level;

	if (id)
		return id->identity;
	for (level = 0; level < MESHD_CGROUP_DEPTH; level++) {
		anc = bpf_get_current_ancestor_cgroup_id(level);
		if (!anc || anc == cg)
			break; /* below the root of the hierarchy, or the cgroup itself: done */
		id = bpf_map_lookup_elem(&meshd_subtree_v1, &anc);
		if (id)
			found = id->identity; /* a deeper ancestor's entry overrides */
	}
	return found;
}

static __always_inline void meshd_count_denied(__u32 group, __u32 identity)
{
	struct meshd_denied_key k = { .group = group, .identity = identity };
	__u64 one = 1, *n;

	n = bpf_map_lookup_elem(&meshd_denied_v1, &k);
	if (n)
		__sync_fetch_and_add(n, 1); /* this CPU's copy, but sockops may preempt a hook */
	else
		bpf_map_update_elem(&meshd_denied_v1, &k, &one, BPF_NOEXIST);
}

/* 1 if the current task may reach frontend group `group`, else 0 (counted). *identity gets
 * the caller's identity, *policy the deciding policy of a denial (0: none allows it). */
static __always_inline int meshd_policy_allows(__u32 group, int open, __u32 *identity,
					       __u32 *policy)
{
	struct meshd_verdict_key k = {};
	struct meshd_verdict *v, *v2;

	k.identity = meshd_identity();
	k.group = group;
	k.uid = MESHD_UID_ANY;
	*identity = k.identity;
	v = bpf_map_lookup_elem(&meshd_verdict_v1, &k);
	if (v && (v->flags & MESHD_VERDICT_F_UID)) {
		k.uid = (__u32)bpf_get_current_uid_gid();
		v2 = bpf_map_lookup_elem(&meshd_verdict_v1, &k);
		if (v2)
			v = v2;
	}
	if (v && v->action ? v->action == MESHD_VERDICT_ALLOW : open)
		return 1;
	*policy = v ? v->policy : 0;
	meshd_count_denied(group, k.identity);
	return 0;
}

#endif
