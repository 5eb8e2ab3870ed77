"""The ENGINE field (issue [engines]): a server offering `--engines qemu,lxc` runs an ENV
of a QEMU VM and an lxc container of debian-12 through the same API; the container is
entered for commands and files, held to its memory, cut off from the network, and leaves
nothing after delete, expiry or a server crash."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from helpers import (
    CHILD_PYTEST_ADDOPTS,
    IMAGE_PATH,
    NOTHING_LEFT,
    ProxyProcess,
    ServerProcess,
    create_env,
    leftovers,
    new_run_dir,
    run_cmd,
    tt,
    wait_env,
)

pytestmark = pytest.mark.vm
pytest_plugins = ["pytester"]
CONTAINER = IMAGE_PATH / "lxc:debian-12:x86_64"  # scripts/setup-host.sh makes it
PORTS = "48000-48099"
SECRET = "TT_TEST_SERVER_SECRET"  # in the test server's environment: never in a container


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    run_dir = new_run_dir("engines-")
    server = ServerProcess(run_dir / "state", port_range=PORTS,
                           extra=("--engines", "qemu,lxc"), env={SECRET: "s3cr3t"}).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)




def delete(srv: ServerProcess, name: str) -> None:
    assert requests.delete(f"{srv.url}/envs/{name}", timeout=120).status_code == 200


def test_one_env_of_a_vm_and_a_container(srv: ServerProcess):
    assert CONTAINER.is_dir(), "run scripts/setup-host.sh (it makes the lxc image)"
    images = {i["name"] for i in requests.get(srv.url + "/status", timeout=10).json()["images"]}
    assert {"qemu:debian-12:x86_64", "lxc:debian-12:x86_64"} <= images
    env = create_env(srv, "mix", ["debian-12", "lxc:debian-12"])
    by_image = {vm["image"]: vm for vm in env["vms"]}
    assert set(by_image) == {"qemu:debian-12:x86_64", "lxc:debian-12:x86_64"}
    box = by_image["lxc:debian-12:x86_64"]
    try:
        res = {r["vm"]: r for r in run_cmd(srv, "mix", "hostname; id -u; cat /etc/debian_version;"
                                                   " cat /proc/1/comm")}
        outs = {vm: r["stdout"].split() for vm, r in res.items()}
        assert all(r["exit_code"] == 0 for r in res.values()), res
        assert sorted(o[0] for o in outs.values()) == ["mix-0", "mix-1"]
        assert {o[1] for o in outs.values()} == {"0"}
        assert len({o[2] for o in outs.values()}) == 1  # the same Debian release
        # the VM's PID 1 is systemd; the container's nspawn's stub init
        assert sorted(o[3] for o in outs.values()) == ["(sd-stubinit)", "systemd"]

        # files in and out of the container (and the VM) through the same calls
        payload = os.urandom(200_000)
        resp = requests.put(srv.url + "/envs/mix/files", params={"path": "/root/blob"},
                            data=payload, timeout=120)
        assert resp.status_code == 200, resp.text
        got = requests.get(f"{srv.url}/envs/mix/vms/{box['id']}/files",
                           params={"path": "/root/blob"}, timeout=60)
        assert got.status_code == 200 and got.content == payload
        code = run_cmd(srv, "mix", "test -f /etc/shadow && cat /etc/shadow >/dev/null; "
                               "ls -ln /root/blob", vms=[box["id"]])[0]
        assert code["exit_code"] == 0 and code["stdout"].split()[2:4] == ["0", "0"], code

        # the container: its memory limit (512 MiB) kills what goes past it, a timeout
        # ends the command, nothing reaches the host's loopback
        big = run_cmd(srv, "mix", "python3 -c 'b = bytearray(900 << 20)'", vms=[box["id"]])[0]
        assert big["exit_code"] == 137, big
        late = run_cmd(srv, "mix", "sleep 30; touch /tmp/late", timeout=2, vms=[box["id"]])[0]
        assert late["timed_out"] and late["exit_code"] is None
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            out = run_cmd(srv, "mix", "python3 -c 'import socket; socket.create_connection("
                                  f"(\"127.0.0.1\", {port}), 3)'", vms=[box["id"]])[0]
            assert "ConnectionRefusedError" in out["stderr"], out
        # the CLI, as for VMs
        cli = tt(srv.address, "env", "run", "mix", "--cmd", "echo hi")
        assert cli.returncode == 0 and cli.stdout.count("hi\n") == 2, cli.stderr

        # SSH into both with the server's key, the container's host key pinned
        ssh = run_cmd(srv, "mix", "id -un; cat /etc/machine-id", use_ssh=True)
        assert [r["stdout"].split()[0] for r in ssh] == ["root", "root"], ssh
        assert len({r["stdout"].split()[1] for r in ssh}) == 2  # machine-ids differ
        # an SSH session silent for longer than the relay's connect timeout (10 s): it
        # was cut, ssh retried, and the command ran again and again
        once = run_cmd(srv, "mix", "sleep 11; echo x >> /root/count; cat /root/count",
                       use_ssh=True, vms=[box["id"]])[0]
        assert (once["exit_code"], once["stdout"]) == (0, "x\n"), once

        # the container's root replaces the first program every entry runs: it must see
        # nothing of the server's environment (nsenter passes its own on)
        spy = ("mv /usr/bin/env /usr/bin/env.real && printf '%s\\n' '#!/bin/sh' "
               "'tr \"\\\\0\" \"\\\\n\" < /proc/$$/environ >> /tmp/seen' "
               "'exec /usr/bin/env.real \"$@\"' > /usr/bin/env && chmod 755 /usr/bin/env")
        assert run_cmd(srv, "mix", spy, vms=[box["id"]])[0]["exit_code"] == 0
        seen = run_cmd(srv, "mix", "cat /tmp/seen", vms=[box["id"]])[0]["stdout"]
        assert "PATH=" in seen and SECRET not in seen, seen
    finally:
        delete(srv, "mix")
    assert leftovers(srv.server_id(), srv.cfgdb, []) == NOTHING_LEFT


def test_an_expired_container_and_one_a_crash_left_leave_nothing(srv: ServerProcess):
    create_env(srv, "short", ["lxc:debian-12"], life_time=3)
    deadline = time.monotonic() + 60
    while requests.get(srv.url + "/envs/short", timeout=10).status_code != 404:
        assert time.monotonic() < deadline, "the expired ENV was not reaped"
        time.sleep(0.5)
    sid = srv.server_id()
    assert leftovers(sid, srv.cfgdb, []) == NOTHING_LEFT

    # a crash: the container runs on, the restarted server adopts it (and forwards its
    # port again), then removes it
    env = create_env(srv, "kept", ["lxc:debian-12"], ports=[8080])
    port = int(env["vms"][0]["ports"]["8080"])
    run_cmd(srv, "kept", "echo before > /root/mark; "
                     "python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &")
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(30)
    assert not serves(port)  # the forward was the server's
    srv.start()
    assert run_cmd(srv, "kept", "cat /root/mark")[0]["stdout"] == "before\n"
    deadline = time.monotonic() + 30
    while not serves(port):
        assert time.monotonic() < deadline, "the restarted server does not forward the port"
        time.sleep(0.2)
    # a restart without the engine would not know the container: it is refused
    srv.stop(clean=False)
    without = ServerProcess(srv.cfgdb, port=srv.port, port_range=PORTS)
    with pytest.raises(RuntimeError, match=r"ENVs with lxc containers are on record "
                                           r"\(kept\): start ttserver with --engines"):
        without.start()
    srv.start()
    assert run_cmd(srv, "kept", "cat /root/mark")[0]["stdout"] == "before\n"
    delete(srv, "kept")
    assert leftovers(sid, srv.cfgdb, [port]) == NOTHING_LEFT


def test_containers_are_refused_where_the_operator_did_not_turn_them_on(server: ServerProcess):
    resp = requests.post(server.url + "/envs", json={"name": "c", "os_prefix": ["lxc:debian-12"]},
                         timeout=30)
    assert resp.status_code == 400
    assert "--engines qemu,lxc" in resp.json()["detail"]
    images = {i["name"] for i in requests.get(server.url + "/status", timeout=10).json()["images"]}
    assert "lxc:debian-12:x86_64" not in images


def serves(port: int) -> bool:
    """Whether an HTTP server answers on the host's loopback `port`."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_container_serves_on_its_forwarded_ports(srv: ServerProcess):
    """Ports forward into the container's own loopback (it has no other interface), at
    create and through PATCH, and stop with it."""
    env = create_env(srv, "web", ["lxc:debian-12"], ports=[8080])
    box = env["vms"][0]
    http = "python3 -m http.server {} --bind 127.0.0.1 >/dev/null 2>&1 &"
    try:
        run_cmd(srv, "web", http.format(8080))
        first = int(box["ports"]["8080"])
        deadline = time.monotonic() + 30
        while not serves(first):
            assert time.monotonic() < deadline, "nothing answered on the forwarded port"
            time.sleep(0.2)
        resp = requests.patch(srv.url + "/envs/web", json={"add_ports": [9090],
                                                           "remove_ports": [8080]}, timeout=30)
        assert resp.status_code == 200, resp.text
        ports = resp.json()["vms"][0]["ports"]
        assert set(ports) == {"9090"}
        run_cmd(srv, "web", http.format(9090))
        second = int(ports["9090"])
        deadline = time.monotonic() + 30
        while not serves(second):
            assert time.monotonic() < deadline, "nothing answered on the added port"
            time.sleep(0.2)
        assert not serves(first)  # removed
    finally:
        delete(srv, "web")
    assert leftovers(srv.server_id(), srv.cfgdb, [first, second]) == NOTHING_LEFT


def peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) >> 10
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_root_that_replaces_head_gets_no_more_from_the_server(srv: ServerProcess):
    """The caps of a run's output and of a file read are `head -c` in the guest, which its
    root may replace: the server read everything it was sent (800 MiB of output: 1.7 GB
    of server memory) and a read longer than the file's size broke the HTTP answer."""
    create_env(srv, "flood", ["lxc:debian-12"], cpu_num=1, mem_size=256)
    try:
        before = peak_rss_mib(srv.proc.pid)
        replace = ("mv /usr/bin/head /usr/bin/head.real && printf '%s\\n' '#!/bin/sh' "
                   "'case \"$*\" in */root/big*) /usr/bin/head.real \"$@\"; echo more; exit;; "
                   "*/root/held*) exec >&-; (setsid sh -c \"/usr/bin/head.real -c 300000000 "
                   "/dev/zero >&2; exec sleep 60\" </dev/null &); exit 3;; "
                   "esac' '[ -e /root/flood ] && exec dd if=/dev/zero bs=1M count=400 "
                   "status=none' '[ -e /root/short ] && exit 0' "
                   "'exec /usr/bin/head.real \"$@\"' "
                   "> /usr/bin/head && chmod 755 /usr/bin/head")
        assert run_cmd(srv, "flood", replace)[0]["exit_code"] == 0
        flooded = run_cmd(srv, "flood", "touch /root/flood; echo hi")[0]
        assert "more than the run's output cap" in flooded["error"], flooded
        assert peak_rss_mib(srv.proc.pid) - before < 200  # at most both capped streams
        # a head that sends nothing: it was an output cut at the cap, with no output
        short = run_cmd(srv, "flood", "rm /root/flood; touch /root/short; echo hi")[0]
        assert "short of the run's output" in short["error"], short
        # a file read (streamed: over the size read whole) sends at most its size
        assert run_cmd(srv, "flood", "rm /root/short; dd if=/dev/zero of=/root/big bs=1M "
                                     "count=2 status=none")[0]["exit_code"] == 0
        box = requests.get(f"{srv.url}/envs/flood", timeout=10).json()["vms"][0]
        got = requests.get(f"{srv.url}/envs/flood/vms/{box['id']}/files",
                           params={"path": "/root/big"}, timeout=60)
        assert got.status_code == 200 and got.content == bytes(2 << 20)
        # one that closes its stdout, floods stderr and holds it open: the server read
        # all of it, and waited for as long as the guest held it
        assert run_cmd(srv, "flood", "cp /root/big /root/held")[0]["exit_code"] == 0
        started = time.monotonic()
        with pytest.raises(requests.RequestException):
            requests.get(f"{srv.url}/envs/flood/vms/{box['id']}/files",
                         params={"path": "/root/held"}, timeout=60).raise_for_status()
        assert time.monotonic() - started < 20
        assert peak_rss_mib(srv.proc.pid) - before < 200
    finally:
        delete(srv, "flood")


