"""Time Maglev table builds: python bench/maglev_build.py [repeats]

Prints the median and worst build time in milliseconds for table sizes 16381
and 65537 with 3, 100 and 1000 equal-weight backends, and 1000 backends with
mixed weights 1..5. Target: m=65537 with 1000 backends well under 100 ms.
"""

from __future__ import annotations

import statistics
import sys
import time

from meshd.maglev import build_table


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


if __name__ == "__main__":
    main()
