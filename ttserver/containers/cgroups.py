"""Each container's cgroups: limits (memory, CPU, tasks) and a census of its processes.

Hosts with cgroup v1 controllers (legacy or hybrid, as these machines: /sys/fs/cgroup a
tmpfs of v1 hierarchies, no systemd as PID 1). A container gets one directory, named
after it, under this server's group in each of:

- the `memory`, `cpu` and `pids` hierarchies: its limits (memory.limit_in_bytes and,
  where swap is accounted, memory.memsw.limit_in_bytes; cpu.cfs_quota_us per
  cpu.cfs_period_us; pids.max);
- the `name=systemd` hierarchy and a cgroup2 hierarchy this module mounts under
  `/run/ttstack/cgroup2` (no controllers: it only groups processes). systemd-nspawn
  (--keep-unit, no systemd on the host) places the container below *its own* cgroup,
  which it reads from the cgroup2 line of /proc/self/cgroup, and mirrors that path in
  `name=systemd`: started from the same directory in both, two containers never share
  its `payload` cgroup (measured with systemd 252: from the root cgroup, every container
  used /payload).

A process joins all five before it execs (`wrap`): nspawn (but for the memory cgroup),
and every command entered into the container, since nsenter does not move a process into
the target's cgroups (a command not moved was not held to the memory limit; measured).
Every process of a container is then in its directories, so `kill` finds them all, also
after a server crash, without any pid file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
LIMITS = ("memory", "cpu", "pids")
TRACK_V1 = "systemd"  # the name=systemd hierarchy's mount point under ROOT
V2_MOUNT = Path("/run/ttstack/cgroup2")
CFS_PERIOD_US = 100_000
TASKS_MAX = 4096  # per container: a fork bomb stays inside
KILL_TIMEOUT = 10.0


class CgroupError(RuntimeError):
    """The host's cgroups cannot hold containers, or one cannot be made or removed; the
    message says which and why."""


def _v1_mounted(name: str) -> bool:
    return (ROOT / name / "cgroup.procs").is_file()


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def _read_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd) as f:
        return f.read()


def _rmdir(path: str, dir_fd: int | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path, dir_fd=dir_fd)


class Cgroups:
    """The containers' cgroups of one server: its `group` (a directory name, e.g.
    `ttstack-<server id>`) in every hierarchy, one directory per container below it."""

    def __init__(self, group: str, v2_mount: Path = V2_MOUNT) -> None:
        self.group = group
        self.v2_mount = v2_mount

    def setup(self) -> None:
        """Check the host and mount the cgroup2 hierarchy (once per boot); CgroupError
        naming what is missing."""
        missing = [n for n in (*LIMITS, TRACK_V1) if not _v1_mounted(n)]
        if missing:
            unified = (ROOT / "cgroup.controllers").is_file()
            raise CgroupError(
                "containers need the cgroup v1 hierarchies " + ", ".join(missing)
                + (" (this host has only the unified cgroup v2 hierarchy, which the lxc "
                   "engine does not support yet)" if unified else " mounted under /sys/fs/cgroup"))
        if not (self.v2_mount / "cgroup.procs").is_file():
            self.v2_mount.mkdir(parents=True, exist_ok=True)
            res = subprocess.run(["mount", "-t", "cgroup2", "none", str(self.v2_mount)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise CgroupError(f"cannot mount a cgroup2 hierarchy at {self.v2_mount}: "
                                  f"{res.stderr.strip()}")

    def dirs(self, name: str) -> list[Path]:
        """The container's directories: limits first, then the two census hierarchies."""
        return [*(ROOT / c / self.group / name for c in (*LIMITS, TRACK_V1)),
                self.v2_mount / self.group / name]

    def create(self, name: str, mem_mib: int, cpus: int, tasks: int = TASKS_MAX) -> None:
        """Make the container's directories with its limits: `mem_mib` MiB of memory (swap
        included where the host accounts it), `cpus` CPUs' worth of time, `tasks`
        processes and threads; CgroupError."""
        for d in self.dirs(name):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot make the cgroup {d}: {exc.strerror}") from None
        memory, cpu, pids = self.dirs(name)[:3]
        limit = str(mem_mib << 20)
        _write(memory / "memory.limit_in_bytes", limit)
        if (memory / "memory.memsw.limit_in_bytes").is_file():  # not above memory's
            _write(memory / "memory.memsw.limit_in_bytes", limit)
        _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(cpus * CFS_PERIOD_US))
        _write(pids / "pids.max", str(tasks))

    def wrap(self, name: str, argv: list[str], supervisor: bool = False) -> list[str]:
        """`argv` run by a shell that first moves itself into the container's cgroups
        (exit 125 when it cannot).

        A container filled to its memory limit by a tmpfs (/tmp: no kill frees it) drives
        its OOM killer through every process: it chose nspawn, then the stub init (the
        biggest), and the container ended. So a `supervisor` (nspawn) stays out of the
        container's memory cgroup, in the server's group (confine() moves its children
        in), and what is entered into the container is the OOM killer's first choice
        (oom_score_adj 1000: lowering the init's needs CAP_SYS_RESOURCE, which a server
        in a container may lack)."""
        dirs = self.dirs(name)
        if supervisor:
            dirs[0] = dirs[0].parent
        procs = [str(d / "cgroup.procs") for d in dirs]
        first = "" if supervisor else "echo 1000 > /proc/self/oom_score_adj || exit 125; "
        return ["/bin/sh", "-c",
                first + 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
                'shift; exec "$@"', "sh", *procs, "--", *argv]

    def confine(self, name: str, pids: list[int]) -> None:
        """Move the processes `pids` (a supervisor's children, started outside) into the
        container's memory cgroup; CgroupError."""
        procs = self.dirs(name)[0] / "cgroup.procs"
        for pid in pids:
            try:
                procs.write_text(str(pid))
            except OSError as exc:
                raise CgroupError(f"cannot move process {pid} into {procs}: "
                                  f"{exc.strerror}") from None

    def pids(self, name: str) -> set[int]:
        """Every process in the container's directories and below them. A process that is
        exiting may be listed as pid 0 in cgroup.procs (measured on cgroup v2 during a
        mass SIGKILL, kernel 6.18); it is left out: kill(0) would signal the caller's own
        process group. The trees are walked by directory descriptor (os.fwalk): a
        container's root once made one whose paths passed PATH_MAX, and a walk by path
        raised ENAMETOOLONG in every census, so nothing could end the container."""
        found: set[int] = set()
        for top in self.dirs(name):
            for _path, _dirs, files, fd in os.fwalk(top) if top.is_dir() else ():
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError, ValueError):
                        found.update(int(p) for p in _read_at(fd, "cgroup.procs").split())
        found.discard(0)
        return found

    def seal(self, name: str) -> None:
        """Give the container's census cgroups back to the host's root: nspawn hands its
        payload cgroup to the container's root (to delegate it to a systemd inside, which
        does not run here), who could make cgroups in it, as deep as it likes; CgroupError."""
        for top in self.dirs(name)[len(LIMITS):]:
            if not top.is_dir():
                continue
            try:
                for _path, dirs, files, fd in os.fwalk(top):
                    for entry in (*dirs, *files):
                        os.chown(entry, 0, 0, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                raise CgroupError(f"cannot take back the cgroup {top}: {exc.strerror}"
                                  ) from None

    def kill(self, name: str, timeout: float = KILL_TIMEOUT) -> None:
        """SIGKILL every process of the container until none is left; CgroupError after
        `timeout` seconds (a process in uninterruptible sleep)."""
        # a task throttled by its CPU quota cannot run to act on SIGKILL: a fork bomb's
        # killed tasks stayed runnable until the quota was lifted (kernel 6.18)
        with contextlib.suppress(OSError):
            (self.dirs(name)[1] / "cpu.cfs_quota_us").write_text("-1")
        deadline = time.monotonic() + timeout
        while pids := self.pids(name):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupError(f"container {name}: processes {sorted(pids)} survive "
                                  f"SIGKILL after {timeout:.0f}s")
            time.sleep(0.02)

    def remove(self, name: str) -> None:
        """Remove the container's directories (deepest first, by directory descriptor;
        nspawn and the payload make their own below them); CgroupError when one still has
        processes."""
        for top in self.dirs(name):
            if not top.is_dir():
                continue
            try:
                for _path, dirs, _files, fd in os.fwalk(top, topdown=False):
                    for d in dirs:
                        _rmdir(d, fd)
                _rmdir(str(top), None)
            except OSError as exc:
                raise CgroupError(f"cannot remove the cgroups of {top}: "
                                  f"{exc.strerror}") from None

    def close(self) -> None:
        """Remove this server's group directories once no container has cgroups in them
        (left in place otherwise)."""
        for top in [*(ROOT / c / self.group for c in (*LIMITS, TRACK_V1)),
                    self.v2_mount / self.group]:
            with contextlib.suppress(OSError):
                top.rmdir()

    def names(self) -> list[str]:
        """The containers that have cgroups of this server (after a crash: the ones to
        kill and remove)."""
        return sorted({d.name for top in (ROOT / TRACK_V1 / self.group,
                                          self.v2_mount / self.group, ROOT / "memory" / self.group)
                       if top.is_dir() for d in top.iterdir() if d.is_dir()})
