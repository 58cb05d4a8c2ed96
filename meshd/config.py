"""meshd configuration: THE one place that reads the config file and the environment.

Owns the Config model (every section extra=forbid), load_config(), and the strict YAML reader
(read_yaml: duplicate keys rejected) that the static services source reuses.

Precedence: defaults < YAML file < environment. Environment overrides use an explicit mapping
generated from the Config fields rather than pydantic-settings, so that (a) an error names the
variable that supplied the bad value, (b) relative paths resolve predictably (from the file:
against the file's directory; from the environment: against the working directory), and (c)
unknown YAML keys are rejected while unrelated MESHD_* variables are ignored (see unused_env):
  MESHD_<FIELD>              top-level field, e.g. MESHD_INSTANCE, MESHD_LOG_LEVEL, MESHD_CGROUP
  MESHD_<SECTION>__<FIELD>   section field, e.g. MESHD_MAGLEV__TABLE_SIZE, MESHD_ETCD__PASSWORD
List fields take comma-separated values (MESHD_SERVICE_CIDRS, MESHD_ETCD__ENDPOINTS,
MESHD_TC__INTERFACES); an empty value clears an optional field (or, for a list, empties it:
MESHD_ETCD__ENDPOINTS= turns on the embedded etcd).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import types
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, PlainValidator, ValidationError,
                      model_validator)
from pydantic_core import PydanticCustomError

from meshd.errors import ConfigError
from meshd.node import cgroup2_mount
from meshd.model import IPNetwork, StrictModel, explain_errors, format_loc, show

log = logging.getLogger("meshd.config")

ENV_PREFIX = "MESHD_"
# tables hold 16-bit slot indexes (meshd_maglev_v3): at most 65,535 slots, 65521 the prime
MAGLEV_MIN, MAGLEV_MAX = 251, 65521


def _fail(template: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError("config", "{msg}", {"msg": template.format(**ctx)})


# ---- field checks ----------------------------------------------------------------------------

def _not_empty(v: object) -> object:
    if v == "":
        raise _fail("must not be empty")
    return v


def _absolute(v: Path) -> Path:
    if not v.is_absolute():
        raise _fail("must be an absolute path (got {got})", got=show(str(v)))
    return v


AbsPath = Annotated[Path, BeforeValidator(_not_empty), AfterValidator(_absolute)]
AnyPath = Annotated[Path, BeforeValidator(_not_empty)]


def _cidr(v: object) -> IPNetwork:
    if not isinstance(v, str):
        raise _fail("must be a CIDR such as 10.96.0.0/12 (got {got})", got=show(v))
    try:
        return ip_network(v)
    except ValueError:
        pass
    try:
        fixed = ip_network(v, strict=False)
    except ValueError:
        raise _fail("must be a CIDR such as 10.96.0.0/12 (got {got})", got=show(v)) from None
    raise _fail("{got} has host bits set; did you mean {fixed}?", got=v, fixed=fixed)


def _non_empty_list(v: list[Any]) -> list[Any]:
    if not v:
        raise _fail("must list at least one entry")
    return v


def _etcd_url(v: str) -> str:
    """An etcd endpoint as etcdctl takes it: http(s)://host:port, host:port (= http://), or
    unix:///absolute/path. Returns the URL with its scheme."""
    if isinstance(v, str) and "://" not in v:
        try:
            split_host_port(v)
            v = f"http://{v}"  # etcdctl's default scheme
        except ValueError:
            pass
    try:
        u = urlsplit(v)
        if u.scheme == "unix":
            ok = not u.netloc and u.path.startswith("/") and u.path != "/" and not (u.query or u.fragment)
        else:
            ok = u.scheme in ("http", "https") and bool(u.hostname) and u.port is not None \
                and u.path in ("", "/") and not (u.query or u.fragment or u.username)
    except ValueError:
        ok = False
    if not ok:
        raise _fail("must be http(s)://host:port, host:port or unix:///path, such as "
                    "https://etcd-1:2379 (got {got})", got=show(v))
    return v.rstrip("/") if u.scheme != "unix" else v


