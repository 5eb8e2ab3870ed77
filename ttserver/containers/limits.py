"""The host's per-user kernel limits that containers share with the host's root.

A container's user namespace belongs to host root (nspawn runs as root), and the kernel
counts what a namespace's users make against its owner's limits too (ucounts, kernel/
ucount.c): every container's inotify instances and watches count against host root's
`fs.inotify.max_user_*`. A container holding 100 of the default 128 instances left the
host's root 28 (a hostile trial, 2026-12-02). Keys are counted per uid, and every
container's root is the same host uid (rootfs.ID_BASE): `kernel.keys.maxkeys` is shared
by all containers.

With the lxc engine on, the server raises these to the values LXD's "Production setup"
guide gives (documentation.ubuntu.com/lxd, server settings), never lowers one. Raising
them costs nothing until used: the kernel memory behind an inotify instance or a key is
charged to the memory cgroup of its maker, so a container still stops at its memory
limit.
"""

from __future__ import annotations

from pathlib import Path

PROC_SYS = Path("/proc/sys")
SHARED = {  # sysctl path under /proc/sys -> at least this value
    "fs/inotify/max_user_instances": 1048576,
    "fs/inotify/max_user_watches": 1048576,
    "fs/inotify/max_queued_events": 1048576,
    "kernel/keys/maxkeys": 2000,
    "kernel/keys/maxbytes": 2000000,
}


def raise_shared(proc_sys: Path = PROC_SYS) -> list[str]:
    """Raise each SHARED limit below its value; one line per limit raised or left too
    low (with why), for the server's log."""
    said = []
    for name, want in SHARED.items():
        path = proc_sys / name
        try:
            have = int(path.read_text().split()[0])
            if have >= want:
                continue
            path.write_text(str(want))
            said.append(f"raised {name.replace('/', '.')} from {have} to {want}")
        except (OSError, ValueError, IndexError) as exc:
            said.append(f"could not raise {name.replace('/', '.')} to {want} ({exc}): "
                        "containers share it with the host's root")
    return said
