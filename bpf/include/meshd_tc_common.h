/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* The tc load balancer's constants, load-time settings, counters and small helpers: what
 * every other meshd_tc_*.h uses. Included once, by bpf/tc_lb.bpf.c, after the kernel and
 * libbpf headers (it defines the object's only .rodata variable, meshd_tc_cfg). */
#ifndef MESHD_TC_COMMON_H
#define MESHD_TC_COMMON_H

#include "meshd_structs.h"
#include "meshd_helpers.h"
#include "meshd_maps.h"
#include "meshd_tc.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define MESHD_IP_MF 0x2000
#define MESHD_IP_OFFMASK 0x1fff
#define MESHD_TCP_FIN 0x01
#define MESHD_TCP_SYN 0x02
#define MESHD_TCP_RST 0x04
#define MESHD_TCP_ACK 0x10
#define MESHD_NEXTHDR_ICMP6 58
/* A flow's REV entry is rewritten at most this often by its forward packets, so a reply
 * direction that LRU evicted while the flow only sent one way comes back. */
#define MESHD_CT_REFRESH_NS 1000000000ULL
#define MESHD_HASH_SEED 0x9e3779b97f4a7c15ULL

/* Set by the loader before load: the SNAT port range (0: routed mode only; the verifier
 * then drops every SNAT path). */
const volatile struct meshd_tc_cfg meshd_tc_cfg = {};

static __always_inline void meshd_copy16(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int meshd_eq16(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline struct meshd_tc_stats *meshd_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&meshd_tcstat_v1, &zero);
}

#define MESHD_COUNT(st, field) do { if (st) (st)->field += 1; } while (0)

static __always_inline int meshd_drop_err(struct meshd_tc_stats *st)
{
	MESHD_COUNT(st, errors);
	return TC_ACT_SHOT;
}

static __always_inline int meshd_snat_on(void)
{
	return meshd_tc_cfg.snat_port_min != 0;
}

/* A port (network order) inside the SNAT range. */
static __always_inline int meshd_snat_port(__u16 port)
{
	__u16 h = bpf_ntohs(port);

	return h >= meshd_tc_cfg.snat_port_min && h <= meshd_tc_cfg.snat_port_max;
}

#endif
