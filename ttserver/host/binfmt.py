"""Register qemu-user with binfmt_misc so foreign-arch binaries run on this host: the
maintainer scripts mmdebstrap runs when it builds an image, and every program of a
foreign-arch container. Debian's qemu-user-static registers its entries with the `F`
flag: the kernel opens the interpreter once, at registration, so it runs in any mount
namespace (a container sees no /usr/libexec/qemu-binfmt of its own)."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import threading
from pathlib import Path

from ttclient import arches

BINFMT = Path("/proc/sys/fs/binfmt_misc")
CONF_DIR = Path("/usr/lib/binfmt.d")


def needs_emulation(profile: arches.ArchProfile, host: str | None = None) -> bool:
    """Whether this host (`platform.machine()` by default) runs `profile`'s binaries only
    through qemu-user: everything but its own arch, and i386 on x86_64."""
    host = host or platform.machine()
    return profile.machine != host and not (host == "x86_64" and profile.name == "i386")


def missing(arch: str) -> str:
    """Why this host cannot run `arch` binaries (no qemu-user-static entry for it), or ""
    when it can (its own arch, or an entry registered or registrable)."""
    profile = arches.by_name(arch)
    if not needs_emulation(profile) or (BINFMT / profile.qemu_user).exists() or (
            CONF_DIR / f"{profile.qemu_user}.conf").is_file():
        return ""
    return (f"this host cannot run {profile.name} binaries: qemu-user-static is not "
            "installed (apt-get install qemu-user-static)")


_register_lock = threading.Lock()


def ensure(entry: str) -> None:
    """Make sure the binfmt_misc `entry` (e.g. "qemu-aarch64", ArchProfile.qemu_user) is
    registered; RuntimeError with the fix if we cannot. Safe from many threads at once
    (an ENV's containers start in parallel): one registers, and an entry another
    process registered meanwhile (the kernel's EEXIST) counts as registered."""
    with _register_lock:
        _ensure(entry)


def _ensure(entry: str) -> None:
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                       check=False, capture_output=True)
    if (BINFMT / entry).exists():
        return
    conf = CONF_DIR / f"{entry}.conf"
    if not conf.is_file():
        raise RuntimeError(f"{conf} is missing: apt-get install qemu-user-static")
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    with contextlib.suppress(FileExistsError):  # another process registered it since
        (BINFMT / "register").write_text(line)
