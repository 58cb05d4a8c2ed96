"""`meshd service …`, `meshd endpoint …` and `meshd policy …`: write the registry (etcd)
from a shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from meshd.config import Config
from meshd.errors import ConfigError, RecordError


def registry_urls(cfg: Config) -> list[str]:
    if cfg.etcd is None:
        raise ConfigError("etcd is disabled in this config (`etcd: null`); the registration "
                          "commands need etcd: remove that line (embedded) or set etcd.endpoints")
    if cfg.etcd.endpoints:
        return list(cfg.etcd.endpoints)
    # the embedded etcd's unix socket, which only root can reach (as the daemon does)
    from meshd.sources.etcd_server import client_url, data_dir_of
    return [client_url(data_dir_of(cfg.state_dir, cfg.instance))]


def _split_name(s: str) -> tuple[str, str]:
    ns, sep, name = s.partition("/")
    if not sep or not ns or not name:
        raise RecordError(s, "expected NAMESPACE/NAME, e.g. default/web")
    return ns, name


def _ports(specs: list[str], *, with_protocol: bool) -> list[dict] | dict:
    """`http=80/TCP` (services) or `http=8080` (endpoints)."""
    out_list, out_map = [], {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep:
            raise RecordError(spec, "expected NAME=PORT" + ("[/TCP|UDP]" if with_protocol else ""))
        num, _, proto = rest.partition("/")
        try:
            port = int(num)
        except ValueError:
            raise RecordError(spec, f"port {num!r} is not a number") from None
        if with_protocol:
            out_list.append({"name": name, "port": port, "protocol": (proto or "TCP").upper()})
        else:
            out_map[name] = port
    return out_list if with_protocol else out_map


def _load_records(path: str) -> list[dict]:
    import yaml
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and "services" in data:
        data = data["services"]
    return data if isinstance(data, list) else [data]


async def _service(args, cfg: Config) -> int:
    from meshd.registry import Registry
    async with Registry(cfg.etcd, endpoints=registry_urls(cfg)) as reg:
        if args.action == "put":
            if args.file:
                records = _load_records(args.file)
            else:
                if not args.name or not args.vip or not args.port:
                    raise RecordError("service put", "give --file FILE, or NAMESPACE/NAME "
                                      "with --vip and --port NAME=PORT[/PROTO]")
                ns, name = _split_name(args.name)
                records = [{"namespace": ns, "name": name, "vips": args.vip,
                            "ports": _ports(args.port, with_protocol=True)}]
            for rec in records:
                endpoints = rec.pop("endpoints", None) if isinstance(rec, dict) else None
                svc = await reg.put_service(rec)
                print(f"service {svc.key} written")
                for i, ep in enumerate(endpoints or []):
                    ep_id = str(ep.pop("id", None) or f"ep{i}")
                    await reg.add_endpoint(svc.namespace, svc.name, ep_id, ep)
                    print(f"  endpoint {ep_id} written")
        elif args.action == "delete":
            ns, name = _split_name(args.name)
            n = await reg.delete_service(ns, name)
            print(f"deleted {n} keys of {ns}/{name}" if n else f"{ns}/{name} was not registered")
        else:
            rows = await reg.list_services()
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
            for r in [] if args.json else rows:
                print(json.dumps(r, default=str))
    return 0


async def _endpoint(args, cfg: Config) -> int:
    from meshd.registry import Registry
    async with Registry(cfg.etcd, endpoints=registry_urls(cfg)) as reg:
        if args.action == "add":
            ns, name = _split_name(args.name)
            data = {"address": args.address, "ports": _ports(args.port, with_protocol=False),
                    "weight": args.weight, "ready": not args.not_ready}
            if args.zone:
                data["zone"] = args.zone
            if args.node:
                data["node"] = args.node
            lease = await reg.add_endpoint(ns, name, args.id, data, ttl=args.ttl)
            print(f"endpoint {args.id} of {ns}/{name} written"
                  + (f" with a {args.ttl}s lease" if args.ttl else ""), flush=True)
            if args.ttl:
                print(f"keeping the lease alive; the endpoint disappears within {args.ttl}s "
                      "after this process ends (Ctrl-C to stop)", flush=True)
                task = asyncio.ensure_future(reg.keep_alive(lease, args.ttl))
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, task.cancel)
                try:
                    await task
                except asyncio.CancelledError:
                    # a clean stop removes the endpoint now; a crash lets the lease expire
                    await reg.revoke_lease(lease)
                    print(f"lease revoked: endpoint {args.id} removed", flush=True)
        elif args.action == "remove":
            ns, name = _split_name(args.name)
            gone = await reg.remove_endpoint(ns, name, args.id)
            print(f"endpoint {args.id} of {ns}/{name} removed" if gone else
                  f"endpoint {args.id} of {ns}/{name} was not registered")
        else:
            ns, name = _split_name(args.name) if args.name else (None, None)
            rows = await reg.list_endpoints(ns, name)
            print(json.dumps(rows, indent=2, default=str) if args.json else
                  "\n".join(json.dumps(r, default=str) for r in rows))
    return 0


def _policy_records(source: str) -> tuple[list[object], list[str]]:
    """The records of FILE or '-' (stdin): one record, a list, or a mapping with `policies:`
    (a services file); with where each came from, for the messages."""
    from meshd.config import YamlFileError, read_yaml
    name = "stdin" if source == "-" else source
    try:
        data = read_yaml(Path("/dev/stdin") if source == "-" else Path(source))
    except YamlFileError as e:
        raise RecordError(name, str(e)) from None
    if isinstance(data, dict) and "policies" in data and "namespace" not in data:
        data, label = data["policies"], "policies"
    else:
        label = ""
    if data is None:
        raise RecordError(name, "no policy record: expected a mapping with namespace, name, from and to, "
                          "a list of them, or a services file's `policies:` list")
    records = data if isinstance(data, list) else [data]
    where = [f"{name}: {label or 'record'}[{i}]" if isinstance(data, list) else name for i in range(len(records))]
    return records, where


async def _policy(args, cfg: Config) -> int:
    from meshd.registry import Registry
    if args.action in ("put", "delete") and not args.target:
        raise RecordError(f"policy {args.action}", "needs " + ("FILE (or - for stdin)" if args.action == "put"
                                                                 else "NAMESPACE/NAME"))
    records, where = _policy_records(args.target) if args.action == "put" else ([], [])
    async with Registry(cfg.etcd, endpoints=registry_urls(cfg)) as reg:
        if args.action == "put":
            for pol in await reg.put_policies(records, where):
                print(f"policy {pol.key} written")
        elif args.action == "delete":
            ns, name = _split_name(args.target)
            print(f"policy {ns}/{name} deleted" if await reg.delete_policy(ns, name)
                  else f"policy {ns}/{name} was not registered")
        else:
            rows = await reg.list_policies()
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
            else:
                for r in rows:
                    print(_policy_line(r))
    return 0


def _policy_line(row: dict) -> str:
    """One line per stored policy: key, action, from -> to (or the reason it is rejected)."""
    who = f"{row['namespace']}/{row['name']}"
    if row["error"]:
        return f"{who}  INVALID: {row['error']}"
    v = row["value"]
    frm = ", ".join(" ".join(f"{k}={x}" for k, x in item.items()) for item in v["from"]) or "(nobody)"
    to = ", ".join(t["service"] + (":" + ",".join(map(str, t["ports"])) if t.get("ports") else "")
                   for t in v["to"])
    return f"{who}  {v.get('action', 'allow')}  from {frm}  to {to}"


def add_parsers(sub, load_cfg) -> None:
    s = sub.add_parser("service", help="register services in etcd (put, delete, list)")
    s.add_argument("action", choices=["put", "delete", "list"])
    s.add_argument("name", nargs="?", help="NAMESPACE/NAME")
    s.add_argument("--config", "-c")
    s.add_argument("--file", "-f", help="YAML/JSON with one service, a list, or services:")
    s.add_argument("--vip", action="append", help="VIP (repeat for several)")
    s.add_argument("--port", action="append", help="NAME=PORT[/TCP|UDP] (repeat)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=lambda a: asyncio.run(_service(a, load_cfg(a))))

    e = sub.add_parser("endpoint", help="register endpoints in etcd (add, remove, list)")
    e.add_argument("action", choices=["add", "remove", "list"])
    e.add_argument("name", nargs="?", help="NAMESPACE/NAME of the service")
    e.add_argument("id", nargs="?", help="endpoint id (e.g. the host or pod name)")
    e.add_argument("--config", "-c")
    e.add_argument("--address", help="backend IP address")
    e.add_argument("--port", action="append", default=[], help="PORT-NAME=NUMBER (repeat)")
    e.add_argument("--weight", type=int, default=1)
    e.add_argument("--zone")
    e.add_argument("--node")
    e.add_argument("--not-ready", action="store_true")
    e.add_argument("--ttl", type=int, help="attach to a lease of N seconds and keep it alive "
                   "while this command runs")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=lambda a: asyncio.run(_endpoint(a, load_cfg(a))))

    p = sub.add_parser("policy", help="authorization policies in etcd (put, delete, list)")
    p.add_argument("action", choices=["put", "delete", "list"])
    p.add_argument("target", nargs="?", help="put: FILE with one record, a list, or policies: "
                   "(- for stdin); delete: NAMESPACE/NAME")
    p.add_argument("--config", "-c")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=lambda a: asyncio.run(_policy(a, load_cfg(a))))


def check_endpoint_args(args: argparse.Namespace) -> None:
    if args.action in ("add", "remove") and (not args.name or not args.id):
        raise RecordError("endpoint " + args.action, "needs NAMESPACE/NAME and an endpoint id")
    if args.action == "add" and (not args.address or not args.port):
        raise RecordError("endpoint add", "needs --address and at least one --port NAME=NUMBER")