def test_a_stopped_container_starts_again_with_its_files_and_identity(srv: ServerProcess):
    """`tt env stop` ends the container and keeps its own layer (as a VM keeps its disk);
    `start` runs it again on it: its files, machine-id and SSH host key, its ports."""
    env = create_env(srv, "again", ["lxc:debian-12"], ports=[8080])
    box, port = env["vms"][0], int(env["vms"][0]["ports"]["8080"])
    sid = srv.server_id()
    try:
        ident = run_cmd(srv, "again", "echo kept > /root/mark; cat /etc/machine-id")[0]["stdout"]
        resp = requests.post(srv.url + "/envs/again/stop", timeout=120)
        assert resp.status_code == 200 and resp.json()["state"] == "stopped", resp.text
        stopped = leftovers(sid, srv.cfgdb, [port])
        assert stopped == {**NOTHING_LEFT, "dirs": [Path(box["id"]).name]}, stopped
        resp = requests.post(srv.url + "/envs/again/start", timeout=30)
        assert resp.status_code == 202, resp.text
        again = wait_env(srv.url, "again")
        assert again["state"] == "running", again["error"]
        out = run_cmd(srv, "again", "cat /root/mark /etc/machine-id", use_ssh=True)[0]
        assert out["stdout"] == "kept\n" + ident, out  # over SSH: the pinned key held
        run_cmd(srv, "again", "python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &")
        deadline = time.monotonic() + 30
        while not serves(port):
            assert time.monotonic() < deadline, "the started container's port is not served"
            time.sleep(0.2)
    finally:
        delete(srv, "again")
    assert leftovers(sid, srv.cfgdb, [port]) == NOTHING_LEFT


