"""Kubernetes API objects -> meshd service records (pure: no I/O, no client library).

Input is JSON as the API serves it (dicts, as `kubectl get -o json` prints them). Three steps,
so that the source re-does only what an event changed:
  * service_base(Service)   -> ServiceBase (the record without endpoints, plus how its ports
                               are named in slices), or Skip (not ours), or RecordError;
  * slice_info(EndpointSlice) -> SliceInfo (its service, ports and endpoints, extracted once);
  * compose(base, slices)   -> the Service record with endpoints merged from every slice
                               (addresses deduplicated, first slice by name wins) and the
                               per-endpoint problems.
translate(service, slices) does all three (tests, tools).

Kubernetes -> meshd, as kube-proxy reads them (pkg/proxy/serviceport.go, endpointslicecache.go):
  spec.clusterIPs (or clusterIP) -> vips; ports[] -> ports (an unnamed single port is named
  `<proto>-<port>`, e.g. tcp-80); nodePort (NodePort/LoadBalancer) -> node_port; a targetPort,
  number or name, is already resolved per endpoint by the EndpointSlice controller: a slice's
  port carries the service port's name and the pods' number, so each endpoint gets the numbers
  of the slice it is in. externalIPs, status.loadBalancer.ingress[].ip (not ipMode Proxy),
  loadBalancerSourceRanges, sessionAffinity + sessionAffinityConfig.clientIP.timeoutSeconds,
  internal/externalTrafficPolicy, healthCheckNodePort, the topology-mode annotation (and the
  older topology-aware-hints one), trafficDistribution. Endpoints: addresses[0], conditions
  (ready/serving/terminating; missing ready = ready), nodeName, zone, hints.forZones.
Skipped (Skip, a debug line): ExternalName, headless (clusterIP None), no cluster IP yet,
labelled service.kubernetes.io/service-proxy-name or service.kubernetes.io/headless.
Rejected (RecordError): SCTP or other protocols, anything the meshd model refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshd.errors import RecordError
from meshd.model import (Endpoint, Service, local_endpoint_problem, local_endpoint_reason,
                         parse_endpoint, parse_service, show)

log = logging.getLogger("meshd.kubernetes")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
TOPOLOGY_HINTS_OLD = "service.kubernetes.io/topology-aware-hints"
ZONE_LABEL = "topology.kubernetes.io/zone"
ZONE_LABEL_OLD = "failure-domain.beta.kubernetes.io/zone"
PROTOCOLS = ("TCP", "UDP")


@dataclass(frozen=True)
class Skip:
    """Not a service meshd serves; `reason` goes to a debug line."""
    reason: str


@dataclass(frozen=True)
class ServiceBase:
    record: Service  # without endpoints
    # per port: (meshd port name, the port's name in slices ("" if unnamed), protocol)
    port_names: tuple[tuple[str, str, str], ...]
    resource_version: str


@dataclass(frozen=True)
class SliceInfo:
    name: str
    service: str  # "ns/name" from the kubernetes.io/service-name label ("" if none)
    # (name, protocol) -> port number
    ports: tuple[tuple[str, str, int], ...]
    # (address, ready, serving, terminating, nodeName, zone, forZones)
    endpoints: tuple[tuple[str, bool | None, bool | None, bool | None, str | None, str | None,
                           tuple[str, ...] | None], ...]


def where(namespace: str, name: str) -> str:
    """How a Kubernetes service is named in errors and logs."""
    return f"kubernetes service {namespace}/{name}"


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def service_key(obj: dict[str, Any]) -> str:
    m = _meta(obj)
    return f"{m.get('namespace', '')}/{m.get('name', '')}"


def service_base(obj: dict[str, Any]) -> ServiceBase | Skip:
    """The record of one Service object (no endpoints); Skip; or RecordError."""
    meta, spec = _meta(obj), obj.get("spec") or {}
    ns, name = meta.get("namespace", ""), meta.get("name", "")
    at = where(ns, name)
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if spec.get("type") == "ExternalName":
        return Skip("type ExternalName (a DNS name, nothing to proxy)")
    if PROXY_NAME_LABEL in labels:
        return Skip(f"labelled {PROXY_NAME_LABEL}={labels[PROXY_NAME_LABEL]} (another proxy owns it)")
    if HEADLESS_LABEL in labels:
        return Skip(f"labelled {HEADLESS_LABEL} (headless)")
    cluster_ip = spec.get("clusterIP") or ""
    if cluster_ip == "None":
        return Skip("headless (clusterIP None)")
    if not cluster_ip:
        return Skip("no cluster IP allocated yet")
    vips = list(spec.get("clusterIPs") or [cluster_ip])
    ports: list[dict[str, Any]] = []
    names: list[tuple[str, str, str]] = []
    node_ports = spec.get("type") in ("NodePort", "LoadBalancer")
    for i, p in enumerate(spec.get("ports") or []):
        proto = p.get("protocol") or "TCP"
        if proto not in PROTOCOLS:
            raise RecordError(at, f"ports[{i}]: protocol {show(proto)} is not supported (meshd serves TCP "
                              "and UDP); the service is not served")
        kname = p.get("name") or ""
        mname = kname or f"{proto.lower()}-{p.get('port')}"
        entry: dict[str, Any] = {"name": mname, "port": p.get("port"), "protocol": proto}
        if node_ports and p.get("nodePort"):
            entry["node_port"] = p["nodePort"]
        ports.append(entry)
        names.append((mname, kname, proto))
    data: dict[str, Any] = {"namespace": ns, "name": name, "vips": vips, "ports": ports}
    if spec.get("sessionAffinity") == "ClientIP":
        data["session_affinity"] = "ClientIP"
        timeout = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
        if timeout is not None:
            data["affinity_timeout_seconds"] = timeout
    for key, field in (("internalTrafficPolicy", "internal_traffic_policy"),
                       ("externalTrafficPolicy", "external_traffic_policy")):
        if spec.get(key):
            # "Local" and "Cluster"; the long-deprecated spelling "OnlyLocal" means Local
            data[field] = "Local" if spec[key] in ("Local", "OnlyLocal") else spec[key]
    if spec.get("externalIPs"):
        data["external_ips"] = list(spec["externalIPs"])
    if spec.get("type") == "LoadBalancer":
        ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        lb_ips = [i["ip"] for i in ingress if i.get("ip") and i.get("ipMode") != "Proxy"]
        if lb_ips:
            data["load_balancer_ips"] = lb_ips
        if spec.get("loadBalancerSourceRanges"):
            data["load_balancer_source_ranges"] = [r.strip() for r in spec["loadBalancerSourceRanges"]]
        if spec.get("healthCheckNodePort"):
            data["health_check_node_port"] = spec["healthCheckNodePort"]
    # kube-proxy reads the deprecated annotation first; "Auto"/"auto" turn hints on, any
    # other value (a typo, "Disabled") leaves them off -- never a rejected service
    mode = annotations.get(TOPOLOGY_HINTS_OLD) or annotations.get(TOPOLOGY_MODE)
    if isinstance(mode, str) and mode.strip() in ("Auto", "auto"):
        data["topology_mode"] = "Auto"
    elif mode is not None:
        log.debug("kubernetes: service %s: topology annotation %r ignored", at, mode)
    dist = spec.get("trafficDistribution")
    if dist in ("PreferClose", "PreferSameZone", "PreferSameNode"):
        # PreferSameNode: node hints are not read yet; zone hints stand in for them
        data["traffic_distribution"] = "PreferClose" if dist == "PreferSameNode" else dist
    elif dist is not None:
        log.debug("kubernetes: service %s: trafficDistribution %r ignored", at, dist)
    record = parse_service(data, at)
    return ServiceBase(record, tuple(names), str(meta.get("resourceVersion", "")))


def slice_info(obj: dict[str, Any]) -> SliceInfo:
    """What a slice contributes (never raises: a bad endpoint is caught in compose)."""
    meta = _meta(obj)
    ns = meta.get("namespace", "")
    svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    ports: list[tuple[str, str, int]] = []
    for p in obj.get("ports") or []:
        if isinstance(p.get("port"), int):
            ports.append((p.get("name") or "", p.get("protocol") or "TCP", p["port"]))
    eps = []
    if obj.get("addressType") in ("IPv4", "IPv6"):  # FQDN slices: not proxied (as kube-proxy)
        for ep in obj.get("endpoints") or []:  # `endpoints: null` on an empty slice
            addrs = ep.get("addresses") or []
            if not addrs:
                continue
            c = ep.get("conditions") or {}
            hints = (ep.get("hints") or {}).get("forZones")
            zones = tuple(h.get("name", "") for h in hints) if hints is not None else None
            eps.append((addrs[0], c.get("ready"), c.get("serving"), c.get("terminating"),
                        ep.get("nodeName"), ep.get("zone"), zones))
    return SliceInfo(meta.get("name", ""), f"{ns}/{svc}" if svc else "", tuple(ports), tuple(eps))


def compose(base: ServiceBase, slices: Iterable[SliceInfo]) -> tuple[Service, tuple[RecordError, ...]]:
    """The record with endpoints from every slice of the service, sorted by slice name. As
    kube-proxy does, duplicates are removed per (service port, address): the first slice
    that gives an address a port wins it, and an address serving different ports from
    different slices serves them all (one endpoint record, its port maps merged)."""
    rec = base.record
    at = where(rec.namespace, rec.name)
    merged: dict[str, tuple[dict[str, int], dict[str, Any], str]] = {}  # addr -> ports, data
    for sl in sorted(slices, key=lambda s: s.name):
        numbers = {(n, proto): port for n, proto, port in sl.ports}
        ports = {m: numbers[(k, proto)] for m, k, proto in base.port_names if (k, proto) in numbers}
        if not ports:
            continue  # a slice for none of the service's ports (or `ports: null`)
        for addr, ready, serving, terminating, node, zone, zones in sl.endpoints:
            if addr in merged:
                have = merged[addr][0]
                for name, number in ports.items():
                    have.setdefault(name, number)
                continue
            data: dict[str, Any] = {"address": addr,
                                    "ready": True if ready is None else ready,
                                    # the API: absent means true (kube-proxy's reading)
                                    "serving": True if serving is None else serving,
                                    "terminating": bool(terminating)}
            if node:
                data["node"] = node
            if zone:
                data["zone"] = zone
            if zones is not None:
                data["hints_for_zones"] = list(zones)
            merged[addr] = (dict(ports), data, f"{at} slice {sl.name}")
    out: list[Endpoint] = []
    problems: list[RecordError] = []
    for addr, (ports, data, where_) in merged.items():
        try:
            ep = parse_endpoint({**data, "ports": ports}, where_)
        except RecordError as e:
            problems.append(e)
            continue
        why = None if rec.allow_local_endpoints else local_endpoint_problem(ep.address)
        if why:  # the model's check (the record is not validated again below)
            problems.append(RecordError(where_, local_endpoint_reason(ep.address, rec.key)))
            continue
        out.append(ep)
    out.sort(key=lambda e: (e.address.version, int(e.address)))
    return rec.model_copy(update={"endpoints": tuple(out)}), tuple(problems)


def translate(service: dict[str, Any], slices: Iterable[dict[str, Any]]) -> Service | Skip:
    """One Service and its slices -> a record (Skip, or RecordError for the service itself;
    a bad endpoint is dropped). Slices of other services are ignored."""
    base = service_base(service)
    if isinstance(base, Skip):
        return base
    key = service_key(service)
    infos = [i for i in map(slice_info, slices) if i.service == key]
    return compose(base, infos)[0]


def node_zone(node: dict[str, Any]) -> str | None:
    """A Node's zone label (topology.kubernetes.io/zone, else the deprecated beta label)."""
    labels = _meta(node).get("labels") or {}
    return labels.get(ZONE_LABEL) or labels.get(ZONE_LABEL_OLD) or None
