"""The lxc engine's runtime (ttserver/containers): real systemd-nspawn containers of the
debian-12 image's root filesystem, in user namespaces and cgroups of their own."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttserver.containers import forwards, limits, nspawn, rootfs
from ttserver.containers.cgroups import ROOT, Cgroups
from ttserver.containers.nspawn import ContainerError, ContainerSpec, Runtime
from ttserver.images import lxc
from ttserver.images.lxc import in_use

from helpers import IMAGE_PATH, new_run_dir

# the image scripts/setup-host.sh builds; it installs systemd-nspawn too
DISK = IMAGE_PATH / "qemu:debian-12:x86_64" / "disk.qcow2"


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """The debian-12 image's files, shifted for containers (a few seconds)."""
    run_dir = new_run_dir("containers-")
    try:  # colons, as in an image's directory name: escaped in the overlay's options
        (run_dir / "lxc:debian-12:x86_64").mkdir()
        yield rootfs.from_disk(DISK, run_dir / "lxc:debian-12:x86_64" / "rootfs")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture()
def runtime() -> Iterator[Runtime]:
    """A runtime with a cgroup group of its own; at the end no container may be left in
    it, and the group itself is removed."""
    cgroups = Cgroups(f"ttstack-test-{uuid.uuid4().hex[:8]}")
    cgroups.setup()
    try:
        yield Runtime(cgroups)
        assert cgroups.names() == []
    finally:
        cgroups.close()
    assert not any((ROOT / c / cgroups.group).exists() for c in ("memory", "cpu", "systemd"))


def spec(image_root: Path, tmp: Path, name: str, mem_mib: int = 256,
         disk_mib: int = 2048) -> ContainerSpec:
    return ContainerSpec(name=name, rootfs=image_root, dir=tmp / name, mem_mib=mem_mib, cpus=1,
                         disk_mib=disk_mib)


def run(rt: Runtime, s: ContainerSpec, script: str, stdin: bytes = b"") -> tuple[int, str]:
    res = rt.exec_argv(s, ["/bin/sh", "-c", script], stdin=stdin)
    return res.returncode, (res.stdout + res.stderr).decode()


def assert_gone(rt: Runtime, s: ContainerSpec) -> None:
    assert rt.cgroups.pids(s.name) == set()
    assert not s.dir.exists()
    mounts = Path("/proc/self/mounts").read_text()
    assert str(s.root) not in mounts and str(s.layer) not in mounts
    assert str(s.disk) not in subprocess.run(["losetup", "-a"], capture_output=True,
                                             text=True).stdout
    assert not any(d.exists() for d in rt.cgroups.dirs(s.name))


def test_a_pid_listed_as_0_is_no_process_of_the_container(tmp_path: Path):
    """cgroup.procs lists an exiting process as pid 0 (seen during a fork bomb's mass
    SIGKILL): taken for a process, kill() sent SIGKILL to pid 0, the server's own process
    group, and the server died."""
    cgroups = Cgroups("g", v2_mount=tmp_path)
    (tmp_path / "g" / "c" / "payload").mkdir(parents=True)
    (tmp_path / "g" / "c" / "cgroup.procs").write_text("0\n4242\n")
    (tmp_path / "g" / "c" / "payload" / "cgroup.procs").write_text("0\n")
    assert cgroups.pids("c") == {4242}


