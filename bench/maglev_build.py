"""Time Maglev table builds: python bench/maglev_build.py [repeats]

Prints the median and worst build time in milliseconds for table sizes 16381
and 65537 with 3, 100 and 1000 equal-weight backends, and 1000 backends with
mixed weights 1..5. Target: m=65537 with 1000 backends well under 100 ms.
Then, at the size `maglev.table_size: auto` picks (maglev.table_size_for), for 10
backends (the benchmarks' services) and for the most backends each rung takes:
balance (max slot share / mean - 1) and disruption (share of the other
backends' slots that move when one backend is removed).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from meshd.maglev import LADDER, build_table, table_size_for


def backends(n: int, weighted: bool) -> list[tuple[str, int]]:
    return [(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:8080/TCP", 1 + i % 5 if weighted else 1) for i in range(n)]


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    print(f"{'m':>6} {'backends':>14} {'median ms':>10} {'max ms':>8}")
    for m in (16381, 65537):
        for n, weighted in ((3, False), (100, False), (1000, False), (1000, True)):
            bs = backends(n, weighted)
            build_table(bs, m)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                build_table(bs, m)
                times.append((time.perf_counter() - start) * 1000)
            label = f"{n}{' w1..5' if weighted else ''}"
            print(f"{m:>6} {label:>14} {statistics.median(times):>10.1f} {max(times):>8.1f}")
    print()
    print(f"{'backends':>8} {'auto m':>7} {'imbalance %':>12} {'disruption %':>13}")
    for n in [10] + [max(2, m // 100) for m in LADDER]:
        m = table_size_for(n)
        names = [name for name, _w in backends(n, False)]
        table = np.array(names)[build_table([(x, 1) for x in names], m)]
        after = np.array(names[1:])[build_table([(x, 1) for x in names[1:]], m)]
        kept = table != names[0]
        share = np.unique(table, return_counts=True)[1].max() / (m / n) - 1
        print(f"{n:>8} {m:>7} {share * 100:>12.2f} {(table[kept] != after[kept]).mean() * 100:>13.2f}")


if __name__ == "__main__":
    main()
