"""Per-VM disks: a copy-on-write clone of the read-only base image, made in milliseconds.

Two backends, chosen by what the state directory lives on (`--storage auto`):
- `qcow2` (anywhere): a qcow2 overlay whose backing file is the base image;
- `btrfs` (state and images on one btrfs): the VM's directory is a btrfs snapshot of a
  per-image base subvolume holding a reflink copy of the image. The VM's disk is then a
  standalone qcow2 (no backing chain for QEMU to walk, the filesystem shares the blocks),
  and deleting the VM is deleting its subvolume.
ZFS (snapshot + clone per VM) would be the third; it needs the ZFS kernel module, which
these hosts cannot load, so `--storage zfs` is refused with that reason rather than
shipped untested.

Warm-clone templates keep using qcow2 overlays on every backend: a template's disk must
stay frozen while clones run, which is exactly what a backing file is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

CMD_TIMEOUT = 120
BTRFS_MAGIC = "btrfs"


class StorageError(RuntimeError):
    pass


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except FileNotFoundError as exc:
        raise StorageError(f"{cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        raise StorageError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def create_overlay(base: Path, overlay: Path, size_mib: int | None, uid: int, gid: int) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
           str(overlay)]
    if size_mib:
        cmd.append(f"{size_mib}M")
    _run(cmd)
    os.chown(overlay, uid, gid)


def backing_file(overlay: Path) -> str | None:
    """The image an overlay is a clone of (read from its qcow2 header)."""
    proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout).get("backing-filename")


def make_vm_dir(path: Path, uid: int, gid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(0o750)


def fs_type(path: Path) -> str:
    """The filesystem type a path lives on ("btrfs", "zfs", "ext2/ext3", ...)."""
    path = path if path.exists() else path.parent
    return _run(["stat", "-f", "-c", "%T", str(path)]).strip()


def is_subvolume(path: Path) -> bool:
    # a btrfs subvolume's root directory has inode number 256
    return path.is_dir() and path.stat().st_ino == 256 and fs_type(path) == BTRFS_MAGIC


def remove_vm_dir(path: Path) -> None:
    if is_subvolume(path):
        _run(["btrfs", "subvolume", "delete", str(path)])
    shutil.rmtree(path, ignore_errors=True)


def choose(requested: str, image_path: Path, state_path: Path) -> str:
    """Resolve `--storage` (auto|qcow2|btrfs|zfs) for these directories, or explain why
    not."""
    state_path.mkdir(parents=True, exist_ok=True)
    state_fs = fs_type(state_path)
    if requested == "zfs":  # (auto on ZFS: qcow2 overlays, below)
        raise StorageError("--storage zfs is not implemented: it needs the ZFS kernel "
                           "module, which this kind of host cannot load (use auto, "
                           "qcow2 or btrfs)")
    if requested == "btrfs" or (requested == "auto" and state_fs == BTRFS_MAGIC):
        same = (image_path.exists()
                and os.stat(image_path).st_dev == os.stat(state_path).st_dev)
        if state_fs == BTRFS_MAGIC and fs_type(image_path) == BTRFS_MAGIC and (
                same or _same_btrfs(image_path, state_path)):
            return "btrfs"
        if requested == "btrfs":
            raise StorageError(f"--storage btrfs needs --image-path ({image_path}) and "
                               f"--cfgdb-path ({state_path}) on one btrfs filesystem")
    return "qcow2"


def _same_btrfs(a: Path, b: Path) -> bool:
    """Subvolumes of one btrfs have different st_dev; their filesystem UUID is shared."""
    def uuid(p: Path) -> str:
        return _run(["btrfs", "filesystem", "show", str(p)]).split("uuid:")[1].split()[0]
    try:
        return uuid(a) == uuid(b)
    except (StorageError, IndexError):
        return False


class Btrfs:
    """VM directories as snapshots of per-image base subvolumes under `bases`."""

    def __init__(self, bases: Path) -> None:
        self.bases = bases
        self._lock = threading.Lock()  # an ENV's VMs boot in parallel: one makes the base

    def base_for(self, disk: Path, fingerprint: str) -> Path:
        """The base subvolume of an image (made once: a reflink copy of its disk)."""
        base = self.bases / f"{disk.parent.name}@{fingerprint}"
        with self._lock:
            if not (base / "disk.qcow2").is_file():
                self._make_base(disk, base)
        return base

    def _make_base(self, disk: Path, base: Path) -> None:
        """Built under a temporary name and renamed: a crash leaves no half base."""
        self.bases.mkdir(parents=True, exist_ok=True)
        tmp = base.with_name(base.name + ".tmp")
        if tmp.exists():
            remove_vm_dir(tmp)
        _run(["btrfs", "subvolume", "create", str(tmp)])
        _run(["cp", "--reflink=always", str(disk), str(tmp / "disk.qcow2")])
        tmp.rename(base)

    def clone(self, base: Path, vm_dir: Path, size_mib: int | None, uid: int,
              gid: int) -> None:
        if vm_dir.exists():  # e.g. what a failed warm clone left: console log only
            remove_vm_dir(vm_dir)
        vm_dir.parent.mkdir(parents=True, exist_ok=True)
        _run(["btrfs", "subvolume", "snapshot", str(base), str(vm_dir)])
        disk = vm_dir / "disk.qcow2"
        if size_mib:
            _run(["qemu-img", "resize", "-q", str(disk), f"{size_mib}M"])
        os.chown(vm_dir, uid, gid)
        vm_dir.chmod(0o750)
        os.chown(disk, uid, gid)
        disk.chmod(0o640)

    def collect(self, keep: set[str]) -> list[str]:
        """Delete bases of images that changed or are gone (`keep`: live base names).
        VM snapshots do not depend on their base, so this is safe at any time."""
        gone = []
        if self.bases.is_dir():
            for d in self.bases.iterdir():
                if d.name not in keep:
                    remove_vm_dir(d)
                    gone.append(d.name)
        return gone
