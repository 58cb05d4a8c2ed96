#!/usr/bin/env bash
# Compiles bpf/*.bpf.c into meshd/bpf_obj/ (only what changed). Needs clang-19 and libbpf-dev.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT="$HERE/../meshd/bpf_obj"
CLANG=${CLANG:-clang-19}
mkdir -p "$OUT"
for src in "$HERE"/*.bpf.c; do
  obj="$OUT/$(basename "${src%.c}").o"
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ] && [ -z "$(find "$HERE/include" -newer "$obj" -print -quit)" ]; then
    continue
  fi
  "$CLANG" -O2 -g -target bpf -Wall -Werror \
    -I/usr/include/x86_64-linux-gnu -I"$HERE/include" \
    -c "$src" -o "$obj.tmp"
  mv "$obj.tmp" "$obj"
  echo "built $(basename "$obj")"
done
