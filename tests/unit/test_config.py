"""meshd.config: defaults, file + environment, and errors that name the key and the fix."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from meshd.config import Config, load_config, unused_env
from meshd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "meshd.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error(path: Path | None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, env or {})
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg and "pydantic" not in msg
    return msg


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.instance == "default"
    assert cfg.cgroup == Path("/sys/fs/cgroup/unified")
    assert cfg.bpffs == Path("/sys/fs/bpf") and cfg.state_dir == Path("/var/lib/meshd")
    assert cfg.services_file is None
    assert cfg.etcd is not None and cfg.etcd.embedded  # no etcd section = embedded etcd
    assert cfg.etcd.endpoints == [] and cfg.etcd.password is None
    assert cfg.service_cidrs == [ip_network("10.96.0.0/12"), ip_network("fd00:96::/108")]
    assert cfg.metrics.listen == "127.0.0.1:9469"
    assert cfg.maglev.table_size == "auto" and cfg.maglev.fixed_size == 0
    assert cfg.maglev.max_table_size == 65521
    assert cfg.tc.interfaces == [] and cfg.log_level == "info"
    assert cfg.pin_dir == Path("/sys/fs/bpf/meshd/default")


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()
    assert load_config(write(tmp_path, "metrics:\nmaglev:\ntc:\n"), env={}) == Config()


def test_example_production_config_loads() -> None:
    cfg = load_config(REPO / "config" / "meshd.yaml", env={})
    assert cfg.cgroup == Path("/sys/fs/cgroup/unified")
    assert cfg.etcd is not None and cfg.etcd.embedded and cfg.etcd.prefix == "/meshd/"


def test_null_etcd_turns_etcd_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "etcd: null\n"), env={}).etcd is None
    assert load_config(write(tmp_path, "etcd:\n"), env={}).etcd is None


def test_etcd_defaults(tmp_path: Path) -> None:
    etcd = load_config(write(tmp_path, "etcd: {}\n"), env={}).etcd
    assert etcd is not None and etcd.endpoints == [] and etcd.embedded
    assert (etcd.prefix, etcd.dial_timeout, etcd.username, etcd.password) == ("/meshd/", 5.0, None, None)


def test_non_prime_table_size_suggests_neighbours(tmp_path: Path) -> None:
    p = write(tmp_path, "maglev:\n  table_size: 16380\n")
    assert error(p) == f"config {p}: maglev.table_size: 16380 is not prime; nearest primes are 16369 and 16381"
    # 16-bit slots: 65537 (accepted before layout 3) is refused by name
    assert "must be a prime between 251 and 65521 (got 65537)" in error(write(tmp_path, "maglev: {table_size: 65537}"))
    assert error(write(tmp_path, "maglev: {table_size: 252}")).endswith("nearest primes are 251 and 257")
    assert error(write(tmp_path, "maglev: {table_size: 65520}")).endswith("nearest primes are 65519 and 65521")
    for prime in (251, 16381, 65521):
        assert load_config(write(tmp_path, f"maglev: {{table_size: {prime}}}"), env={}).maglev.table_size == prime


def test_unknown_keys_are_named_with_valid_keys(tmp_path: Path) -> None:
    msg = error(write(tmp_path, "maglv: {}\n"))
    assert "maglv: unknown key (did you mean 'maglev'?); valid keys: instance, cgroup" in msg
    msg = error(write(tmp_path, "maglev:\n  tablesize: 251\n"))
    assert "maglev.tablesize: unknown key (did you mean 'table_size'?); valid keys: table_size" in msg
    assert "etcd.endpoint: unknown key (did you mean 'endpoints'?)" in error(write(tmp_path, "etcd: {endpoint: []}"))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    assert error(p).startswith(f"config {p}: no such file; check the path")


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, "instance: a\nmaglev:\n  table_size: [1,\n")
    assert error(p).startswith(f"config {p}: invalid YAML at line 4, column 1:")
    assert "line 2, column 1: duplicate key 'instance' (first at line 1)" in error(write(tmp_path, "instance: a\ninstance: b\n"))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "the top level must be a mapping" in error(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("text,expect", [
    ("instance: Prod", "instance: must be 1-32 lowercase letters"),
    ("cgroup: sys/fs/cgroup", "cgroup: must be an absolute path (got 'sys/fs/cgroup')"),
    ("log_level: verbose", "log_level: must be 'debug', 'info', 'warning' or 'error' (got 'verbose')"),
    ("service_cidrs: [10.96.0.1/12]", "service_cidrs[0]: 10.96.0.1/12 has host bits set; did you mean 10.96.0.0/12?"),
    ("service_cidrs: []", "service_cidrs: must list at least one entry"),
    ("metrics: {listen: '::1:9469'}", "metrics.listen: write IPv6 in brackets, e.g. [::1]:9469"),
    ("metrics: {listen: '127.0.0.1:70000'}", "metrics.listen: port must be 0-65535 (0: any free port)"),
    ("metrics: {listen: ':9469'}", "use 0.0.0.0:PORT"),
    ("etcd: {prefix: meshd}", "etcd.prefix: must start and end with '/'"),
    ("etcd: {endpoints: ['127.0.0.1']}", "etcd.endpoints[0]: must be http(s)://host:port, host:port or unix:///path"),
    ("etcd: {endpoints: ['unix://relative.sock']}", "etcd.endpoints[0]: must be http(s)://host:port, host:port"),
    ("etcd: {username: u, password: p, password_file: /p}", "etcd: set password or password_file, not both"),
    ("etcd: {username: u}", "etcd: username and password (or password_file) must be set together"),
    ("etcd: {cert_file: c.pem}", "etcd: cert_file and key_file must be set together"),
    ("etcd: {dial_timeout: 0}", "etcd.dial_timeout: must be > 0"),
    ("tc: {interfaces: [eth0, eth0]}", "tc.interfaces: 'eth0' is listed twice"),
    ("tc: {interfaces: [a-very-long-ifname]}", "is not a network interface name"),
])
def test_bad_values_name_the_key_and_fix(tmp_path: Path, text: str, expect: str) -> None:
    p = write(tmp_path, text + "\n")
    msg = error(p)
    assert msg.startswith(f"config {p}: ") and expect in msg


def test_valid_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
instance: edge-1
log_level: DEBUG
metrics: {listen: "[::1]:9469"}
etcd: {endpoints: ["https://10.0.0.1:2379"], prefix: /x/, username: u, password: p}
tc: {interfaces: [eth0]}
"""), env={})
    assert cfg.pin_dir == Path("/sys/fs/bpf/meshd/edge-1") and cfg.log_level == "debug"
    assert cfg.metrics.listen == "[::1]:9469"
    assert cfg.etcd is not None and not cfg.etcd.embedded and cfg.etcd.password == "p"


