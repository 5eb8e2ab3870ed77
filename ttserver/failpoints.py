"""Named crash points, so tests can kill the server at the worst moments on purpose.

`TTSERVER_CRASH_AT=create.admitted,delete.marked ttserver ...` makes the process exit at
once (status 70, no clean-up, like `kill -9`) when it reaches one of those points. Unset —
always, outside tests — a crash point is a set lookup. The points sit where a crash leaves
SQLite, libvirt and the disk most out of step; tests/test_crash.py restarts the server
after each and checks that reconciliation leaves nothing behind.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
EXIT_STATUS = 70
ARMED = frozenset(filter(None, os.environ.get("TTSERVER_CRASH_AT", "").split(",")))
POINTS = ("create.admitted", "boot.overlay_created", "boot.domain_started",
          "boot.vm_running", "delete.marked", "delete.torn_down", "stop.marked")


def crash_point(name: str) -> None:
    """Exit the process at once (status 70, no clean-up) when `name` is armed in
    $TTSERVER_CRASH_AT; otherwise nothing."""
    if name in ARMED:
        log.warning("crash point %s reached: exiting now (TTSERVER_CRASH_AT)", name)
        logging.shutdown()
        os._exit(EXIT_STATUS)
