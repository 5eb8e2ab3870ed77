"""Native mode's pure logic, no VM: OS-tagged ids, host→guest paths, wheel tags, the
per-OS worker command line, and the probe's verdict on a guest without Python."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import execnet
import pytest

from pytest_ttstack.native import events, gateways, project, wheelhouse, workdir
from pytest_ttstack.native.controller import NativeSession, host_only_plugins
from pytest_ttstack.native.events import phase_after, unbatching
from pytest_ttstack.native.ids import tag, untag
from pytest_ttstack.native.provision import Provisioner
from pytest_ttstack.session import TTSetupError

OSES = ["debian-12:x86_64", "debian-13:x86_64"]


@pytest.mark.parametrize(("plain", "tagged"), [
    ("t.py::test_a", "t.py::test_a[debian-12:x86_64]"),
    ("t.py::test_p[1-x]", "t.py::test_p[debian-12:x86_64-1-x]"),
    ("t.py::TestC::test_m", "t.py::TestC::test_m[debian-12:x86_64]"),
    ("pkg/calc.py::pkg.calc.double", "pkg/calc.py::pkg.calc.double[debian-12:x86_64]"),
    ("t.py::test_odd[::z]", "t.py::test_odd[debian-12:x86_64-::z]"),  # '::' in a param id
    ("d[x]/t.py::T::test_p[a]", "d[x]/t.py::T::test_p[debian-12:x86_64-a]"),
])
def test_ids_round_trip(plain, tagged):
    assert tag(plain, "debian-12:x86_64") == tagged
    assert untag(tagged, OSES) == ("debian-12:x86_64", plain)


def test_untag_leaves_other_parameters_alone():
    assert untag("t.py::test_p[1]", OSES) == (None, "t.py::test_p[1]")
    assert untag("t.py", OSES) == (None, "t.py")


def test_path_map(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("")
    paths = project.PathMap(tmp_path, tmp_path / "tests")
    assert paths.guest_cwd == f"{project.GUEST_PROJECT}/tests"
    assert paths.arg("test_x.py::test_a") == f"{project.GUEST_PROJECT}/tests/test_x.py::test_a"
    assert paths.arg(str(tmp_path)) == project.GUEST_PROJECT
    assert paths.arg("/dev/null") == "/dev/null"  # outside the project: as is
    assert paths.arg("no_such_file.py") == "no_such_file.py"


def test_git_decides_what_is_shipped(tmp_path):
    (tmp_path / ".gitignore").write_text("secret.env\nbuild/\n")
    (tmp_path / "secret.env").write_text("x")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "out.o").write_text("x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "disk.img").write_bytes(b"\0\1")
    (tmp_path / "new_untracked.py").write_text("")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", ".gitignore", "data"], cwd=tmp_path, check=True)
    assert project.project_files(tmp_path) == [".gitignore", "data/disk.img",
                                               "new_untracked.py"]


def test_guest_wheel_tags():
    bookworm = wheelhouse.GuestPython("3.11", "3.11.2", "x86_64", "2.36")
    assert bookworm.uv_platform() == "x86_64-manylinux_2_36"
    tags = bookworm.pip_tags()
    assert tags[:6] == ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    assert "manylinux_2_17_x86_64" in tags and "manylinux_2_37_x86_64" not in tags
    trixie = wheelhouse.GuestPython("3.13", "3.13.5", "aarch64", "2.41")
    assert trixie.uv_platform() == "aarch64-manylinux_2_40"  # uv knows up to 2.40
    assert wheelhouse.GuestPython("3.13", "3.13.5", "riscv64", "2.41").uv_platform() \
        == "riscv64-unknown-linux"
    other = wheelhouse.GuestPython("3.13", "3.13.6", "x86_64", "2.36")
    res = wheelhouse.Resolution(pins=["six==1.17.0"], local=[])
    assert wheelhouse.venv_key(bookworm, res) != wheelhouse.venv_key(other, res)


def test_probe_names_an_image_without_python():
    vm = {"id": "v1", "name": "e-0", "image": "qemu:debian-12:x86_64"}
    reply = {"results": [{"id": "v1", "vm": "e-0", "exit_code": 127, "stdout": "",
                          "stderr": "python3 not found\n", "error": ""}]}
    client = SimpleNamespace(run=lambda *a, **k: reply)
    env = SimpleNamespace(name="e", vms=[vm], client=client)
    prov = Provisioner(env, project.PathMap(Path("."), Path(".")), [], Path("."),  # type: ignore[arg-type]
                       Path("key"), print, 10)
    with pytest.raises(TTSetupError, match=r"image qemu:debian-12:x86_64 has no python3"):
        prov.probe()


def test_probe_line_parses():
    line = json.dumps({"version": "3.13", "full_version": "3.13.5", "machine": "x86_64",
                       "libc": "2.41", "os_release": "ID=debian\n"})
    assert wheelhouse.GuestPython.from_probe(line).libc == "2.41"


def _session(tmp_path, args: list[str], positional: list[str]) -> NativeSession:
    (tmp_path / "t.py").write_text("")
    session = NativeSession.__new__(NativeSession)
    session.config = SimpleNamespace(  # type: ignore[assignment]
        option=SimpleNamespace(file_or_dir=positional),
        invocation_params=SimpleNamespace(args=args))
    session.paths = project.PathMap(tmp_path, tmp_path)
    session.os_ids = OSES
    return session


def test_the_probe_says_what_platform_would_say():
    """The probe dropped `platform` and `json` (a second of imports on a fresh TCG
    clone); what it prints must still be what they gave."""
    import platform
    import subprocess

    line = subprocess.run(["sh", "-c", wheelhouse.PROBE], capture_output=True, text=True,
                          check=True).stdout
    found = wheelhouse.GuestPython.from_probe(line.strip())
    assert found == wheelhouse.GuestPython(
        "{}.{}".format(*sys.version_info[:2]), platform.python_version(), platform.machine(),
        platform.libc_ver()[1])


def test_guest_pythons_are_remembered_per_image(tmp_path, monkeypatch):
    monkeypatch.setenv("TTSTACK_CACHE_DIR", str(tmp_path))
    assert wheelhouse.remembered_guests() == {}
    bookworm = wheelhouse.GuestPython("3.11", "3.11.2", "x86_64", "2.36")
    trixie = wheelhouse.GuestPython("3.13", "3.13.5", "x86_64", "2.41")
    wheelhouse.remember_guests({"qemu:debian-12:x86_64": (bookworm, "d12")})
    wheelhouse.remember_guests({"qemu:debian-13:x86_64": (trixie, "")})
    assert wheelhouse.remembered_guests() == {"qemu:debian-12:x86_64": (bookworm, "d12"),
                                              "qemu:debian-13:x86_64": (trixie, "")}
    assert [p.name for p in tmp_path.iterdir()] == ["guest-pythons.json"]
    (tmp_path / "guest-pythons.json").write_text('{"qemu:debian-12:x86_64": {"nope": 1}}')
    assert wheelhouse.remembered_guests() == {}  # a hint: unreadable means unknown


def test_worker_args_keep_each_os_its_own_ids(tmp_path):
    g = project.GUEST_PROJECT
    s = _session(tmp_path, ["-v", "t.py::test_a[debian-13:x86_64]"],
                 ["t.py::test_a[debian-13:x86_64]"])
    assert s.worker_args("debian-13:x86_64") == (
        ["-p", "pytest_ttstack.native.guest", "-v", f"{g}/t.py::test_a"], False)
    assert s.worker_args("debian-12:x86_64") == (
        ["-p", "pytest_ttstack.native.guest", "-v"], True)  # runs nothing
    both = ["t.py::test_a[debian-12:x86_64]", "t.py::test_b[debian-13:x86_64]"]
    s = _session(tmp_path, both, both)
    assert s.worker_args("debian-12:x86_64") == (
        ["-p", "pytest_ttstack.native.guest", f"{g}/t.py::test_a"], False)
    (tmp_path / "integration").mkdir()
    words = ["-k", "integration", "--deselect", "t.py::test_a", f"--rootdir={tmp_path}",
             "-c", str(tmp_path / "t.py"), "t.py"]
    s = _session(tmp_path, words, ["t.py"])
    assert s.worker_args("debian-12:x86_64") == (
        ["-p", "pytest_ttstack.native.guest", "-k", "integration", "--deselect",
         "t.py::test_a", f"--rootdir={g}", "-c", f"{g}/t.py", f"{g}/t.py"], False)


def test_local_projects_install_from_the_shipped_copy(tmp_path):
    (tmp_path / "sub").mkdir()
    prov = Provisioner(SimpleNamespace(), project.PathMap(tmp_path, tmp_path), [],  # type: ignore[arg-type]
                       tmp_path, Path("key"), print, 10)
    g = project.GUEST_PROJECT
    assert prov.local_args(".") == [g]
    assert prov.local_args("-e .") == ["-e", g]
    assert prov.local_args("./sub[test]") == [f"{g}/sub[test]"]
    assert prov.local_args(f"sub @ file://{tmp_path}/sub") == [f"{g}/sub"]
    with pytest.raises(TTSetupError, match="outside the project"):
        prov.local_args("/usr/lib")


def test_hard_links_ship_as_files(tmp_path):
    import io
    import os
    import tarfile

    (tmp_path / "a.bin").write_bytes(b"data")
    os.link(tmp_path / "a.bin", tmp_path / "b.bin")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        project.add_files(tar, tmp_path, ["a.bin", "b.bin"], "project")
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        assert [(m.name, m.isreg(), m.size) for m in tar.getmembers()] == [
            ("project/a.bin", True, 4), ("project/b.bin", True, 4)]


def test_git_versions_of_local_projects_reach_the_guest_build(tmp_path):
    """A setuptools-scm project's version comes from .git, which is not shipped: the
    host computes it for the guest's build (real uv and setuptools-scm, from PyPI)."""
    scm = tmp_path / "scm"
    (scm / "sub").mkdir(parents=True)
    (scm / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61", "setuptools-scm>=8"]\n'
        'build-backend = "setuptools.build_meta"\n'
        '[project]\nname = "Fast.Math"\ndynamic = ["version"]\n[tool.setuptools_scm]\n')
    (scm / "sub" / "pyproject.toml").write_text('[project]\nname = "plain"\nversion = "1"\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=scm, check=True)
    subprocess.run(["git", "add", "-A"], cwd=scm, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=scm, check=True)
    subprocess.run(["git", "tag", "v1.2.3"], cwd=scm, check=True)
    res = wheelhouse.Resolution(pins=["six==1.17.0"], local=["-e .", "./sub"])
    assert wheelhouse.scm_versions(res, scm) == {
        "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_FAST_MATH": "1.2.3"}
    assert wheelhouse._local_names([".", "six", "./sub[x]"], scm) == ["Fast.Math", "plain"]


def test_plugins_installed_on_the_host_only_are_named():
    """`-p NAME` from a distribution the VMs' venvs will not have made every worker fail
    to start (4 restarts, then xdist's 'maximum crashed workers'); now it is named first."""
    root = Path(__file__).resolve().parent.parent
    assert host_only_plugins(["-p", "timeout"], [], root) == ["timeout (pytest-timeout)"]
    assert host_only_plugins(["-ptimeout"], ["attrs"], root) == ["timeout (pytest-timeout)"]
    assert host_only_plugins(["-p", "timeout"], ["pytest-timeout>=2"], root) == []
    assert host_only_plugins(["-p", "no:timeout", "-p", "xdist"], [], root) == []
    assert host_only_plugins(["-p", "timeout"], [".[test]"], root) == []  # known later
    assert host_only_plugins(["-p", "tests.helpers"], [], root) == []  # shipped


def test_a_host_only_plugin_is_a_usage_error_before_anything_boots(tmp_path):
    (tmp_path / "test_a.py").write_text("def test_a():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--tt-native", "--tt-os=debian-12", "--tt-server=127.0.0.1:9",
                           "-p", "timeout"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TT_CONFIG": "/nonexistent"})
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "-p timeout (pytest-timeout) is installed on this host only" in proc.stderr
    assert "--tt-native-install" in proc.stderr


def test_stale_session_folders_are_removed_live_ones_kept(tmp_path):
    """A session killed before its cleanup (SIGKILL, a CI time limit) left its folder,
    private key included; the next session removes it — and only it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    folders = {name: tmp_path / f"{workdir.PREFIX}{name}" for name in
               ("dead", "live", "reused-pid", "no-owner", "garbled")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "id_ed25519").write_text("key")
    me = os.getpid()
    (folders["dead"] / workdir.OWNER_FILE).write_text(f"{dead.pid} 1\n")
    (folders["live"] / workdir.OWNER_FILE).write_text(f"{me} {workdir._start_time(me)}\n")
    (folders["reused-pid"] / workdir.OWNER_FILE).write_text(f"{me} 1\n")  # pid now reused
    (folders["garbled"] / workdir.OWNER_FILE).write_text("x\n")
    removed = workdir.remove_stale(tmp_path)
    assert sorted(removed) == sorted([folders["dead"], folders["reused-pid"]])
    assert {p.name for p in tmp_path.iterdir()} == {
        folders[n].name for n in ("live", "no-owner", "garbled")}


def test_a_new_session_folder_records_its_owner():
    work = workdir.create()
    try:
        assert oct(work.stat().st_mode & 0o777) == "0o700"
        assert not workdir.is_stale(work)
        assert (work / workdir.OWNER_FILE).read_text().split()[0] == str(os.getpid())
    finally:
        shutil.rmtree(work)


def test_requirements_resolved_recently_are_resolved_offline(tmp_path, monkeypatch):
    """The index is asked once per RESOLVE_TTL for the same requirements (it cost ~9 s of
    every session); after that uv resolves from its cache, and an offline miss goes
    online again."""
    monkeypatch.setenv("TTSTACK_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[list[str]] = []

    def fake_tool(args, what, cwd, timeout=600, env=None):
        calls.append(args)
        if "--offline" in args and "miss" in Path(args[-1]).read_text():
            raise wheelhouse.InstallError("not in the cache")
        return "pytest==9.0.3\n"

    monkeypatch.setattr(wheelhouse, "_tool", fake_tool)
    guest = wheelhouse.GuestPython.from_probe(
        '{"version": "3.11", "machine": "x86_64", "libc": "2.36", "abi": "cp311"}')
    for specs in ([], [], ["miss"], ["miss"]):
        res = wheelhouse.resolve(specs, guest, tmp_path, tmp_path)
        assert res.pins == ["pytest==9.0.3"]
    modes = ["--offline" in c for c in calls]
    # first: online; again: offline; new specs: online; again: offline misses, then online
    assert modes == [False, True, False, True, False], modes


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


LONG = "t.py::test_a[" + "x" * 5000 + "-debian-12:x86_64]"  # over the 4 KiB note


@pytest.mark.parametrize(("item", "ledger", "phase"), [
    ("t.py::test_a[debian-12:x86_64]", _sha1("t.py::test_a[debian-12:x86_64]") + "\tlogstart",
     "setup"),
    ("t.py::test_a[debian-12:x86_64]", _sha1("t.py::test_a[debian-12:x86_64]") + "\tsetup",
     "call"),
    ("t.py::test_a[debian-12:x86_64]", _sha1("t.py::test_a[debian-12:x86_64]") + "\tcall",
     "teardown"),
    ("t.py::test_a[debian-12:x86_64]", _sha1("t.py::test_before[debian-12:x86_64]")
     + "\tcall", "setup"),
    ("t.py::test_a[debian-12:x86_64]", "", "setup"),  # died before its first event
    (LONG, _sha1(LONG) + "\tcall", "teardown"),  # was "setup": the note cut the id
])
def test_the_phase_of_a_crash_comes_from_the_workers_ledger(item, ledger, phase):
    assert phase_after(item, ledger) == phase


def test_a_batch_of_worker_events_is_handed_on_in_order():
    """remote.py sends one test's events as one JSON message; the controller's receiver
    gets them one by one, as xdist sent them (location a tuple again); anything else
    passes unchanged; an unreadable batch is an xdist internal error, not a lost test."""
    got: list = []
    receive = unbatching(got.append)
    events = [("logstart", {"nodeid": "t.py::a", "location": ("t.py", 3, "a")}),
              ("testreport", {"data": {"nodeid": "t.py::a", "when": "call",
                                       "location": ("t.py", 3, "a"),
                                       "longrepr": ("t.py", 4, "Skipped: no"),
                                       "sections": [("Captured stdout call", "hi\n")]}}),
              ("runtest_protocol_complete", {"item_index": 0, "duration": 0.1})]
    receive(("tt_events", {"json": json.dumps(events)}))
    receive(("workerfinished", {"workeroutput": {}}))
    assert got == [*events, ("workerfinished", {"workeroutput": {}})]
    got.clear()
    receive(("tt_events", {"json": "[not json"}))
    assert [name for name, _ in got] == ["internal_error"]
    assert "unreadable" in got[0][1]["formatted_error"]


def test_worker_gateways_start_at_once(tmp_path):
    """xdist makes its gateways one after another; under TCG each takes ~2 s to answer,
    so native mode starts them all at once. Each gateway's Python here waits until every
    one of them has been started: made one after another, the first never answers."""
    count = 3
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"touch {tmp_path}/started-$$\n"
        f"for i in $(seq 100); do [ $(ls {tmp_path} | grep -c started-) -ge {count} ] && "
        f"exec {sys.executable} \"$@\"; sleep 0.1; done\n"
        "echo 'not all gateways were started' >&2; exit 1\n")
    wrapper.chmod(0o755)
    group = execnet.Group()
    try:
        specs = [execnet.XSpec(f"popen//python={wrapper}") for _ in range(count)]
        for spec in specs:
            group.allocate_id(spec)
        made = gateways.make_at_once(group.makegateway, specs, rinfo=True)
        assert sorted(made) == sorted(str(s.id) for s in specs)
        assert {gw._rinfo().executable for gw in made.values()} == {sys.executable}
    finally:
        group.terminate(10)


def test_a_dead_workers_unsent_results_are_replayed_before_its_end():
    """Results go in batches, so a worker that dies may have finished tests whose events
    it never sent; they are in its ledger. Before xdist hears of the end (ENDMARK) they
    are handed on, less any whose completion did come through, so xdist blames the test
    that was running. A worker that finished (workerfinished) has nothing to replay."""
    def test(index: int) -> list:
        return [["logstart", {"nodeid": f"t.py::t{index}", "location": ["t.py", index, "t"]}],
                ["runtest_protocol_complete", {"item_index": index, "duration": 0.0}]]

    note = "t.py::t3\tcall"
    text = (note + "\n" + events.SEPARATOR + json.dumps(test(1)) + "\n"
            + json.dumps(test(2)) + "\n" + json.dumps(test(3))[:20])  # torn last line
    assert events.parse_ledger(text) == (note, [test(1), test(2)])
    got: list = []
    receive = unbatching(got.append, lambda: events.parse_ledger(text)[1])
    receive(("tt_events", {"json": json.dumps(test(1))}))  # t1 came through
    end = -1  # the channel's end marker: xdist's Marker.END (-1), ENDMARK before 3.6
    receive(end)
    assert got == [(n, events.retupled(k)) for n, k in test(1) + test(2)] + [end]
    assert got[-2][0] == "runtest_protocol_complete"
    assert isinstance(got[-3][1]["location"], tuple)

    got.clear()
    receive = unbatching(got.append, lambda: pytest.fail("a finished worker's ledger was read"))
    receive(("workerfinished", {"workeroutput": {}}))
    receive(end)
    assert got == [("workerfinished", {"workeroutput": {}}), end]


def test_the_ledger_read_command_prints_what_parse_ledger_reads(tmp_path, monkeypatch):
    """The guest command (head/tail/tr) against a ledger file laid out as remote.py
    writes it: the NUL-padded note, then unsent lines, then NULs."""
    gateway = "gw-test"
    path = Path(events.ledger_path(gateway))
    line = json.dumps([["runtest_protocol_complete", {"item_index": 7}]])
    data = bytearray(events.NOTE_SIZE + events.UNSENT_SIZE)
    note = "t.py::é[debian-12:x86_64]\tsetup\n".encode()
    data[:len(note)] = note
    data[events.NOTE_SIZE:events.NOTE_SIZE + len(line) + 1] = (line + "\n").encode()
    path.write_bytes(bytes(data))
    try:
        out = subprocess.run(["sh", "-c", events.read_command(gateway)], capture_output=True,
                             text=True, check=True).stdout
    finally:
        path.unlink()
    assert events.parse_ledger(out) == (note.decode().rstrip("\n"), [json.loads(line)])
    missing = subprocess.run(["sh", "-c", events.read_command(gateway)], capture_output=True)
    assert missing.returncode == 1


def test_a_subtests_keywords_read_as_their_repr_whichever_way_the_event_came():
    """remote.py puts a subtest's keywords as reprs into the event before choosing JSON or
    execnet; an event that fell back to execnet kept them as {"__tt_repr__": ...} dicts."""
    got: list = []
    receive = unbatching(got.append)
    kwargs = {"data": {"_subtest.context": {"msg": None,
                                            "kwargs": {"k": {"__tt_repr__": "(3, 4)"}}}}}
    receive(("testreport", kwargs))
    receive(("tt_events", {"json": json.dumps([["testreport", {
        "data": {"_subtest.context": {"msg": None,
                                      "kwargs": {"k": {"__tt_repr__": "range(0, 2)"}}}}}]])}))
    shown = [repr(event[1]["data"]["_subtest.context"]["kwargs"]["k"]) for event in got]
    assert shown == ["(3, 4)", "range(0, 2)"]


def test_the_guest_site_imports_with_the_standard_library_and_pytest_alone(tmp_path):
    """The guest plugin's package is shipped without ttclient: an import of it in
    pytest_ttstack/__init__.py crashed every native worker at start ("No module named
    'ttclient'"; xdist: maximum crashed workers reached)."""
    import tarfile

    with tarfile.open(fileobj=__import__("io").BytesIO(project.tar_bytes(project.guest_site_tar))
                      ) as tar:
        tar.extractall(tmp_path, filter="data")
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('ttclient', 'requests', 'ttserver'):\n"
            "            raise ImportError('not in the guest: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import pytest_ttstack.native.guest, pytest_ttstack.native.remote\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"),
                                                              *sys.path[1:]])})
    assert proc.stdout.strip() == "ok", proc.stderr


def test_ssh_control_sockets_fit_a_unix_socket_path_whatever_the_session_dir(tmp_path):
    """A long TMPDIR made the master connection's socket path too long ("too long for Unix
    domain socket"): every try failed and the session waited its whole timeout. The
    sockets then go to a short private directory."""
    from pytest_ttstack.native.ssh import _CONTROL_SUFFIX, SOCKET_PATH_MAX, SSHTarget

    def socket_path(session: Path) -> str:  # as ssh binds it: %C expanded, suffix added
        return SSHTarget("127.0.0.1", 48000, session / "k", session / "known_hosts"
                         )._control.replace("%C", "c" * 40) + "." + "x" * (_CONTROL_SUFFIX - 1)

    short = Path("/tmp/ttnative-abcdefgh")
    assert socket_path(short).startswith(str(short))  # kept beside the session's files
    long = tmp_path / ("d" * 60) / "ttnative-abcdefgh"
    path = socket_path(long)
    assert len(path) <= SOCKET_PATH_MAX and not path.startswith(str(long))
    assert oct(Path(path).parent.stat().st_mode & 0o777) == "0o700"
    assert socket_path(long) == path  # one directory per session
