"""The pytest plugin against a real ttserver: plain and under xdist, on two OS images."""

from __future__ import annotations

import json
import os
import re
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
    # 8 vCPUs: 2 workers x 2 OSes, and a fresh VM per test next to them
    srv = ServerProcess(state / "state", port_range="43000-43999",
                        extra=("--cpu-total", "8")).start()
    yield srv
    srv.stop()
    shutil.rmtree(state, ignore_errors=True)


def run_sample(srv: ServerProcess, tmp_path: Path,
               *extra: str) -> tuple[subprocess.CompletedProcess, ET.Element]:
    junit = tmp_path / "report.xml"
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "SAMPLE_OUT": str(out), "TT_CONFIG": str(tmp_path / "none.json"),
           "SAMPLE_TT_PORT": "1" if any(a.startswith("--tt-port") for a in extra) else ""}
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
    assert "2 failed, 11 passed, 1 skipped" in proc.stdout, proc.stdout
    assert counts(root) == {"tests": 14, "failures": 2, "errors": 0, "skipped": 1}
    names = {tc.get("name") for tc in root.iter("testcase")}
    assert {"test_runs_on_every_os[debian-12:x86_64]",
            "test_runs_on_every_os[debian-13:x86_64]", "test_only_trixie[debian-13:x86_64]",
            "test_without_vm"} <= names
    failures = [tc.find("failure") for tc in root.iter("testcase")
                if tc.find("failure") is not None]
    assert all("ttstack console tail of" in (f.text or "") for f in failures)
    assert proc.stdout.count("ttstack console tail of") == 2, proc.stdout  # once each
    # the failing test printed a line on its VM's console (the login prompt came too
    # late to count on: a warm clone's getty reprints it seconds after the VM runs)
    assert "sample-console-line" in "".join(f.text or "" for f in failures)
    assert "matches none of the requested OS images" in proc.stdout
    # the header, the per-OS summary and the JUnit property the CI summary reads
    assert "ttstack: server " in proc.stdout, proc.stdout  # (a proxy has no one accel)
    assert "ttstack:   qemu:debian-13:x86_64: " in proc.stdout, proc.stdout
    assert "debian-12:x86_64: 4 passed, 1 failed" in proc.stdout, proc.stdout
    assert "debian-13:x86_64: 5 passed, 1 failed" in proc.stdout, proc.stdout
    props = {(tc.get("name"), p.get("value")) for tc in root.iter("testcase")
             for p in tc.iter("property") if p.get("name") == "tt_os"}
    assert ("test_only_trixie[debian-13:x86_64]", "debian-13:x86_64") in props, props
    assert len(props) == 11, props
    assert requests.get(srv.url + "/envs", timeout=10).json() == [], "the ENV must be deleted"


@pytest.mark.slow  # ~40 s; test_workers_never_share_a_vm_... covers xdist by default
def test_xdist_run_gives_each_worker_its_own_vms(plugin_server, tmp_path):
    proc, root = run_sample(plugin_server, tmp_path, "-n", "2", "--tt-port=8000")
    check_common(plugin_server, proc, root)
    assert "accel tcg" in proc.stdout, proc.stdout
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


SHAPES = Path(__file__).parent / "sample_xdist"
EXECUTED = re.compile(r"^(test_shapes\.py::\S+) (?:PASSED|FAILED|SKIPPED|ERROR)", re.M)


def run_project(srv: ServerProcess, project: Path, *args: str) -> subprocess.CompletedProcess:
    """`pytest -v ARGS` in a test project of the test's own (its rootdir, no ini file)
    against `srv`."""
    env = {**os.environ, "TT_CONFIG": str(project / "none.json")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-c", os.devnull,
         "--rootdir", str(project), f"--tt-server={srv.address}", *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=project)


