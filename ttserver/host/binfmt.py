"""Register qemu-user with binfmt_misc so mmdebstrap can run foreign-arch maintainer scripts."""

from __future__ import annotations

import subprocess
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")
CONF_DIR = Path("/usr/lib/binfmt.d")


def ensure(entry: str) -> None:
    """Make sure the binfmt_misc `entry` (e.g. "qemu-aarch64", ArchProfile.qemu_user) is
    registered; RuntimeError with the fix if we cannot."""
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                       check=False, capture_output=True)
    if (BINFMT / entry).exists():
        return
    conf = CONF_DIR / f"{entry}.conf"
    if not conf.is_file():
        raise RuntimeError(f"{conf} is missing: apt-get install qemu-user-static")
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    (BINFMT / "register").write_text(line)
