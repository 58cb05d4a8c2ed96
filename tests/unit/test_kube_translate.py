"""Kubernetes objects (as `kubectl get -o json` prints them) -> meshd service records."""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_network

import pytest

from meshd.errors import RecordError
from meshd.sources.kubernetes_translate import Skip, node_zone, translate

# kubectl get svc web -o json (a dual-stack service with a named targetPort)
DUAL_STACK = json.loads("""
{
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "annotations": {"service.kubernetes.io/topology-mode": "Auto"},
        "creationTimestamp": "2024-05-02T09:12:44Z",
        "labels": {"app": "web"},
        "name": "web",
        "namespace": "shop",
        "resourceVersion": "48211",
        "uid": "7f0c6c1e-3b1a-4a53-9a43-2f1b8d0b7d11"
    },
    "spec": {
        "clusterIP": "10.96.14.7",
        "clusterIPs": ["10.96.14.7", "fd00:96::e07"],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "PreferDualStack",
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web-http"},
            {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9090}
        ],
        "selector": {"app": "web"},
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "type": "ClusterIP"
    },
    "status": {"loadBalancer": {}}
}
""")

# kubectl get endpointslices -l kubernetes.io/service-name=web -o json (items)
WEB_SLICES = json.loads("""
[
 {
    "addressType": "IPv4",
    "apiVersion": "discovery.k8s.io/v1",
    "endpoints": [
        {"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
         "hints": {"forZones": [{"name": "eu-west-1a"}]}, "nodeName": "node-a",
         "targetRef": {"kind": "Pod", "name": "web-6d4b9c-abcde", "namespace": "shop", "uid": "1"},
         "zone": "eu-west-1a"},
        {"addresses": ["10.244.2.9"], "conditions": {"ready": false, "serving": true, "terminating": true},
         "hints": {"forZones": [{"name": "eu-west-1b"}]}, "nodeName": "node-b",
         "targetRef": {"kind": "Pod", "name": "web-6d4b9c-fghij", "namespace": "shop", "uid": "2"},
         "zone": "eu-west-1b"}
    ],
    "kind": "EndpointSlice",
    "metadata": {
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-02T09:13:01Z"},
        "generateName": "web-", "generation": 4,
        "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                   "kubernetes.io/service-name": "web"},
        "name": "web-x7k2p", "namespace": "shop", "resourceVersion": "48302"
    },
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "metrics", "port": 9090, "protocol": "TCP"}]
 },
 {
    "addressType": "IPv4",
    "apiVersion": "discovery.k8s.io/v1",
    "endpoints": [
        {"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
         "nodeName": "node-a", "zone": "eu-west-1a"},
        {"addresses": ["10.244.3.3"], "conditions": {"ready": true, "serving": true, "terminating": false},
         "nodeName": "node-c", "zone": "eu-west-1c"}
    ],
    "kind": "EndpointSlice",
    "metadata": {"generateName": "web-", "labels": {"kubernetes.io/service-name": "web"},
                 "name": "web-zz9q1", "namespace": "shop", "resourceVersion": "48310"},
    "ports": [{"name": "http", "port": 8081, "protocol": "TCP"}, {"name": "metrics", "port": 9090, "protocol": "TCP"}]
 },
 {
    "addressType": "IPv6",
    "apiVersion": "discovery.k8s.io/v1",
    "endpoints": [
        {"addresses": ["fd00:244:1::5"], "conditions": {"ready": true}, "nodeName": "node-a"}
    ],
    "kind": "EndpointSlice",
    "metadata": {"labels": {"kubernetes.io/service-name": "web"}, "name": "web-v6abc", "namespace": "shop",
                 "resourceVersion": "48311"},
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
 },
 {
    "addressType": "IPv4",
    "apiVersion": "discovery.k8s.io/v1",
    "endpoints": null,
    "kind": "EndpointSlice",
    "metadata": {"labels": {"kubernetes.io/service-name": "web"}, "name": "web-empty", "namespace": "shop",
                 "resourceVersion": "48000"},
    "ports": null
 }
]
""")

