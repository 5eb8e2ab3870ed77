"""Container images (`lxc:OS-VERSION:ARCH`): made from the VM image of the same OS and
arch, whose disk's files become the container image's `rootfs/`, shifted to the
containers' uid range (ttserver/containers/rootfs.py). Its meta.json (written last: an
image without one is incomplete) records the VM image's digest; a VM image rebuilt since
makes `ttserver image build --engine lxc` derive the container image again."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ttclient.imagenames import ImageName, parse_image_name

from ..containers import rootfs
from . import DISK, META, ROOTFS, Image, _virtual_size_mib, read_meta


class ContainerImageError(RuntimeError):
    """A container image cannot be made; the message says why."""


def in_use(root: Path) -> bool:
    """Whether a mounted overlay has `root` as its lower layer (a container runs on it).
    /proc/self/mounts shows the option as given, its backslashes (the escapes of `:`) as
    the octal escape \\134."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return False
    mounts = mounts.replace("\\134", "\\").replace("\\:", ":")
    return f"lowerdir={root}," in mounts or f"lowerdir={root} " in mounts


def derive(vm_dir: Path, image_path: Path, force: bool = False,
           say: Callable[[str], None] = lambda msg: None) -> Path:
    """Make (or keep) the container image of the VM image in `vm_dir` in `image_path`;
    its directory (`say`: progress lines). Kept when it was made from the VM image as it
    is now, unless `force`. ContainerImageError when it cannot be replaced (containers of
    it run) or made."""
    vm_name = parse_image_name(vm_dir.name)
    name = ImageName("lxc", vm_name.os, vm_name.arch)
    target = image_path / name.full
    vm_meta = read_meta(vm_dir)
    try:
        size_mib = _virtual_size_mib(vm_meta, vm_dir / DISK)
        vm_digest = Image(name=vm_name, path=vm_dir, size_mib=size_mib).digest()
    except (OSError, ValueError) as exc:
        raise ContainerImageError(f"the VM image {vm_dir} is not usable: {exc}") from None
    if (not force and (target / ROOTFS).is_dir()
            and read_meta(target).get("from_digest") == vm_digest):
        say(f"exists at {target}; skipping (use --force to make it again)")
        return target
    if in_use(target / ROOTFS):
        raise ContainerImageError(f"{name.full} is in use by running containers: delete "
                                  "their ENVs before replacing it")
    started = time.monotonic()
    say(f"making {name.full} from {vm_name.full}'s files (a few seconds)")
    staged = image_path / f".build-{name.full}-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        try:
            rootfs.from_disk(vm_dir / DISK, staged / ROOTFS)
        except rootfs.RootfsError as exc:
            raise ContainerImageError(str(exc)) from None
        meta = {"name": name.full, "arch": name.arch, "suite": vm_meta.get("suite", ""),
                "virtual_size_mib": size_mib, "from": vm_name.full, "from_digest": vm_digest,
                "built_at": int(time.time()),
                "build_seconds": round(time.monotonic() - started, 1)}
        (staged / META).write_text(json.dumps(meta, indent=2) + "\n")
        staged.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    say(f"made in {time.monotonic() - started:.0f}s at {target}")
    return target
