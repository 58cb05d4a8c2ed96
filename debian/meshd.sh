#!/bin/sh
# meshd, from its virtual environment (/usr/lib/meshd); exec keeps the PID (systemd's
# Type=notify main process).
exec /usr/lib/meshd/bin/python3 -m meshd "$@"
