"""A container image's root filesystem: the files of a QEMU image's disk, owned by the
unprivileged uid range containers run as.

The same bits as the VM image (`ttserver image build` makes its root filesystem with
mmdebstrap and `mkfs.ext4 -d`): the disk is converted to raw, mounted read-only once,
copied (`cp -a`: modes, hard links, xattrs), and every file's owner and group moved up by
ID_BASE. Containers then run in a user namespace that maps their uids 0–65535 to
ID_BASE…ID_BASE+65535 on the host (`--private-users=ID_BASE:65536`), and see the files
owned by their own root and users. Shifting the tree once per image is what lets many
containers share it read-only: systemd-nspawn's own ways cost each container a copy
(`--private-users-ownership=chown` on an overlay copies every file up: 463 MiB of an
8 MiB container, measured) or need ID-mapped mounts, which it reports unavailable on
these hosts' overlays ("ID mapped mounts are apparently not available").
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

# the host uid/gid of a container's root; its users are ID_BASE + their own uid. One range
# for all containers (they cannot reach each other's files or processes: separate mount
# and PID namespaces), above the ranges distributions give users and systemd-nspawn's
# `pick` (0x00080000-0x6FFF0000 is its pick range: 0x70000000 is above it)
ID_BASE = 0x70000000
ID_RANGE = 65536
STEP_TIMEOUT = 600.0


class RootfsError(RuntimeError):
    """A root filesystem could not be made; the message names the failing step."""


def _run(cmd: list[str], what: str) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RootfsError(f"{what}: no result in {STEP_TIMEOUT:.0f}s") from None
    if res.returncode != 0:
        raise RootfsError(f"{what} failed ({res.returncode}): {res.stderr.strip()[-500:]}")


def shift_ids(root: Path, base: int = ID_BASE) -> int:
    """Add `base` to the owner and group of every file under `root` (each inode once: hard
    links share one), keeping set-uid/gid bits (chown clears them); the files shifted."""
    seen: set[tuple[int, int]] = set()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        paths = [dirpath, *(os.path.join(dirpath, n) for n in filenames),
                 *(os.path.join(dirpath, n) for n in dirnames
                   if os.path.islink(os.path.join(dirpath, n)))]
        for path in paths:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if st.st_uid >= ID_RANGE or st.st_gid >= ID_RANGE:
                raise RootfsError(f"{path} is owned by {st.st_uid}:{st.st_gid}, outside the "
                                  f"{ID_RANGE} ids a container maps")
            os.lchown(path, st.st_uid + base, st.st_gid + base)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode))
            count += 1
    return count


def from_disk(disk: Path, target: Path) -> Path:
    """Make `target` (a directory that must not exist) the shifted copy of the root
    filesystem on the qcow2 `disk` (an ext4 file system on the whole disk, as `ttserver
    image build` makes); the target. Built beside it and renamed into place, so a target
    is complete or absent. RootfsError."""
    if target.exists():
        raise RootfsError(f"{target} exists")
    work = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "mnt").mkdir(parents=True)
    try:
        raw = work / "disk.raw"
        _run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], "qemu-img convert")
        # noload: a read-only mount that does not replay the journal
        _run(["mount", "-o", "loop,ro,noload", str(raw), str(work / "mnt")], "mount")
        try:
            _run(["cp", "-a", f"{work / 'mnt'}/.", str(work / "rootfs")], "copying the files")
        finally:
            _run(["umount", str(work / "mnt")], "umount")
        raw.unlink()
        shift_ids(work / "rootfs")
        (work / "rootfs").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
