"""Runs inside each VM with --tt-native (tests/test_plugin.py drives it).

Expected with debian-12 and debian-13: 6 passed, 3 failed, 1 skipped.
"""

import os
import platform
import signal
from pathlib import Path

import pytest


def test_runs_inside_the_guest():
    assert platform.machine() == "x86_64"
    assert Path("/etc/os-release").read_text().startswith("PRETTY_NAME=\"Debian")
    assert Path("/root/ttnative/project").is_dir()


@pytest.mark.parametrize("n", [1])
def test_parametrized_inside(n):
    print("captured from the guest")
    assert n == 1


def test_fails_in_guest():
    assert Path("/etc/hostname").read_text() == "nowhere\n"


def test_skipped_in_guest():
    if "trixie" in Path("/etc/os-release").read_text():
        pytest.skip("skipped inside the trixie guest")


def test_killed_in_guest():
    """The test process dies mid-test on bookworm: the host must report a failure that
    says so, not a pass or a hang."""
    if "bookworm" in Path("/etc/os-release").read_text():
        os.kill(os.getpid(), signal.SIGKILL)
