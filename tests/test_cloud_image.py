"""Imported generic cloud images: a Debian disk with cloud-init (built here the way cloud
images are made: a partition table, ext4 on partition 1, no ttstack customisation) is
imported with `ttserver image import`, and its VM takes hostname and SSH keys from the
NoCloud seed ttserver gives it — cloud-init reports the NoCloud datasource, done."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ttserver.images import build as imagebuild

from helpers import NOTHING_LEFT, ServerProcess, leftovers, new_run_dir, wait_env

pytestmark = pytest.mark.vm
CACHE = Path("/var/lib/ttstack/cloudtest")  # the built test image, reused between runs
NAME = "qemu:debcloud-12:x86_64"
PACKAGES = ["linux-image-cloud-amd64", "systemd-sysv", "udev", "openssh-server",
            "qemu-guest-agent", "cloud-init", "ifupdown", "isc-dhcp-client", "e2fsprogs",
            "cloud-guest-utils", "locales"]
DISK_MIB = 3072


def build_cloud_image() -> Path:
    """A 'downloaded' cloud image: qcow2 of a partitioned disk, made without loop mounts."""
    image = CACHE / "debcloud-12.qcow2"
    if image.is_file():
        return image
    work = CACHE / "work"
    imagebuild.remove_tree(work)
    work.mkdir(parents=True)
    try:
        root = work / "rootfs"
        imagebuild.run_step(["mmdebstrap", "--variant=apt", "--mode=root",
                         "--include=" + ",".join(PACKAGES),
                         *[f"--dpkgopt={o}" for o in imagebuild.DPKG_EXCLUDES],
                         "bookworm", str(root), imagebuild.host_mirror()], 900, "mmdebstrap")
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(DISK_MIB << 20)
        subprocess.run(["sfdisk", "-q", str(raw)], input="label: dos\nstart=2048, type=83\n",
                       text=True, check=True, timeout=60)
        imagebuild.run_step(["mkfs.ext4", "-q", "-F", "-L", "cloudimg-rootfs",
                         "-E", "offset=1048576", "-d", str(root), str(raw),
                         f"{DISK_MIB - 1}M"], 600, "mkfs.ext4")
        imagebuild.run_step(["qemu-img", "convert", "-O", "qcow2", str(raw),
                         str(work / "out.qcow2")], 600, "qemu-img convert")
        (work / "out.qcow2").rename(image)
    finally:
        imagebuild.remove_tree(work)
    return image


def ttserver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ttserver.cli", "image", *args],
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def imported() -> Iterator[Path]:
    source = build_cloud_image()
    run_dir = new_run_dir("cloud-")
    images = run_dir / "images"
    res = ttserver("import", str(source), "--name", NAME, "--image-path", str(images))
    assert res.returncode == 0, res.stderr
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)


def test_import_bad_input_is_a_clear_error(imported: Path):
    images = imported / "images"
    res = ttserver("import", "/nonexistent.qcow2", "--name", NAME, "--image-path", str(images))
    assert res.returncode == 1 and "is not a file" in res.stderr
    res = ttserver("import", str(CACHE / "debcloud-12.qcow2"), "--name", "no-colons",
                   "--image-path", str(images))
    assert res.returncode == 1 and "ENGINE:OS-VERSION:ARCH" in res.stderr, res.stderr
    res = ttserver("import", str(CACHE / "debcloud-12.qcow2"), "--name", NAME,
                   "--image-path", str(images))
    assert res.returncode == 1 and "exists" in res.stderr
    empty = imported / "empty.raw"
    empty.write_bytes(b"\0" * (1 << 20))
    res = ttserver("import", str(empty), "--name", "qemu:empty-1:x86_64",
                   "--image-path", str(imported / "other"))
    assert res.returncode == 1 and "no Linux root filesystem" in res.stderr, res.stderr
    corrupt = imported / "corrupt.qcow2"  # qemu-img itself fails: was a traceback
    corrupt.write_bytes(b"QFI\xfb" + b"\xff" * 4096)
    res = ttserver("import", str(corrupt), "--name", "qemu:corrupt-1:x86_64",
                   "--image-path", str(imported / "other"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("ttserver image import: reading the image failed"), res.stderr


@pytest.mark.slow
def test_cloud_image_vm_takes_its_identity_from_the_nocloud_seed(imported: Path):
    meta = json.loads((imported / "images" / NAME / "meta.json").read_text())
    assert meta["cloud_init"] and meta["cmdline"].startswith("root=/dev/vda1 ")
    srv = ServerProcess(imported / "state", imported / "images",
                        port_range="41200-41499").start()
    try:
        sid = srv.server_id()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "user@cloud",
                        "-f", str(imported / "user_key")], check=True, timeout=30)
        user_key = (imported / "user_key.pub").read_text().strip()
        resp = requests.post(srv.url + "/envs", json={"name": "cloud", "os_prefix": ["debcloud"],
                                                      "ssh_keys": [user_key], "warm": False},
                             timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "cloud")
        assert env["state"] == "running", env["error"]

        def run(cmd: str, **kw) -> dict:
            resp = requests.post(srv.url + "/envs/cloud/run", json={"cmd": cmd, **kw},
                                 timeout=400)
            assert resp.status_code == 200, resp.text
            return resp.json()["results"][0]

        status = run("cloud-init status --wait --long", timeout=300)
        assert "status: done" in status["stdout"], status
        assert "DataSourceNoCloud" in status["stdout"], status
        assert run("hostname")["stdout"] == "cloud-0\n"
        assert user_key in run("cat /root/.ssh/authorized_keys")["stdout"]
        assert run("id -un", use_ssh=True)["stdout"] == "root\n"
        ports = [vm["ssh_port"] for vm in env["vms"]]
        assert requests.delete(srv.url + "/envs/cloud", timeout=120).status_code == 200
        assert leftovers(sid, imported / "state", ports) == NOTHING_LEFT
    finally:
        srv.stop()


@pytest.mark.slow
def test_cloud_image_vms_are_warm_clones_of_a_template_cloud_init_finished(imported: Path):
    """The server makes a cloud image's template by itself (booted with a seed of its own,
    saved once cloud-init is done); its clones come up warm, each with its own identity
    and the ENV's keys, and cloud-init reports done in them (nothing left to do)."""
    srv = ServerProcess(imported / "warm-state", imported / "images",
                        port_range="41200-41499", template_cache=None).start()
    try:
        sid = srv.server_id()
        deadline = time.monotonic() + 900
        key = f"{NAME}-1cpu-512m"
        while True:
            found = requests.get(srv.url + "/status", timeout=10).json()["templates"]
            if any(t["key"] == key and t["state"] == "ready" for t in found):
                break
            assert not [t for t in found if t["state"] == "failed"], found
            assert time.monotonic() < deadline, found
            time.sleep(2)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "user@clone",
                        "-f", str(imported / "clone_key")], check=True, timeout=30)
        user_key = (imported / "clone_key.pub").read_text().strip()
        resp = requests.post(srv.url + "/envs", json={"name": "clones", "vm_number": 2,
                                                      "os_prefix": ["debcloud"],
                                                      "ssh_keys": [user_key]}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "clones")
        assert env["state"] == "running", env["error"]
        assert [vm["boot_mode"] for vm in env["vms"]] == ["warm", "warm"]
        resp = requests.post(srv.url + "/envs/clones/run", json={
            "cmd": "hostname; cat /etc/machine-id; cut -d' ' -f2 "
                   "/etc/ssh/ssh_host_ed25519_key.pub; cloud-init status"}, timeout=120)
        assert resp.status_code == 200, resp.text
        out = [r["stdout"].split() for r in resp.json()["results"]]
        assert [o[0] for o in out] == ["clones-0", "clones-1"], out
        assert len({o[1] for o in out}) == 2 and len({o[2] for o in out}) == 2, out
        assert all(o[3:] == ["status:", "done"] for o in out), out
        resp = requests.post(srv.url + "/envs/clones/run", json={
            "cmd": "cat /root/.ssh/authorized_keys", "use_ssh": True}, timeout=120)
        assert all(user_key in r["stdout"] for r in resp.json()["results"]), resp.text
        ports = [vm["ssh_port"] for vm in env["vms"]]
        assert requests.delete(srv.url + "/envs/clones", timeout=120).status_code == 200
        assert leftovers(sid, imported / "warm-state", ports) == NOTHING_LEFT
    finally:
        srv.stop()
