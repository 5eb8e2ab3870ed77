"""A native session's private folder on the controller (`$TMPDIR/ttnative-*`): the
session's SSH key, known_hosts, master sockets, wrappers and wheels.

The folder is removed when the session ends (`NativeSession.cleanup`). A session that
never reached its cleanup (SIGKILL, OOM killer, a CI job killed at its time limit)
leaves its folder behind, private key included; the next session of the same user
removes such folders: each records its owner as `pid start-time` (field 22 of
`/proc/PID/stat`, in clock ticks since boot, so a reused pid is not taken for the
owner), and a folder whose owner no longer runs is stale.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "ttnative-"
OWNER_FILE = "owner"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) as /proc shows it; None when
    no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    return stat.rsplit(")", 1)[1].split()[19]


def create() -> Path:
    """A new private (0700) session folder with its owner recorded; stale folders of
    this user are removed first (see module docstring)."""
    remove_stale()
    work = Path(tempfile.mkdtemp(prefix=PREFIX))
    (work / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return work


def is_stale(folder: Path) -> bool:
    """True for a session folder of this user whose owner process no longer runs.
    Folders without an owner record (being created, or not ours) are never stale."""
    try:
        if folder.is_symlink() or folder.stat().st_uid != os.getuid():
            return False
        pid, started = (folder / OWNER_FILE).read_text().split()
        return _start_time(int(pid)) != started
    except (OSError, ValueError):
        return False


def remove_stale(tmp: Path | None = None) -> list[Path]:
    """Remove this user's stale session folders in `tmp` (default: tempfile's
    directory); returns the removed paths."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(PREFIX + "*"):
        if is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
