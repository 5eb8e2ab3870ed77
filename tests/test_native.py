"""Native mode (`--tt-native`) against a real ttserver: real projects' suites run as
pytest-xdist workers inside debian-12 and debian-13 VMs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from pytest_ttstack.native.ids import tag

from helpers import IMAGE_PATH, NOTHING_LEFT, ServerProcess, leftovers, new_run_dir

pytestmark = pytest.mark.vm
SAMPLES = Path(__file__).parent / "sample_native"
OSES = ["debian-12:x86_64", "debian-13:x86_64"]
RESULT = re.compile(r"\] (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR) (\S+)")


@pytest.fixture(scope="module")
def native_server() -> ServerProcess:
    missing = [i for i in ("qemu:debian-12:x86_64", "qemu:debian-13:x86_64")
               if not (IMAGE_PATH / i / "disk.qcow2").is_file()]
    if missing:
        pytest.fail(f"images missing: {missing}; bash scripts/setup-host.sh builds them")
    state = new_run_dir("native-")
    srv = ServerProcess(state / "state", port_range="46000-46999").start()
    srv.cache = state / "cache"  # type: ignore[attr-defined]  # venvs, shared by the tests
    yield srv
    srv.stop()
    found = leftovers(srv.sid, srv.cfgdb, [])
    shutil.rmtree(state, ignore_errors=True)
    assert found == NOTHING_LEFT


def git_project(sample: str, dest: Path, tag: str | None = None) -> Path:
    """A copy of a sample project in its own git work tree (what native mode ships),
    committed and tagged `tag` when given (a setuptools-scm version)."""
    shutil.copytree(SAMPLES / sample, dest)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    if tag:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                        "sample"], cwd=dest, check=True)
        subprocess.run(["git", "tag", tag], cwd=dest, check=True)
    return dest


def pytest_in(project: Path, srv: ServerProcess | None, *args: str, timeout: float = 1500,
              cache: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TT_CONFIG": str(project / "none.json")}
    tt = []
    if srv is not None:
        env["TTSTACK_CACHE_DIR"] = str(srv.cache)  # type: ignore[attr-defined]
        tt = [f"--tt-server={srv.address}", "--tt-native"]
    no_cache = [] if cache else ["-p", "no:cacheprovider"]
    return subprocess.run([sys.executable, "-m", "pytest", *no_cache, *tt,
                           *args], cwd=project, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _native_things() -> set[str]:
    procs = subprocess.run(["pgrep", "-af", 'ControlPath="?/tmp/ttnative-'], capture_output=True,
                           text=True).stdout.splitlines()
    return set(procs) | {str(p) for p in Path("/tmp").glob("ttnative-*")}


_BEFORE: set[str] = set()


@pytest.fixture(autouse=True)
def _native_baseline():
    """What was there before the test (a run killed earlier on this machine may have
    left a session folder): the leak checks below count only what the test added."""
    _BEFORE.clear()
    _BEFORE.update(_native_things())
    yield


def native_leftovers() -> list[str]:
    """SSH master connections and session folders the test's native runs left behind."""
    return sorted(_native_things() - _BEFORE)


def failure_texts(junit: Path) -> dict[str, str]:
    """Test name -> its failure's message and text, for the failed tests of a JUnit file."""
    return {case.get("name", ""): f"{f.get('message', '')}\n{f.text or ''}"
            for case in ET.parse(junit).getroot().iter("testcase")
            for f in case if f.tag == "failure"}


def properties(junit: Path, prefix: str) -> dict[str, dict[str, str]]:
    """Test name -> its JUnit properties, for the tests whose name starts with `prefix`."""
    return {case.get("name", ""): {p.get("name", ""): p.get("value", "")
                                   for p in case.iter("property")}
            for case in ET.parse(junit).getroot().iter("testcase")
            if case.get("name", "").startswith(prefix)}