def _prefix(v: str) -> str:
    if not (v.startswith("/") and v.endswith("/")):
        raise _fail("must start and end with '/', e.g. /meshd/ (got {got})", got=show(v))
    return v


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def split_host_port(v: str, allow_zero: bool = False) -> tuple[str, int]:
    """'127.0.0.1:9469' / '[::1]:9469' / 'localhost:9469' -> (host, port); ValueError with a reason.
    `allow_zero`: port 0 (a listener: the kernel picks a free port)."""
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError("write IPv6 as [addr]:port, e.g. [::1]:9469")
        port = rest[1:]
        try:
            IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = v.rpartition(":")
        if not sep:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9469")
        if ":" in host:
            raise ValueError("write IPv6 in brackets, e.g. [::1]:9469")
        if not host:
            raise ValueError("host is missing; use 0.0.0.0:PORT to listen on every address")
        try:
            IPv4Address(host)
        except ValueError:
            if not _HOSTNAME.fullmatch(host) or host.replace(".", "").isdigit():
                raise ValueError(f"{host!r} is not an IPv4 address or host name") from None
    lowest = 0 if allow_zero else 1
    if not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError(f"port must be {lowest}-65535" + (" (0: any free port)" if allow_zero else "")
                         + f" (got {port!r})")
    return host, int(port)


def _listen(v: str) -> str:
    try:
        split_host_port(v, allow_zero=True)
    except ValueError as e:
        raise _fail("{reason} (got {got})", reason=e, got=show(v)) from None
    return v


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n ** 0.5) + 1))


def _table_size(v: int) -> int:
    if not MAGLEV_MIN <= v <= MAGLEV_MAX:
        raise _fail("must be a prime between {lo} and {hi} (got {got})", lo=MAGLEV_MIN, hi=MAGLEV_MAX, got=v)
    if not is_prime(v):
        below = next((n for n in range(v - 1, MAGLEV_MIN - 1, -1) if is_prime(n)), None)
        above = next((n for n in range(v + 1, MAGLEV_MAX + 1) if is_prime(n)), None)
        near = [n for n in (below, above) if n is not None]
        raise _fail("{v} is not prime; nearest prime{s} {w}", v=v, s="s are" if len(near) > 1 else " is",
                    w=" and ".join(map(str, near)))
    return v


