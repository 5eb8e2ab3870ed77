"""`--accel`: explicit choices are obeyed; `auto` really boots the image kernel under KVM
and caches the verdict (on PVM hosts such as CI's, the guest hangs and auto picks TCG)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from ttserver.vm import accel

from helpers import IMAGE_PATH, ServerProcess

BASE = IMAGE_PATH / "qemu:debian-12:x86_64"


def test_explicit_tcg_needs_no_probe(tmp_path):
    choice = accel.choose("tcg", None, None, tmp_path / "a.json")
    assert choice.accel == "tcg" and "requested" in choice.reason
    assert not (tmp_path / "a.json").exists()


def test_auto_without_an_image_falls_back_to_tcg(tmp_path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: auto is trivially tcg")
    choice = accel.choose("auto", None, None, tmp_path / "a.json")
    assert choice.accel == "tcg" and "no host-arch image" in choice.reason


@pytest.mark.slow
@pytest.mark.vm
def test_auto_probes_a_real_boot_once_and_caches_it(tmp_path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    cache = tmp_path / "accel.json"
    started = time.monotonic()
    first = accel.choose("auto", BASE / "vmlinuz", BASE / "initrd.img", cache)
    assert first.accel in ("kvm", "tcg")
    assert "under KVM" in first.reason
    assert time.monotonic() - started < accel.PROBE_TIMEOUT + 10, "the probe must time out"
    again = accel.choose("auto", BASE / "vmlinuz", BASE / "initrd.img", cache)
    assert again.accel == first.accel and again.reason.endswith("(cached)")


def probe_pids(owner: int) -> list[int]:
    """Pids of KVM probes started by the server process `owner`."""
    out = subprocess.run(["pgrep", "-f", f"{accel.PROBE_NAME}-{owner} "], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.vm
def test_a_server_stopped_while_probing_leaves_no_probe(run_dir):
    """The probe hangs under PVM's KVM; it used to outlive the server for good."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: no probe runs")
    srv = ServerProcess(run_dir / "state", extra=("--accel", "auto", "--no-warm-clones"))
    srv.start()
    assert srv.proc is not None
    deadline = time.monotonic() + 15
    while not probe_pids(srv.proc.pid):
        if time.monotonic() > deadline:
            srv.stop()
            pytest.skip("the probe finished before the server could be stopped")
        time.sleep(0.2)
    owner = srv.proc.pid
    srv.stop()
    deadline = time.monotonic() + 10
    while probe_pids(owner):
        assert time.monotonic() < deadline, f"probe still running: {probe_pids(owner)}"
        time.sleep(0.2)


@pytest.mark.vm
def test_probes_of_gone_servers_are_ended_at_start(run_dir):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: no probe runs")
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = subprocess.Popen(  # paused (-S): as a hung probe, without using the CPU
        ["qemu-system-x86_64", "-name", f"{accel.PROBE_NAME}-{gone.pid}", "-accel", "kvm",
         "-S", "-m", "64", "-nodefaults", "-nographic", "-kernel", str(BASE / "vmlinuz"),
         "-append", "console=ttyS0 panic=-1 rdinit=/bin/true"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        assert leftover.poll() is None, "the stand-in probe did not start"
        srv = ServerProcess(run_dir / "state", extra=("--no-warm-clones",)).start()
        try:
            assert leftover.wait(timeout=10) == -9
        finally:
            srv.stop()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