def test_a_container_without_sshd_starts_and_says_why_ssh_fails(srv: ServerProcess):
    """A container whose sshd was removed could never start again, with an empty reason
    ("setting it up failed (127): "): sshd's errors went to /dev/null."""
    env = create_env(srv, "nossh", ["lxc:debian-12"])
    try:
        assert run_cmd(srv, "nossh", "mv /usr/sbin/sshd /root/")[0]["exit_code"] == 0
        assert requests.post(srv.url + "/envs/nossh/stop", timeout=120).status_code == 200
        assert requests.post(srv.url + "/envs/nossh/start", timeout=30).status_code == 202
        again = wait_env(srv.url, "nossh")
        assert again["state"] == "running", again["error"]
        assert run_cmd(srv, "nossh", "echo up")[0]["stdout"] == "up\n"
        console = (srv.cfgdb / "vms" / env["vms"][0]["id"] / "console.log").read_text()
        assert "sshd did not start" in console and "/usr/sbin/sshd: not found" in console
        # one that never daemonizes: the start took over 30 s and failed, again and again
        assert run_cmd(srv, "nossh", "printf '#!/bin/sh\\nexec sleep 100\\n' > "
                                     "/usr/sbin/sshd; chmod 755 /usr/sbin/sshd"
                       )[0]["exit_code"] == 0
        assert requests.post(srv.url + "/envs/nossh/stop", timeout=120).status_code == 200
        assert requests.post(srv.url + "/envs/nossh/start", timeout=30).status_code == 202
        again = wait_env(srv.url, "nossh")
        assert again["state"] == "running", again["error"]
        console = (srv.cfgdb / "vms" / env["vms"][0]["id"] / "console.log").read_text()
        assert "it did not start within 10s" in console
        # one that prints 50 MB: the server read it all, and logged it, twice
        assert run_cmd(srv, "nossh", "printf '%s\\n' '#!/bin/sh' 'head -c 50000000 "
                                     "/dev/zero | tr \"\\\\0\" y >&2' 'echo bad >&2' 'exit 1' "
                                     "> /usr/sbin/sshd")[0]["exit_code"] == 0
        assert requests.post(srv.url + "/envs/nossh/stop", timeout=120).status_code == 200
        assert requests.post(srv.url + "/envs/nossh/start", timeout=30).status_code == 202
        assert wait_env(srv.url, "nossh")["state"] == "running"
        console_log = srv.cfgdb / "vms" / env["vms"][0]["id"] / "console.log"
        assert console_log.stat().st_size < 1 << 20
        assert "sshd did not start (" in console_log.read_text()
    finally:
        delete(srv, "nossh")


