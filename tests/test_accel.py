"""`--accel`: explicit choices are obeyed; `auto` really boots the image kernel under KVM
and caches the verdict (on PVM hosts such as CI's, the guest hangs and auto picks TCG)."""

from __future__ import annotations

import os
import time

import pytest

from ttserver import accel

from helpers import IMAGE_PATH

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