def test_cgroup_trees_past_path_max_are_walked_and_removed(tmp_path: Path):
    """A container's root made cgroups 21 levels of 200-byte names deep: every walk by
    path raised ENAMETOOLONG, and the server could neither delete the ENV nor start
    again. (Containers can no longer make cgroups: Cgroups.seal.)"""
    cgroups = Cgroups("g", v2_mount=tmp_path)
    (tmp_path / "g" / "c").mkdir(parents=True)
    fd = os.open(tmp_path / "g" / "c", os.O_RDONLY)
    for _ in range(25):
        os.mkdir("d" * 200, dir_fd=fd)
        fd, old = os.open("d" * 200, os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    with os.fdopen(os.open("cgroup.procs", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w") as f:
        f.write("77\n")
    assert cgroups.names() == ["c"]
    assert cgroups.pids("c") == {77}
    os.unlink("cgroup.procs", dir_fd=fd)  # remove() takes directories only, as in cgroupfs
    os.close(fd)
    cgroups.remove("c")
    assert not (tmp_path / "g" / "c").exists()


def test_a_container_is_an_unprivileged_root_with_its_own_files_and_no_network(
        image_root: Path, runtime: Runtime, tmp_path: Path):
    s = spec(image_root, tmp_path, f"tt-c-{uuid.uuid4().hex[:6]}")
    assert not in_use(image_root)
    leader = runtime.start(s)
    try:
        assert in_use(image_root)  # so `ttserver image build` does not replace it:
        with pytest.raises(lxc.ContainerImageError, match="in use by running containers"):
            lxc.derive(DISK.parent, image_root.parent.parent, force=True)
        # root inside, host uid ID_BASE outside
        assert run(runtime, s, "id -u; hostname; cat /etc/debian_version") [1].split()[:2] == [
            "0", s.name]
        status = Path(f"/proc/{leader}/status").read_text()
        assert f"Uid:\t{rootfs.ID_BASE}\t" in status
        # its cgroups are the host root's: it cannot make cgroups of its own
        code, out = run(runtime, s, "mkdir /sys/fs/cgroup/systemd/x; "
                                    "mkdir /sys/fs/cgroup/unified/x; ls /sys/fs/cgroup/systemd")
        assert out.count("Permission denied") == 2 and "x" not in out.split(), out
        # a file written inside lands in the container's own layer, owned by that uid
        code, out = run(runtime, s, "cat > /root/note; ls -ln /root/note", stdin=b"hello")
        assert code == 0, out
        written = s.layer / "upper" / "root" / "note"
        assert written.read_bytes() == b"hello"
        assert (written.stat().st_uid, written.stat().st_gid) == (rootfs.ID_BASE,) * 2
        assert not (image_root / "root" / "note").exists()
        # only a loopback of its own: the host's loopback listener is not reachable
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            code, out = run(runtime, s, "ls /sys/class/net; python3 -c 'import socket; "
                                        f"socket.create_connection((\"127.0.0.1\", {port}), 3)'")
            assert out.split()[0] == "lo" and "ConnectionRefusedError" in out, out
            listener.settimeout(0.5)
            with pytest.raises(TimeoutError):
                listener.accept()
        # a command gets a clean environment, not the server's
        os.environ["TT_SECRET_OF_THE_SERVER"] = "x"
        try:
            assert "TT_SECRET" not in run(runtime, s, "env")[1]
        finally:
            del os.environ["TT_SECRET_OF_THE_SERVER"]
    finally:
        runtime.remove(s)
    assert_gone(runtime, s)
    assert not in_use(image_root)
    with pytest.raises(ContainerError, match="is not running"):
        runtime.exec_argv(s, ["true"])


def test_the_memory_limit_kills_what_goes_past_it(image_root: Path, runtime: Runtime,
                                                  tmp_path: Path):
    s = spec(image_root, tmp_path, f"tt-m-{uuid.uuid4().hex[:6]}", mem_mib=128)
    runtime.start(s)
    try:
        code, out = run(runtime, s, "python3 -c 'b = bytearray(64 << 20); print(len(b))'")
        assert (code, out.strip()) == (0, str(64 << 20))
        code, out = run(runtime, s, "python3 -c 'b = bytearray(300 << 20); print(len(b))'")
        assert code == 137, out  # SIGKILL by the OOM killer of the container's cgroup
        oom = (ROOT / "memory" / runtime.cgroups.group / s.name / "memory.oom_control")
        assert "oom_kill 1" in oom.read_text().splitlines()
        # /tmp is a tmpfs charged to the container: filled past the limit, the OOM killer
        # once chose nspawn (the biggest process in the cgroup) and the container ended
        code, out = run(runtime, s, "dd if=/dev/zero of=/tmp/fill bs=1M count=200")
        assert code != 0, out
        assert run(runtime, s, "rm /tmp/fill; echo alive") == (0, "alive\n")
    finally:
        runtime.remove(s)
    assert_gone(runtime, s)


def test_the_disk_size_bounds_what_a_container_writes(image_root: Path, runtime: Runtime,
                                                      tmp_path: Path):
    """The container's layer is a file system of its disk size (it was a directory on the
    host's: a container could fill the host's disk); it is kept from a stop to a start."""
    s = spec(image_root, tmp_path, f"tt-d-{uuid.uuid4().hex[:6]}", disk_mib=64)
    runtime.start(s)
    try:  # sparse: a new one takes what its file system's metadata takes
        assert s.disk.stat().st_blocks * 512 < 16 << 20, s.disk.stat()
        code, out = run(runtime, s, "dd if=/dev/zero of=/root/big bs=1M count=100")
        assert code != 0 and "No space left on device" in out, out
        assert run(runtime, s, "rm /root/big; echo kept > /root/note; echo alive") == (
            0, "alive\n")
        assert s.disk.stat().st_size == 64 << 20
        runtime.stop(s)
        assert not os.path.ismount(s.layer) and s.disk.is_file()
        runtime.start(s)
        assert run(runtime, s, "cat /root/note") == (0, "kept\n")
    finally:
        runtime.remove(s)
    assert_gone(runtime, s)


def test_what_a_container_writes_to_its_console_is_capped(image_root: Path,
                                                         runtime: Runtime, tmp_path: Path):
    """nspawn copies /dev/console to console.log on the host: 200 MiB written there took
    200 MiB of the host's disk, outside the container's own."""
    s = spec(image_root, tmp_path, f"tt-o-{uuid.uuid4().hex[:6]}")
    runtime.start(s)
    try:
        code, out = run(runtime, s, "head -c 12M /dev/zero | tr '\\0' x > /dev/console; "
                                    "echo written")
        assert (code, out) == (0, "written\n")
        time.sleep(0.5)
        assert s.console.stat().st_size <= nspawn.CONSOLE_MAX
        assert s.console.read_bytes().endswith(b"x" * 1000)
        assert run(runtime, s, "echo alive") == (0, "alive\n")
    finally:
        runtime.remove(s)
    assert_gone(runtime, s)


def test_a_fork_bomb_ends_with_its_container(image_root: Path, runtime: Runtime,
                                            tmp_path: Path):
    """A fork bomb stops at the container's task limit (here 200) and stop() kills it to
    the last process, whatever pids the dying tasks show in cgroup.procs meanwhile."""
    s = spec(image_root, tmp_path, f"tt-b-{uuid.uuid4().hex[:6]}")
    runtime.start(s)
    pids = ROOT / "pids" / runtime.cgroups.group / s.name
    try:
        (pids / "pids.max").write_text("200")
        bomb = subprocess.Popen(runtime.enter_argv(s, ["/bin/sh", "-c", "b(){ b|b& }; b"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "max 0" in (pids / "pids.events").read_text():  # no fork refused yet
            assert time.monotonic() < deadline, "the bomb did not reach the task limit"
            time.sleep(0.1)
        assert int((pids / "pids.current").read_text()) <= 200
    finally:
        runtime.remove(s)  # this test's process survives it
    bomb.wait(10)
    assert_gone(runtime, s)


def test_a_new_runtime_removes_what_a_crashed_server_left(image_root: Path, runtime: Runtime,
                                                          tmp_path: Path):
    """After a crash the server has no process handles: the container's cgroups name it
    and hold every one of its processes (nspawn's too)."""
    s = spec(image_root, tmp_path, f"tt-x-{uuid.uuid4().hex[:6]}")
    runtime.start(s)
    try:  # orphans, reparented to the stub init
        run(runtime, s, "for i in 1 2; do sleep 1000 >/dev/null 2>&1 & done")
        assert len(runtime.cgroups.pids(s.name)) >= 5  # nspawn, init, payload, 2 sleeps
        after_crash = Runtime(runtime.cgroups)
        assert runtime.cgroups.names() == [s.name]
        after_crash.remove(s)
        assert_gone(runtime, s)
    finally:
        runtime.remove(s)  # idempotent; reaps the old runtime's nspawn


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_forwards_hold_few_threads_share_a_budget_and_let_go_of_clients(monkeypatch):
    """3000 connections held by the guest made 6000 relay threads in the server, which
    stayed after the clients closed; 32 forwarded ports of 128 connections each held
    8000 file descriptors. Here the "container" is this process's own network namespace,
    the guest a listener that accepts and never closes; its two forwards share a budget."""
    monkeypatch.setattr(forwards, "HALF_CLOSE_GRACE", 1.0)
    guest = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold() -> None:
        with contextlib.suppress(OSError):  # until the test closes it
            while True:
                held.append(guest.accept()[0])

    threading.Thread(target=hold, daemon=True).start()
    budget = forwards.Budget(60)
    fwds = [forwards.Forward("127.0.0.1", free_port(), guest.getsockname()[1],
                             lambda: "/proc/self/ns/net", budget) for _ in range(2)]
    threads = threading.active_count()
    clients = []
    try:
        for fwd in fwds:
            for _ in range(40):
                clients.append(socket.create_connection(("127.0.0.1", fwd.host_port), 5))
        deadline = time.monotonic() + 20
        while budget.used < 60:
            assert time.monotonic() < deadline, budget.used
            time.sleep(0.05)
        time.sleep(0.5)
        assert budget.used == 60  # the rest closed at accept
        assert threading.active_count() - threads < 20
        clients[0].sendall(b"x")  # a relay still relays
        for c in clients:
            c.close()
        deadline = time.monotonic() + 10
        while budget.used:  # the guest holds its ends: the grace ends them
            assert time.monotonic() < deadline, budget.used
            time.sleep(0.1)
    finally:
        for fwd in fwds:
            fwd.close()
        for c in clients + held:
            c.close()
        guest.close()


def test_a_guest_port_that_never_answers_delays_no_other_forward():
    """Dials shared 8 threads and waited 10 s each for a port whose accept queue was full
    (its SYNs go unanswered): 40 connections to it, and every other container's SSH
    waited 39 s and more."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    with contextlib.suppress(OSError):  # fill its accept queue: it answers no more SYNs
        for _ in range(4):
            fillers.append(socket.create_connection(silent.getsockname(), 0.5))
    talker = socket.create_server(("127.0.0.1", 0))

    def greet() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = talker.accept()[0]
                conn.sendall(b"hi")
                conn.close()

    threading.Thread(target=greet, daemon=True).start()
    stuck = forwards.Forward("127.0.0.1", free_port(), silent.getsockname()[1],
                             lambda: "/proc/self/ns/net")
    other = forwards.Forward("127.0.0.1", free_port(), talker.getsockname()[1],
                             lambda: "/proc/self/ns/net")
    clients = []
    try:
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", stuck.host_port), 5))
        time.sleep(0.5)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", other.host_port), 5) as c:
            c.settimeout(10)
            assert c.recv(2) == b"hi"
        assert time.monotonic() - started < 2
    finally:
        for fwd in (stuck, other):
            fwd.close()
        for c in clients + fillers:
            c.close()
        silent.close()
        talker.close()


def test_the_limits_containers_share_with_root_are_raised_never_lowered(tmp_path: Path):
    """Containers count against host root's per-user limits: 100 inotify instances in
    one left root 28 of its 128."""
    for name in limits.SHARED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("128\n")
    (tmp_path / "fs/inotify/max_user_watches").write_text("99999999\n")
    (tmp_path / "kernel/keys/maxbytes").unlink()
    said = limits.raise_shared(tmp_path)
    assert (tmp_path / "fs/inotify/max_user_instances").read_text() == "1048576"
    assert (tmp_path / "fs/inotify/max_user_watches").read_text() == "99999999\n"
    assert "raised fs.inotify.max_user_instances from 128 to 1048576" in said
    assert any(line.startswith("could not raise kernel.keys.maxbytes") for line in said)
    assert len(said) == 4
