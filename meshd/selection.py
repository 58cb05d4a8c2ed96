"""Which endpoints a service's frontends use on this node: kube-proxy's rules, pure.

The rules are those of kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go):

- Usable = ready. If no endpoint is ready (for that policy's candidates), the endpoints
  that are serving and terminating are used instead; if none, there is no backend (the
  frontend refuses: ECONNREFUSED / TCP RST / ICMP port unreachable).
- Cluster policy: every usable endpoint, narrowed by topology when the service turns it on
  (`topology_mode: Auto` or `traffic_distribution: PreferClose`) and every ready endpoint
  carries zone hints and at least one is hinted for this node's zone (otherwise topology
  is ignored: all of them). Terminating fallback ignores topology.
- Local policy: the usable endpoints on this node (`node` == node.name); ready ones, else
  local serving-and-terminating ones. None: traffic is dropped (not refused), as
  kube-proxy's DROP — unless no endpoint is usable anywhere, then it is refused like
  Cluster (kube-proxy: "no endpoints" REJECT wins over "no local endpoints" DROP).
- Internal frontends (VIPs) follow `internal_traffic_policy`; external ones (node ports,
  external IPs, load-balancer IPs, reached through tc) follow `external_traffic_policy`.
  Clients on the node itself reaching an external frontend through the socket hooks get
  the Cluster selection, as kube-proxy does for node-local traffic.

meshd adds one rule: weight 0 means drained — never selected, like not serving.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

TOPOLOGY_ON = ("Auto",)  # topology_mode values that turn zone hints on
DISTRIBUTION_ON = ("PreferClose", "PreferSameZone")  # traffic_distribution values


class EndpointLike(Protocol):
    ready: bool
    serving: bool
    terminating: bool
    weight: int
    node: str | None
    hints_for_zones: tuple[str, ...] | None


def _ready(ep) -> bool:
    return ep.ready and ep.weight > 0


def _serving_terminating(ep) -> bool:
    return ep.serving and ep.terminating and ep.weight > 0


@dataclass(frozen=True)
class Selection:
    cluster: tuple  # endpoints Cluster-policy frontends use (may be empty)
    local: tuple  # endpoints Local-policy frontends use (may be empty)
    has_any: bool  # some endpoint is usable somewhere in the cluster
    topology: str  # "" or "PreferSameZone": whether zone hints narrowed `cluster`

    def for_policy(self, policy: str) -> tuple[tuple, str]:
        """(endpoints, what an empty selection does: "refuse" | "drop")."""
        if policy == "Local":
            return self.local, ("drop" if self.has_any else "refuse")
        return self.cluster, "refuse"


def topology_wanted(topology_mode: str | None, traffic_distribution: str | None) -> bool:
    return topology_mode in TOPOLOGY_ON or traffic_distribution in DISTRIBUTION_ON


def _zone_mode(endpoints: Sequence, zone: str | None) -> str:
    """kube-proxy's topologyModeFromHints (zone part)."""
    any_ready = False
    all_hinted = True
    for_zone = False
    for ep in endpoints:
        if not _ready(ep):
            continue
        any_ready = True
        hints = ep.hints_for_zones or ()
        if not hints:
            all_hinted = False
        elif zone is not None and zone in hints:
            for_zone = True
    return "PreferSameZone" if any_ready and all_hinted and for_zone else ""


def categorize(endpoints: Iterable, *, node: str, zone: str | None = None,
               topology: bool = False) -> Selection:
    eps = tuple(endpoints)
    mode = _zone_mode(eps, zone) if topology else ""
    cluster = tuple(ep for ep in eps if _ready(ep) and
                    (not mode or zone in (ep.hints_for_zones or ())))
    if not cluster:
        cluster = tuple(ep for ep in eps if _serving_terminating(ep))
    mine = tuple(ep for ep in eps if ep.node is not None and ep.node == node)
    local = tuple(ep for ep in mine if _ready(ep)) or \
        tuple(ep for ep in mine if _serving_terminating(ep))
    has_any = any(_ready(ep) or _serving_terminating(ep) for ep in eps)
    return Selection(cluster, local, has_any, mode)