def test_password_never_shown(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "etcd: {username: u, password: s3cret-pw}\n"), env={})
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in str(cfg)
    assert "12345" not in error(write(tmp_path, "etcd: {username: u, password: 12345}\n"))


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "services_file: svc.yaml\netcd: {ca_file: ca.pem}\n"), env={})
    assert cfg.services_file == tmp_path / "svc.yaml"
    assert cfg.etcd is not None and cfg.etcd.ca_file == tmp_path / "ca.pem"
    assert load_config(write(tmp_path, "services_file: /abs/s.yaml\n"), env={}).services_file == Path("/abs/s.yaml")


# ---- environment ------------------------------------------------------------------------------

def test_environment_overrides_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "instance: fromfile\nmaglev: {table_size: 251}\n")
    cfg = load_config(p, env={"MESHD_INSTANCE": "fromenv", "MESHD_MAGLEV__TABLE_SIZE": "65521",
                              "MESHD_LOG_LEVEL": "warning", "MESHD_BPFFS": "/mnt/bpf",
                              "MESHD_CGROUP": "/sys/fs/cgroup", "MESHD_SERVICE_CIDRS": "10.0.0.0/8, fd00::/64",
                              "MESHD_ETCD__ENDPOINTS": "http://10.0.0.1:2379,http://10.0.0.2:2379"})
    assert (cfg.instance, cfg.maglev.table_size, cfg.log_level) == ("fromenv", 65521, "warning")
    assert cfg.pin_dir == Path("/mnt/bpf/meshd/fromenv") and cfg.cgroup == Path("/sys/fs/cgroup")
    assert cfg.service_cidrs == [ip_network("10.0.0.0/8"), ip_network("fd00::/64")]
    assert cfg.etcd is not None and len(cfg.etcd.endpoints) == 2


def test_empty_env_list_turns_on_embedded_etcd_and_empty_optional_clears() -> None:
    cfg = load_config(None, env={"MESHD_ETCD__ENDPOINTS": ""})
    assert cfg.etcd is not None and cfg.etcd.embedded
    assert load_config(None, env={"MESHD_SERVICES_FILE": ""}).services_file is None


def test_env_error_names_the_variable() -> None:
    msg = error(None, {"MESHD_MAGLEV__TABLE_SIZE": "16380"})
    assert msg == ("config (no file): maglev.table_size (from MESHD_MAGLEV__TABLE_SIZE): "
                   "16380 is not prime; nearest primes are 16369 and 16381")
    assert "instance (from MESHD_INSTANCE): must be 1-32" in error(None, {"MESHD_INSTANCE": "Bad Name"})


def test_env_relative_path_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(conf_dir, "services_file: a.yaml\n"), env={"MESHD_SERVICES_FILE": "b.yaml"})
    assert cfg.services_file == tmp_path / "b.yaml"


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHD_INSTANCE", "viaenv")
    monkeypatch.setenv("MESHD_SOMETHING_ELSE", "ignored")
    assert load_config(None).instance == "viaenv"
    assert "MESHD_SOMETHING_ELSE" in unused_env() and "MESHD_INSTANCE" not in unused_env()


