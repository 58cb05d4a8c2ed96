"""deploy/kubernetes: every manifest validates against the Kubernetes schema (lightkube's models:
typed decoding, and a round trip that loses nothing, so an unknown or misspelt field fails), the
RBAC rules cover exactly what the source calls, and the DaemonSet fits meshd's config."""

from __future__ import annotations

import copy
from pathlib import Path
from urllib.parse import urlsplit

import lightkube.codecs
import pytest
import yaml

from meshd.config import load_config, split_host_port
from meshd.sources import kubernetes as source

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _docs() -> list[dict]:
    return [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def _by_kind(kind: str) -> dict:
    (doc,) = [d for d in _docs() if d["kind"] == kind]
    return doc


def _strip_nulls(v):
    if isinstance(v, dict):
        return {k: _strip_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_strip_nulls(x) for x in v]
    return v


def test_every_manifest_validates_against_the_schema():
    kinds = sorted(d["kind"] for d in _docs())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
    for doc in _docs():
        obj = lightkube.codecs.from_dict(copy.deepcopy(doc))  # typed: a wrong type raises
        assert type(obj).__name__ == doc["kind"]
        assert _strip_nulls(obj.to_dict()) == doc, f"{doc['kind']}: a field the schema does not know"


def test_the_schema_check_catches_a_misspelt_field():
    ds = copy.deepcopy(_by_kind("DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetWork"] = True
    assert _strip_nulls(lightkube.codecs.from_dict(ds).to_dict()) != ds


def _api_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every request the source makes."""
    calls = set()
    for path in (source.SERVICES, source.SLICES, source.NODES):
        parts = urlsplit(path).path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        for verb in ("list", "watch"):  # _list() and _watch() on each path
            calls.add((group, parts[-1], verb))
    return calls


def test_rbac_grants_exactly_read_access_to_what_the_source_calls():
    role = _by_kind("ClusterRole")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert _api_calls() <= granted
    assert {v for _, _, v in granted} == {"get", "list", "watch"}
    assert {(g, r) for g, r, _ in granted} == {(g, r) for g, r, _ in _api_calls()}
    binding, sa = _by_kind("ClusterRoleBinding"), _by_kind("ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def test_daemonset_runs_the_configmap_config_like_kube_proxy(tmp_path):
    ds, cm = _by_kind("DaemonSet"), _by_kind("ConfigMap")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == _by_kind("ServiceAccount")["metadata"]["name"]
    assert {"operator": "Exists"} in pod["tolerations"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    assert {"BPF", "NET_ADMIN", "SYS_ADMIN"} <= set(c["securityContext"]["capabilities"]["add"])
    # the config the pod reads is a valid meshd config, in Kubernetes mode, without etcd
    cfg_file = "meshd.yaml"
    # the API server's real address reaches the pod (a ClusterIP would be unreachable)
    env = {e["name"]: e for e in c["env"]}
    for var, key in (("KUBERNETES_SERVICE_HOST", "api-server-host"),
                     ("KUBERNETES_SERVICE_PORT", "api-server-port")):
        assert env[var]["valueFrom"]["configMapKeyRef"] == {"name": cm["metadata"]["name"],
                                                            "key": key} and key in cm["data"]
    (tmp_path / cfg_file).write_text(cm["data"][cfg_file])
    cfg = load_config(tmp_path / cfg_file, env={"NODE_NAME": "n1"})
    assert cfg.kubernetes is not None and cfg.kubernetes.kubeconfig is None and cfg.etcd is None
    assert c["command"][-1] == f"/etc/meshd/{cfg_file}"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[[n for n, p in mounts.items() if p == "/etc/meshd"][0]]["configMap"]["name"] == cm["metadata"]["name"]
    host = {mounts[n]: v["hostPath"]["path"] for n, v in vols.items() if "hostPath" in v}
    assert host[str(cfg.bpffs)] == "/sys/fs/bpf" and host[str(cfg.cgroup)] == "/sys/fs/cgroup"
    assert host[str(cfg.state_dir)] == "/var/lib/meshd"
    # probes hit meshd's healthz listener: /livez (liveness), /healthz (readiness)
    port = split_host_port(cfg.healthz.listen)[1]
    assert (c["livenessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["port"]) == ("/livez", port)
    assert (c["readinessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["port"]) == ("/healthz", port)


@pytest.mark.parametrize("line", ["FROM debian:12-slim AS build", "FROM debian:12-slim"])
def test_containerfile_builds_on_debian_12(line):
    text = (DEPLOY / "Containerfile").read_text()
    assert line in text.splitlines()
    assert "bash bpf/build.sh" in text and "pip install --no-cache-dir /src" in text
