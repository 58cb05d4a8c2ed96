"""The status file (`<state_dir>/<instance>/status.json`): what the daemon last did, read by
`meshd services` and by tests. Written atomically (tmp + rename)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("meshd.daemon")


def status_path(cfg) -> Path:
    return Path(cfg.state_dir) / cfg.instance / "status.json"


def write_status(path: Path, doc: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot write status file %s: %s", path, e)
