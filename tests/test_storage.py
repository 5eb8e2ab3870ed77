"""Storage backends on real VMs: with state and images on a btrfs (a loop-mounted file
made here), every VM disk is a btrfs snapshot; with state on a ZFS pool (a file-backed
pool under zfs-fuse here), a ZFS clone. Either way no qcow2 backing chain, the disk works,
is the VM's own, and is gone (subvolume deleted, clone destroyed) after delete."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from helpers import IMAGE_PATH, NOTHING_LEFT, ServerProcess, leftovers, new_run_dir, wait_env

pytestmark = pytest.mark.vm
IMAGE = "qemu:debian-12:x86_64"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=300).stdout


@pytest.fixture(scope="module")
def btrfs_mount() -> Iterator[Path]:
    if not shutil.which("mkfs.btrfs"):
        pytest.skip("btrfs-progs is not installed (scripts/setup-host.sh installs it)")
    run_dir = new_run_dir("btrfs-")
    backing, mnt = run_dir / "fs.img", run_dir / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(4 << 30)  # sparse: only what is written takes space
    sh("mkfs.btrfs", "-q", str(backing))
    sh("mount", "-o", "loop", str(backing), str(mnt))
    try:
        (mnt / "images").mkdir()
        shutil.copytree(IMAGE_PATH / IMAGE, mnt / "images" / IMAGE)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)


def subvolumes(mnt: Path) -> list[str]:
    return [line.split(" path ")[1] for line in
            sh("btrfs", "subvolume", "list", str(mnt)).splitlines() if " path " in line]


def check_vm_clones(state: Path, images: Path, backend: str,
                    clones: Callable[[], set[str]]) -> None:
    """A 2-VM ENV on `backend`: each VM directory is a filesystem clone (named in
    `clones()`), its disk has no qcow2 backing chain, writes stay per VM, and delete
    leaves no clone, domain, directory or port."""
    # warm clones are qcow2 overlays on any backend: these VMs must boot cold
    srv = ServerProcess(state, images, port_range="43500-43999",
                        extra=("--no-warm-clones",)).start()
    try:
        assert requests.get(srv.url + "/status", timeout=10).json()["storage"] == backend
        sid = srv.server_id()
        resp = requests.post(srv.url + "/envs", json={"name": "snap", "vm_number": 2,
                                                      "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "snap")
        assert env["state"] == "running", env["error"]
        vm_ids = {vm["id"] for vm in env["vms"]}
        assert vm_ids <= clones(), clones()
        for i in vm_ids:  # standalone disks: the filesystem shares the blocks, not QEMU
            info = sh("qemu-img", "info", "-U", str(state / "vms" / i / "disk.qcow2"))
            assert "backing file" not in info, info
        # each VM writes its own disk
        res = requests.post(f"{srv.url}/envs/snap/run", timeout=120, json={
            "cmd": "echo mine > /root/only-here && sync", "vms": ["0"]}).json()["results"]
        assert res[0]["exit_code"] == 0, res
        res = requests.post(f"{srv.url}/envs/snap/run", timeout=120, json={
            "cmd": "cat /root/only-here 2>/dev/null || echo none"}).json()["results"]
        assert [r["stdout"] for r in res] == ["mine\n", "none\n"]
        ports = [vm["ssh_port"] for vm in env["vms"]]
        resp = requests.delete(srv.url + "/envs/snap", timeout=120)
        assert resp.status_code == 200, f"{resp.text}\n{srv.log_tail()}"
        assert not vm_ids & clones(), clones()
        assert leftovers(sid, state, ports) == NOTHING_LEFT
    finally:
        srv.stop()


@pytest.mark.slow
def test_btrfs_snapshots_per_vm_and_nothing_left(btrfs_mount: Path):
    mnt = btrfs_mount

    def snapshots() -> set[str]:
        return {s.rsplit("/", 1)[1] for s in subvolumes(mnt) if s.startswith("state/vms/")}

    check_vm_clones(mnt / "state", mnt / "images", "btrfs", snapshots)


@pytest.fixture
def zfs_pool() -> Iterator[tuple[str, Path]]:
    """A pool on a sparse file, under kernel ZFS or zfs-fuse (scripts/setup-host.sh starts
    zfs-fuse where the kernel has no ZFS, as here)."""
    if not shutil.which("zpool") or subprocess.run(
            ["zpool", "list"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no ZFS here: neither the kernel module nor a running zfs-fuse")
    run_dir = new_run_dir("zfs-")
    pool = f"tt{run_dir.name.rsplit('-', 1)[1]}"
    backing, mnt = run_dir / "pool.img", run_dir / "mnt"
    with open(backing, "wb") as f:
        f.truncate(4 << 30)
    sh("zpool", "create", "-m", str(mnt), pool, str(backing))
    try:
        yield pool, mnt
    finally:
        destroy_pool(pool)
        shutil.rmtree(run_dir, ignore_errors=True)


def destroy_pool(pool: str, wait: float = 30) -> None:
    """`zpool destroy`, retried: right after the last VM ends the kernel still holds its
    mount namespace's copies of our mounts for a moment ("pool is busy"). A pool that
    will not go is a leak: said, not ignored."""
    deadline = time.monotonic() + wait
    while True:
        proc = subprocess.run(["zpool", "destroy", "-f", pool], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"test pool {pool} left behind: {proc.stderr.strip()}")
        print(f"zpool destroy {pool}: {proc.stderr.strip()}; retrying")
        time.sleep(0.5)


@pytest.mark.slow
def test_zfs_clones_per_vm_and_nothing_left(zfs_pool: tuple[str, Path]):
    pool, mnt = zfs_pool

    def datasets() -> list[tuple[str, str]]:
        out = sh("zfs", "list", "-H", "-o", "name,origin", "-r", pool).splitlines()
        return [(name, origin) for name, origin in (ln.split("\t") for ln in out)]

    def clones() -> set[str]:
        return {name.rsplit("/", 1)[1] for name, origin in datasets()
                if name.split("/")[2:3] == ["vms"] and origin.endswith("@base")}

    check_vm_clones(mnt / "state", IMAGE_PATH, "zfs", clones)
    # A clone no VM names (a crash between `zfs clone` and the database) is destroyed at
    # the next start, even unmounted, where the directory sweep cannot see it.
    base = next(name for name, _ in datasets() if name.split("/")[2:3] == ["bases"]
                and name.count("/") == 3)
    stray = f"{base.split('/bases/')[0]}/vms/stray"
    sh("zfs", "clone", "-o", "canmount=off", f"{base}@base", stray)
    assert "stray" in clones()
    ServerProcess(mnt / "state", IMAGE_PATH, port_range="43500-43999",
                  extra=("--no-warm-clones",)).start().stop()
    assert clones() == set(), datasets()


def test_storage_choices_are_checked(run_dir: Path):
    """Asking for a backend the host cannot give is a clear start-up error."""
    for storage, why in (("btrfs", "on one btrfs filesystem"), ("zfs", "on a mounted ZFS dataset")):
        proc = subprocess.run(
            ["python3", "-m", "ttserver.cli", "--image-path", str(IMAGE_PATH),
             "--cfgdb-path", str(run_dir / storage), "--storage", storage,
             "--serv-port", "1"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and why in proc.stderr, proc.stderr
