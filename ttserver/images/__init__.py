"""The image directory: what images exist and where their parts are.

Each image is a directory named `ENGINE:OS-VERSION:ARCH`. A VM image (`qemu:`) holds
`disk.qcow2` plus `vmlinuz`/`initrd.img` for direct kernel boot (no bootloader to emulate
under TCG) and an optional `meta.json`; a container image (`lxc:`) holds `rootfs/`, the
files of a VM image's disk shifted to the containers' uid range (ttserver/containers/
rootfs.py), and its `meta.json`. Scanning is a directory listing, so it runs on every
request and new images appear without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ttclient.imagenames import (
    ImageName,
    ImageNameError,
    NoMatchingImage,
    match_images,
    parse_image_name,
)

from ..errors import BadRequest, NotFound

log = logging.getLogger(__name__)

DISK = "disk.qcow2"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
META = "meta.json"
ROOTFS = "rootfs"  # a container image's root filesystem (a directory)
# `quiet`: every console byte is an emulated UART write, which costs seconds under TCG;
# failures still reach the console (and so the console tail in errors).
DEFAULT_CMDLINE = "root=/dev/vda rw console=ttyS0 quiet"


@dataclass(frozen=True)
class Image:
    """A complete image directory: its parsed name, path, virtual disk size (MiB), kernel
    command line, warnings about its files' ownership and modes, and whether it is an
    imported cloud image."""

    name: ImageName
    path: Path
    size_mib: int
    cmdline: str = DEFAULT_CMDLINE
    warnings: tuple[str, ...] = field(default=())
    cloud_init: bool = False  # imported cloud image: its VMs get a NoCloud seed disk

    @property
    def disk(self) -> Path:
        """The image's base disk, `disk.qcow2`."""
        return self.path / DISK

    @property
    def rootfs(self) -> Path:
        """A container image's root filesystem, `rootfs/`."""
        return self.path / ROOTFS

    @property
    def container(self) -> bool:
        """Whether the image runs as a container (the `lxc` engine), not a VM."""
        return self.name.engine == "lxc"

    @property
    def kernel(self) -> Path:
        """The guest kernel for direct boot, `vmlinuz`."""
        return self.path / KERNEL

    @property
    def initrd(self) -> Path:
        """The guest initrd for direct boot, `initrd.img`."""
        return self.path / INITRD

    def digest(self) -> str:
        """16 hex digits that change whenever the image's disk, kernel or initrd is
        replaced or touched (their names, sizes and mtimes). OSError when one is gone."""
        files = (self.path / META,) if self.container else (self.disk, self.kernel, self.initrd)
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """The image as the API lists it: full name, os, arch, engine, size_mib,
        warnings and digest ("" when its files cannot be read just now)."""
        try:
            digest = self.digest()
        except OSError:
            digest = ""
        return {"name": self.name.full, "os": self.name.os, "arch": self.name.arch,
                "engine": self.name.engine, "size_mib": self.size_mib,
                "warnings": list(self.warnings), "digest": digest}


