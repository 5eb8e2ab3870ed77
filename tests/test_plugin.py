"""The pytest plugin against a real ttserver: plain and under xdist, on two OS images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from helpers import IMAGE_PATH, NOTHING_LEFT, ServerProcess, leftovers, new_run_dir

pytestmark = pytest.mark.vm
SAMPLE = Path(__file__).parent / "sample"
IMAGES = ["qemu:debian-12:x86_64", "qemu:debian-13:x86_64"]


@pytest.fixture(scope="module")
def plugin_server() -> ServerProcess:
    missing = [i for i in IMAGES if not (IMAGE_PATH / i / "disk.qcow2").is_file()]
    if missing:
        pytest.fail(f"images missing: {missing}; TTSTACK_IMAGES='debian-12 debian-13' "
                    "bash scripts/setup-host.sh builds them")
    state = new_run_dir("plugin-")
    srv = ServerProcess(state / "state", port_range="43000-43999").start()
    yield srv
    srv.stop()
    shutil.rmtree(state, ignore_errors=True)


def run_sample(srv: ServerProcess, tmp_path: Path,
               *extra: str) -> tuple[subprocess.CompletedProcess, ET.Element]:
    junit = tmp_path / "report.xml"
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "SAMPLE_OUT": str(out), "TT_CONFIG": str(tmp_path / "none.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs",
         "--rootdir", str(SAMPLE), "-c", os.devnull, f"--junitxml={junit}",
         f"--tt-server={srv.address}", "--tt-os=debian-12,debian-13", *extra, str(SAMPLE)],
        capture_output=True, text=True, env=env, timeout=1200)
    assert junit.is_file(), proc.stdout + proc.stderr
    return proc, ET.parse(junit).getroot()


def counts(root: ET.Element) -> dict[str, int]:
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}


def check_common(srv: ServerProcess, proc, root) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 1 = some tests failed
    assert "2 failed, 5 passed, 1 skipped" in proc.stdout, proc.stdout
    assert counts(root) == {"tests": 8, "failures": 2, "errors": 0, "skipped": 1}
    names = {tc.get("name") for tc in root.iter("testcase")}
    assert {"test_runs_on_every_os[debian-12:x86_64]",
            "test_runs_on_every_os[debian-13:x86_64]", "test_only_trixie[debian-13:x86_64]",
            "test_without_vm"} <= names
    failures = [tc.find("failure") for tc in root.iter("testcase")
                if tc.find("failure") is not None]
    assert all("ttstack console tail of" in (f.text or "") for f in failures)
    # the failing test printed a line on its VM's console (the login prompt came too
    # late to count on: a warm clone's getty reprints it seconds after the VM runs)
    assert "sample-console-line" in "".join(f.text or "" for f in failures)
    assert "matches none of the requested OS images" in proc.stdout
    assert requests.get(srv.url + "/envs", timeout=10).json() == [], "the ENV must be deleted"


def test_xdist_run_gives_each_worker_its_own_vms(plugin_server, tmp_path):
    proc, root = run_sample(plugin_server, tmp_path, "-n", "2")
    check_common(plugin_server, proc, root)
    used = [json.loads(p.read_text()) for p in (tmp_path / "out").iterdir()]
    by_worker: dict[str, set] = {}
    for u in used:
        by_worker.setdefault(u["worker"], set()).add(u["vm"])
    if len(by_worker) == 2:  # xdist may hand all four to one worker; when both ran, no sharing
        a, b = by_worker.values()
        assert not a & b, f"two workers used one VM: {by_worker}"
    assert {u["image"] for u in used} == set(IMAGES)
    assert proc.stdout.count("ttstack: ENV pytest-") == 1, "exactly one ENV per session"


def test_bad_os_prefix_is_a_usage_error(plugin_server, tmp_path):
    env = {**os.environ, "TT_CONFIG": str(tmp_path / "none.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(SAMPLE),
         "-c", os.devnull, f"--tt-server={plugin_server.address}", "--tt-os=fedora",
         str(SAMPLE)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "'fedora' matches no image" in proc.stderr
    assert requests.get(plugin_server.url + "/envs", timeout=10).json() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_while_booting_deletes_the_env(plugin_server, tmp_path, sig):
    """Ctrl-C, and SIGTERM (a CI runner cancelling the job, `timeout`), while the ENV
    boots: it is deleted (SIGTERM used to end pytest at once and leave the VMs running)."""
    env = {**os.environ, "TT_CONFIG": str(tmp_path / "none.json")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(SAMPLE),
         "-c", os.devnull, f"--tt-server={plugin_server.address}", "--tt-os=debian-12",
         str(SAMPLE)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "booting" in line:
            break
    assert requests.get(plugin_server.url + "/envs", timeout=10).json() != []
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "deleted ENV pytest-" in "".join(lines) + out
    assert requests.get(plugin_server.url + "/envs", timeout=10).json() == []
    found = leftovers(plugin_server.server_id(), plugin_server.cfgdb, [])
    assert found == NOTHING_LEFT