def run_shapes(srv: ServerProcess, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "SAMPLE_OUT": str(out), "TT_CONFIG": str(tmp_path / "none.json")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(SHAPES),
         "-c", os.devnull, f"--tt-server={srv.address}", "--tt-os=debian-12", *extra,
         str(SHAPES)], capture_output=True, text=True, env=env, timeout=1200, cwd=SHAPES)


@pytest.mark.slow  # ~35 s: a collection and a run on two OSes
def test_collect_only_ids_are_the_ids_a_run_executes(plugin_server, tmp_path):
    """--collect-only listed `test_x[no-tt-os]` (ids no run has), so `-k` previews, IDEs
    and CI sharding asked for tests that do not exist."""
    listed = run_shapes(plugin_server, tmp_path, "--collect-only", "-q")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    ids = {line for line in listed.stdout.splitlines() if line.startswith("test_shapes.py::")}
    assert "test_shapes.py::test_param[debian-12:x86_64-1]" in ids, listed.stdout
    assert requests.get(plugin_server.url + "/envs", timeout=10).json() == []  # no boot
    ran = run_shapes(plugin_server, tmp_path, "-v", "-p", "no:xdist")
    assert ran.returncode == 0, ran.stdout + ran.stderr  # no xdist: no worker to kill
    assert set(EXECUTED.findall(ran.stdout)) == ids, ran.stdout


def test_workers_never_share_a_vm_whatever_sizes_the_pool(plugin_server, tmp_path):
    """xdist sizes its pool from --tx (`-n` only fills --tx in): `--tx 2*popen` gave two
    workers one VM; a crashed worker's replacement (gw2) took gw0's VM by its number, while
    gw1 might be the one alive on it. A module fixture on tt_vm was a ScopeMismatch."""
    proc = run_shapes(plugin_server, tmp_path, "-v", "--tx", "2*popen", "--dist", "load")
    out = proc.stdout + proc.stderr
    assert "1 OS x 2 worker VM(s)" in out, out
    assert "replacing crashed worker" in out, out
    assert proc.returncode == 1 and "2 failed, 17 passed" in out, out
    # the crashed tests count under their OS (xdist's report of them had no tt_os)
    assert "debian-12:x86_64: 16 passed, 2 failed" in out, out  # test_plain has no OS
    records = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    vms_of = {}
    for r in records:
        if r["kind"] == "fresh":  # a fresh VM's own ENV, not the worker's slot
            continue
        vms_of.setdefault(r["worker"], set()).add(r["vm"])
    assert all(len(v) == 1 for v in vms_of.values()), vms_of  # one VM per worker
    assert "gw2" in vms_of, vms_of
    # gw2 replaces the first worker to crash (both may: two tests kill theirs)
    downs = {w: out.find(f"[{w}] node down") for w in ("gw0", "gw1")}
    crashed = min((w for w in downs if downs[w] >= 0), key=downs.__getitem__)
    survivor = {"gw0": "gw1", "gw1": "gw0"}[crashed]
    if survivor in vms_of:  # both alive at the end: never one VM
        assert vms_of["gw2"] != vms_of[survivor], vms_of
    assert vms_of["gw2"] == vms_of.get(crashed, vms_of["gw2"]), vms_of
    fixture_runs = [(r["worker"], r["vm"]) for r in records if r["kind"] == "module-fixture"]
    assert len(fixture_runs) == len(set(fixture_runs)) >= 1, fixture_runs
    assert requests.get(plugin_server.url + "/envs", timeout=10).json() == []


