"""The endpoint-selection semantics table, derived from kube-proxy's own cases
(pkg/proxy/topology_test.go TestCategorizeEndpoints, with the terminating-endpoints and
topology-hints features on, as in current Kubernetes), run against meshd.selection.

Notation: an endpoint is "ADDR flags [zones]": r = ready, s = serving, t = terminating,
l = on this node; e.g. "10.0.0.2 st l". Not ready and not serving unless flagged. meshd's
own rule (weight 0 = drained) has cases of its own at the end."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshd.selection import categorize

NODE, OTHER = "node-1", "node-2"


@dataclass(frozen=True)
class Ep:
    address: str
    ready: bool
    serving: bool
    terminating: bool
    node: str | None
    hints_for_zones: tuple[str, ...] | None
    weight: int = 1


def ep(spec: str, weight: int = 1) -> Ep:
    parts = spec.split()
    addr, flags = parts[0], (parts[1] if len(parts) > 1 and not parts[1].startswith("[") else "")
    zones = next((p.strip("[]").split(",") for p in parts[1:] if p.startswith("[")), None)
    r = "r" in flags
    return Ep(addr, r, r or "s" in flags, "t" in flags,
              NODE if "l" in flags else OTHER,
              tuple(zones) if zones else None, weight)


def addrs(eps) -> set[str]:
    return {e.address for e in eps}


# name, zone, topology, endpoints, cluster (None: kube-proxy does not compute it), local, has_any
CASES = [
    ("hints auto: only zone-a", "zone-a", True,
     ["10.1.2.3 r [zone-a]", "10.1.2.4 r [zone-b]", "10.1.2.5 r [zone-c]", "10.1.2.6 r [zone-a]"],
     {"10.1.2.3", "10.1.2.6"}, None, True),
    ("topology off: hints ignored", "zone-a", False,
     ["10.1.2.3 r [zone-a]", "10.1.2.4 r [zone-b]", "10.1.2.5 r [zone-c]", "10.1.2.6 r [zone-a]"],
     {"10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"}, None, True),
    ("eTP Local: topology ignored for Local endpoints", "zone-a", True,
     ["10.1.2.3 rl [zone-a]", "10.1.2.4 rl [zone-b]", "10.1.2.5 r [zone-c]", "10.1.2.6 r [zone-a]"],
     {"10.1.2.3", "10.1.2.6"}, {"10.1.2.3", "10.1.2.4"}, True),
    ("node without a zone: no filtering", None, True, ["10.1.2.3 r [zone-a]"],
     {"10.1.2.3"}, None, True),
    ("node in another zone: no filtering", "zone-b", True, ["10.1.2.3 r [zone-a]"],
     {"10.1.2.3"}, None, True),
    ("unready endpoint is not used", "zone-a", True,
     ["10.1.2.3 r [zone-a]", "10.1.2.4 r [zone-b]", "10.1.2.5 r [zone-c]", "10.1.2.6 [zone-a]"],
     {"10.1.2.3"}, None, True),
    ("only unready endpoints in my zone: no filtering", "zone-a", True,
     ["10.1.2.3 [zone-a]", "10.1.2.4 r [zone-b]", "10.1.2.5 r [zone-c]", "10.1.2.6 [zone-a]"],
     {"10.1.2.4", "10.1.2.5"}, None, True),
    ("a ready endpoint without hints: no filtering", "zone-a", True,
     ["10.1.2.3 r [zone-a]", "10.1.2.4 r [zone-b]", "10.1.2.5 r", "10.1.2.6 r [zone-a]"],
     {"10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"}, None, True),
    ("several hints per endpoint", "zone-c", True,
     ["10.1.2.3 r [zone-a,zone-b,zone-c]", "10.1.2.4 r [zone-b,zone-c]",
      "10.1.2.5 r [zone-b,zone-d]", "10.1.2.6 r [zone-c]"],
     {"10.1.2.3", "10.1.2.4", "10.1.2.6"}, None, True),
    ("topology and localness differ", "zone-a", True,
     ["10.0.0.0 rl [zone-a]", "10.0.0.1 rl [zone-b]", "10.0.0.2 r [zone-a]", "10.0.0.3 r [zone-b]"],
     {"10.0.0.0", "10.0.0.2"}, {"10.0.0.0", "10.0.0.1"}, True),
    ("iTP Local, no endpoints", None, False, [], None, set(), False),
    ("iTP Local, all endpoints remote", None, False, ["10.0.0.0 r", "10.0.0.1 r"],
     None, set(), True),
    ("iTP Local, all endpoints local", None, False, ["10.0.0.0 rl", "10.0.0.1 rl"],
     None, {"10.0.0.0", "10.0.0.1"}, True),
    ("iTP Local, some local", None, False, ["10.0.0.0 rl", "10.0.0.1 r"],
     None, {"10.0.0.0"}, True),
    ("Cluster, none ready", None, False, ["10.0.0.0", "10.0.0.1"], set(), None, False),
    ("Cluster, some ready", None, False, ["10.0.0.0", "10.0.0.1 r"], {"10.0.0.1"}, None, True),
    ("Cluster, all terminating: serving-terminating fallback", None, False,
     ["10.0.0.0 stl", "10.0.0.1 st"], {"10.0.0.0", "10.0.0.1"}, None, True),
    ("both policies, some local", None, False, ["10.0.0.0 rl", "10.0.0.1 r"],
     {"10.0.0.0", "10.0.0.1"}, {"10.0.0.0"}, True),
    ("both Local, all remote and terminating", None, False, ["10.0.0.0 st", "10.0.0.1 st"],
     {"10.0.0.0", "10.0.0.1"}, set(), True),
    ("eTP Local with terminating endpoints", None, False,
     ["10.0.0.0 r", "10.0.0.1 l", "10.0.0.2 stl", "10.0.0.3 st"],
     {"10.0.0.0"}, {"10.0.0.2"}, True),
    ("not serving and terminating: never used", None, False, ["10.0.0.0 t", "10.0.0.1 tl"],
     set(), set(), False),
]


@pytest.mark.parametrize("name,zone,topology,eps,cluster,local,has_any", CASES,
                         ids=[c[0] for c in CASES])
def test_kube_proxy_categorize_endpoints(name, zone, topology, eps, cluster, local, has_any):
    sel = categorize([ep(s) for s in eps], node=NODE, zone=zone, topology=topology)
    if cluster is not None:
        assert addrs(sel.cluster) == cluster
    if local is not None:
        assert addrs(sel.local) == local
    assert sel.has_any == has_any


def test_empty_selection_refuses_for_cluster_and_drops_for_local_only_when_others_exist():
    remote = categorize([ep("10.0.0.1 r")], node=NODE)
    assert remote.for_policy("Local") == ((), "drop")
    assert remote.for_policy("Cluster")[1] == "refuse" and remote.for_policy("Cluster")[0]
    nothing = categorize([ep("10.0.0.1")], node=NODE)
    assert nothing.for_policy("Local") == ((), "refuse")
    assert nothing.for_policy("Cluster") == ((), "refuse")


def test_weight_zero_is_drained_everywhere():
    sel = categorize([ep("10.0.0.1 rl", weight=0), ep("10.0.0.2 stl", weight=0),
                      ep("10.0.0.3 st")], node=NODE)
    assert addrs(sel.cluster) == {"10.0.0.3"} and sel.local == ()
    assert sel.for_policy("Local") == ((), "drop")
