"""End to end on real VMs under TCG: ttserver subprocess on loopback, real image, real API,
real `tt` CLI, then proof that nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from helpers import (
    IMAGE_PATH,
    NOTHING_LEFT,
    ServerProcess,
    all_domains,
    leftovers,
    run_cmd,
    tt,
    wait_env,
)

pytestmark = pytest.mark.vm
BASE = IMAGE_PATH / "qemu:debian-12:x86_64"



def base_image_state() -> list[tuple]:
    return [(p.name, p.stat().st_uid, p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(BASE.iterdir())]


@pytest.mark.slow  # ~85 s: two VMs through every verb, a restart, then the leak check
def test_env_of_two_vms_end_to_end_without_leaks(run_dir: Path):
    before = base_image_state()
    srv = ServerProcess(run_dir / "state").start()
    try:
        sid = srv.server_id()
        resp = requests.post(srv.url + "/envs", json={
            "name": "e2e", "os_prefix": ["debian-12"], "vm_number": 2, "ports": [8080],
            "life_time": 3600}, timeout=30)
        assert resp.status_code == 202, resp.text
        assert resp.json()["state"] == "creating"
        dup = requests.post(srv.url + "/envs", json={"name": "e2e", "os_prefix": ["deb"]},
                            timeout=30)
        assert dup.status_code == 409 and "already exists" in dup.json()["detail"]

        env = wait_env(srv.url, "e2e")
        assert env["state"] == "running", env["error"]
        vms = env["vms"]
        assert len(vms) == 2 and {v["state"] for v in vms} == {"running"}
        ports = [v["ssh_port"] for v in vms] + [int(v["ports"]["8080"]) for v in vms]
        assert len(set(ports)) == 4

        # through the API (guest agent)
        res = run_cmd(srv, "e2e", "uname -m")
        assert [r["stdout"] for r in res] == ["x86_64\n", "x86_64\n"]
        assert all(r["exit_code"] == 0 for r in res)
        res = run_cmd(srv, "e2e", "cat /etc/os-release")
        assert all('VERSION_ID="12"' in r["stdout"] and "Debian" in r["stdout"] for r in res)
        assert sorted(r["vm"] for r in run_cmd(srv, "e2e", "hostname")) == ["e2e-0", "e2e-1"]
        assert {r["stdout"] for r in run_cmd(srv, "e2e", "hostname")} == {"e2e-0\n", "e2e-1\n"}
        ids = {r["stdout"] for r in run_cmd(srv, "e2e", "cat /etc/machine-id")}
        assert len(ids) == 2, "clones must not share a machine-id"

        # through the CLI
        cli = tt(srv.address, "env", "run", "e2e", "--cmd", "uname -m; grep ^ID= /etc/os-release")
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.count("\nx86_64\n") == 2 and cli.stdout.count("ID=debian") == 2
        assert "== e2e-0" in cli.stdout and "== e2e-1" in cli.stdout
        cli = tt(srv.address, "env", "run", "e2e", "--cmd", "exit 3")
        assert cli.returncode == 1 and "command failed on e2e-0, e2e-1" in cli.stderr
        cli = tt(srv.address, "env", "run", "e2e", "--json", "--cmd", "echo hi >&2")
        assert [r["stderr"] for r in json.loads(cli.stdout)["results"]] == ["hi\n", "hi\n"]
        cli = tt(srv.address, "env", "show", "e2e")
        assert cli.returncode == 0 and "running" in cli.stdout and "8080->" in cli.stdout
        assert "e2e" in tt(srv.address, "env", "listall").stdout  # made without an owner

        # over SSH with the server's key
        cli = tt(srv.address, "env", "run", "e2e", "--use-ssh", "--cmd", "id -un")
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert cli.stdout.count("root") == 2

        # command timeout: clear result, the guest process is killed (agent and SSH alike),
        # the ENV unchanged
        res = run_cmd(srv, "e2e", "sleep 30; touch /tmp/late", timeout=2)
        assert all(r["timed_out"] and r["exit_code"] is None for r in res)
        cli = tt(srv.address, "env", "run", "e2e", "--cmd", "sleep 30", "--timeout", "2")
        assert cli.returncode == 124 and "timed out after 2s" in cli.stderr
        res = run_cmd(srv, "e2e", "sleep 31; touch /tmp/late", timeout=2, use_ssh=True)
        assert all(r["timed_out"] and r["exit_code"] is None for r in res), res
        time.sleep(3)
        assert all(r["stdout"] == "no\n" for r in run_cmd(  # no sleeper left, by either way
            srv, "e2e", "pgrep -f 'slee[p] 3[01]' >/dev/null && echo yes || echo no"))
        assert requests.get(srv.url + "/envs/e2e", timeout=10).json()["state"] == "running"

        # files in and out through the agent
        payload = os.urandom(300_000)
        resp = requests.put(srv.url + "/envs/e2e/files", params={"path": "/root/blob"},
                            data=payload, timeout=120)
        assert resp.status_code == 200 and all(r["bytes"] == len(payload)
                                               for r in resp.json()["results"])
        for vm in vms:
            got = requests.get(f"{srv.url}/envs/e2e/vms/{vm['id']}/files",
                               params={"path": "/root/blob"}, timeout=120)
            assert got.content == payload
        bad = requests.put(srv.url + "/envs/e2e/files", params={"path": "relative"}, data=b"x")
        assert bad.status_code == 400
        # get refuses what is not a regular file (it read /dev/zero into the server's memory
        # without end; a FIFO with no writer stuck the agent) and files over the 1 GiB a
        # get may carry (a sparse file made them), by either way in
        assert all(r["exit_code"] == 0 for r in run_cmd(
            srv, "e2e", "mkfifo /root/fifo && truncate -s 3G /root/sparse"))
        vm0 = f"{srv.url}/envs/e2e/vms/{vms[0]['id']}/files"
        for use_ssh in (False, True):
            for path, kind, status in (("/dev/zero", "character special file", 400),
                                       ("/root/fifo", "fifo", 400), ("/root", "directory", 400),
                                       ("/root/sparse", "3221225472 bytes", 413)):
                got = requests.get(vm0, params={"path": path, "use_ssh": use_ssh}, timeout=60)
                assert got.status_code == status and kind in got.text, (path, got.text)
        got = requests.get(vm0, params={"path": "/root/none"}, timeout=60)
        assert got.status_code == 404 and "No such file" in got.text, got.text
        cli = tt(srv.address, "env", "get", "e2e", "--remote", "/dev/zero",
                 "--local", str(run_dir / "zero"))
        assert cli.returncode == 1 and "not a regular file" in cli.stdout + cli.stderr, cli

        # the console log is rotated (by virtlogd, 2 MiB x 3 by default), not unbounded:
        # a VM printing 5 MB on its console leaves at most ~8 MiB, and `console` still
        # gives the latest lines
        res = run_cmd(srv, "e2e", "head -c 5000000 /dev/zero | tr '\\0' x | fold -w 99 "
                  "> /dev/ttyS0; echo last-line-$((6*7)) > /dev/ttyS0", timeout=300)
        assert all(r["exit_code"] == 0 for r in res), res
        logs = sorted((run_dir / "state" / "vms" / vms[0]["id"]).glob("console.log*"))
        sizes = [p.stat().st_size for p in logs]
        assert len(logs) >= 2 and max(sizes) <= 2 * 1024 * 1024 + 4096, (logs, sizes)
        assert sum(sizes) <= 8 * 1024 * 1024 + 16384, sizes
        tail = requests.get(f"{srv.url}/envs/e2e/vms/{vms[0]['id']}/console",
                            params={"lines": 5}, timeout=30).text
        assert "last-line-42" in tail, tail

        # crash and restart: the running ENV is adopted and still answers
        srv.stop(signal.SIGKILL)
        srv = ServerProcess(run_dir / "state", port=srv.port).start()
        assert requests.get(srv.url + "/envs/e2e", timeout=10).json()["state"] == "running"
        assert [r["stdout"] for r in run_cmd(srv, "e2e", "uname -m")] == ["x86_64\n"] * 2

        # a VM whose QEMU ended while the server was down: an error, never a silent gap
        srv.stop(signal.SIGKILL)
        subprocess.run(["virsh", "destroy", f"tt-{vms[1]['id']}"], capture_output=True,
                       check=True, timeout=60)
        srv = ServerProcess(run_dir / "state", port=srv.port).start()
        env = requests.get(srv.url + "/envs/e2e", timeout=10).json()
        assert "e2e-1 was gone after a server restart" in env["error"], env
        res = run_cmd(srv, "e2e", "uname -m")
        assert [r["stdout"] for r in res] == ["x86_64\n", ""]
        assert "was gone after a server restart" in res[1]["error"], res

        cli = tt(srv.address, "env", "del", "e2e")
        assert cli.returncode == 0, cli.stderr
        assert requests.get(srv.url + "/envs/e2e", timeout=10).status_code == 404
        assert leftovers(sid, run_dir / "state", ports) == NOTHING_LEFT
        status = requests.get(srv.url + "/status", timeout=10).json()
        assert (status["cpu_used"], status["mem_used_mib"], status["disk_used_mib"]) == (0, 0, 0)
    finally:
        srv.stop()
    assert base_image_state() == before, "base image files must stay untouched"


def _broken_image(root: Path) -> Path:
    """An image whose kernel panics at once: its console tail must reach the user."""
    images = root / "images"
    img = images / "qemu:broken-1:x86_64"
    img.mkdir(parents=True)
    for part in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (img / part).symlink_to(BASE / part)
    (img / "meta.json").write_text(json.dumps({
        "cmdline": "console=ttyS0 rdinit=/bin/false panic=0", "virtual_size_mib": 2048}))
    images.chmod(0o755)
    return images


@pytest.mark.slow
def test_boot_failure_reports_console_tail_and_frees_everything(run_dir: Path):
    """Also: the first VM that fails fails the ENV at once. With boots queued for a slot
    (--cold-boots), every VM of a broken ENV used to boot in turn, each until its
    boot timeout, before the ENV was reported failed."""
    images = _broken_image(run_dir)
    srv = ServerProcess(run_dir / "state", images, extra=("--boot-timeout", "40",
                                                         "--no-warm-clones",
                                                         "--cold-boots", "1")).start()
    try:
        sid = srv.server_id()
        started = time.monotonic()
        resp = requests.post(srv.url + "/envs", json={"name": "broken", "os_prefix": ["broken"],
                                                      "vm_number": 3}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "broken", timeout=120)
        assert env["state"] == "failed"
        assert time.monotonic() - started < 80  # one boot timeout, not three
        assert "console tail" in env["error"] and "Kernel panic" in env["error"]
        assert [bool(vm["error"]) for vm in env["vms"]].count(True) == 1, env["vms"]
        cli = tt(srv.address, "env", "show", "broken")
        assert "Kernel panic" in cli.stdout
        run_resp = requests.post(srv.url + "/envs/broken/run", json={"cmd": "true"}, timeout=10)
        assert run_resp.status_code == 409 and "failed" in run_resp.json()["detail"]
        status = requests.get(srv.url + "/status", timeout=10).json()
        assert status["cpu_used"] == 0 and status["mem_used_mib"] == 0
        ports = [vm["ssh_port"] for vm in resp.json()["vms"]]
        assert leftovers(sid, run_dir / "state", ports) == NOTHING_LEFT
        assert tt(srv.address, "env", "del", "broken").returncode == 0
    finally:
        srv.stop()


def test_env_expiring_while_it_boots_is_removed_without_leaks(run_dir: Path):
    srv = ServerProcess(run_dir / "state").start()
    try:
        sid = srv.server_id()
        resp = requests.post(srv.url + "/envs", json={"name": "brief", "os_prefix": ["deb"],
                                                      "life_time": 4}, timeout=30)
        assert resp.status_code == 202
        port = resp.json()["vms"][0]["ssh_port"]
        deadline = time.monotonic() + 60
        while requests.get(srv.url + "/envs/brief", timeout=10).status_code != 404:
            assert time.monotonic() < deadline, "expired ENV was not reaped"
            time.sleep(0.5)
        assert leftovers(sid, run_dir / "state", [port]) == NOTHING_LEFT
    finally:
        srv.stop()


def test_cold_boots_past_the_limit_wait_pending_and_a_delete_ends_them(run_dir: Path):
    """Cold boots ran as many at once as warm clones (4 per host CPU, at least 8): under
    TCG each one is CPU-bound, so they only stretched each other, 8 on 2 cores past the
    300 s boot timeout. Now one per host CPU by default (`/status` says how many), --cold-boots N
    sets it; the other VMs wait `pending`, and a delete ends them at once."""
    default = ServerProcess(run_dir / "default").start()
    try:
        status = requests.get(default.url + "/status", timeout=10).json()
        assert status["cold_boots"] == len(os.sched_getaffinity(0)), status
    finally:
        default.stop()
    srv = ServerProcess(run_dir / "state", extra=("--cold-boots", "1")).start()
    try:
        assert requests.get(srv.url + "/status", timeout=10).json()["cold_boots"] == 1
        resp = requests.post(srv.url + "/envs", json={"name": "queue", "os_prefix": ["debian-12"],
                                                       "vm_number": 2, "warm": False},
                             timeout=30)
        assert resp.status_code == 202, resp.text
        ports = [vm["ssh_port"] for vm in resp.json()["vms"]]
        seen: list[list[str]] = []
        deadline = time.monotonic() + 60
        while not seen or sorted(seen[-1]) != ["booting", "pending"] or len(seen) < 20:
            env = requests.get(srv.url + "/envs/queue", timeout=10).json()
            assert time.monotonic() < deadline, (seen[-5:], env)
            seen.append([vm["state"] for vm in env["vms"]])
            assert seen[-1].count("booting") <= 1, seen[-1]
            time.sleep(0.1)
        started = time.monotonic()
        assert requests.delete(srv.url + "/envs/queue", timeout=60).status_code == 200
        assert time.monotonic() - started < 15
        assert leftovers(srv.server_id(), run_dir / "state", ports) == NOTHING_LEFT
    finally:
        srv.stop()


def test_image_path_is_rescanned_without_restart(run_dir: Path):
    images = run_dir / "images"
    images.mkdir(mode=0o755)
    srv = ServerProcess(run_dir / "state", images, extra=("--no-warm-clones",)).start()
    try:
        assert requests.get(srv.url + "/images", timeout=10).json() == []
        shutil.copytree(BASE, images / "qemu:debian-12:x86_64", symlinks=True)
        names = [i["name"] for i in requests.get(srv.url + "/images", timeout=10).json()]
        assert names == ["qemu:debian-12:x86_64"]
    finally:
        srv.stop()


def test_a_vm_that_cannot_be_destroyed_keeps_its_env_until_it_is(run_dir: Path):
    """A delete whose VM could not be ended (libvirt failed) dropped the records anyway: a
    running QEMU nobody accounted for. Now the ENV stays `deleting` with the error, the
    VM keeps its resources and ports, and the reaper finishes the delete."""
    srv = ServerProcess(run_dir / "state", env={"TTSERVER_FAIL_AT": "teardown.destroy:1"})
    srv.start()
    try:
        sid = srv.server_id()
        resp = requests.post(srv.url + "/envs", json={"name": "stuck",
                                                      "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        env = wait_env(srv.url, "stuck")
        assert env["state"] == "running", env["error"]
        vm = env["vms"][0]
        resp = requests.delete(srv.url + "/envs/stuck", timeout=120)
        assert resp.status_code == 503, resp.text
        assert "could not be stopped" in resp.json()["detail"]
        kept = requests.get(srv.url + "/envs/stuck", timeout=10).json()
        assert kept["state"] == "deleting" and "injected failure" in kept["error"], kept
        assert requests.get(srv.url + "/status", timeout=10).json()["cpu_used"] == 1
        assert f"tt-{vm['id']}" in all_domains()
        deadline = time.monotonic() + 60
        while requests.get(srv.url + "/envs/stuck", timeout=10).status_code != 404:
            assert time.monotonic() < deadline, "the reaper did not finish the delete"
            time.sleep(1)
        assert leftovers(sid, run_dir / "state", [vm["ssh_port"]]) == NOTHING_LEFT
    finally:
        srv.stop()


def test_the_servers_ssh_accepts_only_the_vms_pinned_host_key(run_dir: Path):
    """`use_ssh` goes to whatever answers on the VM's forwarded port: the server pins the
    guest's host key (read through the agent) and refuses any other (it accepted every
    key: StrictHostKeyChecking=no)."""
    srv = ServerProcess(run_dir / "state").start()
    try:
        resp = requests.post(srv.url + "/envs", json={"name": "pin",
                                                      "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        assert wait_env(srv.url, "pin")["state"] == "running"
        res = run_cmd(srv, "pin", "hostname", use_ssh=True)
        assert [r["stdout"] for r in res] == ["pin-0\n"], res
        # someone else's sshd on the VM's port (here: the VM's own, with a new key)
        res = run_cmd(srv, "pin", "rm -f /etc/ssh/ssh_host_ed25519_key* && ssh-keygen -q -t "
                  "ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key && systemctl restart ssh")
        assert res[0]["exit_code"] == 0, res
        res = run_cmd(srv, "pin", "echo reached", use_ssh=True)  # not run: an error, no exit
        assert res[0]["stdout"] == "" and res[0]["exit_code"] is None, res
        assert "Host key verification failed" in res[0]["error"], res
        assert run_cmd(srv, "pin", "echo via-agent")[0]["stdout"] == "via-agent\n"
    finally:
        srv.stop()
