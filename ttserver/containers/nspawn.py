"""Start, enter and remove containers with systemd-nspawn (docs/decisions.md, 83).

A container's directory holds `disk.img` (its own ext4 file system, sparse, of the VM
row's disk size: the container's "disk", so its writes stop there as a VM's do, not at a
full host), mounted (loop) at `layer/` while it runs, with `layer/upper` and `layer/work`
(its overlay's writable layer); `root/` (the overlay mounted: the image's rootfs below,
read-only and shared) and `console.log` (what nspawn printed). nspawn runs with:

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
# What a container may write to its console (nspawn copies /dev/console to console.log):
# 200 MiB written by `> /dev/console` in 1.5 s went to the host's disk, beside the
# container's own. The first CONSOLE_MAX bytes are kept (nspawn's own errors come
# first); the rest is read and dropped by a sink in the container's CPU cgroup.
CONSOLE_MAX = 4 << 20
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
    disk_mib: int = 0  # the size of its layer's file system (0: unknown, to stop it only)
    hostname: str = ""  # the container's host name (default: its name)

    @property
    def root(self) -> Path:
        """Where the overlay is mounted: the container's `/`."""
        return self.dir / "root"

    @property
    def disk(self) -> Path:
        """The container's own file system (an ext4 image file, sparse)."""
        return self.dir / "disk.img"

    @property
    def layer(self) -> Path:
        """Where `disk` is mounted while the container runs."""
        return self.dir / "layer"

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


def _mount(spec: ContainerSpec, args: list[str], what: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise ContainerError(f"container {spec.name}: mounting {what} failed: "
                             f"{res.stderr.strip()}")


def _make_disk(spec: ContainerSpec) -> None:
    """The container's file system: a sparse file of `disk_mib` MiB made ext4 (~15 ms;
    inode tables and journal initialized lazily), renamed into place once complete;
    ContainerError."""
    if spec.disk_mib < 1:
        raise ContainerError(f"container {spec.name}: no disk size to make its disk with")
    part = spec.disk.with_name(spec.disk.name + ".part")
    with open(part, "wb") as f:
        f.truncate(spec.disk_mib << 20)
    res = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                          "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(part)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        part.unlink(missing_ok=True)
        raise ContainerError(f"container {spec.name}: making its disk failed: "
                             f"{res.stderr.strip()}")
    part.rename(spec.disk)


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
        # nspawn and its console sink, to reap when they end
        self._spawned: dict[str, tuple[subprocess.Popen, subprocess.Popen]] = {}

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
        spec.root.mkdir(parents=True, exist_ok=True)
        if not spec.disk.exists():
            _make_disk(spec)
        spec.layer.mkdir(exist_ok=True)
        if not os.path.ismount(spec.layer):
            _mount(spec, ["-t", "ext4", "-o", "loop,nodev", str(spec.disk),
                          str(spec.layer)], "its disk")
        for sub in ("upper", "work"):
            (spec.layer / sub).mkdir(exist_ok=True)
        _mount(spec, ["-t", "overlay", "overlay", "-o",
                      f"lowerdir={_overlay_path(spec.rootfs)},"
                      f"upperdir={_overlay_path(spec.layer / 'upper')},"
                      f"workdir={_overlay_path(spec.layer / 'work')}", str(spec.root)],
               "its root")
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
        room = CONSOLE_MAX - (spec.console.stat().st_size if spec.console.exists() else 0)
        sink = subprocess.Popen(self.cgroups.wrap(spec.name, [
            "/bin/sh", "-c", 'head -c "$1" >> "$2"; exec cat > /dev/null', "sh",
            str(max(room, 0)), str(spec.console)], supervisor=True),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            proc = subprocess.Popen(self.cgroups.wrap(spec.name, argv, supervisor=True),
                                    stdin=subprocess.DEVNULL, stdout=sink.stdin,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            assert sink.stdin is not None
            sink.stdin.close()
        with self._lock:
            self._spawned[spec.name] = (proc, sink)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    sink.wait(5)  # it has written what nspawn said
                raise ContainerError(f"container {spec.name}: nspawn exited with "
                                     f"{proc.returncode}:\n{console_tail(spec.console)}")
            # PID 1 of the container: nspawn's child in another PID namespace (nspawn
            # forks helpers of its own too), set up once it started the payload
            leader = next((c for c in _children(proc.pid) if _own_pid_ns(c)
                           and _children(c)), 0)
            if leader:
                try:  # the stub init and its payload: nspawn forked them outside
                    self.cgroups.confine(spec.name, [leader, *_children(leader)])
                    self.cgroups.seal(spec.name)
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
            spawned = self._spawned.pop(spec.name, None)
        for proc in spawned or ():
            proc.wait(timeout=10)
        for mounted in (spec.root, spec.layer):  # the loop device goes with its mount
            if os.path.ismount(mounted):
                res = subprocess.run(["umount", str(mounted)], capture_output=True, text=True)
                if res.returncode != 0:
                    raise ContainerError(f"container {spec.name}: unmounting {mounted} "
                                         f"failed: {res.stderr.strip()}")
        try:
            self.cgroups.remove(spec.name)
        except CgroupError as exc:
            raise ContainerError(str(exc)) from None
        (spec.dir / "leader.pid").unlink(missing_ok=True)