def test_n_auto_is_sized_by_the_servers_room(plugin_server, tmp_path):
    """`-n auto` counted this host's CPUs (2): 2 workers × 2 OSes × 4 vCPUs would not fit
    the server's 8 free vCPUs."""
    (tmp_path / "conftest.py").write_text(
        "def pytest_sessionstart(session):\n"
        "    print('numprocesses=%s' % session.config.option.numprocesses)\n")
    (tmp_path / "test_a.py").write_text("def test_a(tt_vm):\n    pass\n")
    env = {**os.environ, "TT_CONFIG": str(tmp_path / "none.json")}
    env.pop("PYTEST_XDIST_AUTO_NUM_WORKERS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "--collect-only",
         "-c", os.devnull, "--rootdir", str(tmp_path), f"--tt-server={plugin_server.address}",
         "--tt-os=debian-12,debian-13", "--tt-cpu=4", "-n", "auto", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert "numprocesses=1" in proc.stdout, proc.stdout + proc.stderr


def test_tt_env_runs_on_an_existing_env_and_keeps_it(plugin_server, tmp_path):
    from ttclient.api import Client

    client = Client(plugin_server.url)
    client.create_env("attached", ["debian-12"], life_time=900)
    try:
        assert client.wait_env("attached", timeout=600)["state"] == "running"
        (tmp_path / "test_a.py").write_text(
            "def test_a(tt_vm, tt_env):\n"
            "    assert tt_env.name == 'attached' and tt_vm.os == 'debian-12'\n"
            "    assert 8000 in tt_vm.ports, tt_vm.ports\n"
            "    tt_vm.run('touch /tmp/was-here', check=True)\n")
        attach = ("--tt-env=attached", "--tt-port=8000")
        proc = run_project(plugin_server, tmp_path, *attach, str(tmp_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "test_a[debian-12:x86_64] PASSED" in proc.stdout, proc.stdout
        assert "using ENV attached" in proc.stdout and "deleted ENV" not in proc.stdout
        assert client.run("attached", "test -e /tmp/was-here")["results"][0]["exit_code"] == 0
        # two workers would share its one VM: refused before anything runs
        proc = run_project(plugin_server, tmp_path, *attach, str(tmp_path), "-n", "2")
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert "it has 1 VM(s) of qemu:debian-12:x86_64" in proc.stderr, proc.stderr
        proc = run_project(plugin_server, tmp_path, *attach, "--tt-os=debian-13",
                           str(tmp_path))
        assert proc.returncode == 4 and "'debian-13' matches no image" in proc.stderr, \
            proc.stdout + proc.stderr
        assert [e["name"] for e in client.list_envs()] == ["attached"]
    finally:
        client.delete_env("attached")


def test_nothing_boots_when_no_selected_test_needs_a_vm(plugin_server, tmp_path):
    """`-k` deselecting every VM test still booted the whole ENV."""
    env = {**os.environ, "TT_CONFIG": str(tmp_path / "none.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(SAMPLE),
         "-c", os.devnull, f"--tt-server={plugin_server.address}", "--tt-os=debian-12",
         "-k", "without_vm", str(SAMPLE)], capture_output=True, text=True, env=env,
        timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no selected test uses a VM; nothing booted" in proc.stdout, proc.stdout
    assert "ENV pytest-" not in proc.stdout
    assert "test_sample.py::test_without_vm" not in proc.stdout or "1 passed" in proc.stdout


@pytest.mark.slow  # ~35 s: waits past a life time
def test_a_session_outlives_its_life_time_and_boots_only_the_oses_selected(plugin_server,
                                                                          tmp_path):
    """--tt-life-time was a hard limit on a live session (its ENV expired under its
    tests: "ENV ... does not exist"); selecting one OS's test booted every --tt-os OS."""
    (tmp_path / "test_a.py").write_text(
        "import time\n"
        "def test_long(tt_vm):\n"
        "    time.sleep(25)\n"
        "    tt_vm.run('true', check=True)\n")
    proc = run_project(plugin_server, tmp_path, "--tt-os=debian-12,debian-13",
                       "--tt-life-time=10", "test_a.py::test_long[debian-12:x86_64]")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 OS x 1 worker VM(s)" in proc.stdout, proc.stdout
    assert "qemu:debian-13:x86_64" not in proc.stdout, proc.stdout
    assert requests.get(plugin_server.url + "/envs", timeout=10).json() == []
