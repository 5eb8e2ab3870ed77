"""Can QEMU reach the server's files? QEMU runs as its own user (libvirt's `user` in
qemu.conf; `libvirt-qemu` on Debian), not as the server: every directory on the way to a
VM's disk must let that user through, or libvirt refuses the domain with "Cannot access
storage file ... Permission denied" at the first boot."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path


def blocking_dir(path: Path, uid: int, gid: int) -> Path | None:
    """The first existing directory from / down to `path` that user `uid` (group `gid`)
    may not search (no x bit for it: owner, group or other, by POSIX rules), else None.
    uid 0 passes everywhere. Parts of `path` that do not exist yet are not judged."""
    if uid == 0:
        return None
    groups = {gid, *_groups_of(uid)}
    path = path.absolute()
    for part in [*reversed(path.parents), path]:
        try:
            st = part.stat()
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return part
    return None


def _groups_of(uid: int) -> set[int]:
    """The supplementary groups of user `uid` (from the group database)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return set()
    return {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}


def check_reachable(path: Path, uid: int, gid: int, what: str) -> None:
    """ValueError naming the directory that keeps QEMU (`uid`) from `path`, and the fix."""
    blocked = blocking_dir(path, uid, gid)
    if blocked is not None:
        mode = stat.S_IMODE(os.stat(blocked).st_mode)
        raise ValueError(
            f"{what} {path}: QEMU runs as uid {uid} and cannot enter {blocked} (mode "
            f"{mode:04o}); choose a path it can reach (e.g. under /var/lib/ttstack) or "
            f"allow it through (chmod o+x {blocked})")
