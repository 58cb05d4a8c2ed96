#!/usr/bin/env python3
"""Writes the meshd(8) man page (roff) from the argparse parser of `meshd` (meshd/cli.py
build_parser), so the page lists exactly the commands and options the program accepts.

    python3 scripts/manpage.py > meshd.8        (run with meshd importable)
"""

from __future__ import annotations

import argparse
import sys

from meshd import __version__
from meshd.cli import build_parser

FILES = [
    ("/etc/meshd/meshd.yaml", "the configuration (a conffile: upgrades keep your edits); every "
     "key is commented; unknown keys are rejected"),
    ("/usr/share/doc/meshd/examples/services.yaml", "an example services_file"),
    ("/var/lib/meshd", "state_dir: status, the embedded etcd's data and unix socket "
     "(removed by purging the package)"),
    ("/sys/fs/bpf/meshd/INSTANCE", "the pinned maps and links of an instance: they keep "
     "serving while the daemon is stopped or upgraded, until meshd cleanup"),
]


def esc(text: str) -> str:
    """Roff-safe text: backslashes, hyphens of options, leading dots and quotes."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.splitlines())


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)


def _options(p: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            takes = a.nargs != 0
            meta = a.metavar or a.dest.upper()
            names = ", ".join(f"\\fB{esc(o)}\\fR" + (f" \\fI{esc(meta)}\\fR" if takes else "")
                              for o in a.option_strings)
        else:
            names = (f"\\fI{esc(a.dest)}\\fR" if not a.choices else
                     "|".join(f"\\fB{esc(c)}\\fR" for c in a.choices))
        out += [".TP", names, esc(a.help or "")] if a.help else [".TP", names]
    return out


def render() -> str:
    p = build_parser()
    sub = _subparsers(p)
    lines = [
        f'.TH MESHD 8 "" "meshd {__version__}" "System Administration"',
        ".SH NAME",
        "meshd \\- kernel\\-level sidecarless service mesh and L4 load balancer (eBPF)",
        ".SH SYNOPSIS",
        "\\fBmeshd\\fR [\\fB\\-\\-log\\-level\\fR \\fILEVEL\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        esc("meshd keeps eBPF maps in step with a registry of services (etcd, a static file "
            "or the Kubernetes API). cgroup socket hooks translate a service VIP to a backend "
            "chosen by Maglev inside connect() and sendmsg(); tc programs balance packets "
            "that never pass a local socket. The daemon runs as the systemd unit "
            "meshd.service (meshd run); the other commands register services in etcd and "
            "show what the kernel holds. Errors are printed as one line naming what failed "
            "and what to do; the exit status is then 1."),
        ".SH OPTIONS",
        *_options(p),
        ".SH COMMANDS",
    ]
    for choice in sub._choices_actions:
        cp = sub.choices[choice.dest]
        usage = cp.format_usage().replace("usage: ", "", 1).strip()
        lines += [f".SS {esc(choice.dest)}", esc(choice.help or ""), ".PP",
                  ".nf", esc(" ".join(usage.split())), ".fi", *_options(cp)]
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    lines += [
        ".SH ENVIRONMENT",
        ".TP", "\\fBMESHD_\\fIKEY\\fR, \\fBMESHD_\\fISECTION\\fB__\\fIKEY\\fR",
        esc("override a key of the configuration file, e.g. MESHD_LOG_LEVEL=debug, "
            "MESHD_MAGLEV__TABLE_SIZE=65537 (lists comma-separated)."),
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBetcd\\fR(1); "
        + esc("/usr/share/doc/meshd/ (README.md, install.md, configuration.md, services.md, "
              "etcd.md, metrics.md)"),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
