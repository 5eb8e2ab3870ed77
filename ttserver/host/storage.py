"""Per-VM disks: a copy-on-write clone of the read-only base image, made in milliseconds.

Two backends, chosen by what the state directory lives on (`--storage auto`):
- `qcow2` (anywhere): a qcow2 overlay whose backing file is the base image;
- `btrfs` (state and images on one btrfs): the VM's directory is a btrfs snapshot of a
  per-image base subvolume holding a reflink copy of the image. The VM's disk is then a
  standalone qcow2 (no backing chain for QEMU to walk, the filesystem shares the blocks),
  and deleting the VM is deleting its subvolume.
- `zfs` (state on a ZFS dataset): a base dataset per image holding a copy of its disk,
  snapshotted once; each VM directory is a clone of that snapshot, mounted where the VM
  directory goes. Deleting the VM destroys the clone. Driven with the `zfs` command, not
  pyzfs: libzfs_core cannot mount datasets and needs the kernel module's /dev/zfs, while
  the command works with kernel ZFS and with zfs-fuse alike (the tests use zfs-fuse: these
  hosts cannot load kernel modules).

Warm-clone templates keep using qcow2 overlays on every backend: a template's disk must
stay frozen while clones run, which is exactly what a backing file is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Protocol

from ttclient.waiting import WaitTimeout, wait_for

CMD_TIMEOUT = 120
BTRFS_MAGIC = "btrfs"


class StorageError(RuntimeError):
    """A storage command failed or is missing, or the requested backend does not fit the
    directories; the message has the command's error."""
    pass


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except FileNotFoundError as exc:
        raise StorageError(f"{cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        raise StorageError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def set_owner(path: Path, uid: int | None = None, gid: int | None = None,
              mode: int | None = None) -> None:
    """chown `path` to uid:gid and/or chmod it to `mode` — the file or directory itself,
    never what a symlink there points to: VM directories are writable by QEMU's user,
    and a QEMU that swapped a file for a link to a host file would otherwise have root
    chown or chmod that host file. OSError (ELOOP) for a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def create_overlay(base: Path, overlay: Path, size_mib: int | None, uid: int, gid: int) -> None:
    """Create the qcow2 overlay `overlay` backed by `base` (virtual size `size_mib` MiB when
    given, else the base's), owned by uid:gid; StorageError."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
           str(overlay)]
    if size_mib:
        cmd.append(f"{size_mib}M")
    _run(cmd)
    set_owner(overlay, uid, gid)


def backing_file(overlay: Path) -> str | None:
    """The image an overlay is a clone of (read from its qcow2 header)."""
    proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout).get("backing-filename")


def make_vm_dir(path: Path, uid: int, gid: int) -> None:
    """Create the VM directory `path` (and parents), owned by uid:gid, mode 0750."""
    path.mkdir(parents=True, exist_ok=True)
    set_owner(path, uid, gid, 0o750)


def fs_type(path: Path) -> str:
    """The filesystem type a path lives on ("btrfs", "zfs", "ext2/ext3", ...)."""
    path = path if path.exists() else path.parent
    return _run(["stat", "-f", "-c", "%T", str(path)]).strip()


def is_subvolume(path: Path) -> bool:
    """True when `path` is the root directory of a btrfs subvolume."""
    # a btrfs subvolume's root directory has inode number 256
    return path.is_dir() and path.stat().st_ino == 256 and fs_type(path) == BTRFS_MAGIC