def _table_size_or_auto(v: object) -> object:
    """maglev.table_size: `auto` (each group its own size) or a prime (every group that)."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail("must be `auto` or a prime between {lo} and {hi} (got {got})",
                    lo=MAGLEV_MIN, hi=MAGLEV_MAX, got=show(str(v)))
    return _table_size(v)


def _ifnames(v: list[str]) -> list[str]:
    for name in v:
        if not 1 <= len(name) <= 15 or name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
            raise _fail("{got} is not a network interface name (1-15 characters, no '/', ':' or spaces)",
                        got=show(name))
    dup = next((n for i, n in enumerate(v) if n in v[:i]), None)
    if dup is not None:
        raise _fail("{got} is listed twice", got=show(dup))
    return v


def _instance(v: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", v):
        raise _fail("must be 1-32 lowercase letters, digits, '_' or '-', starting with a letter or digit "
                    "(got {got}); it names the pin directory", got=show(v))
    return v


def _section(default: object) -> BeforeValidator:
    """`metrics:` with nothing after it (null) means the defaults."""
    return BeforeValidator(lambda v: default if v is None else v)


# ---- models ----------------------------------------------------------------------------------

class EtcdConfig(StrictModel):
    endpoints: list[Annotated[str, AfterValidator(_etcd_url)]] = []  # empty = embedded etcd
    prefix: Annotated[str, AfterValidator(_prefix)] = "/meshd/"
    ca_file: AnyPath | None = None
    cert_file: AnyPath | None = None
    key_file: AnyPath | None = None
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    # A file holding the password (one trailing newline stripped), read by load_config into
    # `password`; keeps the secret out of the YAML and the environment.
    password_file: AnyPath | None = None
    dial_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5.0
    # Deprecated and ignored (accepted so old configs still load): the embedded etcd listened
    # on these loopback ports; it now listens on unix sockets only root can reach (docs/etcd.md).
    embedded_listen: str | None = None
    embedded_peer_listen: str | None = None

    @property
    def embedded(self) -> bool:
        return not self.endpoints


    @model_validator(mode="after")
    def _pairs(self) -> EtcdConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise _fail("cert_file and key_file must be set together (client TLS needs both)")
        if self.password is not None and self.password_file is not None:
            raise _fail("set password or password_file, not both")
        if (self.username is None) != (self.password is None and self.password_file is None):
            raise _fail("username and password (or password_file) must be set together")
        for key in ("embedded_listen", "embedded_peer_listen"):
            if getattr(self, key) is not None:
                log.warning("config: etcd.%s is ignored and can be removed: the embedded etcd no longer "
                            "listens on TCP, only on a unix socket under state_dir that only root can "
                            "reach (docs/etcd.md)", key)
        return self


def _read_password_file(cfg: Config, label: str) -> Config:
    """Read etcd.password_file into etcd.password; ConfigError if it cannot be read."""
    etcd = cfg.etcd
    if etcd is None or etcd.password_file is None:
        return cfg
    path = Path(etcd.password_file)
    try:
        mode = path.stat().st_mode
        secret = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"config {label}: etcd.password_file {path}: cannot read: {why}; it must be a UTF-8 text file "
                          "readable by meshd") from None
    secret = secret[:-1] if secret.endswith("\n") else secret
    secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret:
        raise ConfigError(f"config {label}: etcd.password_file {path}: the file is empty; write the etcd password in it")
    if mode & 0o077:
        log.warning("config: etcd.password_file %s can be read by other users (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return cfg.model_copy(update={"etcd": etcd.model_copy(update={"password": secret})})


class KubernetesConfig(StrictModel):
    """Kubernetes mode (docs/kubernetes.md): follow Services, EndpointSlices and this node's Node.
    kubeconfig absent: the in-cluster service account, then $KUBECONFIG, then ~/.kube/config."""
    kubeconfig: AnyPath | None = None


class MetricsConfig(StrictModel):
    # null: no exporter; port 0: a free port, logged and written to the status file
    listen: Annotated[str, AfterValidator(_listen)] | None = "127.0.0.1:9469"


class MapsConfig(StrictModel):
    """Capacities of the socket LB's maps, fixed for the life of the pins (`meshd cleanup` to
    change). A service record that does not fit is reported (status, metrics, log) and the
    others keep serving."""
    max_frontends: Annotated[int, Field(ge=16, le=1 << 22)] = 65536  # VIP:port/proto entries
    max_backends: Annotated[int, Field(ge=16, le=1 << 22)] = 262144  # distinct backends


def _node_name() -> str:
    import socket
    return os.environ.get("NODE_NAME") or socket.gethostname()


class NodeConfig(StrictModel):
    """This node's identity: endpoints whose `node` equals `name` are local (traffic
    policy Local); `zone` picks topology-hinted endpoints."""
    name: Annotated[str, BeforeValidator(_not_empty)] = Field(default_factory=_node_name)
    zone: str | None = None


class HealthzConfig(StrictModel):
    # kube-proxy's node healthz (/healthz, /livez); null turns it off
    listen: Annotated[str, AfterValidator(_listen)] | None = "0.0.0.0:10256"


class SyncConfig(StrictModel):
    """When the daemon counts as stuck or ready (meshd/agent/health.py)."""
    # syncs failing this long: the systemd watchdog is no longer pinged (systemd restarts us)
    stuck_after_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    # READY anyway (serving the pinned state) when every source still unread is unreachable
    ready_grace_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 20.0


def _ring_bytes(v: int) -> int:
    if v < 4096 or v & (v - 1) or v > 1 << 30:
        raise _fail("must be a power of two from 4096 (a page) to 1073741824 (1 GiB), such "
                    "as 1048576 (got {got})", got=show(v))
    return v


class EventsConfig(StrictModel):
    """The connection event stream (`meshd observe`, docs/policy.md): which events the
    kernel emits, how many, and how many the daemon keeps for `observe --since`."""
    # [] turns events off (the hooks then pay one array lookup)
    types: list[Literal["connect", "denied", "failed", "closed"]] = \
        ["connect", "denied", "failed", "closed"]
    # connect and closed events of 1 in `sample` sockets; denied and failed: every one
    sample: Annotated[int, Field(ge=1, le=1 << 20)] = 1
    # at most this many events per second per CPU (0: no limit); what is over is counted
    # in meshd_events_lost_total{reason="rate_limit"}
    rate_per_cpu: Annotated[int, Field(ge=0, le=10_000_000)] = 5000
    # the kernel ring buffer (restart only); full: meshd_events_lost_total{reason="ring_full"}
    ring_bytes: Annotated[int, AfterValidator(_ring_bytes)] = 1 << 20
    # events kept in the daemon for `meshd observe --since` (0: none)
    history: Annotated[int, Field(ge=0, le=1_000_000)] = 10_000


class MaglevConfig(StrictModel):
    """Maglev table sizes (docs/datapath.md). `table_size: auto` (the default): each service
    port gets the smallest of 251, 509, 1021, ... 65521 that is at least 100x the sum of its
    backends' weights (<= 1% imbalance), at most `max_table_size`; a group moves to a bigger
    table when it grows. `table_size: <prime>`: every group gets exactly that size (what
    meshd did before `auto`; configs that set it keep their meaning)."""
    table_size: Annotated[int | Literal["auto"], BeforeValidator(_table_size_or_auto)] = "auto"
    max_table_size: Annotated[int, AfterValidator(_table_size)] = 65521

    @property
    def fixed_size(self) -> int:
        """The fixed table size; 0: auto."""
        return 0 if self.table_size == "auto" else int(self.table_size)


def _port_range(v: object) -> tuple[int, int]:
    """"30000-32767" (inclusive) -> (30000, 32767)."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(type(x) is int for x in v):
        v = f"{v[0]}-{v[1]}"  # the parsed form (a dumped config read back)
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", v) if isinstance(v, str) else None
    lo, hi = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if not m or not 1 <= lo <= hi <= 65535:
        raise _fail("must be a port range LOW-HIGH within 1-65535, such as 30000-32767 "
                    "(got {got})", got=show(v))
    return lo, hi