def test_a_container_leaves_the_hosts_root_its_inotify_instances(srv: ServerProcess):
    """A container's inotify instances count against host root's per-user limit (128 by
    default): one holding 200 left the host's root none. The server raises it."""
    create_env(srv, "notify", ["lxc:debian-12"])
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        held = run_cmd(srv, "notify", "nohup python3 -c 'import ctypes, time; "
                                      "l = ctypes.CDLL(None); "
                                      "n = [l.inotify_init() for i in range(200)]; "
                                      "print(min(n), flush=True); time.sleep(30)' "
                                      "> /root/n 2>&1 & sleep 1; cat /root/n")[0]
        assert held["stdout"].strip().isdigit() and int(held["stdout"]) > 0, held
        fd = libc.inotify_init()
        assert fd >= 0, os.strerror(ctypes.get_errno())
        os.close(fd)
    finally:
        delete(srv, "notify")


def test_ttproxy_places_containers_on_the_servers_that_offer_them(srv: ServerProcess):
    """Behind ttproxy, a server without the engine gets VMs only; the ENV's containers go
    to the one that offers them, and one ENV spans both."""
    run_dir = new_run_dir("engines-proxy-")
    vms_only = ServerProcess(run_dir / "state", port_range="48100-48199").start()
    proxy = ProxyProcess([srv.address, vms_only.address], run_dir).start()
    try:
        resp = requests.post(proxy.url + "/envs", json={
            "name": "spread", "os_prefix": ["debian-12", "lxc:debian-12"], "vm_number": 2},
            timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(proxy.url, "spread")
        assert env["state"] == "running", env["error"]
        placed = {(vm["image"], vm["server"]) for vm in env["vms"]}
        assert {s for i, s in placed if i.startswith("lxc:")} == {srv.address}
        assert len({s for _, s in placed}) == 2  # the VMs went to both
        res = requests.post(proxy.url + "/envs/spread/run", json={"cmd": "hostname"},
                            timeout=60).json()["results"]
        assert sorted(r["stdout"] for r in res) == [f"spread-{i}\n" for i in range(4)]
        assert requests.delete(proxy.url + "/envs/spread", timeout=120).status_code == 200
        for server in (srv, vms_only):
            assert leftovers(server.server_id(), server.cfgdb, []) == NOTHING_LEFT
    finally:
        proxy.stop()
        vms_only.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


SUITE = """
def test_release(tt_vm):
    assert tt_vm.run("cat /etc/debian_version", check=True).stdout.startswith("12")

def test_files(tt_vm, tmp_path):
    (tmp_path / "a").write_text("hello")
    tt_vm.put(tmp_path / "a", "/root/a")
    assert tt_vm.get("/root/a", tmp_path / "b").read_text() == "hello"
"""


def test_the_plugin_runs_each_test_on_a_vm_and_a_container(
        srv: ServerProcess, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path):
    """`--tt-os=debian-12,lxc:debian-12`: one ENV of both; the ids name the engine, as the
    same OS runs under two."""
    monkeypatch.setenv("PYTEST_ADDOPTS", CHILD_PYTEST_ADDOPTS)  # pytester removed it
    monkeypatch.setenv("TT_CONFIG", str(tmp_path / "no-config.json"))
    monkeypatch.setenv("TTSTACK_CACHE_DIR", str(tmp_path / "cache"))
    pytester.makepyfile(test_suite=SUITE)
    res = pytester.runpytest_subprocess(f"--tt-server={srv.address}",
                                        "--tt-os=debian-12,lxc:debian-12", "-v")
    res.assert_outcomes(passed=4)
    res.stdout.fnmatch_lines_random([
        "*test_release[[]qemu:debian-12:x86_64[]] PASSED*",
        "*test_release[[]lxc:debian-12:x86_64[]] PASSED*",
        "*lxc:debian-12:x86_64: 1 VM(s), 1 container*"])
    assert leftovers(srv.server_id(), srv.cfgdb, []) == NOTHING_LEFT


def test_native_mode_runs_a_suite_inside_a_container(
        srv: ServerProcess, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path):
    """`--tt-native` reaches a container's workers over SSH (its sshd, through its
    forwarded SSH port) as it does a VM's."""
    monkeypatch.setenv("PYTEST_ADDOPTS", CHILD_PYTEST_ADDOPTS)
    monkeypatch.setenv("TT_CONFIG", str(tmp_path / "no-config.json"))
    monkeypatch.setenv("TTSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    pytester.makepyfile(test_inside="""
import os, pytest
@pytest.mark.parametrize("n", range(4))
def test_in_the_container(n):
    assert open("/proc/1/comm").read().strip() == "(sd-stubinit)"
""")
    res = pytester.runpytest_subprocess(f"--tt-server={srv.address}", "--tt-native",
                                        "--tt-os=lxc:debian-12", "-v")
    res.assert_outcomes(passed=4)
    res.stdout.fnmatch_lines(["*PASSED*test_in_the_container[[]debian-12:x86_64-0[]]*"])
    assert leftovers(srv.server_id(), srv.cfgdb, []) == NOTHING_LEFT


FOREIGN = Path(os.environ.get("TTSTACK_FOREIGN_IMAGES", "/var/lib/ttstack/images-foreign"))


@pytest.mark.skipif(os.environ.get("TTSTACK_FOREIGN_TESTS") != "1",
                    reason="opt-in (TTSTACK_FOREIGN_TESTS=1, as tests/test_multiarch.py): "
                           "builds an arm64 image under qemu-user, minutes")
def test_an_arm64_container_runs_arm64_binaries_through_qemu_user():
    """`lxc:debian-12:aarch64` on an x86_64 host: every program is arm64, run by the
    kernel through qemu-user's binfmt_misc entry (F flag: it works in the container's
    mount namespace); uname and Python say aarch64 (qemu-user answers for the guest)."""
    build = subprocess.run([sys.executable, "-m", "ttserver.cli", "image", "build",
                            "debian-12", "--arch", "aarch64", "--engine", "lxc",
                            "--image-path", str(FOREIGN), "--timeout", "1800"],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-2000:]
    run_dir = new_run_dir("engines-arm-")
    srv = ServerProcess(run_dir / "state", FOREIGN, port_range=PORTS,
                        extra=("--engines", "lxc")).start()
    try:
        create_env(srv, "arm", ["lxc:debian-12:aarch64"])
        out = run_cmd(srv, "arm", "uname -m; python3 -c 'import platform; "
                              "print(platform.machine())'; od -An -tx1 -j18 -N2 /bin/true")[0]
        # /bin/true's ELF e_machine: 0xb7, EM_AARCH64
        assert out["stdout"].split() == ["aarch64", "aarch64", "b7", "00"], out
        payload = os.urandom(50_000)
        resp = requests.put(srv.url + "/envs/arm/files", params={"path": "/root/blob"},
                            data=payload, timeout=120)
        assert resp.status_code == 200, resp.text
        vm = requests.get(srv.url + "/envs/arm", timeout=10).json()["vms"][0]
        got = requests.get(f"{srv.url}/envs/arm/vms/{vm['id']}/files",
                           params={"path": "/root/blob"}, timeout=60)
        assert got.content == payload
        delete(srv, "arm")
        assert leftovers(srv.server_id(), srv.cfgdb, []) == NOTHING_LEFT
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
