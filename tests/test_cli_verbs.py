"""The `tt` verbs that hand VMs to the user's own tools, against a real server and real
VMs: `env ssh`, `env ssh-config` (used by OpenSSH itself), `env console --follow`,
`image list --json`, `env run -- ARGV` with `--vm` and its exit-status rules, `completion`,
`status --remote`; bad input to each is exit != 0 with one line saying what to fix; the
client's retries of calls that are safe to repeat."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from ttclient.api import ApiError, Client

from helpers import NOTHING_LEFT, ServerProcess, leftovers, new_run_dir, tt, wait_env

ENV = "verbs"


@dataclass
class Ctx:
    srv: ServerProcess
    key: Path  # the user's private key; its public half is in the ENV
    env: dict

    def tt(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return tt(self.srv.address, *args, **kw)


@pytest.fixture(scope="module")
def ctx() -> Iterator[Ctx]:
    run_dir = new_run_dir("verbs-")
    srv = ServerProcess(run_dir / "state", port_range="40000-40099").start()
    key = run_dir / "user_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "user@verbs",
                    "-f", str(key)], check=True, timeout=30)
    try:
        resp = requests.post(srv.url + "/envs", json={
            "name": ENV, "os_prefix": ["debian-12:x86_64"], "vm_number": 2,
            "ssh_keys": [key.with_suffix(".pub").read_text().strip()]}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, ENV)
        assert env["state"] == "running", env["error"]
        yield Ctx(srv, key, env)
        ports = [vm["ssh_port"] for vm in env["vms"]]
        sid = srv.server_id()
        assert requests.delete(f"{srv.url}/envs/{ENV}", timeout=120).status_code == 200
        assert leftovers(sid, run_dir / "state", ports) == NOTHING_LEFT
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


pytestmark = [pytest.mark.vm, pytest.mark.skipif(shutil.which("ssh") is None,
                                                  reason="needs the OpenSSH client")]


def test_ssh_runs_one_command_and_ssh_config_serves_openssh(ctx: Ctx, tmp_path: Path):
    res = ctx.tt("env", "ssh", ENV, "-i", str(ctx.key), "--", "uname", "-m")
    assert (res.returncode, res.stdout) == (0, "x86_64\n"), res.stderr
    res = ctx.tt("env", "ssh", ENV, "1", "-i", str(ctx.key), "--", "hostname")
    assert (res.returncode, res.stdout) == (0, f"{ENV}-1\n"), res.stderr
    res = ctx.tt("env", "ssh", ENV, "0", "-i", str(ctx.key), "--", "sh", "-c", "exit 5")
    assert res.returncode == 5  # ssh's status is the command's
    # nothing of it in the user's known_hosts, and no prompt was needed (stdin closed)
    assert not (Path.home() / ".ssh" / "known_hosts").exists() or ENV not in (
        Path.home() / ".ssh" / "known_hosts").read_text()

    res = ctx.tt("env", "ssh-config", ENV, "-i", str(ctx.key))
    assert res.returncode == 0, res.stderr
    config = tmp_path / "ssh_config"
    config.write_text(res.stdout)
    assert res.stdout.count("Host ") == 2 and "UserKnownHostsFile /dev/null" in res.stdout
    for vm in ctx.env["vms"]:
        done = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", vm["name"],
                               "hostname"], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (0, f"{vm['name']}\n"), done.stderr
    done = subprocess.run(["scp", "-F", str(config), "-o", "BatchMode=yes", str(config),
                           f"{ENV}-0:/tmp/copied"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_console_follow_shows_a_new_line_within_two_seconds(ctx: Ctx):
    env = {k: v for k, v in os.environ.items() if k not in ("TT_TOKEN", "TT_SERVER")}
    env.update(TT_CONFIG="/nonexistent/tt.json", TT_SERVER=ctx.srv.address)
    follow = subprocess.Popen([sys.executable, "-m", "ttclient.cli", "env", "console", ENV,
                               f"{ENV}-0", "--lines", "5", "--follow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert follow.stdout is not None
        os.set_blocking(follow.stdout.fileno(), False)
        time.sleep(1.5)  # its first tail is printed, and polls have run
        first = follow.stdout.read() or b""
        # it printed the whole 200-line window again on its first poll
        assert 1 <= len(first.splitlines()) <= 5, first[-2000:]
        mark = f"ttmark-{time.time_ns()}"
        res = ctx.tt("env", "run", ENV, "--vm", "0", "--", "sh", "-c",
                     f"echo {mark} > /dev/ttyS0")
        assert res.returncode == 0, res.stdout + res.stderr
        written = time.monotonic()
        seen = b""
        while mark.encode() not in seen and time.monotonic() - written < 2.0:
            seen += follow.stdout.read() or b""
            time.sleep(0.05)
        assert mark.encode() in seen, seen[-500:]
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=10) == 130


def test_json_output_matches_the_api(ctx: Ctx):
    status = requests.get(ctx.srv.url + "/status", timeout=10).json()
    res = ctx.tt("image", "list", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == [i["name"] for i in status["images"]]
    assert {r["template"] for r in rows} <= {"ready", "building", "failed", "none"}
    debian12 = next(r for r in rows if r["name"] == "qemu:debian-12:x86_64")
    assert (debian12["os"], debian12["arch"], debian12["template"]) == (
        "debian-12", "x86_64", "ready")
    res = ctx.tt("env", "show", ENV, "--json")
    api = requests.get(f"{ctx.srv.url}/envs/{ENV}", timeout=10).json()
    assert json.loads(res.stdout)["vms"] == api["vms"]
    for spelling in ("--remote", "--server"):  # the old one stays, hidden
        res = ctx.tt("status", spelling, "--json")
        assert res.returncode == 0 and json.loads(res.stdout)["images"] == status["images"]
    assert "--server" not in ctx.tt("status", "--help").stdout


def test_run_argv_and_its_exit_status_rules(ctx: Ctx):
    res = ctx.tt("env", "run", ENV, "--", "printf", "%s|", "a b", "c'd", "$HOME")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("a b|c'd|$HOME|") == 2  # each word as given, not re-split
    res = ctx.tt("env", "run", ENV, "--vm", "1", "--", "sh", "-c", "exit 7")
    assert res.returncode == 7 and "command failed on verbs-1" in res.stderr
    res = ctx.tt("env", "run", ENV, "--", "sh", "-c", "exit 7")  # two VMs: 1
    assert res.returncode == 1 and "command failed on verbs-0, verbs-1" in res.stderr
    res = ctx.tt("env", "run", ENV, "--vm", f"{ENV}-0", "--cmd", "hostname")
    assert res.returncode == 0 and res.stdout.count(f"{ENV}-0\n") == 1, res.stdout


@pytest.mark.parametrize(("args", "words", "code"), [
    (("env", "run", ENV), "give the command one way: --cmd 'LINE', --script FILE", 2),
    (("env", "run", ENV, "--cmd", "true", "--", "true"), "give the command one way", 2),
    (("env", "run", ENV, "-f", "/nonexistent.sh"), "--script /nonexistent.sh: No such", 1),
    (("env", "update", ENV, "-p", "53/udp"), "53/udp: only TCP ports are forwarded", 2),
    (("env", "update", ENV, "-p", "80,x"), "'x' is not a port number", 2),
    (("env", "push", ENV, "--local", "/etc/hostname", "-r"), "not a directory", 1),
    (("env", "ssh", ENV, "nosuch", "--", "true"), "has no VM 'nosuch' (its VMs: verbs-0", 1),
    (("env", "console", ENV, "0", "--lines", "0"), "outside 1-2000", 2),
    (("env", "console", ENV, "0", "--lines", "many"), "'many' is not a number", 2),
    (("env", "console", ENV, "7"), "has no VM '7'", 1),
    (("env", "ssh-config", "nosuch"), "nosuch", 1),
    (("completion", "fish"), "invalid choice: 'fish'", 2),
])
def test_bad_input_is_one_line_saying_what_to_fix(ctx: Ctx, args, words, code):
    res = ctx.tt(*args)
    assert res.returncode == code, res.stdout + res.stderr
    assert words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_trees_round_trip_through_push_and_get_recursive(ctx: Ctx, tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "sub dir").mkdir(parents=True)
    (tree / "sub dir" / "a file with spaces.txt").write_bytes(b"\x00\xffbytes\n")
    (tree / "empty").write_bytes(b"")
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "link").symlink_to("sub dir/a file with spaces.txt")
    res = ctx.tt("env", "push", ENV, "--local", str(tree), "-r")  # to /tmp/tree
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("bytes of tar -> /tmp/tree/") == 2, res.stdout
    res = ctx.tt("env", "get", ENV, "--remote", "/tmp/tree", "--local", str(tmp_path / "back"),
                 "-r", "--vm", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    back = tmp_path / "back" / f"{ENV}-1" / "tree"
    assert not (tmp_path / "back" / f"{ENV}-0").exists()  # --vm 1 only
    for rel in ("sub dir/a file with spaces.txt", "empty", "run.sh"):
        assert (back / rel).read_bytes() == (tree / rel).read_bytes(), rel
    assert os.readlink(back / "link") == "sub dir/a file with spaces.txt"
    assert (back / "run.sh").stat().st_mode & 0o777 == 0o755
    left = ctx.tt("env", "run", ENV, "--cmd", "ls -a /tmp | grep -c '^.tt-' || true")
    assert left.stdout.count("\n0\n") == 2, left.stdout  # no staged tar left behind


def test_a_local_script_runs_by_its_own_interpreter(ctx: Ctx, tmp_path: Path):
    script = tmp_path / "probe.py"
    script.write_text("#!/usr/bin/python3\nimport platform, sys\n"
                      "print(platform.machine(), 'EOF', sys.argv[0].startswith('/tmp/'))\n"
                      "sys.exit(3)\n")
    res = ctx.tt("env", "run", ENV, "--vm", "0", "--script", str(script))
    assert res.returncode == 3 and "x86_64 EOF True" in res.stdout, res.stdout + res.stderr
    res = ctx.tt("env", "run", ENV, "-f", str(tmp_path / "probe.py"), "--json")
    assert [r["stdout"] for r in json.loads(res.stdout)["results"]] == ["x86_64 EOF True\n"] * 2


def test_ports_lists_and_several_names(ctx: Ctx):
    res = ctx.tt("env", "update", ENV, "-p", "8081,8082/tcp", "--json")
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)["vms"][0]["ports"]) == {"8081", "8082"}
    res = ctx.tt("env", "update", ENV, "--no-port", "8081,8082", "--json")
    assert json.loads(res.stdout)["vms"][0]["ports"] == {}
    res = ctx.tt("env", "show", ENV, ENV, "--json")
    assert [e["name"] for e in json.loads(res.stdout)] == [ENV, ENV]


@pytest.mark.slow  # ~90 s: a three-VM ENV stopped, resized and started cold
def test_kick_removes_vms_and_update_resizes_a_stopped_env(ctx: Ctx):
    srv = ctx.srv
    res = ctx.tt("env", "add", "resize", "--os-prefix", "debian-12:x86_64", "-n", "2",
                 "--disk-size", "3G", timeout=600)
    assert res.returncode == 0, res.stderr
    # the disk grew and so did its filesystem (it stayed at the image's 2 GiB)
    res = ctx.tt("env", "run", "resize", "--vm", "0", "--", "df", "-BM", "--output=size", "/")
    assert res.returncode == 0 and int(res.stdout.split()[-1].rstrip("M")) > 2900, res.stdout
    env = requests.get(f"{srv.url}/envs/resize", timeout=10).json()
    kicked = env["vms"][1]
    res = ctx.tt("env", "kick", "resize", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert [vm["name"] for vm in json.loads(res.stdout)["vms"]] == ["resize-0"]
    gone = leftovers(srv.server_id(), srv.cfgdb, [kicked["ssh_port"]])
    assert not any(kicked["id"] in str(v) for v in gone.values()), gone
    assert not gone["ports"], gone
    res = ctx.tt("env", "kick", "resize", "resize-0")
    assert res.returncode == 1 and "every VM of ENV 'resize': delete the ENV" in res.stderr
    res = ctx.tt("env", "add", "slow", "--os-prefix", "debian-12:x86_64", "--cold",
                 "--wait-timeout", "1")
    assert res.returncode == 1 and "it keeps booting on the server" in res.stderr, res.stderr
    assert requests.delete(f"{srv.url}/envs/slow", timeout=120).status_code == 200
    res = ctx.tt("env", "kick", "resize", "9")
    assert res.returncode == 1 and "has no VM '9'" in res.stderr

    res = ctx.tt("env", "update", "resize", "-c", "2", "-m", "768")
    assert res.returncode == 1 and "only while it is stopped" in res.stderr, res.stderr
    assert ctx.tt("env", "stop", "resize", timeout=300).returncode == 0
    res = ctx.tt("env", "console", "resize", "0", "--lines", "3")  # was refused: "stopped"
    assert res.returncode == 0 and 1 <= len(res.stdout.splitlines()) <= 3, res.stderr
    res = ctx.tt("env", "update", "resize", "-c", "2", "-m", "768M", "--json")
    assert res.returncode == 0, res.stderr
    vm = json.loads(res.stdout)["vms"][0]
    assert (vm["cpu"], vm["mem_mib"]) == (2, 768)
    res = ctx.tt("env", "update", "resize", "-c", "9")  # the server has 4
    assert res.returncode == 1 and "not enough resources" in res.stderr, res.stderr
    assert ctx.tt("env", "start", "resize", timeout=600).returncode == 0
    out = ctx.tt("env", "run", "resize", "--cmd", "nproc; grep MemTotal /proc/meminfo").stdout
    lines = out.splitlines()
    assert lines[1] == "2" and 600_000 < int(lines[2].split()[1]) <= 768 * 1024, out
    assert requests.delete(f"{srv.url}/envs/resize", timeout=120).status_code == 200


def test_completion_scripts_are_accepted_by_their_shells(tmp_path: Path):
    res = tt(None, "completion", "bash")
    assert res.returncode == 0 and "complete" in res.stdout
    script = tmp_path / "tt.bash"
    script.write_text(res.stdout)
    done = subprocess.run(["bash", "-c", f"source {script} && complete -p tt"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert tt(None, "completion", "zsh").stdout.startswith("#compdef tt")


class Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first two requests of each method, then 200 {}."""

    seen: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        Flaky.seen[self.command] = Flaky.seen.get(self.command, 0) + 1
        code = 503 if Flaky.seen[self.command] <= 2 else 200
        body = json.dumps({"detail": "restarting"} if code == 503 else {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer


def test_the_client_repeats_only_what_is_safe_to_repeat():
    """A server restarting (503) is waited out for GET and DELETE; a POST is not sent
    twice (it may have acted)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        client = Client(url, token=None, retry=True)
        assert client.status() == {}
        assert client.delete_env("x") == {}
        with pytest.raises(ApiError, match="restarting"):
            client.stop_env("x")  # POST
        assert Flaky.seen == {"GET": 3, "DELETE": 3, "POST": 1}
        Flaky.seen.clear()
        with pytest.raises(ApiError, match="restarting"):
            Client(url, token=None).status()  # the library's default: no retries
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_partial_failures_and_look_alike_names(ctx: Ctx, tmp_path: Path):
    res = ctx.tt("env", "show", ENV, "NOPE")  # showed nothing at all
    assert res.returncode == 1 and f"ENV {ENV}: running" in res.stdout
    assert "'NOPE' does not exist" in res.stderr
    before = requests.get(f"{ctx.srv.url}/envs/{ENV}", timeout=10).json()["expires_at"]
    res = ctx.tt("env", "update", ENV, "NOPE", "-l", "3000")  # changed ENV, then failed
    assert res.returncode == 1 and "'NOPE' does not exist" in res.stderr
    after = requests.get(f"{ctx.srv.url}/envs/{ENV}", timeout=10).json()["expires_at"]
    assert after == before
    res = ctx.tt("env", "add", ENV.upper(), "--os-prefix", "debian-12", "--no-wait")
    assert res.returncode == 1 and "names must differ in more than case" in res.stderr
    res = ctx.tt("env", "run", ENV, "--vm", "0", "--vm", f"{ENV}-0", "--", "sh", "-c",
                 "exit 4")  # one VM, named twice: its own status
    assert res.returncode == 4, res.stdout + res.stderr


def test_get_recursive_skips_what_the_data_filter_refuses(ctx: Ctx, tmp_path: Path):
    res = ctx.tt("env", "run", ENV, "--vm", "0", "--cmd",
                 "rm -rf /tmp/abs && mkdir /tmp/abs && echo hi > /tmp/abs/a && "
                 "ln -s /etc/hostname /tmp/abs/link")
    assert res.returncode == 0, res.stdout
    res = ctx.tt("env", "get", ENV, "--vm", "0", "-r", "--remote", "/tmp/abs", "--local",
                 str(tmp_path))  # stopped half-way at the absolute link
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skipped 1 the data filter refuses: ./link:" in res.stdout, res.stdout
    assert (tmp_path / f"{ENV}-0" / "abs" / "a").read_text() == "hi\n"
    assert not (tmp_path / f"{ENV}-0" / "abs" / "link").exists()
