"""The kernel side of meshd: the only package that touches ctypes, libbpf and bpffs.

  libbpf   ctypes binding over libbpf.so.1 (typed BpfError on every failure)
  structs  Python mirrors of bpf/include/meshd_structs.h (checked against BTF by a test)
  loader   load/adopt/pin/attach/remove the socket LB of one instance
  kernel   the reconciler's Dataplane on the real maps
"""
