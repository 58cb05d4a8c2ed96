"""The `meshd` command. Errors are printed as one line with what to do, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from meshd import __version__
from meshd.errors import MeshdError

log = logging.getLogger("meshd")


DEFAULT_CONFIG = Path("/etc/meshd/meshd.yaml")  # what the Debian package installs


def config_path(args) -> Path | None:
    """--config, else the installed /etc/meshd/meshd.yaml when there is one, else none
    (the built-in defaults): every verb reads the config the daemon runs with."""
    if args.config:
        return Path(args.config)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _config(args):
    from meshd.config import load_config
    return load_config(config_path(args))


def cmd_run(args) -> int:
    from meshd import daemon
    return daemon.run(config_path(args), log_level_set=args.log_level is not None)


def cmd_services(args) -> int:
    from meshd.show import format_report, services_report
    report = services_report(_config(args), with_desired=not args.kernel_only)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_cleanup(args) -> int:
    from meshd.agent.lock import InstanceLock
    from meshd.dataplane import loader
    cfg = _config(args)
    lock = InstanceLock(cfg.state_dir, cfg.instance)
    lock.acquire()  # refuses (naming its pid) while a daemon runs this instance: it holds
    try:            # the data plane and would put back what cleanup removes
        removed = loader.remove(cfg.bpffs, cfg.instance)
    finally:
        lock.release()
    print(f"removed {len(removed)} pins and links of instance {cfg.instance!r}"
          if removed else f"instance {cfg.instance!r} had nothing pinned")
    return 0


def cmd_top(args) -> int:
    from meshd import top
    return top.main(_config(args), interval=args.interval, once=args.once)


def cmd_demo(args) -> int:
    from meshd import demo
    return demo.main()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshd", description=__doc__)
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    p.add_argument("--log-level", default=None, help="debug|info|warning|error")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the daemon (keeps the kernel maps equal to the registry)")
    r.add_argument("--config", "-c", help="config file (YAML); default: /etc/meshd/meshd.yaml "
                   "if it exists, else the built-in defaults")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("services", help="print what the kernel maps hold")
    s.add_argument("--config", "-c")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--kernel-only", action="store_true",
                   help="do not read the sources (no desired state, no drift check)")
    s.set_defaults(fn=cmd_services)

    c = sub.add_parser("cleanup", help="detach and unpin everything of this instance")
    c.add_argument("--config", "-c")
    c.set_defaults(fn=cmd_cleanup)
    t = sub.add_parser("top", help="live per-service view: connection rate, latency, errors")
    t.add_argument("--config", "-c")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.set_defaults(fn=cmd_top)

    d = sub.add_parser("demo", help="live demo in a throw-away netns lab (root)")
    d.set_defaults(fn=cmd_demo)

    from meshd import cli_registry, observe
    observe.add_parser(sub, _config)
    cli_registry.add_parsers(sub, _config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "endpoint":
            from meshd.cli_registry import check_endpoint_args
            check_endpoint_args(args)
        return args.fn(args)
    except MeshdError as e:
        print(f"meshd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