def _virtual_size_mib(meta: dict, disk: Path) -> int:
    """meta.json's virtual_size_mib, else the disk file's size; ValueError naming the
    field when it is not a whole number of MiB >= 1."""
    if "virtual_size_mib" not in meta:
        return max(1, disk.stat().st_size // (1024 * 1024))
    value = meta["virtual_size_mib"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 2048.0
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # "2048"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"virtual_size_mib must be a whole number of MiB >= 1, not {value!r}")
    return value


def _ownership_warnings(image_dir: Path) -> tuple[str, ...]:
    """Base images are shared by every clone; anything but root-owned read-only is a risk."""
    out = []
    for part in (DISK, KERNEL, INITRD):
        st = (image_dir / part).stat()
        if st.st_uid != 0:
            out.append(f"{part} is owned by uid {st.st_uid}, not root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IWUSR):
            out.append(f"{part} is writable; base images should be read-only (0444)")
        if not st.st_mode & stat.S_IROTH:
            out.append(f"{part} is not world-readable; QEMU runs unprivileged and needs it")
    return tuple(out)


def scan(image_path: Path, engines: tuple[str, ...] = ("qemu",)) -> list[Image]:
    """All complete images of `engines` under image_path (by default VM images only:
    what the VM machinery, templates and disk clones, works on), by directory name;
    incomplete or misnamed
    entries and ones with a bad meta.json are skipped and logged. Of several usable
    directories naming one image (`qemu:debian-12:amd64` beside `qemu:debian-12:x86_64`)
    the one spelling it canonically is used (else the first), and the others are logged."""
    usable: list[Image] = []
    if not image_path.is_dir():
        return usable
    for entry in sorted(os.scandir(image_path), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            name = parse_image_name(entry.name)
        except ImageNameError as exc:
            log.debug("skipping %s: %s", entry.path, exc)
            continue
        if name.engine not in engines:
            continue
        d = Path(entry.path)
        if name.engine == "lxc":
            image = _container_image(name, d)
            if image is not None:
                usable.append(image)
            continue
        if not all((d / p).is_file() for p in (DISK, KERNEL, INITRD)):
            log.debug("skipping %s: missing %s, %s or %s", d, DISK, KERNEL, INITRD)
            continue
        meta = read_meta(d)
        try:
            size_mib = _virtual_size_mib(meta, d / DISK)
            cmdline = meta.get("cmdline", DEFAULT_CMDLINE)
            if not isinstance(cmdline, str):
                raise ValueError(f"cmdline must be a string, not {cmdline!r}")
        except ValueError as exc:
            log.warning("image %s is not offered: %s: %s", d, d / META, exc)
            continue
        usable.append(Image(name=name, path=d, size_mib=size_mib, cmdline=cmdline,
                            warnings=_ownership_warnings(d),
                            cloud_init=bool(meta.get("cloud_init"))))
    chosen: dict[ImageName, Image] = {}
    for img in usable:
        held = chosen.get(img.name)
        if held is None or (held.path.name != img.name.full and img.path.name == img.name.full):
            chosen[img.name] = img
    for img in usable:
        if chosen[img.name] is not img:
            log.warning("skipping image directory %s: %s already names %s (rename or remove"
                        " one)", img.path, chosen[img.name].path, img.name.full)
    return [img for img in usable if chosen[img.name] is img]


def _container_image(name: ImageName, d: Path) -> Image | None:
    """The container image in `d`, or None (logged) when it is incomplete: its meta.json
    is written last, when its rootfs is complete."""
    meta = read_meta(d)
    if not (d / ROOTFS).is_dir() or not meta:
        log.debug("skipping %s: no %s/ or %s", d, ROOTFS, META)
        return None
    try:
        size_mib = _virtual_size_mib(meta, d / META)
    except ValueError as exc:
        log.warning("image %s is not offered: %s: %s", d, d / META, exc)
        return None
    return Image(name=name, path=d, size_mib=size_mib)


def read_meta(image_dir: Path) -> dict:
    """An image's meta.json as a dict; {} when it has none, or (logged) an unreadable one."""
    if not (image_dir / META).is_file():
        return {}
    try:
        meta = json.loads((image_dir / META).read_text())
    except (OSError, ValueError) as exc:
        log.warning("image %s: unreadable %s: %s", image_dir, META, exc)
        return {}
    if not isinstance(meta, dict):
        log.warning("image %s: %s is not a JSON object; ignored", image_dir, META)
        return {}
    return meta


def select(image_path: Path, prefixes: list[str],
           engines: tuple[str, ...] = ("qemu",)) -> list[Image]:
    """Images of `engines` for the given OS prefixes; NotFound lists what is available."""
    images = scan(image_path, engines)
    by_name = {img.name: img for img in images}
    try:
        names = match_images(prefixes, list(by_name))
    except NoMatchingImage as exc:
        raise NotFound(str(exc)) from exc
    except ImageNameError as exc:
        raise BadRequest(str(exc)) from exc
    return [by_name[n] for n in names]


def install(staged: Path, meta: dict, target: Path) -> None:
    """Make a staged image directory (disk, kernel, initrd) the image `target`: write its
    meta.json, make every file root-owned and read-only (shared by every clone, never
    written), replace what was there."""
    (staged / META).write_text(json.dumps(meta, indent=2) + "\n")
    for part in staged.iterdir():
        os.chown(part, 0, 0)
        part.chmod(0o444)
    staged.chmod(0o755)
    if target.exists():
        shutil.rmtree(target)
    staged.rename(target)