def outcomes(junit: Path) -> dict[str, str]:
    """nodeid-like 'classname::name' -> passed/failed/skipped/error."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")),
                    "passed")
        found[f"{case.get('classname')}::{case.get('name')}"] = kind
    return found


@pytest.mark.slow  # ~140 s: two guests get venvs and run 18 items natively
def test_whole_suite_runs_in_every_vm(native_server, tmp_path):
    """unittest classes, doctests, functions and parametrized tests: every item runs once
    per OS inside its VM with the project's own configuration, outcomes as on the host."""
    project = git_project("matrix", tmp_path / "matrix")
    (project / "secret.env").write_text("TOKEN=not-for-the-vm\n")  # .gitignore'd
    host = pytest_in(project, None, f"--junitxml={tmp_path / 'host.xml'}")
    assert host.returncode == 1, host.stdout + host.stderr
    on_host = outcomes(tmp_path / "host.xml")
    assert len(on_host) == 18, on_host

    listed = pytest_in(project, native_server, "--tt-os=debian-12,debian-13", "-q",
                       "--collect-only")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    collected = {line for line in listed.stdout.splitlines() if "::" in line}

    proc = pytest_in(project, native_server, "--tt-os=debian-12,debian-13", "-v", "-rs",
                     "--tt-native-install", "six", f"--junitxml={tmp_path / 'native.xml'}",
                     cache=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    native = outcomes(tmp_path / "native.xml")
    assert len(native) == len(on_host) * len(OSES), out
    killed = "tests.test_funcs::test_killed_worker[debian-12:x86_64]"
    assert native.pop(killed) == "failure", out
    for name, kind in on_host.items():
        for os_id in OSES:
            ran = tag(name, os_id)
            if ran != killed:
                assert native[ran] == kind, f"{ran}: {native[ran]} natively, {kind} on host"
    assert "died during its call: the test's worker process died on pytest-" in out
    assert "(debian-12:x86_64)" in out
    # the counts per OS (xdist's own line shows one worker's); section headlines name it
    assert "ttstack: native: 36 items: 18 on debian-12:x86_64, 18 on debian-13:x86_64" in out
    for os_id in OSES:
        assert re.search(rf"_ test_fails_everywhere\[{os_id}\] _", out), out
    assert "+ Linux" in out  # pytest's assertion explanation, made in the guest
    assert "console tail of pytest-" in out
    assert "making 2 venv(s) in the guests" in out
    venvs = list(native_server.cache.glob("native-venvs/*.tar.gz"))
    assert len(venvs) == 2
    for venv in venvs:  # bytecode cached, less what workers never import
        with tarfile.open(venv) as tar:
            names = tar.getnames()
        assert any("/_pytest/__pycache__/" in n for n in names), venv
        assert any(n.endswith("/pygments/lexers/python.py") for n in names), venv
        assert not any("/pygments/lexers/__pycache__" in n for n in names), venv
    props = properties(tmp_path / "native.xml", "test_record_property")
    assert props == {tag("test_record_property", os_id): {
        "os": os_id.split(":")[0].split("-")[1], "raw": str(b"\x00bytes"),
        "tt_os": os_id} for os_id in OSES}  # the test's own properties, and the plugin's
    assert "ttstack: results per OS" in out and f"\n{OSES[0]}: " in out, out
    ran_ids = {m.group(2) for m in RESULT.finditer(proc.stdout)}
    assert ran_ids == collected, "--collect-only must list exactly the ids a run reports"
    assert requests.get(native_server.url + "/envs", timeout=10).json() == []
    assert native_leftovers() == []

    # --lf: the workers see the controller's lastfailed, whose ids carry the OS; an OS
    # none of whose tests failed runs nothing (its workers used to run everything)
    failed = {n for n, kind in native_run_outcomes(proc.stdout).items() if kind == "FAILED"}
    lastfailed = project / ".pytest_cache" / "v" / "cache" / "lastfailed"
    assert {n for n in json.loads(lastfailed.read_text())} == failed
    only_13 = {n for n in failed if "debian-13" in n}
    assert only_13 and only_13 != failed
    lastfailed.write_text(json.dumps(dict.fromkeys(sorted(only_13), True)))
    again = pytest_in(project, native_server, "--tt-os=debian-12,debian-13", "-v", "--lf",
                      "--tt-native-install", "six", cache=True)
    assert "venvs from the cache" in again.stdout + again.stderr  # same pins as before
    ran = {m.group(2) for m in RESULT.finditer(again.stdout)}
    assert ran == only_13, again.stdout + again.stderr
    assert native_leftovers() == []


def native_run_outcomes(stdout: str) -> dict[str, str]:
    return {m.group(2): m.group(1) for m in RESULT.finditer(stdout)}


@pytest.mark.slow
def test_src_layout_c_extension_installed_in_guest(native_server, tmp_path):
    """`--tt-native-install=.`: the project's dependency comes from the host's wheels, its
    C extension is compiled in each guest, its version comes from the host's git tag
    (setuptools-scm; .git is not shipped); a local project that a pinned PyPI
    distribution depends on (vendored/six, for python-dateutil) installs too."""
    project = git_project("cext", tmp_path / "cext", tag="v1.2.3")
    proc = pytest_in(project, native_server, "--tt-os=debian-12,debian-13", "-v",
                     "--tt-native-install=.", "--tt-native-install=./vendored/six",
                     "--tt-native-install=python-dateutil")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "6 passed" in out
    # six is pure Python: built once on the host, not once per VM under TCG (~1 min each)
    assert "pure-Python wheels built here for ./vendored/six (no build" in out, out
    for os_id in OSES:
        assert f"PASSED tests/test_fastmath.py::test_c_extension_built_in_the_guest[{os_id}]" \
            in out
    assert native_leftovers() == []


def test_unresolvable_install_stops_before_any_test(native_server, tmp_path):
    project = git_project("cext", tmp_path / "cext")
    proc = pytest_in(project, native_server, "--tt-os=debian-12",
                     "--tt-native-install", "ttstack-no-such-distribution==1.0")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "--tt-native-install" in proc.stderr
    assert "ttstack-no-such-distribution" in proc.stderr
    assert " passed" not in proc.stdout
    assert requests.get(native_server.url + "/envs", timeout=10).json() == []
    assert native_leftovers() == []


@pytest.mark.slow
def test_paths_with_spaces(native_server, tmp_path):
    """A Python and a project whose paths have spaces (a venv under "My Projects"): the
    wrapper's shebang cut the interpreter's path at its first space, and execnet split
    the wrapper's path in two."""
    home = new_run_dir("native-spaces-") / "My Projects"
    venv = home / "py env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    project = home / "the project"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_where.py").write_text(
        "import os\n\n\ndef test_in_the_guest():\n"
        "    assert os.path.exists('/etc/debian_version')\n")
    env = {**os.environ, "TT_CONFIG": str(project / "none.json"),
           "TTSTACK_CACHE_DIR": str(native_server.cache)}
    try:
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-p",
                               "no:cacheprovider", f"--tt-server={native_server.address}",
                               "--tt-native", "--tt-os=debian-12", "-v"], cwd=project,
                              capture_output=True, text=True, env=env, timeout=1500)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "PASSED tests/test_where.py::test_in_the_guest[debian-12:x86_64]" in out, out
        assert native_leftovers() == []
    finally:
        shutil.rmtree(home.parent, ignore_errors=True)


