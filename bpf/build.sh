#!/usr/bin/env bash
# Compiles bpf/*.bpf.c into meshd/bpf_obj/ (only what changed), and the userspace helper
# bpf/native/maglev_fill.c into meshd/bpf_obj/maglev_fill.so (the Maglev fill; loaded with
# ctypes by meshd/dataplane/native.py). Needs clang-19 and libbpf-dev.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT="$HERE/../meshd/bpf_obj"
CLANG=${CLANG:-clang-19}
mkdir -p "$OUT"
# vmlinux.h (kernel types for CO-RE programs such as the socket iterator), generated from
# the running kernel's BTF into build/, not committed.
GEN="$HERE/../build/include"
if [ ! -s "$GEN/vmlinux.h" ]; then
  mkdir -p "$GEN"
  bpftool btf dump file /sys/kernel/btf/vmlinux format c > "$GEN/vmlinux.h.tmp"
  mv "$GEN/vmlinux.h.tmp" "$GEN/vmlinux.h"
fi
for src in "$HERE"/*.bpf.c; do
  obj="$OUT/$(basename "${src%.c}").o"
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ] && [ -z "$(find "$HERE/include" -newer "$obj" -print -quit)" ]; then
    continue
  fi
  "$CLANG" -O2 -g -target bpf -Wall -Werror \
    -I/usr/include/x86_64-linux-gnu -I"$HERE/include" -I"$GEN" \
    -c "$src" -o "$obj.tmp"
  mv "$obj.tmp" "$obj"
  echo "built $(basename "$obj")"
done
# The Maglev fill: plain userspace C (no libc calls), for the machine it is built on.
for src in "$HERE"/native/*.c; do
  so="$OUT/$(basename "${src%.c}").so"
  if [ -f "$so" ] && [ "$so" -nt "$src" ]; then
    continue
  fi
  # stripped (-s): the package strips binaries but not bpf_obj/, whose BPF objects need
  # their BTF
  "$CLANG" -O2 -Wall -Werror -shared -fPIC -Wl,-s -o "$so.tmp" "$src"
  mv "$so.tmp" "$so"
  echo "built $(basename "$so")"
done