def zfs_datasets() -> dict[str, str]:
    """Mountpoint -> dataset of every mounted ZFS filesystem ({} without ZFS)."""
    if not shutil.which("zfs"):
        return {}
    proc = subprocess.run(["zfs", "list", "-H", "-o", "name,mountpoint", "-t", "filesystem"],
                          capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if proc.returncode != 0:
        return {}
    return {mp: name for name, mp in (ln.split("\t", 1) for ln in proc.stdout.splitlines())
            if mp.startswith("/")}


def zfs_dataset_of(path: Path) -> tuple[str, str] | None:
    """(dataset, its mountpoint) of the ZFS filesystem `path` lives on, if any."""
    path = path.resolve()
    best = None
    for mp, name in zfs_datasets().items():
        if (path == Path(mp) or Path(mp) in path.parents) and (
                best is None or len(mp) > len(best[1])):
            best = (name, mp)
    return best


def remove_vm_dir(path: Path) -> None:
    """Delete a VM directory, and the btrfs subvolume or ZFS clone it is; StorageError when
    the btrfs or zfs command fails."""
    if is_subvolume(path):
        _run(["btrfs", "subvolume", "delete", str(path)])
    # only a mount point can be a ZFS clone: plain VM directories cost no `zfs list`
    elif os.path.ismount(path):
        dataset = zfs_datasets().get(str(path.resolve()))
        if dataset:
            _destroy_zfs(dataset)
    shutil.rmtree(path, ignore_errors=True)


def _destroy_zfs(dataset: str, busy_for: float = 10.0) -> None:
    """`zfs destroy -f`, retried for up to `busy_for` seconds: when a VM's QEMU has just
    ended, the kernel drops its mount namespace's copy of the clone lazily, and until then
    ZFS says "dataset is busy" (measured: the first attempt right after destroy fails, the
    second, 0.25 s later, succeeds). StorageError with ZFS's message otherwise."""

    def destroyed() -> bool | None:
        proc = subprocess.run(["zfs", "destroy", "-f", dataset], capture_output=True,
                              text=True, timeout=CMD_TIMEOUT)
        if proc.returncode == 0:
            return True
        return None if "busy" in proc.stderr else False

    with contextlib.suppress(WaitTimeout):
        if wait_for(destroyed, busy_for, interval=0.25, what=f"destroying {dataset}"):
            return
    _run(["zfs", "destroy", "-f", dataset])  # the error, as ZFS words it


def choose(requested: str, image_path: Path, state_path: Path) -> str:
    """Resolve `--storage` (auto|qcow2|btrfs|zfs) for these directories, or explain why
    not."""
    state_path.mkdir(parents=True, exist_ok=True)
    state_fs = fs_type(state_path)
    if requested in ("zfs", "auto") and zfs_dataset_of(state_path):
        return "zfs"
    if requested == "zfs":
        raise StorageError(f"--storage zfs needs --cfgdb-path ({state_path}) on a mounted ZFS"
                           " dataset (kernel ZFS or zfs-fuse); `zfs list` shows none there")
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


def _make_room(vm_dir: Path) -> None:
    """Clear the place a clone goes (e.g. what a failed warm clone left: a console log)."""
    if vm_dir.exists():
        remove_vm_dir(vm_dir)
    vm_dir.parent.mkdir(parents=True, exist_ok=True)


def _hand_over(vm_dir: Path, size_mib: int | None, uid: int, gid: int) -> None:
    """Grow a fresh clone's disk if asked and give it to the QEMU user."""
    disk = vm_dir / "disk.qcow2"
    if size_mib:
        _run(["qemu-img", "resize", "-q", str(disk), f"{size_mib}M"])
    set_owner(vm_dir, uid, gid, 0o750)
    set_owner(disk, uid, gid, 0o640)


class CloneStore(Protocol):
    """Copy-on-write VM disks made from a per-image base (btrfs subvolumes, ZFS clones)."""

    def base_for(self, disk: Path, fingerprint: str) -> str:
        """The base of an image's `disk` at `fingerprint`, made on first use: an opaque
        name that `clone` takes."""
        ...

    def clone(self, base: str, vm_dir: Path, size_mib: int | None, uid: int,
              gid: int) -> None:
        """Make `vm_dir` (holding disk.qcow2) from `base`, grown to `size_mib` if given,
        owned by uid:gid."""
        ...

    def collect(self, keep: set[str], vm_dirs: set[str]) -> list[str]:
        """Delete bases not named in `keep` (base names) and leftovers no VM directory in
        `vm_dirs` uses; returns what was deleted."""
        ...


class Btrfs:
    """VM directories as snapshots of per-image base subvolumes under `bases`."""

    def __init__(self, bases: Path) -> None:
        self.bases = bases
        self._lock = threading.Lock()  # an ENV's VMs boot in parallel: one makes the base

    def base_for(self, disk: Path, fingerprint: str) -> str:
        """The base subvolume's path of an image (made once: a reflink copy of its disk)."""
        base = self.bases / f"{disk.parent.name}@{fingerprint}"
        with self._lock:
            if not (base / "disk.qcow2").is_file():
                self._make_base(disk, base)
        return str(base)

    def _make_base(self, disk: Path, base: Path) -> None:
        """Built under a temporary name and renamed: a crash leaves no half base."""
        self.bases.mkdir(parents=True, exist_ok=True)
        tmp = base.with_name(base.name + ".tmp")
        if tmp.exists():
            remove_vm_dir(tmp)
        _run(["btrfs", "subvolume", "create", str(tmp)])
        _run(["cp", "--reflink=always", str(disk), str(tmp / "disk.qcow2")])
        tmp.rename(base)

    def clone(self, base: str, vm_dir: Path, size_mib: int | None, uid: int,
              gid: int) -> None:
        """Make `vm_dir` a snapshot of the base subvolume `base`, its disk grown to
        `size_mib` MiB if given and owned by uid:gid; StorageError."""
        _make_room(vm_dir)
        _run(["btrfs", "subvolume", "snapshot", base, str(vm_dir)])
        _hand_over(vm_dir, size_mib, uid, gid)

    def collect(self, keep: set[str], vm_dirs: set[str]) -> list[str]:
        """Delete bases of images that changed or are gone (`keep`: live base names).
        VM snapshots do not depend on their base, so this is safe at any time; they are
        directories of the VM tree, which the server's own sweep keeps to `vm_dirs`."""
        gone = []
        if self.bases.is_dir():
            for d in self.bases.iterdir():
                if d.name not in keep:
                    remove_vm_dir(d)
                    gone.append(d.name)
        return gone


class Zfs:
    """VM directories as clones of per-image base snapshots, under the dataset that holds
    the state directory: `<dataset>/tt-<server id>/bases/<image>` and
    `<dataset>/tt-<server id>/vms/<vm id>` (the server id keeps two servers whose state
    shares a dataset out of each other's datasets)."""

    def __init__(self, state_path: Path, server_id: str) -> None:
        found = zfs_dataset_of(state_path)
        if found is None:
            raise StorageError(f"{state_path} is not on a ZFS dataset")
        self.root = f"{found[0]}/tt-{server_id}"
        existing = set(_run(["zfs", "list", "-H", "-o", "name", "-r", found[0]]).split())
        for dataset in (self.root, f"{self.root}/bases", f"{self.root}/vms"):
            if dataset not in existing:  # containers only: nothing mounted, no directory
                _run(["zfs", "create", "-o", "canmount=off", dataset])
        self.bases = state_path / "bases"
        # Clones are mounted inside this dataset's mount. libvirt runs every QEMU in its own
        # mount namespace, a copy of ours taken at its start, so each QEMU holds a copy of
        # the clone mounts made before it — and a copy that is still mounted somewhere keeps
        # `zfs destroy` "busy". A shared parent mount makes our unmounts reach those copies
        # (libvirt marks its namespace a slave of ours).
        _run(["mount", "--make-shared", found[1]])
        self._lock = threading.Lock()

    @staticmethod
    def _component(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)

    def base_for(self, disk: Path, fingerprint: str) -> str:
        """The base snapshot of an image (made once: a sparse copy of its disk)."""
        name = self._component(f"{disk.parent.name}@{fingerprint}")
        dataset = f"{self.root}/bases/{name}"
        with self._lock:
            ours = _run(["zfs", "list", "-H", "-o", "name", "-r", "-t", "filesystem,snapshot",
                         f"{self.root}/bases"]).split()
            if f"{dataset}@base" not in ours:
                if dataset in ours:
                    _run(["zfs", "destroy", "-r", "-f", dataset])  # a half-made base
                _run(["zfs", "create", "-o", f"mountpoint={self.bases / name}",
                      dataset])
                _run(["cp", "--sparse=always", str(disk), str(self.bases / name / "disk.qcow2")])
                _run(["zfs", "snapshot", f"{dataset}@base"])
        return f"{dataset}@base"

    def clone(self, base: str, vm_dir: Path, size_mib: int | None, uid: int,
              gid: int) -> None:
        """Make `vm_dir` the mountpoint of a clone of the base snapshot `base`, its disk
        grown to `size_mib` MiB if given and owned by uid:gid; StorageError."""
        _make_room(vm_dir)
        _run(["zfs", "clone", "-o", f"mountpoint={vm_dir}", base,
              f"{self.root}/vms/{self._component(vm_dir.name)}"])
        _hand_over(vm_dir, size_mib, uid, gid)

    def collect(self, keep: set[str], vm_dirs: set[str]) -> list[str]:
        """Destroy VM clones no VM directory of ours names (a crash between `zfs clone`
        and its mount leaves one that the directory sweep cannot see), then bases of
        images that changed or are gone, once no clone depends on them (ZFS clones,
        unlike btrfs snapshots, keep their origin alive)."""
        gone = []
        keep = {self._component(k) for k in keep}
        vm_dirs = {self._component(d) for d in vm_dirs}
        names = _run(["zfs", "list", "-H", "-o", "name", "-r", "-t", "filesystem",
                      self.root]).split()
        stray = [d for d in names if d.rpartition("/")[0] == f"{self.root}/vms"
                 and d.rpartition("/")[2] not in vm_dirs]
        bases = [d for d in names if d.rpartition("/")[0] == f"{self.root}/bases"
                 and d.rpartition("/")[2] not in keep]
        for dataset in stray + bases:
            proc = subprocess.run(["zfs", "destroy", "-r", "-f", dataset],
                                  capture_output=True, text=True, timeout=CMD_TIMEOUT)
            if proc.returncode == 0:
                gone.append(dataset.rpartition("/")[2])
        return gone
