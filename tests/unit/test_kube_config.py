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
