"""The kernel side of meshd: the only package that touches ctypes, libbpf and bpffs.

  libbpf   ctypes binding over libbpf.so.1 (typed BpfError on every failure)
  structs  Python mirrors of bpf/include/meshd_structs.h (checked against BTF by a test)
  pins     object paths, bpffs, adopting and pinning maps (used by every loader below)
  loader   load/adopt/pin/attach/remove the socket LB of one instance
  tc       load/attach/detach the tc (per-packet) LB on interfaces
  sockdestroy  destroy connected UDP sockets aimed at removed backends
  kernel   the reconciler's Dataplane on the real maps
"""