def test_etcd_endpoints_as_etcdctl_takes_them(tmp_path: Path) -> None:
    """Issue 12 item 13: host:port means http://host:port, as in etcdctl --endpoints."""
    cfg = load_config(write(tmp_path, "etcd: {endpoints: ['127.0.0.1:2379', '[::1]:2379', 'etcd-1:2379', "
                            "'https://etcd-2:2379/', 'unix:///run/etcd.sock:1']}\n"), env={})
    assert cfg.etcd is not None and cfg.etcd.endpoints == [
        "http://127.0.0.1:2379", "http://[::1]:2379", "http://etcd-1:2379", "https://etcd-2:2379",
        "unix:///run/etcd.sock:1"]
    env = load_config(None, env={"MESHD_ETCD__ENDPOINTS": "10.0.0.1:2379,10.0.0.2:2379"})
    assert env.etcd is not None and env.etcd.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]


def test_password_file_is_read_relative_to_the_config_file(tmp_path: Path, caplog) -> None:
    secret = tmp_path / "etcd-password"
    secret.write_text("s3cret pass\n")
    secret.chmod(0o600)
    cfg = load_config(write(tmp_path, "etcd: {endpoints: ['https://e:2379'], username: meshd, "
                            "password_file: etcd-password}\n"), env={})
    assert cfg.etcd is not None and cfg.etcd.password == "s3cret pass"  # one trailing newline stripped
    assert cfg.etcd.password_file == secret
    assert "password_file" not in caplog.text
    secret.write_text("two\n\n")
    secret.chmod(0o644)
    env = {"MESHD_ETCD__USERNAME": "meshd", "MESHD_ETCD__PASSWORD_FILE": str(secret)}
    cfg = load_config(None, env=env)
    assert cfg.etcd is not None and cfg.etcd.password == "two\n"
    assert f"etcd.password_file {secret} can be read by other users (mode 644); chmod 600 it" in caplog.text
    assert "two" not in caplog.text


def test_password_file_problems_name_the_file_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    msg = error(write(tmp_path, f"etcd: {{username: u, password_file: {missing}}}\n"))
    assert f"etcd.password_file {missing}: cannot read: No such file or directory" in msg
    (tmp_path / "empty").write_text("\n")
    msg = error(write(tmp_path, "etcd: {username: u, password_file: empty}\n"))
    assert "the file is empty; write the etcd password in it" in msg


def test_old_embedded_listen_keys_still_load_with_a_warning(tmp_path: Path, caplog) -> None:
    """The embedded etcd no longer listens on TCP: configs that set its ports keep loading."""
    cfg = load_config(write(tmp_path, "etcd: {embedded_listen: 127.0.0.1:12379, "
                            "embedded_peer_listen: 127.0.0.1:12380}\n"), env={})
    assert cfg.etcd is not None and cfg.etcd.embedded
    assert "etcd.embedded_listen is ignored and can be removed" in caplog.text
    assert "etcd.embedded_peer_listen is ignored" in caplog.text


def test_cli_reads_the_installed_config_when_none_is_given(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from meshd import cli
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", tmp_path / "meshd.yaml")
    assert cli.config_path(SimpleNamespace(config=None)) is None  # not installed: defaults
    (tmp_path / "meshd.yaml").write_text("instance: vm\n")
    assert cli.config_path(SimpleNamespace(config=None)) == tmp_path / "meshd.yaml"
    assert cli.config_path(SimpleNamespace(config="x.yaml")) == Path("x.yaml")  # --config wins


def test_events_section_and_its_errors(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "events: {types: [denied], sample: 10, "
                                      "rate_per_cpu: 0, ring_bytes: 65536}\n"), {})
    assert cfg.events.types == ["denied"] and cfg.events.ring_bytes == 65536
    assert "events.ring_bytes" in error(write(tmp_path, "events: {ring_bytes: 5000}\n"))
    assert "power of two" in error(write(tmp_path, "events: {ring_bytes: 5000}\n"))
    msg = error(write(tmp_path, "events: {types: [connects]}\n"))
    assert "events.types" in msg and "connect" in msg
    assert "events.sample" in error(write(tmp_path, "events: {sample: 0}\n"))


def test_a_reload_applies_events_but_names_the_ring_size_as_restart_only(tmp_path: Path) -> None:
    from meshd.agent.reload import plan_reload
    old = load_config(write(tmp_path, "events: {sample: 1}\n"), {})
    new = load_config(write(tmp_path, "events: {sample: 5, ring_bytes: 4096}\n", "b.yaml"), {})
    plan = plan_reload(old, new)
    assert "events" in plan.applied and "events.ring_bytes" in plan.refused
    assert plan.config.events.sample == 5 and plan.config.events.ring_bytes == 1 << 20