# kubectl get svc edge -o json (LoadBalancer, eTP Local, unnamed port)
LOAD_BALANCER = json.loads("""
{
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "edge", "namespace": "default", "resourceVersion": "912"},
    "spec": {
        "allocateLoadBalancerNodePorts": true,
        "clusterIP": "10.96.200.1",
        "clusterIPs": ["10.96.200.1"],
        "externalIPs": ["198.51.100.7"],
        "externalTrafficPolicy": "Local",
        "healthCheckNodePort": 31999,
        "internalTrafficPolicy": "Local",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "loadBalancerSourceRanges": ["203.0.113.0/24", " 192.0.2.0/25"],
        "ports": [{"nodePort": 30443, "port": 443, "protocol": "TCP", "targetPort": 8443}],
        "selector": {"app": "edge"},
        "sessionAffinity": "None",
        "trafficDistribution": "PreferClose",
        "type": "LoadBalancer"
    },
    "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50", "ipMode": "VIP"},
                                            {"hostname": "lb.example.com"},
                                            {"ip": "203.0.113.51", "ipMode": "Proxy"}]}}
}
""")

EDGE_SLICE = json.loads("""
{
    "addressType": "IPv4", "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-a", "zone": "z1"}],
    "metadata": {"labels": {"kubernetes.io/service-name": "edge"}, "name": "edge-1", "namespace": "default"},
    "ports": [{"name": "", "port": 8443, "protocol": "TCP"}]
}
""")


def _copy(obj):
    return json.loads(json.dumps(obj))


def test_dual_stack_named_target_ports_resolved_per_slice_and_merged():
    svc = translate(DUAL_STACK, WEB_SLICES)
    assert not isinstance(svc, Skip)
    assert (svc.namespace, svc.name) == ("shop", "web")
    assert svc.vips == (ip_address("10.96.14.7"), ip_address("fd00:96::e07"))
    assert [(p.name, p.port, p.protocol) for p in svc.ports] == [("http", 80, "TCP"), ("metrics", 9090, "TCP")]
    assert svc.session_affinity == "ClientIP" and svc.affinity_timeout_seconds == 600
    assert svc.topology_mode == "Auto"
    eps = {str(e.address): e for e in svc.endpoints}
    # 10.244.1.5 is in two slices: once, from the first slice by name (web-x7k2p's 8080 wins
    # over web-zz9q1's 8081)
    assert sorted(eps) == ["10.244.1.5", "10.244.2.9", "10.244.3.3", "fd00:244:1::5"]
    assert dict(eps["10.244.1.5"].ports) == {"http": 8080, "metrics": 9090}
    assert dict(eps["10.244.3.3"].ports) == {"http": 8081, "metrics": 9090}
    assert dict(eps["fd00:244:1::5"].ports) == {"http": 8080}  # this slice has no metrics port
    a, b = eps["10.244.1.5"], eps["10.244.2.9"]
    assert (a.ready, a.serving, a.terminating, a.node, a.zone, a.hints_for_zones) == \
        (True, True, False, "node-a", "eu-west-1a", ("eu-west-1a",))
    assert (b.ready, b.is_serving, b.terminating, b.node, b.hints_for_zones) == \
        (False, True, True, "node-b", ("eu-west-1b",))
    # conditions.serving absent: true, as kube-proxy reads the API
    assert eps["fd00:244:1::5"].serving is True and eps["fd00:244:1::5"].terminating is False


def test_an_address_in_two_slices_for_different_ports_serves_both():
    """kube-proxy dedupes per (service port, address): a pod listed in one slice for `http`
    and in another for `metrics` serves both (review finding: it lost `metrics`)."""
    from kubeapi.objects import endpoint, endpoint_slice, service
    svc = service("d", "w", ["10.96.0.9"], [{"name": "http", "port": 80, "targetPort": 8080},
                                              {"name": "metrics", "port": 90, "targetPort": 9090}])
    a = endpoint_slice("d", "w-a", "w", [endpoint("10.244.0.7")], [{"name": "http", "port": 8080}])
    b = endpoint_slice("d", "w-b", "w", [endpoint("10.244.0.7")], [{"name": "metrics", "port": 9090}])
    rec = translate(svc, [a, b])
    assert [dict(e.ports) for e in rec.endpoints] == [{"http": 8080, "metrics": 9090}]


def test_a_metadata_address_in_a_slice_is_refused_like_any_record():
    from kubeapi.objects import endpoint, endpoint_slice, service
    from meshd.sources.kubernetes_translate import compose, service_base, slice_info
    svc = service("d", "w", ["10.96.0.9"], [{"name": "http", "port": 80, "targetPort": 8080}])
    sl = endpoint_slice("d", "w-a", "w", [endpoint("168.63.129.16"), endpoint("10.244.0.8")],
                        [{"name": "http", "port": 8080}])
    rec, problems = compose(service_base(svc), [slice_info(sl)])
    assert [str(e.address) for e in rec.endpoints] == ["10.244.0.8"]
    assert "cloud metadata address" in problems[0].reason