@pytest.mark.slow
def test_a_killed_worker_loses_no_earlier_result(native_server, tmp_path):
    """Workers send results in batches: a worker killed after many quick tests had some
    finished tests' results not sent yet. They come from its ledger: every earlier test
    is reported passed, the test that killed it fails (in its call), the rest runs."""
    project = tmp_path / "batches"
    (project / "tests").mkdir(parents=True)
    quick = ("import pytest\n\n\n@pytest.mark.parametrize('i', range(150))\n"
             "def test_quick(i):\n    assert i >= 0\n")
    (project / "tests" / "test_a.py").write_text(quick)
    (project / "tests" / "test_b.py").write_text(
        "import os\n\n\ndef test_kills_its_worker():\n    os._exit(3)\n")
    (project / "tests" / "test_c.py").write_text(quick)  # the worker's queue stays long
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    proc = pytest_in(project, native_server, "--tt-os=debian-12", "-q",
                     f"--junitxml={tmp_path / 'batches.xml'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    found = outcomes(tmp_path / "batches.xml")
    killer = f"tests.test_b::test_kills_its_worker[{OSES[0]}]"
    assert found == {killer: "failure", **{f"tests.test_{m}::test_quick[{OSES[0]}-{i}]":
                                           "passed" for m in "ac" for i in range(150)}}, out
    text = failure_texts(tmp_path / "batches.xml")[killer.split("::")[1]]
    assert "died during its call" in text, text
    assert native_leftovers() == []


@pytest.mark.slow
def test_a_vm_that_dies_fails_its_items_and_the_other_os_goes_on(native_server, tmp_path):
    """A test that powers its VM off: that test fails naming the VM's death with the
    console tail, the items that VM had not run are reported failed, the other OS runs
    everything; it used to end the whole run in an xdist INTERNALERROR."""
    project = tmp_path / "death"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_death.py").write_text(
        "import os\nimport time\n\n\ndef test_before():\n    pass\n\n\n"
        "def test_kills_the_vm_on_debian_12():\n"
        "    if 'bookworm' in open('/etc/os-release').read():\n"
        "        os.system('echo o > /proc/sysrq-trigger')  # power off at once\n"
        "        time.sleep(60)\n\n\n"
        "def test_after_1():\n    pass\n\n\ndef test_after_2():\n    pass\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    proc = pytest_in(project, native_server, "--tt-os=debian-12,debian-13", "-v",
                     f"--junitxml={tmp_path / 'death.xml'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "INTERNALERROR" not in out, out
    d12, d13 = "[debian-12:x86_64]", "[debian-13:x86_64]"
    names = ("test_before", "test_kills_the_vm_on_debian_12", "test_after_1", "test_after_2")
    assert outcomes(tmp_path / "death.xml") == {
        f"tests.test_death::test_before{d12}": "passed",
        **{f"tests.test_death::{t}{d12}": "failure" for t in names[1:]},
        **{f"tests.test_death::{t}{d13}": "passed" for t in names}}, out
    # each failure names what happened, with the console tail (read from the JUnit file:
    # the terminal's short summary repeats messages or not depending on its width)
    texts = failure_texts(tmp_path / "death.xml")
    assert ("died while it ran (in which phase is not known: the VM is gone): the VM pytest-"
            in texts[f"test_kills_the_vm_on_debian_12{d12}"])
    for name in (f"test_after_1{d12}", f"test_after_2{d12}"):
        assert "not run: its VM pytest-" in texts[name], texts
    assert all("reboot: Power down" in text for text in texts.values()), texts
    assert requests.get(native_server.url + "/envs", timeout=10).json() == []
    assert native_leftovers() == []


ODD = '''import os
import subprocess
import unittest

import pytest


@pytest.mark.parametrize("i", range(40))
def test_quick(i):
    pass


class Sub(unittest.TestCase):
    def test_range_keyword(self):  # execnet cannot send a range: it ended the session
        with self.subTest(r=range(2)):
            pass


def test_subtests_fixture(subtests):  # pytest 9 fails the parent in report_teststatus
    with subtests.test(msg="bad", k=(3, 4)):
        assert False
    with subtests.test(msg="good"):
        pass


@pytest.mark.parametrize("x", ["y" * 5000])  # a node id over the ledger's 4 KiB note
def test_long_id_dies(x):
    os._exit(3)


def test_fills_run():  # the ledger lives in /run: a full tmpfs killed workers (SIGBUS)
    subprocess.run("head -c 300000000 /dev/zero > /run/fill", shell=True)


@pytest.mark.parametrize("i", range(40))
def test_quick_after(i):
    pass
'''


@pytest.mark.slow
def test_odd_tests_get_the_reports_the_host_would_give(native_server, tmp_path):
    """Found by a hostile trial of batched results: each case ended the session, lost
    results or reported a failed test as passed."""
    project = tmp_path / "odd"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_odd.py").write_text(ODD)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    proc = pytest_in(project, native_server, "--tt-os=debian-12", "-q", "-rA",
                     f"--junitxml={tmp_path / 'odd.xml'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "INTERNALERROR" not in out, out
    found = outcomes(tmp_path / "odd.xml")
    tag = OSES[0]
    expected = {**{f"tests.test_odd::test_quick[{tag}-{i}]": "passed" for i in range(40)},
                **{f"tests.test_odd::test_quick_after[{tag}-{i}]": "passed" for i in range(40)},
                f"tests.test_odd.Sub::test_range_keyword[{tag}]": "passed",
                f"tests.test_odd::test_fills_run[{tag}]": "passed",
                f"tests.test_odd::test_subtests_fixture[{tag}]": "failure",
                f"tests.test_odd::test_long_id_dies[{tag}-{'y' * 5000}]": "failure"}
    assert {k: found.get(k) for k in expected} == expected, out
    texts = failure_texts(tmp_path / "odd.xml")
    assert "contains 1 failed subtest" in texts[f"test_subtests_fixture[{tag}]"]
    assert "died during its call" in texts[f"test_long_id_dies[{tag}-{'y' * 5000}]"]
    assert "k=(3, 4)" in out, out  # a subtest's keywords as the host shows them
    assert native_leftovers() == []
