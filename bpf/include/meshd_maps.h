/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Maps of the socket load balancer. Names carry the project prefix and a layout version;
 * the same names are used in Python (meshd/names.py) and as pin file names. Sizes are the
 * defaults documented in docs/datapath.md; the loader may resize before load. */
#ifndef MESHD_MAPS_H
#define MESHD_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "meshd_structs.h"

#define MESHD_MAX_FRONTENDS 65536
#define MESHD_MAX_GROUPS 65536
#define MESHD_MAX_BACKENDS 262144
#define MESHD_MAX_REVNAT 65536	/* unconnected UDP (socket, backend) pairs only */
#define MESHD_DEFAULT_MAGLEV_M 16381
#define MESHD_MAX_AFFINITY 65536
#define MESHD_MAX_MEMBERS 262144
#define MESHD_MAX_SRCRANGES 16384

/* VIP:port/proto -> frontend group id and backend count. */
/* The maps that grow with services and backends are not preallocated: their memory
 * follows what they hold (a bucket array of 16 B per max entry, then each entry as it is
 * written), not their capacity. Lookups cost the same. A pin dir of an older meshd keeps
 * its preallocated maps (libbpf adopts a pinned map as it is) until `meshd cleanup` or a
 * reboot. LRU maps are always preallocated: they are sized for what they cache. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_FRONTENDS);
	__type(key, struct meshd_svc_key);
	__type(value, struct meshd_svc_val);
} meshd_svc_v1 SEC(".maps");

/* VIP:port/proto -> the tc path's group of an external frontend, where it differs from the
 * one in meshd_svc_v1 (which the socket path uses): tc looks here first. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_FRONTENDS);
	__type(key, struct meshd_svc_key);
	__type(value, struct meshd_svc_val);
} meshd_svc_ext_v1 SEC(".maps");

/* (client, group) -> backend and last use: session affinity of both paths. LRU: idle
 * clients age out; an entry older than the group's timeout is not followed. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESHD_MAX_AFFINITY);
	__type(key, struct meshd_aff_key);
	__type(value, struct meshd_aff_val);
} meshd_aff_v1 SEC(".maps");

/* frontend group id -> affinity timeout in seconds (groups with MESHD_SVC_F_AFFINITY). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_GROUPS);
	__type(key, __u32);
	__type(value, __u32);
} meshd_affcfg_v1 SEC(".maps");

/* (group, backend) -> weight: the current selection of groups with affinity. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_MEMBERS);
	__type(key, struct meshd_member_key);
	__type(value, __u32);
} meshd_member_v1 SEC(".maps");

/* load_balancer_source_ranges of frontends with MESHD_SVC_F_SOURCE_RANGES. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_SRCRANGES);
	__type(key, struct meshd_srcrange_key);
	__type(value, __u8);
} meshd_srcrange_v1 SEC(".maps");

/* backend id -> address. Ids are allocated by the reconciler and stable while a backend exists. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct meshd_backend);
} meshd_be_v1 SEC(".maps");

/* Inner map template of meshd_maglev_v3: one group's Maglev table in 64-byte chunks
 * (struct meshd_table_chunk): the header, two halves of 16-bit slots, and each half's
 * member list. Frontends name the half readers use (MESHD_SVC_F_TABLE_B); a change fills
 * the other half (slots and members) with plain array updates and then flips the
 * frontends (no map-in-map update, so no RCU grace period in the syscall).
 * BPF_F_INNER_MAP: inner maps of any max_entries fit, so every group has the table size
 * its backends need (meshd/maglev.py table_size_for). */
struct meshd_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP);
	/* a template: every group's inner map has its own size (meshd/dataplane/tables.py) */
	__uint(max_entries, 1 + 2 * ((MESHD_DEFAULT_MAGLEV_M + MESHD_TABLE_SLOTS - 1) /
				     MESHD_TABLE_SLOTS) + 2);
	/* sizes, not BTF types: clang emits the chunk struct as a forward declaration here,
	 * and libbpf 1.1 cannot size that (tests/kernel/test_tables.py checks the mirror) */
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct meshd_table_chunk));
};

/* frontend group id -> its Maglev table (inner map). Layout 3; the tables of layout 1
 * (meshd_maglev_v1: one value of M slots per inner map, one M for all) and 2
 * (meshd_maglev_v3: 32-bit slots) are migrated by the loader (docs/datapath.md). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_GROUPS);
	__type(key, __u32);
	__array(values, struct meshd_maglev_inner);
} meshd_maglev_v3 SEC(".maps");

/* (socket cookie, backend) -> VIP, for recvmsg/getpeername. LRU: entries of closed sockets
 * age out without a delete on close. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MESHD_MAX_REVNAT);
	__type(key, struct meshd_revnat_key);
	__type(value, struct meshd_revnat_val);
} meshd_revnat_v1 SEC(".maps");

/* [0] -> what the pinned maps were created with (see struct meshd_meta). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meshd_meta);
} meshd_meta_v1 SEC(".maps");

/* socket -> struct meshd_sock (translation and metrics tag of a socket meshd translated). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct meshd_sock);
} meshd_sock_v1 SEC(".maps");

/* socket -> struct meshd_sknat of sockets an older meshd connected (read only). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct meshd_sknat);
} meshd_sknat_v1 SEC(".maps");

/* frontend group id -> its group key for tools; never read by BPF, so not preallocated. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MESHD_MAX_GROUPS);
	__type(key, __u32);
	__type(value, struct meshd_svc_name);
} meshd_names_v1 SEC(".maps");

#endif
