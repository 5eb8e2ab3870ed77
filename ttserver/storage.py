"""Per-VM disks: a qcow2 overlay on the read-only base (copy-on-write, created in ms)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path


def create_overlay(base: Path, overlay: Path, size_mib: int | None, uid: int, gid: int) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
           str(overlay)]
    if size_mib:
        cmd.append(f"{size_mib}M")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-img create failed: {proc.stderr.strip()}")
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


def remove_vm_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
