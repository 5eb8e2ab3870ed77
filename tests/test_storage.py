"""Storage backends on real VMs: with state and images on a btrfs (a loop-mounted file
made here), every VM disk is a btrfs snapshot — no qcow2 backing chain — that works, is
the VM's own, and is gone (subvolume deleted) after delete. ZFS cannot be tested here."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
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


def test_btrfs_snapshots_per_vm_and_nothing_left(btrfs_mount: Path):
    mnt = btrfs_mount
    srv = ServerProcess(mnt / "state", mnt / "images", port_range="43500-43999").start()
    try:
        st = requests.get(srv.url + "/status", timeout=10).json()
        assert st["storage"] == "btrfs"
        sid = srv.server_id()
        resp = requests.post(srv.url + "/envs", json={"name": "snap", "vm_number": 2,
                                                      "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "snap")
        assert env["state"] == "running", env["error"]
        vm_ids = [vm["id"] for vm in env["vms"]]
        subs = subvolumes(mnt)
        assert {f"state/vms/{i}" for i in vm_ids} <= set(subs), subs
        for i in vm_ids:  # standalone disks: the filesystem shares the blocks, not QEMU
            info = sh("qemu-img", "info", "-U", str(mnt / "state" / "vms" / i / "disk.qcow2"))
            assert "backing file" not in info, info
        # each VM writes its own disk
        res = requests.post(f"{srv.url}/envs/snap/run", timeout=120, json={
            "cmd": "echo mine > /root/only-here && sync", "vms": ["0"]}).json()["results"]
        assert res[0]["exit_code"] == 0, res
        res = requests.post(f"{srv.url}/envs/snap/run", timeout=120, json={
            "cmd": "cat /root/only-here 2>/dev/null || echo none"}).json()["results"]
        assert [r["stdout"] for r in res] == ["mine\n", "none\n"]
        ports = [vm["ssh_port"] for vm in env["vms"]]
        assert requests.delete(srv.url + "/envs/snap", timeout=120).status_code == 200
        assert not any(s.startswith("state/vms/") for s in subvolumes(mnt)), subvolumes(mnt)
        assert leftovers(sid, mnt / "state", ports) == NOTHING_LEFT
    finally:
        srv.stop()


def test_storage_choices_are_checked(tmp_path: Path):
    """Asking for a backend the host cannot give is a clear start-up error."""
    for storage, why in (("btrfs", "on one btrfs filesystem"), ("zfs", "ZFS kernel module")):
        proc = subprocess.run(
            ["python3", "-m", "ttserver.cli", "--image-path", str(IMAGE_PATH),
             "--cfgdb-path", str(tmp_path / storage), "--storage", storage,
             "--serv-port", "1"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and why in proc.stderr, proc.stderr
