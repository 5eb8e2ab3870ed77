"""ONE ENV with a VM of every architecture ttstack knows (ttclient.arches: x86_64, i386,
aarch64, armhf, ppc64le, s390x, riscv64), all under TCG: `uname -m` and a Python one-liner
answer in each, a file pushed to every VM comes back byte-exact from each, and the boot
seconds per arch are printed (run with -s to see them).

Opt-in (the default CI stays x86_64 only): foreign images take minutes each to build
under qemu-user. Prepare the host and run it with

    TTSTACK_FOREIGN_TESTS=1 bash scripts/setup-host.sh   # + emulators, qemu-user-static
    TTSTACK_FOREIGN_TESTS=1 python3 -m pytest -s tests/test_multiarch.py
    # fewer arches: TTSTACK_FOREIGN_ARCHES=x86_64,aarch64,riscv64 (same command)

The test builds every image it lacks with `ttserver image build --all-arches` into
$TTSTACK_FOREIGN_IMAGES (/var/lib/ttstack/images-foreign): kept apart from the default
image dir, where `debian-13` would otherwise match all seven in every other test. Debian
13 has no i386 kernel, so the i386 VM runs Debian 12.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ttclient import arches

from helpers import IMAGE_PATH, ServerProcess, new_run_dir, tt, wait_env

pytestmark = pytest.mark.vm
FOREIGN = Path(os.environ.get("TTSTACK_FOREIGN_IMAGES", "/var/lib/ttstack/images-foreign"))
# TTSTACK_FOREIGN_ARCHES: a comma list to run with fewer (a host whose package mirror
# lacks an arch's .debs cannot build its image); all seven by default
ONLY = [arches.by_name(a).name for a in
        os.environ.get("TTSTACK_FOREIGN_ARCHES", "").split(",") if a.strip()]
OS_OF = {p.name: ("debian-13" if "trixie" in p.suites else "debian-12")
         for p in arches.PROFILES if not ONLY or p.name in ONLY}
BUILD_TIMEOUT = 3 * 3600  # seven builds, two at a time, 2-7 min each when idle


def _image(arch: str) -> str:
    return f"qemu:{OS_OF[arch]}:{arch}"


def _build_missing() -> None:
    """Build every image of OS_OF that neither image dir has (cached otherwise), with
    the builder's progress on the terminal."""
    missing = [a for a in OS_OF if not (IMAGE_PATH / _image(a) / "disk.qcow2").is_file()
               and not (FOREIGN / _image(a) / "disk.qcow2").is_file()]
    for os_version in sorted({OS_OF[a] for a in missing}):
        archs = ",".join(a for a in missing if OS_OF[a] == os_version)
        proc = subprocess.run([sys.executable, "-m", "ttserver.cli", "image", "build",
                               os_version, "--arch", archs, "--image-path", str(FOREIGN)],
                              timeout=BUILD_TIMEOUT)
        assert proc.returncode == 0, f"building {os_version} for {archs} failed (above)"


@pytest.mark.timeout(BUILD_TIMEOUT + 3600)  # builds, then five to seven guests under TCG
def test_one_env_with_every_arch():
    if os.environ.get("TTSTACK_FOREIGN_TESTS") != "1":
        pytest.skip("foreign-arch images take minutes each to build under qemu-user; opt "
                    "in with TTSTACK_FOREIGN_TESTS=1 (see this module's docstring)")
    lacking = sorted({p.qemu_package for p in map(arches.by_name, OS_OF)
                      if not shutil.which(p.qemu_system)}
                     | ({"qemu-user-static"} if not Path(
                         "/usr/lib/binfmt.d/qemu-aarch64.conf").is_file() else set()))
    assert not lacking, (f"missing {', '.join(lacking)}: run "
                         "TTSTACK_FOREIGN_TESTS=1 bash scripts/setup-host.sh")
    _build_missing()
    run_dir = new_run_dir("multiarch-")
    images = run_dir / "images"
    images.mkdir()
    for arch in OS_OF:
        home = IMAGE_PATH if (IMAGE_PATH / _image(arch)).is_dir() else FOREIGN
        (images / _image(arch)).symlink_to(home / _image(arch))
    srv = ServerProcess(run_dir / "state", images, port_range="44500-44599",
                        extra=("--boot-timeout", "1200", "--no-warm-clones",
                               "--cpu-total", "8", "--mem-total", "8G")).start()
    env_name = "every-arch"
    try:
        resp = requests.post(srv.url + "/envs", json={
            "name": env_name, "os_prefix": [_image(a) for a in OS_OF], "mem_size": 512},
            timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, env_name, timeout=1800)
        assert env["state"] == "running", env["error"]
        vms = {vm["arch"]: vm for vm in env["vms"]}
        assert sorted(vms) == sorted(OS_OF)
        print(f"\nboot seconds under TCG, all {len(vms)} booting at once on "
              f"{os.cpu_count()} host CPUs:")
        for arch, vm in sorted(vms.items(), key=lambda kv: kv[1]["boot_seconds"]):
            print(f"  {arch:8} {vm['image']:28} {vm['boot_seconds']:6.1f} s")

        probe = ("python3 -c 'import platform, sys; "
                 "print(platform.machine(), sys.byteorder, sys.maxsize > 2**32)'")
        res = requests.post(srv.url + f"/envs/{env_name}/run",
                            json={"cmd": f"uname -m; {probe}"}, timeout=600).json()
        by_vm = {r["vm"]: r for r in res["results"]}
        for arch, vm in vms.items():
            profile = arches.by_name(arch)
            out = by_vm[vm["name"]]
            assert out["exit_code"] == 0, out
            uname, python = out["stdout"].split("\n")[:2]
            byteorder = "big" if arch == "s390x" else "little"
            bits64 = arch not in ("i386", "armhf")
            assert (uname, python) == (
                profile.machine, f"{profile.machine} {byteorder} {bits64}"), (arch, out)

        payload = run_dir / "payload.bin"
        payload.write_bytes(os.urandom(256 << 10) + b"\x00end")
        res = tt(srv.address, "env", "push", env_name, "--local", str(payload),
                 "--remote", "/root/payload.bin", timeout=600)
        assert res.returncode == 0, res.stderr
        back = run_dir / "back"  # back/<vm name>/payload.bin, from each VM
        res = tt(srv.address, "env", "get", env_name, "--remote", "/root/payload.bin",
                 "--local", str(back), timeout=600)
        assert res.returncode == 0, res.stderr
        for arch, vm in vms.items():
            assert (back / vm["name"] / "payload.bin").read_bytes() == payload.read_bytes(), arch
        _tt_vm_runs_on_every_arch(srv, env_name, run_dir)
        assert requests.delete(srv.url + f"/envs/{env_name}", timeout=300).status_code == 200
        _native_mode_runs_on_every_arch(srv, run_dir)
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


