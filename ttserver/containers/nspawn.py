"""Start, enter and remove containers with systemd-nspawn (docs/decisions.md, 83).

A container's directory holds `upper/` and `work/` (its overlay's writable layer),
`root/` (the overlay mounted: the image's rootfs below, read-only and shared) and
`console.log` (what nspawn printed). nspawn runs with:

- `--private-users=ID_BASE:65536 --private-users-ownership=off`: a user namespace whose
  root is host uid ID_BASE (the image's files are owned by that range, rootfs.py);
- `--private-network`: a network namespace with only `lo`, so nothing leaves the container
  (deny-outgoing is the only mode);
- `--as-pid2 sleep infinity`: nspawn's stub init as PID 1, reaping orphans, and a payload
  that only keeps the container alive. Not `--boot`: systemd as the container's init
  failed in the user namespace on these hosts ("Failed to create /init.scope control
  group: Permission denied"), and a boot costs ~1 s where this starts in ~30 ms;
- `--register=no --keep-unit`: no systemd-machined, no scope unit (no systemd on the host);
  the cgroups are ours (cgroups.py).

The container's PID 1 (the "leader") is nspawn's child; commands enter with
`nsenter --target LEADER --all` from a shell that first joined the container's cgroups.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..vm.libvirt_domains import console_tail
from .cgroups import CgroupError, Cgroups
from .rootfs import ID_BASE, ID_RANGE

START_TIMEOUT = 30.0
# what a command in a container starts with: not the server's environment
EXEC_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}


class ContainerError(RuntimeError):
    """A container could not be started, entered or removed; the message says why (with
    the tail of nspawn's output when it failed to start)."""


@dataclass(frozen=True)
class ContainerSpec:
    """One container: its `name` (nspawn's machine name and its cgroups' name), the
    image's shifted `rootfs`, its own directory `dir`, memory in MiB, CPUs and host
    name."""

    name: str
    rootfs: Path
    dir: Path
    mem_mib: int
    cpus: int
    hostname: str = ""  # the container's host name (default: its name)

    @property
    def root(self) -> Path:
        """Where the overlay is mounted: the container's `/`."""
        return self.dir / "root"

    @property
    def console(self) -> Path:
        """nspawn's output."""
        return self.dir / "console.log"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _overlay_path(path: Path) -> str:
    """`path` as an overlayfs mount option value: `:` separates lower layers and `,`
    options, so image directories (`lxc:debian-12:x86_64`) have their colons escaped;
    ContainerError for a comma, which the mount option parser splits at."""
    text = str(path)
    if "," in text:
        raise ContainerError(f"{text}: a path with a comma cannot be an overlay layer")
    return text.replace("\\", "\\\\").replace(":", "\\:")


def _own_pid_ns(pid: int) -> bool:
    """Whether `pid` is in a PID namespace other than ours."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


class Runtime:
    """Containers of one server, in `cgroups` (cgroups.setup() must have run)."""

    def __init__(self, cgroups: Cgroups) -> None:
        self.cgroups = cgroups
        self._lock = threading.Lock()
        self._spawned: dict[str, subprocess.Popen] = {}  # to reap nspawn when it ends

    def start(self, spec: ContainerSpec) -> int:
        """Mount the container's root (on its own layer, new or kept by stop()), make its
        cgroups and start it; its leader's pid once the payload runs (~30 ms).
        ContainerError (the container is stopped again)."""
        try:
            return self._start(spec)
        except BaseException:
            with contextlib.suppress(ContainerError):
                self.stop(spec)
            raise

    def _start(self, spec: ContainerSpec) -> int:
        for sub in ("upper", "work", "root"):
            (spec.dir / sub).mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={_overlay_path(spec.rootfs)},upperdir={_overlay_path(spec.dir / 'upper')},"
             f"workdir={_overlay_path(spec.dir / 'work')}", str(spec.root)],
            capture_output=True, text=True)
        if res.returncode != 0:
            raise ContainerError(f"container {spec.name}: mounting its root failed: "
                                 f"{res.stderr.strip()}")
        os.chown(spec.root, ID_BASE, ID_BASE)  # the overlay's top: the container's root's
        try:
            self.cgroups.create(spec.name, spec.mem_mib, spec.cpus)
        except CgroupError as exc:
            raise ContainerError(f"container {spec.name}: {exc}") from None
        argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                f"--private-users={ID_BASE}:{ID_RANGE}", "--private-users-ownership=off",
                "--private-network", "--as-pid2", f"--machine={spec.name}",
                "--console=read-only", f"--directory={spec.root}",
                *([f"--hostname={spec.hostname}"] if spec.hostname else []),
                "sleep", "infinity"]
        with open(spec.console, "ab") as out:
            proc = subprocess.Popen(self.cgroups.wrap(spec.name, argv, supervisor=True),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        with self._lock:
            self._spawned[spec.name] = proc
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ContainerError(f"container {spec.name}: nspawn exited with "
                                     f"{proc.returncode}:\n{console_tail(spec.console)}")
            # PID 1 of the container: nspawn's child in another PID namespace (nspawn
            # forks helpers of its own too), set up once it started the payload
            leader = next((c for c in _children(proc.pid) if _own_pid_ns(c)
                           and _children(c)), 0)
            if leader:
                try:  # the stub init and its payload: nspawn forked them outside
                    self.cgroups.confine(spec.name, [leader, *_children(leader)])
                except CgroupError as exc:
                    raise ContainerError(f"container {spec.name}: {exc}") from None
                (spec.dir / "leader.pid").write_text(f"{leader}\n")
                return leader
            time.sleep(0.005)
        raise ContainerError(f"container {spec.name}: not running after {START_TIMEOUT:.0f}s"
                             f":\n{console_tail(spec.console)}")

    def leader(self, spec: ContainerSpec) -> int:
        """The running container's PID 1 (its pid file, checked against the container's
        cgroups: a reused pid is not taken for it); ContainerError when it is not
        running."""
        try:
            pid = int((spec.dir / "leader.pid").read_text())
        except (OSError, ValueError):
            pid = 0
        if not pid or pid not in self.cgroups.pids(spec.name):
            raise ContainerError(f"container {spec.name} is not running")
        return pid

    def enter_argv(self, spec: ContainerSpec, argv: list[str]) -> list[str]:
        """The host command that runs `argv` in the running container as its root, in
        /root, with EXEC_ENV only: `env -i` on the host first, since nsenter hands its
        environment to the container's first program, which the container's root may
        have replaced (no byte of the server's environment reaches the container), and
        from a shell that joined the container's cgroups (cgroups.wrap). ContainerError
        when it is not running."""
        leader = self.leader(spec)
        env = [f"{k}={v}" for k, v in EXEC_ENV.items()]
        return ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                *self.cgroups.wrap(spec.name, [
                    "nsenter", f"--target={leader}", "--all", "--", "/usr/bin/env", "-i",
                    *env, "/bin/sh", "-c", 'cd "$HOME" 2>/dev/null; exec "$@"', "sh",
                    *argv])]

    def exec_argv(self, spec: ContainerSpec, argv: list[str], stdin: bytes = b"",
                  timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `argv` in the container (enter_argv), `stdin` as its input; the completed
        process (returncode, stdout, stderr as bytes; 137 when the memory limit killed
        it). ContainerError when the container is not running; subprocess.TimeoutExpired
        after `timeout` seconds (the command is killed)."""
        return subprocess.run(self.enter_argv(spec, argv), input=stdin,
                              capture_output=True, timeout=timeout)

    def remove(self, spec: ContainerSpec) -> None:
        """stop() the container and remove its directory (its own layer); idempotent.
        ContainerError when a step fails."""
        self.stop(spec)
        shutil.rmtree(spec.dir, ignore_errors=True)

    def stop(self, spec: ContainerSpec) -> None:
        """Kill every process of the container, reap nspawn, unmount its root and remove its
        cgroups; its directory (its own layer) stays, and start() runs it again from
        there. Idempotent; ContainerError when a step fails."""
        try:
            self.cgroups.kill(spec.name)
        except CgroupError as exc:
            raise ContainerError(str(exc)) from None
        with self._lock:
            proc = self._spawned.pop(spec.name, None)
        if proc is not None:
            proc.wait(timeout=10)
        if os.path.ismount(spec.root):
            res = subprocess.run(["umount", str(spec.root)], capture_output=True, text=True)
            if res.returncode != 0:
                raise ContainerError(f"container {spec.name}: unmounting its root failed: "
                                     f"{res.stderr.strip()}")
        try:
            self.cgroups.remove(spec.name)
        except CgroupError as exc:
            raise ContainerError(str(exc)) from None
        (spec.dir / "leader.pid").unlink(missing_ok=True)
