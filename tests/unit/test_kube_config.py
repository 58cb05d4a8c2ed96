"""The `kubernetes` config section."""

from __future__ import annotations

import pytest

from meshd.config import load_config
from meshd.errors import ConfigError


def test_absent_is_off_empty_is_in_cluster_and_paths_resolve_from_the_file(tmp_path):
    cfg = tmp_path / "meshd.yaml"
    assert load_config(None, env={}).kubernetes is None
    cfg.write_text("kubernetes:\n")
    assert load_config(cfg, env={}).kubernetes.kubeconfig is None
    cfg.write_text("kubernetes:\n  kubeconfig: admin.conf\n")
    assert load_config(cfg, env={}).kubernetes.kubeconfig == tmp_path / "admin.conf"
    env = {"MESHD_KUBERNETES__KUBECONFIG": "/etc/kubernetes/meshd.conf"}
    assert str(load_config(None, env=env).kubernetes.kubeconfig) == "/etc/kubernetes/meshd.conf"


def test_unknown_key_is_named_with_the_fix(tmp_path):
    cfg = tmp_path / "meshd.yaml"
    cfg.write_text("kubernetes:\n  kubeconfg: x\n")
    with pytest.raises(ConfigError, match=r"kubernetes.kubeconfg: unknown key \(did you mean 'kubeconfig'\?\)"):
        load_config(cfg, env={})


def test_an_api_server_on_a_cluster_ip_is_refused_with_the_fix(tmp_path):
    """Review finding: meshd never translates its own connections, so an API server reached
    through the `kubernetes` ClusterIP is unreachable once kube-proxy is gone."""
    import json
    from ipaddress import ip_network

    import pytest

    from meshd.config import KubernetesConfig
    from meshd.errors import RegistryError
    from meshd.sources.kubernetes import check_api_server_reachable

    def kubeconfig(server):
        p = tmp_path / "kc"
        p.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        return KubernetesConfig(kubeconfig=p)
    cidrs = [ip_network("10.96.0.0/12")]
    with pytest.raises(RegistryError, match="KUBERNETES_SERVICE_HOST"):
        check_api_server_reachable(kubeconfig("https://10.96.0.1:443"), cidrs)
    check_api_server_reachable(kubeconfig("https://192.0.2.10:6443"), cidrs)  # a real address
    check_api_server_reachable(kubeconfig("https://api.example:6443"), cidrs)  # a name
