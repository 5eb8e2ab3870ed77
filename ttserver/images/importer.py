"""`ttserver image import FILE --name qemu:OS-VERSION:ARCH`: a generic cloud image (any
format qemu-img reads: qcow2, raw, vmdk, ...) becomes a ttstack image.

Why the kernel is copied out instead of booting the image's own bootloader: ttstack
boots every image the same way (direct kernel boot: no firmware, no GRUB menu — seconds
under TCG), and the cloud image's kernel and initramfs already carry its drivers. They are
read with `debugfs` straight from the disk file (`FILE?offset=N` for a partition), so
nothing is mounted and no loop or nbd device is needed. The image is marked `cloud_init`:
its VMs get a NoCloud seed disk (guest/cloudseed.py) with hostname and SSH keys.

An image file comes from whoever made it, so it is read as data, never as a pointer to
other files: `qemu-img info` (which opens no backing file) says its format, images that
name another file — a qcow2 backing file or external data file, a multi-file VMDK, any
format outside SINGLE_FILE_FORMATS — are refused with the reason, and every later
qemu-img call names the format (`-f`), so nothing is probed again. Without this a qcow2
whose backing file is a host path (the server's SSH key, say) would copy that file's
bytes onto every VM's disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from ttclient.imagenames import parse_image_name

from . import DISK, INITRD, KERNEL, install
from .build import BuildError, run_step

LINUX_TYPES = {"83", "0fc63daf-8483-4772-8e79-3d69d8477de4"}  # MBR, GPT Linux filesystem
# formats whose image is one file (VMDK only as one sparse or stream-optimized file)
SINGLE_FILE_FORMATS = {"raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc"}
SINGLE_FILE_VMDK = {"monolithicSparse", "streamOptimized"}
STEP_TIMEOUT = 900


class ImportError_(BuildError):  # noqa: N801 - not the builtin ImportError
    """A cloud image cannot be imported; the message says why."""
    pass


def _run(cmd: list[str], what: str) -> str:
    return run_step(cmd, STEP_TIMEOUT, what)


def inspect(src: Path) -> tuple[str, dict]:
    """(format, `qemu-img info` JSON) of the image file `src` (an absolute path), if it is
    one self-contained file; ImportError_ naming what it refers to otherwise, BuildError
    when qemu-img cannot read it."""
    info = json.loads(_run(["qemu-img", "info", "--output=json", str(src)],
                           "reading the image"))
    fmt = info.get("format", "")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImportError_(f"{src} is a {fmt} image with a backing file "
                           f"({info.get('backing-filename')!r}): refused, an image must not "
                           "read other files; flatten it first (qemu-img convert -O qcow2)")
    if fmt not in SINGLE_FILE_FORMATS:
        raise ImportError_(f"{src} is a {fmt or 'unknown'} image: refused, only single-file "
                           f"formats are imported ({', '.join(sorted(SINGLE_FILE_FORMATS))})")
    specific = info.get("format-specific", {}).get("data", {})
    if specific.get("data-file"):
        raise ImportError_(f"{src} is a qcow2 image with an external data file "
                           f"({specific['data-file']!r}): refused, an image must not read "
                           "other files")
    if fmt == "vmdk":
        extents = [e.get("filename") for e in specific.get("extents", [])]
        if (specific.get("create-type") not in SINGLE_FILE_VMDK
                or any(e != str(src) for e in extents)):
            raise ImportError_(f"{src} is a VMDK of several files: refused, an image must "
                               "not read other files; convert it to qcow2 first")
    return fmt, info


def _filesystems(raw: Path) -> list[tuple[int, int]]:
    """(partition number, byte offset) of every Linux partition; (0, 0) for a disk that is
    one filesystem without a partition table."""
    try:
        table = json.loads(_run(["sfdisk", "-J", str(raw)], "reading the partition table"))
    except BuildError:  # no partition table: one filesystem on the whole disk
        return [(0, 0)]
    pt = table["partitiontable"]
    sector = int(pt.get("sectorsize", 512))
    out = []
    for i, part in enumerate(pt.get("partitions", []), start=1):
        number = int(part["node"][len(str(raw)):].lstrip("p") or i)
        if str(part.get("type", "")).lower() in LINUX_TYPES:
            out.append((number, int(part["start"]) * sector))
    return out


def _ls(raw: Path, offset: int, directory: str) -> list[str] | None:
    """Names in a directory of the ext2/3/4 filesystem at `offset`, None if unreadable."""
    proc = subprocess.run(["debugfs", "-R", f"ls -p {directory}", f"{raw}?offset={offset}"],
                          capture_output=True, text=True, timeout=120)
    names = [line.split("/")[5] for line in proc.stdout.splitlines()
             if line.startswith("/") and len(line.split("/")) > 6]
    return names or None


def _newest(names: list[str], prefix: str) -> str | None:
    found = sorted(n for n in names if n.startswith(prefix) and not n.endswith(".old"))
    return found[-1] if found else None


def find_boot(raw: Path) -> tuple[int, int, str, str]:
    """(root partition number, offset of the filesystem holding the kernel, kernel path,
    initrd path): the root is the filesystem with /etc; the kernel is in its /boot or on a
    separate /boot partition."""
    root = boot = None
    for number, offset in _filesystems(raw):
        top = _ls(raw, offset, "/") or []
        if "etc" in top and root is None:
            root = number
            inner = _ls(raw, offset, "/boot") or []
            if _newest(inner, "vmlinuz-") and boot is None:
                boot = (offset, "/boot/", inner)
        elif _newest(top, "vmlinuz-") and boot is None:  # a separate /boot partition
            boot = (offset, "/", top)
    if root is None:
        raise ImportError_("no Linux root filesystem (ext2/3/4 with /etc) found in the image")
    if boot is None:
        raise ImportError_("no /boot/vmlinuz-* found in the image")
    offset, prefix, names = boot
    kernel, initrd = _newest(names, "vmlinuz-"), _newest(names, "initrd.img-")
    if kernel is None or initrd is None:
        raise ImportError_("the image has a kernel but no initrd.img-* next to it")
    return root, offset, prefix + kernel, prefix + initrd


def import_image(src: Path, name: str, image_path: Path, *, force: bool = False) -> Path:
    """Import the cloud image file `src` as image `name` under `image_path`, kernel and
    initrd copied out of it; the image's directory. ImportError_ when `src` is no file or
    the image exists (without `force`), BuildError for a failed step, ImageNameError."""
    parsed = parse_image_name(name)
    src = src.resolve()  # absolute: qemu-img never reads "proto:..." in it as a protocol
    if not src.is_file():
        raise ImportError_(f"{src} is not a file")
    target = image_path / parsed.full
    if (target / DISK).is_file() and not force:
        raise ImportError_(f"{parsed.full} exists at {target}; pass --force to replace it")
    fmt, info = inspect(src)
    image_path.mkdir(parents=True, exist_ok=True)
    work = image_path / f".import-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "image").mkdir(parents=True)
    try:
        raw = work / "disk.raw"
        _run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(src), str(raw)],
             "qemu-img convert")
        root, offset, kernel, initrd = find_boot(raw)
        out = work / "image"
        for path, dest in ((kernel, KERNEL), (initrd, INITRD)):
            _run(["debugfs", "-R", f"dump {path} {out / dest}", f"{raw}?offset={offset}"],
                 f"copying {path} out of the image")
            if not (out / dest).is_file() or (out / dest).stat().st_size == 0:
                raise ImportError_(f"could not copy {path} out of the image")
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / DISK)],
             "qemu-img convert")
        device = f"/dev/vda{root}" if root else "/dev/vda"
        meta = {"name": parsed.full, "imported_from": str(src),
                "virtual_size_mib": int(info["virtual-size"]) // (1024 * 1024),
                "cmdline": f"root={device} rw console=ttyS0", "cloud_init": True,
                "kernel": Path(kernel).name, "built_at": int(time.time())}
        install(out, meta, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
