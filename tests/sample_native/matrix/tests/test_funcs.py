import os
import platform
import signal
import time
from pathlib import Path

import pytest
from pkg.calc import double

ROOT = Path(__file__).resolve().parent.parent
IN_VM = os.path.isdir("/root/ttnative")


def test_plain():
    assert double(21) == 42


@pytest.mark.parametrize("n", [1, 2, 3])
def test_param(n):
    assert double(n) == n + n


def test_fails_everywhere():
    assert platform.system() == "Plan 9"


def test_skipped():
    pytest.skip("skipped everywhere")


@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert double(1) == 3


@pytest.mark.slowish
def test_project_marker():
    pass


def test_tmp_path(tmp_path):
    (tmp_path / "f").write_text("x")
    assert (tmp_path / "f").read_text() == "x"


def test_binary_test_data_is_shipped():
    assert (ROOT / "data" / "disk.img").read_bytes() == bytes(range(256)) * 4


def test_ignored_files_stay_home():
    if IN_VM:
        assert not (ROOT / "secret.env").exists()
        import six  # installed with --tt-native-install six

        assert six.PY3


def test_killed_worker():
    """The test process dies on bookworm guests: a failure naming the phase, not a hang,
    and the rest of the suite still runs there."""
    if IN_VM and "bookworm" in Path("/etc/os-release").read_text():
        if os.fork() == 0:  # a daemon that outlives the worker: the death is still seen
            os.setsid()
            if os.fork() == 0:
                time.sleep(3600)
                os._exit(0)
            os._exit(0)
        os.wait()
        os.kill(os.getpid(), signal.SIGKILL)


def test_record_property(record_property):
    """Properties of any type reach the controller's JUnit file (native mode sends most
    reports JSON-encoded; these go another way)."""
    record_property("os", platform.freedesktop_os_release()["VERSION_ID"])
    record_property("raw", b"\x00bytes")