PortRange = Annotated[tuple[int, int], PlainValidator(_port_range)]


class TcConfig(StrictModel):
    interfaces: Annotated[list[str], AfterValidator(_ifnames)] = []
    # routed: replies come back through the node by routing; snat: requests leave with the
    # address of the interface they leave by and a port of snat_ports (docs/tc.md)
    mode: Literal["routed", "snat"] = "routed"
    # below node ports (30000-32767) and the kernel's ephemeral ports (32768-60999): a reply
    # is taken for SNAT only when it comes from the backend address:port a SNAT flow uses
    snat_ports: PortRange = (1024, 29999)


class NodePortsConfig(StrictModel):
    range: PortRange = (30000, 32767)
    # node addresses that serve node ports; empty: every global address of the node
    addresses: list[Annotated[IPNetwork, PlainValidator(_cidr)]] = []


def _default_cidrs() -> list[IPNetwork]:
    return [ip_network("10.96.0.0/12"), ip_network("fd00:96::/108")]


class Config(StrictModel):
    instance: Annotated[str, AfterValidator(_instance)] = "default"
    # cgroup2 dir the socket programs attach to; default: where cgroup2 is mounted (the root
    # covers the whole machine: /sys/fs/cgroup on pure v2, /sys/fs/cgroup/unified on hybrid)
    cgroup: AbsPath = Field(default_factory=lambda: cgroup2_mount())
    bpffs: AbsPath = Path("/sys/fs/bpf")
    state_dir: AbsPath = Path("/var/lib/meshd")
    services_file: AnyPath | None = None
    # Absent = the embedded etcd (DESIGN.md); `etcd: null` = no etcd at all (services_file only).
    etcd: EtcdConfig | None = Field(default_factory=EtcdConfig)
    # Absent = no Kubernetes source; `kubernetes:` (empty) = in-cluster (KubernetesConfig).
    kubernetes: Annotated[KubernetesConfig | None, _section({})] = None
    service_cidrs: Annotated[list[Annotated[IPNetwork, PlainValidator(_cidr)]],
                             AfterValidator(_non_empty_list)] = Field(default_factory=_default_cidrs)
    metrics: Annotated[MetricsConfig, _section({})] = Field(default_factory=MetricsConfig)
    maglev: Annotated[MaglevConfig, _section({})] = Field(default_factory=MaglevConfig)
    maps: Annotated[MapsConfig, _section({})] = Field(default_factory=MapsConfig)
    sync: Annotated[SyncConfig, _section({})] = Field(default_factory=SyncConfig)
    node: Annotated[NodeConfig, _section({})] = Field(default_factory=NodeConfig)
    healthz: Annotated[HealthzConfig, _section({})] = Field(default_factory=HealthzConfig)
    events: Annotated[EventsConfig, _section({})] = Field(default_factory=EventsConfig)
    # externalIPs are honoured only inside these (default none: CVE-2020-8554)
    external_ip_cidrs: list[Annotated[IPNetwork, PlainValidator(_cidr)]] = []
    tc: Annotated[TcConfig, _section({})] = Field(default_factory=TcConfig)
    node_ports: Annotated[NodePortsConfig, _section({})] = Field(default_factory=NodePortsConfig)
    log_level: Annotated[Literal["debug", "info", "warning", "error"],
                         BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = "info"

    @property
    def pin_dir(self) -> Path:
        return self.bpffs / "meshd" / self.instance

    @model_validator(mode="after")
    def _kubernetes_mode_has_no_embedded_etcd(self) -> Config:
        # DESIGN: in Kubernetes mode no embedded etcd is started unless `etcd` is given
        if self.kubernetes is not None and "etcd" not in self.model_fields_set:
            return self.model_copy(update={"etcd": None})
        return self

    @model_validator(mode="after")
    def _snat_apart_from_node_ports(self) -> Config:
        (lo, hi), (nlo, nhi) = self.tc.snat_ports, self.node_ports.range
        if self.tc.mode == "snat" and lo <= nhi and nlo <= hi:
            raise _fail("tc.snat_ports {lo}-{hi} overlaps node_ports.range {nlo}-{nhi}: a reply "
                        "to a SNAT port would be taken for a new NodePort connection; move "
                        "one of them", lo=lo, hi=hi, nlo=nlo, nhi=nhi)
        return self


# ---- YAML ------------------------------------------------------------------------------------

class YamlFileError(Exception):
    """A YAML file could not be read or parsed; str() is a one-line reason without the path."""


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if first is not key_node.start_mark:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path) -> object:
    """Read and parse one UTF-8 YAML document; duplicate keys are an error. Raises YamlFileError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlFileError("no such file") from None
    except IsADirectoryError:
        raise YamlFileError("is a directory, not a YAML file") from None
    except PermissionError:
        raise YamlFileError("permission denied; check the file mode or run meshd as root") from None
    except UnicodeDecodeError as e:
        raise YamlFileError(f"not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise YamlFileError(f"cannot read: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = str(e.problem or e.context) + (f" ({e.context})" if e.problem and e.context else "")
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlFileError(f"invalid YAML{at}: {' '.join(what.split())}") from None
    except yaml.YAMLError as e:
        raise YamlFileError("invalid YAML: " + " ".join(str(e).split())) from None
    except RecursionError:
        raise YamlFileError("YAML is nested too deeply") from None


# ---- environment -----------------------------------------------------------------------------

def _strip_optional(t: Any) -> Any:
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def env_vars() -> dict[str, tuple[str, ...]]:
    """Every environment variable load_config honours -> the config key path it sets."""
    out: dict[str, tuple[str, ...]] = {}
    for name, field in Config.model_fields.items():
        section = _strip_optional(field.annotation)
        if isinstance(section, type) and issubclass(section, BaseModel):
            for sub in section.model_fields:
                out[f"{ENV_PREFIX}{name.upper()}__{sub.upper()}"] = (name, sub)
        else:
            out[f"{ENV_PREFIX}{name.upper()}"] = (name,)
    return out


def unused_env(env: Mapping[str, str] | None = None) -> list[str]:
    """MESHD_* variables that set nothing (likely typos); the daemon may warn about them."""
    known = env_vars()
    env = os.environ if env is None else env
    return sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)


def _field_annotation(path: tuple[str, ...]) -> Any:
    model: Any = Config
    for part in path[:-1]:
        model = _strip_optional(model.model_fields[part].annotation)
    return model.model_fields[path[-1]].annotation


def _env_value(path: tuple[str, ...], raw: str) -> object:
    ann = _field_annotation(path)
    if get_origin(_strip_optional(ann)) is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if raw == "" and _strip_optional(ann) is not ann:
        return None
    return raw


_EnvUse = dict[tuple[str, ...], str]  # config key path -> the MESHD_* variable that set it


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], _EnvUse]:
    """Overlay the MESHD_* variables on the file's data; also returns {key path: variable} used."""
    data = dict(data)
    used: dict[tuple[str, ...], str] = {}
    for var, path in env_vars().items():
        if var not in env:
            continue
        value = _env_value(path, env[var])
        if len(path) == 1:
            data[path[0]] = value
        else:
            section = data.get(path[0])
            if section is None:
                section = {}
            if not isinstance(section, dict):
                continue  # the file's own error for this section is reported instead
            data[path[0]] = {**section, path[1]: value}
        used[path] = var
    return data, used


