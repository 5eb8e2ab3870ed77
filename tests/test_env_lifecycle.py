"""The rest of the ENV lifecycle on a real VM, through the real `tt` CLI: push/get of a
50 MB file (agent and SSH), update (expiry, live ports), list vs listall, deny-outgoing,
stop/start across a server crash — and clear errors that change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from helpers import NOTHING_LEFT, ServerProcess, leftovers, new_run_dir, tt

pytestmark = pytest.mark.vm
ENV = "life"
OWNER = "bob@ci"


class Ctx:
    def __init__(self, srv: ServerProcess, run_dir: Path) -> None:
        self.srv = srv
        self.run_dir = run_dir

    def tt(self, *args: str, **kw) -> object:
        kw.setdefault("owner", OWNER)
        return tt(self.srv.address, *args, **kw)

    def show(self) -> dict:
        return requests.get(f"{self.srv.url}/envs/{ENV}", timeout=10).json()

    def sh(self, cmd: str) -> str:
        res = self.tt("env", "run", ENV, "--json", "--cmd", cmd)
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout)["results"][0]["stdout"]


@pytest.fixture(scope="module")
def ctx() -> Iterator[Ctx]:
    run_dir = new_run_dir("life-")
    srv = ServerProcess(run_dir / "state", port_range="45000-45999").start()
    c = Ctx(srv, run_dir)
    sid = srv.server_id()
    try:
        res = c.tt("env", "add", ENV, "--os-prefix", "debian-12", "--port", "8080",
                   "--deny-outgoing", "--life-time", "3600", timeout=600)
        assert res.returncode == 0, res.stderr
        yield c
        ports = [p for vm in c.show()["vms"] for p in [vm["ssh_port"], *vm["ports"].values()]]
        assert c.tt("env", "del", ENV).returncode == 0
        assert leftovers(sid, run_dir / "state", ports) == NOTHING_LEFT
    finally:
        c.srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["agent", "ssh"])
def test_push_then_get_round_trips_50mb_byte_exact(ctx: Ctx, tmp_path: Path, transport: str):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(50 * 1000 * 1000))
    ssh = ["--use-ssh"] if transport == "ssh" else []
    remote = f"/root/blob-{transport}.bin"
    res = ctx.tt("env", "push", ENV, "--local", str(src), "--remote", remote, *ssh,
                 timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"50000000 bytes -> {remote}" in res.stdout
    assert ctx.sh(f"stat -c %a {remote}") == "644\n"
    res = ctx.tt("env", "get", ENV, "--remote", remote, "--local", str(tmp_path / "got"),
                 *ssh, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    got = tmp_path / "got" / f"{ENV}-0" / Path(remote).name  # per-VM sub-directory
    assert _sha(got) == _sha(src)


def test_push_mode_and_bad_paths(ctx: Ctx, tmp_path: Path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho hello from $(hostname)\n")
    res = ctx.tt("env", "push", ENV, "--local", str(script), "--remote", "/usr/local/bin/hi",
                 "--mode", "0755")
    assert res.returncode == 0, res.stderr
    assert ctx.sh("hi") == f"hello from {ENV}-0\n"
    res = ctx.tt("env", "push", ENV, "--local", str(script), "--remote", "relative/hi")
    assert res.returncode == 2 and "give an absolute path in the guest" in res.stderr
    res = ctx.tt("env", "push", ENV, "--local", str(tmp_path / "missing"), "--remote", "/x")
    assert res.returncode == 1 and "--local" in res.stderr
    res = ctx.tt("env", "get", ENV, "--remote", "/no/such/file", "--local", str(tmp_path))
    assert res.returncode == 1 and "/no/such/file" in res.stdout
    res = ctx.tt("env", "push", ENV, "--local", str(script), "--remote", "/no/dir/hi",
                 "--use-ssh")
    assert res.returncode == 1 and "ERROR" in res.stdout


def test_update_extends_expiry_and_changes_ports_live(ctx: Ctx):
    before = ctx.show()
    res = ctx.tt("env", "update", ENV, "--life-time", "7200")
    assert res.returncode == 0, res.stderr
    after = ctx.show()
    assert after["expires_at"] - before["expires_at"] > 3000
    assert abs(after["expires_at"] - (time.time() + 7200)) < 60

    ctx.sh("cd /etc && (setsid python3 -m http.server 9090 >/dev/null 2>&1 &); sleep 1")
    res = ctx.tt("env", "update", ENV, "--port", "9090")
    assert res.returncode == 0, res.stderr
    host_port = int(ctx.show()["vms"][0]["ports"]["9090"])
    deadline = time.monotonic() + 30
    while True:  # the guest's http.server may still be starting under TCG
        try:
            reply = requests.get(f"http://127.0.0.1:{host_port}/hostname", timeout=5)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "forwarded port never answered"
            time.sleep(1)
    assert reply.text == f"{ENV}-0\n"

    res = ctx.tt("env", "update", ENV, "--no-port", "9090")
    assert res.returncode == 0, res.stderr
    assert "9090" not in ctx.show()["vms"][0]["ports"]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{host_port}/hostname", timeout=5)

    # bad input: a clear line, exit 1, nothing changed
    unchanged = ctx.show()
    for args, msg in ((["--no-port", "9090"], "not forwarded"),
                      (["--port", "8080"], "already forwarded"),
                      (["--port", "22"], "22 is always forwarded"),
                      (["--life-time", "99999999"], "outside 1-604800 (seconds)"),
                      # renewals stop at creation + the server's maximum (7 days)
                      (["--life-time", "604800"], "from its creation at most"),
                      ([], "give --life-time")):
        res = ctx.tt("env", "update", ENV, *args)
        assert res.returncode != 0 and msg in res.stderr, (args, res.stderr)
    assert ctx.show() == unchanged


def test_list_shows_own_envs_and_listall_every_client(ctx: Ctx):
    res = ctx.tt("env", "add", "alice-env", "--os-prefix", "debian-12", "--no-wait",
                 owner="alice@laptop")
    assert res.returncode == 0, res.stderr
    try:
        mine = ctx.tt("env", "list").stdout
        assert ENV in mine and "alice-env" not in mine
        theirs = ctx.tt("env", "list", owner="alice@laptop").stdout
        assert "alice-env" in theirs and ENV not in theirs
        every = ctx.tt("env", "listall").stdout
        assert f"[{OWNER}]" in every and "[alice@laptop]" in every
        owners = {e["name"]: e["owner"] for e in json.loads(ctx.tt("env", "listall",
                                                                  "--json").stdout)}
        assert owners == {ENV: OWNER, "alice-env": "alice@laptop"}
    finally:
        assert ctx.tt("env", "del", "alice-env").returncode == 0


def test_deny_outgoing_cuts_the_vm_off_the_host(ctx: Ctx):
    """A listener on the host's loopback is what QEMU user networking calls 10.0.2.2;
    a restricted VM must not reach it (nor anything else)."""
    assert ctx.show()["outgoing"] == "denied"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        out = ctx.sh(f"python3 -c 'import socket; s=socket.socket(); s.settimeout(5);"
                     f" print(s.connect_ex((\"10.0.2.2\", {port})))'")
        # a connection that got through waits in the listen queue, accepted or not
        listener.settimeout(0.5)
        assert out.strip() != "0" and not _accept(listener)


def _accept(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_stop_start_keeps_disk_frees_resources_and_survives_a_crash(ctx: Ctx):
    ctx.sh("echo written-before-stop > /root/keep; sync")
    ssh_port = ctx.show()["vms"][0]["ssh_port"]
    res = ctx.tt("env", "stop", ENV, timeout=200)
    assert res.returncode == 0, res.stderr
    env = ctx.show()
    assert env["state"] == "stopped" and env["vms"][0]["state"] == "stopped"
    status = requests.get(ctx.srv.url + "/status", timeout=10).json()
    assert (status["cpu_used"], status["mem_used_mib"]) == (0, 0)
    assert status["disk_used_mib"] > 0  # the disk is kept
    assert leftovers(ctx.srv.server_id(), ctx.run_dir / "state", [])["domains"] == []

    # bad input on a stopped ENV: clear errors, nothing changed
    res = ctx.tt("env", "stop", ENV)
    assert res.returncode == 1 and "only a running ENV can be stopped" in res.stderr
    res = ctx.tt("env", "run", ENV, "--cmd", "true")
    assert res.returncode == 1 and "is stopped" in res.stderr
    assert ctx.show() == env

    # a crash while stopped loses nothing
    ctx.srv.stop(signal.SIGKILL)
    ctx.srv = ServerProcess(ctx.run_dir / "state", port=ctx.srv.port,
                            port_range="45000-45999").start()
    assert ctx.show()["state"] == "stopped"

    res = ctx.tt("env", "start", ENV, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "running" in res.stderr  # per-VM progress lines
    env = ctx.show()
    assert env["state"] == "running" and env["vms"][0]["ssh_port"] == ssh_port
    assert ctx.sh("cat /root/keep; hostname") == f"written-before-stop\n{ENV}-0\n"
    status = requests.get(ctx.srv.url + "/status", timeout=10).json()
    assert (status["cpu_used"], status["mem_used_mib"]) == (1, 512)
    res = ctx.tt("env", "start", ENV)
    assert res.returncode == 1 and "only a stopped ENV can be started" in res.stderr


@pytest.mark.parametrize("verb", [["stop"], ["start"], ["update", "--life-time", "60"],
                                  ["push", "--local", "/etc/hostname", "--remote", "/x"],
                                  ["get", "--remote", "/etc/hostname"]])
def test_missing_env_is_a_clear_error(ctx: Ctx, verb: list[str]):
    res = ctx.tt("env", verb[0], "no-such-env", *verb[1:])
    assert res.returncode == 1
    assert "ENV 'no-such-env' does not exist" in res.stderr, res.stderr
