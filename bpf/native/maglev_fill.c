/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* The fill of meshd's weighted Maglev tables (meshd/maglev.py has the rule and the numpy
 * version this must match slot for slot): backends walk their permutations on a common
 * clock, backend i looking at position j at time clock[j] / w_i; looks are played in order
 * of (time, backend index) and a look claims its slot if it is free and the backend holds
 * fewer than its quota. Played one by one with a binary heap: ~74 us a table of 1021 slots
 * and 10 backends, where the numpy batches take ~470 us (a cold sync of 10,000 services
 * builds 10,000 tables). Userspace code, built by bpf/build.sh next to the BPF objects and
 * loaded with ctypes by meshd/dataplane/native.py; no allocation, no global state. */
#include <stdint.h>

struct look {
	double t;
	uint32_t i;
};

static int before(const struct look *a, const struct look *b)
{
	return a->t < b->t || (a->t == b->t && a->i < b->i);
}

static void sift_down(struct look *h, uint32_t n, uint32_t k)
{
	for (;;) {
		uint32_t l = 2 * k + 1, r = l + 1, s = k;
		if (l < n && before(&h[l], &h[s]))
			s = l;
		if (r < n && before(&h[r], &h[s]))
			s = r;
		if (s == k)
			return;
		struct look tmp = h[k];
		h[k] = h[s];
		h[s] = tmp;
		k = s;
	}
}

static void sift_up(struct look *h, uint32_t k)
{
	while (k) {
		uint32_t p = (k - 1) / 2;
		if (!before(&h[k], &h[p]))
			return;
		struct look tmp = h[k];
		h[k] = h[p];
		h[p] = tmp;
		k = p;
	}
}

/* Fills `tables` (count tables of m slots, uint32 indexes into each table's backends in
 * name order) for `count` tables whose backends are listed one table after the other:
 * sizes[t] backends each, with their offset, skip, weight and quota (quotas of a table add
 * up to m). `clock`: m values (meshd/maglev.py _clock). Scratch: `held`, `ptr` (one per
 * backend), `heap` (the most backends of one table), `claimed` (m bytes). Returns 0, or -1
 * if a table could not be filled (inconsistent input). */
int meshd_maglev_fill(uint32_t m, uint32_t count, const uint32_t *sizes,
		      const int64_t *offset, const int64_t *skip, const double *weight,
		      const int64_t *quota, const double *clock, uint32_t *tables,
		      int64_t *held, int64_t *ptr, struct look *heap, uint8_t *claimed)
{
	uint64_t base = 0;

	for (uint32_t t = 0; t < count; t++) {
		uint32_t n = sizes[t], len = 0, free = m;
		uint32_t *table = tables + (uint64_t)t * m;

		for (uint32_t s = 0; s < m; s++)
			claimed[s] = 0;
		for (uint32_t i = 0; i < n; i++) {
			held[base + i] = 0;
			ptr[base + i] = 0;
			if (quota[base + i] > 0) {
				heap[len].t = clock[0] / weight[base + i];
				heap[len].i = i;
				sift_up(heap, len++);
			}
		}
		while (free) {
			if (!len)
				return -1;
			uint32_t i = heap[0].i;
			uint64_t b = base + i;
			int64_t p = ptr[b]++;
			uint32_t slot = (uint32_t)((offset[b] + p * skip[b]) % m);

			if (!claimed[slot]) {
				claimed[slot] = 1;
				table[slot] = i;
				held[b]++;
				free--;
			}
			if (held[b] < quota[b] && ptr[b] < m) {
				heap[0].t = clock[ptr[b]] / weight[b];
				sift_down(heap, len, 0);
			} else {
				heap[0] = heap[--len];
				sift_down(heap, len, 0);
			}
		}
		base += n;
	}
	return 0;
}
