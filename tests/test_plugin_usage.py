"""The pytest plugin's behaviour that needs no VM, run with pytester (pytest's own way of
testing plugins): what happens without --tt-os, and the usage errors that must come
before anything is created."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SUITE = """
def test_plain():
    pass

def test_on_vm(tt_vm):
    pass

def test_env(tt_env):
    pass
"""


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def suite(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TT_CONFIG", str(tmp_path / "no-config.json"))
    monkeypatch.setenv("TTSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # native mode's session folders land here
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_without_tt_os_vm_tests_skip_and_the_rest_runs(suite):
    result = suite.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*ttstack: no --tt-os given*"])


@pytest.mark.parametrize("args, message", [
    (["--tt-native"], "*--tt-native needs --tt-os*"),
    (["--tt-native", "--tt-os=debian-12", "--dist", "each"],
     "*--tt-native runs every test once per OS already*"),
    (["--tt-native", "--tt-os=debian-12", "--pdb"], "*--pdb cannot reach into a VM*"),
])
def test_native_usage_errors_come_before_anything_is_made(suite, tmp_path, args, message):
    result = suite.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([message])
    assert not list(tmp_path.glob("ttnative-*"))


@pytest.mark.parametrize("native", [[], ["--collect-only"], ["--tt-native"],
                                    ["--tt-native", "--collect-only"]])
def test_an_unreachable_server_is_one_usage_error_naming_it(suite, tmp_path, native):
    server = f"127.0.0.1:{closed_port()}"
    result = suite.runpytest_subprocess("--tt-os=debian-12", f"--tt-server={server}",
                                        *native)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert server in out, out
    assert "Traceback" not in out, out
    assert not list(tmp_path.glob("ttnative-*"))


@pytest.mark.parametrize("args, workers", [
    (["-n", "4", "--maxprocesses", "1"], 1),
    (["--tx", "3*popen", "--dist", "load"], 3),
    (["--tx", "2*popen"], 1),  # --tx without --dist: xdist does not distribute
    (["-n", "0"], 1),
    (["-n", "2"], 2),
])
def test_vms_per_os_are_the_workers_xdist_starts(suite, args, workers):
    """The VM count came from -n alone: `-n 4 --maxprocesses 1` booted 4 VMs per OS for
    one worker, `--tx 3*popen` one VM for three workers."""
    suite.makeconftest("""
def pytest_sessionstart(session):
    from pytest_ttstack import plugin
    if not hasattr(session.config, "workerinput"):
        print("tt-workers=%d" % plugin._workers(session.config))
""")
    result = suite.runpytest_subprocess("-s", "-p", "no:cacheprovider", *args)
    result.stdout.fnmatch_lines([f"tt-workers={workers}"])


def test_a_bad_tt_port_is_a_usage_error(suite):
    result = suite.runpytest_subprocess("--tt-os=debian-12", "--tt-port=80,http")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--tt-port '80,http': give guest TCP ports as a comma list*"])