@pytest.mark.parametrize("annotation,want", [("Auto", "Auto"), ("auto", "Auto"), ("Auto ", "Auto"),
                                             ("Disabled", None), ("x" * 300, None)])
def test_topology_annotation_values_never_reject_the_service(annotation, want):
    from kubeapi.objects import service
    svc = service("d", "w", ["10.96.0.9"], [{"name": "http", "port": 80, "targetPort": 8080}],
                  annotations={"service.kubernetes.io/topology-mode": annotation})
    rec = translate(svc, [])
    assert rec.topology_mode == want


def test_load_balancer_fields_and_unnamed_port():
    svc = translate(LOAD_BALANCER, [EDGE_SLICE])
    assert not isinstance(svc, Skip)
    (port,) = svc.ports
    assert (port.name, port.port, port.node_port) == ("tcp-443", 443, 30443)
    assert svc.external_ips == (ip_address("198.51.100.7"),)
    assert svc.load_balancer_ips == (ip_address("203.0.113.50"),)  # hostname-only and ipMode Proxy: not ours
    assert svc.load_balancer_source_ranges == (ip_network("203.0.113.0/24"), ip_network("192.0.2.0/25"))
    assert (svc.external_traffic_policy, svc.internal_traffic_policy) == ("Local", "Local")
    assert svc.health_check_node_port == 31999
    assert svc.traffic_distribution == "PreferClose" and svc.topology_mode is None
    assert [(str(e.address), dict(e.ports)) for e in svc.endpoints] == [("10.244.1.7", {"tcp-443": 8443})]


def test_cluster_ip_service_has_no_node_port_and_other_services_slices_are_ignored():
    svc = _copy(LOAD_BALANCER)
    svc["spec"]["type"] = "ClusterIP"
    other = _copy(EDGE_SLICE)
    other["metadata"]["labels"]["kubernetes.io/service-name"] = "not-edge"
    rec = translate(svc, [other])
    assert rec.ports[0].node_port is None and rec.load_balancer_ips == () and rec.endpoints == ()
    assert rec.health_check_node_port is None  # only on LoadBalancer services


@pytest.mark.parametrize("change, reason", [
    (lambda s: s["spec"].update(type="ExternalName", externalName="db.example.com"), "ExternalName"),
    (lambda s: s["spec"].update(clusterIP="None", clusterIPs=["None"]), "headless"),
    (lambda s: s["metadata"].setdefault("labels", {}).update(
        {"service.kubernetes.io/service-proxy-name": "other-proxy"}), "another proxy"),
    (lambda s: s["metadata"].setdefault("labels", {}).update({"service.kubernetes.io/headless": ""}), "headless"),
    (lambda s: s["spec"].update(clusterIP="", clusterIPs=[]), "no cluster IP"),
])
def test_skipped_services(change, reason):
    svc = _copy(DUAL_STACK)
    change(svc)
    out = translate(svc, WEB_SLICES)
    assert isinstance(out, Skip) and reason in out.reason


def test_sctp_is_a_rejected_record_with_the_reason():
    svc = _copy(DUAL_STACK)
    svc["spec"]["ports"][1]["protocol"] = "SCTP"
    with pytest.raises(RecordError) as e:
        translate(svc, WEB_SLICES)
    assert e.value.where == "kubernetes service shop/web"
    assert "ports[1]: protocol 'SCTP' is not supported" in e.value.reason


def test_a_bad_endpoint_is_dropped_alone():
    slices = _copy(WEB_SLICES)
    slices[1]["endpoints"][1]["addresses"] = ["not-an-ip"]
    from meshd.sources.kubernetes_translate import compose, service_base, slice_info
    rec, problems = compose(service_base(DUAL_STACK), [slice_info(s) for s in slices])
    assert "10.244.3.3" not in {str(e.address) for e in rec.endpoints} and len(rec.endpoints) == 3
    assert len(problems) == 1 and "slice web-zz9q1" in problems[0].where


def test_bad_vip_is_a_record_error():
    svc = _copy(DUAL_STACK)
    svc["spec"]["clusterIPs"] = ["10.96.14.7", "10.96.14.7"]
    with pytest.raises(RecordError, match="listed twice"):
        translate(svc, [])


def test_node_zone():
    assert node_zone({"metadata": {"labels": {"topology.kubernetes.io/zone": "z1"}}}) == "z1"
    assert node_zone({"metadata": {"labels": {"failure-domain.beta.kubernetes.io/zone": "old"}}}) == "old"
    assert node_zone({"metadata": {"name": "n"}}) is None
