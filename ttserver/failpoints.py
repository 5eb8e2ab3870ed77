"""Named crash points, so tests can kill the server at the worst moments on purpose.

`TTSERVER_FAIL_AT=teardown.destroy:2` makes the first two passes through a fail point raise
(an operation that fails, the server lives on).

`TTSERVER_STALL_AT=boot.overlay_created:75` makes a crash point wait 75 seconds instead
(a step that takes long and cannot be interrupted: a slow disk, a libvirt call that hangs).

`TTSERVER_CRASH_AT=create.admitted,delete.marked ttserver ...` makes the process exit at
once (status 70, no clean-up, like `kill -9`) when it reaches one of those points. Unset —
always, outside tests — a crash point is a set lookup. The points sit where a crash leaves
SQLite, libvirt and the disk most out of step; tests/test_crash.py restarts the server
after each and checks that reconciliation leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)
EXIT_STATUS = 70
ARMED = frozenset(filter(None, os.environ.get("TTSERVER_CRASH_AT", "").split(",")))
POINTS = ("create.admitted", "boot.overlay_created", "boot.domain_started",
          "boot.vm_running", "delete.marked", "delete.torn_down", "stop.marked")


def _fail_counts() -> dict[str, int]:
    counts = {}
    for item in filter(None, os.environ.get("TTSERVER_FAIL_AT", "").split(",")):
        name, _, times = item.partition(":")
        counts[name] = int(times or 1)
    return counts


FAILING = _fail_counts()
STALLS = {name: float(seconds) for name, _, seconds in (
    item.partition(":") for item in os.environ.get("TTSERVER_STALL_AT", "").split(",") if item)}
FAIL_POINTS = ("teardown.destroy",)


class InjectedFailure(RuntimeError):
    """A failure a test asked for ($TTSERVER_FAIL_AT)."""


def fail_point(name: str) -> None:
    """Raise InjectedFailure the first N times `name` is reached when it is armed as
    `name:N` in $TTSERVER_FAIL_AT (N defaults to 1); otherwise nothing."""
    if FAILING.get(name, 0) > 0:
        FAILING[name] -= 1
        log.warning("fail point %s reached: failing (TTSERVER_FAIL_AT)", name)
        raise InjectedFailure(f"{name}: injected failure (TTSERVER_FAIL_AT)")


def crash_point(name: str) -> None:
    """Exit the process at once (status 70, no clean-up) when `name` is armed in
    $TTSERVER_CRASH_AT; wait when it is armed in $TTSERVER_STALL_AT; otherwise nothing."""
    if name in STALLS:
        log.warning("stall point %s reached: waiting %.0fs (TTSERVER_STALL_AT)", name,
                    STALLS[name])
        time.sleep(STALLS[name])
    if name in ARMED:
        log.warning("crash point %s reached: exiting now (TTSERVER_CRASH_AT)", name)
        logging.shutdown()
        os._exit(EXIT_STATUS)
