"""The pytest plugin's behaviour that needs no VM, run with pytester (pytest's own way of
testing plugins): what happens without --tt-os, and the usage errors that must come
before anything is created."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from helpers import CHILD_PYTEST_ADDOPTS

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
    monkeypatch.setenv("PYTEST_ADDOPTS", CHILD_PYTEST_ADDOPTS)  # pytester removed it
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


@pytest.mark.parametrize("args, message", [
    (["--tt-mem=1G", "--tt-cpu=abc"], "*--tt-cpu 'abc': give a number of vCPUs*"),
    (["--tt-mem=lots"], "*--tt-mem 'lots': give MiB or a size like 512M or 2G*"),
    (["--tt-life-time=1e9"], "*--tt-life-time '1e9': give a number of seconds*"),
    (["--tt-life-time=0", "--collect-only"], "*--tt-life-time '0': give a number of seconds*"),
    (["--tt-server=nowhere"], "*--tt-server: server 'nowhere' is not HOST:PORT*"),
])
def test_bad_sizes_and_servers_are_usage_errors(suite, args, message):
    """--tt-mem=1G (sizes take suffixes everywhere else) and --tt-cpu=abc were an
    INTERNALERROR with a ValueError traceback."""
    result = suite.runpytest_subprocess("--tt-os=debian-12", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([message])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_an_empty_tt_os_is_a_usage_error(suite):
    """`--tt-os=$TT_OS` with the variable unset skipped every VM test and exited 0."""
    result = suite.runpytest_subprocess("--tt-os=")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--tt-os is empty: give OS prefixes*"])
    result = suite.runpytest_subprocess("--tt-os=,", f"--tt-server=127.0.0.1:{closed_port()}")
    assert "--os-prefix" not in result.stdout.str() + result.stderr.str()


def test_a_server_url_is_taken_and_a_bad_tt_server_variable_is_named(suite, monkeypatch):
    """`--tt-server=http://HOST:PORT` said 'cannot reach ttserver at http://http://...';
    a bad $TT_SERVER was blamed on --tt-server."""
    port = closed_port()
    result = suite.runpytest_subprocess("--tt-os=debian-12",
                                        f"--tt-server=http://127.0.0.1:{port}/")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR and f"127.0.0.1:{port}" in out, out
    assert "http://http://" not in out, out
    monkeypatch.setenv("TT_SERVER", "localhost")
    result = suite.runpytest_subprocess("--tt-os=debian-12")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*$TT_SERVER: server 'localhost' is not HOST:PORT*"])
