"""One ENV with an x86_64 and an aarch64 VM (qemu-system-aarch64 `-M virt` under TCG):
`uname -m` answers in each. Needs the aarch64 image, which the default CI does not build
(~7 min under qemu-user) and it runs only with TTSTACK_FOREIGN_TESTS=1; build it once with

    ttserver image build debian-12 --arch aarch64 --image-path /var/lib/ttstack/images-foreign

(kept apart from the default image dir: `debian-12` would otherwise match both arches in
every other test)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

from helpers import IMAGE_PATH, ServerProcess, new_run_dir, wait_env

pytestmark = pytest.mark.vm
FOREIGN = Path(os.environ.get("TTSTACK_FOREIGN_IMAGES", "/var/lib/ttstack/images-foreign"))
X86, ARM = "qemu:debian-12:x86_64", "qemu:debian-12:aarch64"


def test_one_env_with_x86_64_and_aarch64_vms():
    if os.environ.get("TTSTACK_FOREIGN_TESTS") != "1":
        pytest.skip("foreign-arch guests are slow under TCG; opt in with "
                    "TTSTACK_FOREIGN_TESTS=1 (see this module's docstring)")
    if not (FOREIGN / ARM / "disk.qcow2").is_file():
        pytest.skip(f"no {ARM} image under {FOREIGN} (see this module's docstring)")
    if not shutil.which("qemu-system-aarch64"):
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    run_dir = new_run_dir("multiarch-")
    images = run_dir / "images"
    images.mkdir()
    (images / X86).symlink_to(IMAGE_PATH / X86)
    (images / ARM).symlink_to(FOREIGN / ARM)
    srv = ServerProcess(run_dir / "state", images, port_range="41500-41999",
                        extra=("--boot-timeout", "600", "--no-warm-clones")).start()
    try:
        resp = requests.post(srv.url + "/envs", json={"name": "both",
                                                      "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "both", timeout=900)
        assert env["state"] == "running", env["error"]
        assert sorted(vm["arch"] for vm in env["vms"]) == ["aarch64", "x86_64"]
        res = requests.post(srv.url + "/envs/both/run", json={"cmd": "uname -m"},
                            timeout=120).json()["results"]
        by_vm = {r["vm"]: r["stdout"].strip() for r in res}
        assert {vm["arch"]: by_vm[vm["name"]] for vm in env["vms"]} == {
            "x86_64": "x86_64", "aarch64": "aarch64"}, res
        assert requests.delete(srv.url + "/envs/both", timeout=120).status_code == 200
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