# ---- loading ---------------------------------------------------------------------------------

_RELATIVE_TO_FILE = (("services_file",), ("etcd", "ca_file"), ("etcd", "cert_file"), ("etcd", "key_file"),
                     ("etcd", "password_file"))


def _resolve_paths(cfg: Config, file_dir: Path, from_env: Mapping[tuple[str, ...], str]) -> Config:
    def fix(key: tuple[str, ...], p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return (Path.cwd() if key in from_env else file_dir) / p

    update: dict[str, Any] = {"services_file": fix(("services_file",), cfg.services_file)}
    if cfg.etcd is not None:
        update["etcd"] = cfg.etcd.model_copy(update={
            k[1]: fix(k, getattr(cfg.etcd, k[1])) for k in _RELATIVE_TO_FILE if k[0] == "etcd"})
    if cfg.kubernetes is not None:
        key = ("kubernetes", "kubeconfig")
        update["kubernetes"] = cfg.kubernetes.model_copy(update={"kubeconfig": fix(key, cfg.kubernetes.kubeconfig)})
    return cfg.model_copy(update=update)


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults < YAML file at `path` (None: no file) < MESHD_* variables in `env` (default os.environ).
    Every failure raises ConfigError naming the file, the key path (and variable) and the fix."""
    env = os.environ if env is None else env
    if path is None:
        label, data, file_dir = "(no file)", {}, Path.cwd()
    else:
        label, file_dir = str(path), Path(path).absolute().parent
        try:
            doc = read_yaml(Path(path))
        except YamlFileError as e:
            hint = "; check the path, or start meshd without a config file to use the defaults" \
                if str(e) == "no such file" else ""
            raise ConfigError(f"config {label}: {e}{hint}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(f"config {label}: the top level must be a mapping of settings such as "
                              f"'instance: default' (got {type(doc).__name__}); see config/meshd.yaml")
        data = doc
    data, from_env = _apply_env(data, env)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        parts = []
        for loc, msg in explain_errors(e, Config, secret_keys=frozenset({"password"})):
            var = next((v for p, v in from_env.items() if tuple(loc[:len(p)]) == p), None)
            where = format_loc(loc) + (f" (from {var})" if var else "")
            parts.append(f"{where}: {msg}" if where else msg)
        raise ConfigError(f"config {label}: " + "; ".join(parts)) from None
    return _read_password_file(_resolve_paths(cfg, file_dir, from_env), label)
