"""meshd: a kernel-level, sidecarless service mesh and L4 load balancer.

Layout (what each part owns):
  model, config, sources/   pure control-plane input: validated types, config file, registries
  maglev, desired, reconciler  pure logic: tables, desired kernel state, diff to map operations
  dataplane/                the only code that touches ctypes/libbpf and the kernel
  daemon, cli               process life and the user's front door
"""

import os as _os

# grpc (under aetcd) + fork can crash the child; this must be set before grpc is imported.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__all__ = ["__version__"]
__version__ = "0.1.0"
