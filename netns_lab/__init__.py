"""netns_lab — the network-namespace test lab of meshd.

Topology of ``Lab(prefix="ml1a2b3c", backends=3)`` (all names derive from the
prefix; default prefix ``ml`` + 6 random hex)::

    ┌──────────────────── ml1a2b3c-cli (client) ────────────────────┐
    │ lo 127.0.0.1   NO default route (10.96.0.10 -> ENETUNREACH)    │
    │ ml1a2b3c-c1          ml1a2b3c-c2          ml1a2b3c-c3          │
    │ 10.201.1.1/24        10.201.2.1/24        10.201.3.1/24        │
    │ fd00:201:1::1/64     fd00:201:2::1/64     fd00:201:3::1/64     │
    └──────┬────────────────────┬────────────────────┬───────────────┘
           │ veth               │ veth               │ veth
    ┌──────┴───────┐     ┌──────┴───────┐     ┌──────┴───────┐
    │ ml1a2b3c-b1  │     │ ml1a2b3c-b2  │     │ ml1a2b3c-b3  │  backend netns
    │ 10.201.1.2   │     │ 10.201.2.2   │     │ 10.201.3.2   │  (veth has the
    │ fd00:201:1::2│     │ fd00:201:2::2│     │ fd00:201:3::2│   netns's name)
    │ agent "b1"   │     │ agent "b2"   │     │ agent "b3"   │  :8080 tcp+udp
    └──────────────┘     └──────────────┘     └──────────────┘

    cgroup2: /sys/fs/cgroup/unified/ml1a2b3c   (Lab.run(..., cgroup=True))
    state:   /run/netns_lab/ml1a2b3c.json      (+ ml1a2b3c.*.log agent logs)

Each backend namespace only has the connected route of its own link, so
backends cannot reach each other and nothing reaches the outside world.

Use::

    from netns_lab import Lab
    with Lab(backends=3) as lab:
        lab.start_backends(8080)
        res = lab.agent("tcp", addr=lab.backend_addr(1), port=8080, count=5)
        assert res["by_backend"] == {"b1": 5}

``sweep()`` removes leftovers of crashed runs (labs whose creating process is
gone); ``python -m netns_lab up|down|status|sweep`` is the CLI; pytest
fixtures ``lab``/``lab_module`` live in ``netns_lab.pytest_plugin``.
"""

from ._host import LAB_PREFIX_ROOT
from .lab import Lab, agent_argv, sweep

__all__ = ["LAB_PREFIX_ROOT", "Lab", "agent_argv", "sweep"]
