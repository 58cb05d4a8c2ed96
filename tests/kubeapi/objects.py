"""API objects shaped as `kubectl get -o json` prints them (every field the API server
defaults is present), for the test server and the translation tests."""

from __future__ import annotations

from typing import Any


def service(ns: str, name: str, cluster_ips: list[str], ports: list[dict[str, Any]], *,
            type_: str = "ClusterIP", labels: dict[str, str] | None = None,
            annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """ports: [{name, port, targetPort, protocol?, nodePort?}]"""
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips] if cluster_ips != ["None"] else ["IPv4"]
    full_ports = [{"protocol": "TCP", **p} for p in ports]
    if type_ == "ClusterIP":
        for p in full_ports:
            p.pop("nodePort", None)
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {
            "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
            "internalTrafficPolicy": "Cluster", "ipFamilies": families,
            "ipFamilyPolicy": "RequireDualStack" if len(cluster_ips) > 1 else "SingleStack",
            "ports": full_ports, "selector": {"app": name}, "sessionAffinity": "None", "type": type_,
        },
        "status": {"loadBalancer": {}},
    }
    if type_ in ("NodePort", "LoadBalancer"):
        body["spec"]["externalTrafficPolicy"] = "Cluster"
    body["spec"].update(spec)
    return body


def endpoint(ip: str, node: str | None = "node-a", zone: str | None = "zone-a", *, ready: bool | None = True,
             serving: bool | None = True, terminating: bool | None = False,
             for_zones: list[str] | None = None, pod: str | None = None) -> dict[str, Any]:
    conds = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
             if v is not None}
    ep: dict[str, Any] = {"addresses": [ip], "conditions": conds}
    if node:
        ep["nodeName"] = node
    if zone:
        ep["zone"] = zone
    if pod:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default", "uid": "0" * 8}
    if for_zones is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in for_zones]}
    return ep


def endpoint_slice(ns: str, name: str, service_name: str, endpoints: list[dict[str, Any]] | None,
                   ports: list[dict[str, Any]] | None, family: str = "IPv4",
                   annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """ports: [{name, port, protocol?}] (the pod's port numbers). endpoints None: `endpoints: null`
    as the API sends for a slice with none."""
    meta: dict[str, Any] = {
        "name": name, "namespace": ns, "generateName": f"{service_name}-",
        "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                   "kubernetes.io/service-name": service_name},
        "ownerReferences": [{"apiVersion": "v1", "blockOwnerDeletion": True, "controller": True,
                             "kind": "Service", "name": service_name, "uid": "0" * 8}],
    }
    if annotations:
        meta["annotations"] = annotations
    return {"addressType": family, "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "endpoints": endpoints, "metadata": meta,
            "ports": None if ports is None else [{"protocol": "TCP", **p} for p in ports]}


def node(name: str, zone: str | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"podCIDR": "10.244.0.0/24"}, "status": {"addresses": [
                {"type": "InternalIP", "address": "192.0.2.10"}, {"type": "Hostname", "address": name}]}}