MACHINE_TEST = """\
import platform

MACHINES = {machines!r}


def test_guest_machine(tt_vm):
    out = tt_vm.run("python3 -c 'import platform; print(platform.machine())'", check=True)
    assert out.stdout.strip() == MACHINES[tt_vm.arch]


def test_native_machine():
    # with --tt-native this runs inside each VM: the guest's own Python answers
    assert platform.machine() in MACHINES.values()
"""


def _project(run_dir: Path) -> tuple[Path, dict[str, str], list[str]]:
    """The test project (made once), its environment and the pytest command's start."""
    project = run_dir / "project"
    if not project.is_dir():
        project.mkdir()
        machines = {a: arches.by_name(a).machine for a in OS_OF}
        (project / "test_machine.py").write_text(MACHINE_TEST.format(machines=machines))
    env = {**os.environ, "TT_CONFIG": str(project / "none.json")}
    return project, env, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
                          "-c", os.devnull, "--rootdir", str(project)]


def _tt_vm_runs_on_every_arch(srv: ServerProcess, env_name: str, run_dir: Path) -> None:
    """The plugin on the same ENV (`--tt-env`): a `tt_vm` test once per arch."""
    project, env, base = _project(run_dir)
    proc = subprocess.run([*base, f"--tt-server={srv.address}", f"--tt-env={env_name}",
                           "-k", "guest_machine", str(project)], capture_output=True,
                          text=True, env=env, timeout=1200, cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arch in OS_OF:
        assert f"test_guest_machine[{OS_OF[arch]}:{arch}] PASSED" in proc.stdout, proc.stdout


def _native_mode_runs_on_every_arch(srv: ServerProcess, run_dir: Path) -> None:
    """The project's suite natively inside a VM of every arch (native mode makes its own
    ENV: it brings its own SSH key)."""
    project, env, base = _project(run_dir)
    started = time.monotonic()
    proc = subprocess.run([*base, f"--tt-server={srv.address}", "--tt-native",
                           f"--tt-os={','.join(_image(a) for a in OS_OF)}",
                           "-k", "native_machine", str(project)],
                          capture_output=True, text=True, env=env, timeout=3600, cwd=project)
    print(f"native mode on every arch: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(OS_OF)} passed" in proc.stdout, proc.stdout


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_one_root_filesystem_booted_with_two_releases_kernels():
    """`ttserver image build debian-13 --kernels-from debian-12`: trixie's userspace with
    its own kernel and with bookworm's, as two images; the prefix `debian-13` selects
    both (a kernel matrix), and each VM runs its kernel on the same Debian 13."""
    if os.environ.get("TTSTACK_FOREIGN_TESTS") != "1":
        pytest.skip("builds an image (minutes); opt in with TTSTACK_FOREIGN_TESTS=1")
    proc = subprocess.run([sys.executable, "-m", "ttserver.cli", "image", "build",
                           "debian-13", "--arch", "x86_64", "--kernels-from", "debian-12",
                           "--image-path", str(FOREIGN)], timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, "the build failed (above)"
    variants = sorted(p.name for p in FOREIGN.glob("qemu:debian-13*:x86_64"))
    assert variants[0] == "qemu:debian-13-linux6.1:x86_64" and len(variants) == 2, variants
    run_dir = new_run_dir("kernels-")
    images = run_dir / "images"
    images.mkdir()
    for name in variants:
        (images / name).symlink_to(FOREIGN / name)
    srv = ServerProcess(run_dir / "state", images, port_range="44500-44599",
                        extra=("--boot-timeout", "600", "--no-warm-clones")).start()
    try:
        resp = requests.post(srv.url + "/envs", json={"name": "kernels",
                                                      "os_prefix": ["debian-13"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "kernels", timeout=900)
        assert env["state"] == "running", env["error"]
        res = requests.post(srv.url + "/envs/kernels/run", json={
            "cmd": "uname -r; cut -d. -f1 /etc/debian_version"}, timeout=300).json()
        by_vm = {r["vm"]: r["stdout"].split() for r in res["results"]}
        seen = {vm["image"]: by_vm[vm["name"]] for vm in env["vms"]}
        assert seen["qemu:debian-13-linux6.1:x86_64"][0].startswith("6.1."), seen
        assert not seen["qemu:debian-13:x86_64"][0].startswith("6.1."), seen
        assert {v[1] for v in seen.values()} == {"13"}, seen
        assert requests.delete(srv.url + "/envs/kernels", timeout=120).status_code == 200
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
