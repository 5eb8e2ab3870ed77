"""Warm clones on real VMs, on by default: a server builds its images' default-shape
templates at start (ENVs created meanwhile boot cold); clones answer `run`, have their own
hostname, machine-id and SSH host key, keep their disks apart, leak nothing; a template
cache shares builds between servers; a broken template makes VMs boot cold, not fail."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
import requests

from helpers import (
    IMAGE_PATH,
    NOTHING_LEFT,
    ServerProcess,
    create_env,
    leftovers,
    new_run_dir,
    run_cmd,
)

pytestmark = pytest.mark.vm
KEY = "qemu:debian-12:x86_64-1cpu-512m"
# the guest's idle share (%) of its CPU over the next 2 s, from /proc/stat's first line
IDLE_SHARE = ("set -- $(head -n1 /proc/stat); t=$(($2+$3+$4+$5+$6+$7+$8+$9)) i=$5; sleep 2; "
              "set -- $(head -n1 /proc/stat); "
              "echo $(( ($5 - i) * 100 / ($2+$3+$4+$5+$6+$7+$8+$9 - t) ))")


@pytest.fixture(scope="module")
def warm_server() -> Iterator[tuple[ServerProcess, Path]]:
    """A server with no warm-clone flag and its own template cache (run_dir/cache): its
    templates are built here, not taken from the suite's shared cache. Its TCG guests
    keep at most 512 MiB of translated code (more than they use here)."""
    run_dir = new_run_dir("warm-")
    srv = ServerProcess(run_dir / "state", port_range="42000-42499",
                        template_cache=run_dir / "cache",
                        extra=("--tcg-tb-cache", "512")).start()
    try:
        yield srv, run_dir
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)




def served_host_key(port: int) -> str:
    out = subprocess.run(["ssh-keyscan", "-T", "20", "-t", "ed25519", "-p", str(port),
                          "127.0.0.1"], capture_output=True, text=True, timeout=60).stdout
    return out.split()[2]


def templates(srv: ServerProcess) -> list[dict]:
    return requests.get(srv.url + "/status", timeout=10).json()["templates"]


def wait_template(srv: ServerProcess, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [t for t in templates(srv) if t["key"] == KEY and t["state"] == "ready"]
        if ready:
            return ready[0]
        failed = [t for t in templates(srv) if t["state"] == "failed"]
        assert not failed, failed
        time.sleep(2)
    raise AssertionError("template was not built")


@pytest.mark.slow
def test_clones_are_independent_machines_and_leak_nothing(warm_server):
    srv, run_dir = warm_server
    sid = srv.server_id()
    # the default shape's template is being built from the start, unasked
    assert {(t["key"], t["state"]) for t in templates(srv)} >= {(KEY, "building")}
    # the build weighs an eighth of a VM (its own cgroup: nice alone did not reach past it)
    conn = libvirt.open("qemu:///system")
    try:
        deadline, shares = time.monotonic() + 60, []
        while shares != [128]:
            assert time.monotonic() < deadline, f"template build's cpu_shares: {shares}"
            time.sleep(0.2)
            with contextlib.suppress(libvirt.libvirtError):  # a domain gone meanwhile
                shares = [d.schedulerParameters()["cpu_shares"] for d in conn.listAllDomains()
                          if d.name().startswith(f"tt-{sid}-tpl-") and d.isActive()]
    finally:
        conn.close()
    first = create_env(srv, "first")
    assert first["vms"][0]["boot_mode"] == "cold"  # no template yet: it is made meanwhile
    wait_template(srv)

    ram = next((run_dir / "state" / "templates").glob(f"{KEY}@*/memory.ram"))
    ram_before = hashlib.sha256(ram.read_bytes()).hexdigest()
    env = create_env(srv, "clones", vm_number=2, ports=[8080])
    assert [vm["boot_mode"] for vm in env["vms"]] == ["warm", "warm"]
    # a clone starts idle: templates used to be saved as soon as their agent answered,
    # mid-boot, and each clone spent its first ~5 s finishing that boot (0% idle here)
    idle = [int(r["stdout"]) for r in run_cmd(srv, "clones", IDLE_SHARE)]
    assert min(idle) >= 40, idle
    for vm in env["vms"]:  # the server's --tcg-tb-cache reached each clone's QEMU
        pid = Path(f"/run/libvirt/qemu/tt-{vm['id']}.pid").read_text().strip()
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        assert "tcg,tb-size=512" in argv, argv
    # both clones map the template's RAM file: each one's writes stay its own (a shared
    # mapping would have them overwrite each other's pages, and the template's)
    fill = ("head -c 67108864 /dev/urandom > /dev/shm/r && sha256sum /dev/shm/r | "
            "cut -c1-64")
    sums = [r["stdout"] for r in run_cmd(srv, "clones", fill)]
    assert len(set(sums)) == 2 and all(len(x) == 65 for x in sums), sums
    again = [r["stdout"] for r in run_cmd(srv, "clones", "sha256sum /dev/shm/r | cut -c1-64")]
    assert again == sums
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == ram_before
    assert all(vm["boot_seconds"] < 30 for vm in env["vms"]), env["vms"]
    res = run_cmd(srv, "clones", "hostname; cat /etc/machine-id; "
                             "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2")
    assert all(r["exit_code"] == 0 for r in res), res
    hostnames, machine_ids, host_keys = zip(*(r["stdout"].split() for r in res), strict=True)
    assert hostnames == ("clones-0", "clones-1")
    assert len(set(machine_ids)) == 2 and len(set(host_keys)) == 2
    first_id = run_cmd(srv, "first", "cat /etc/machine-id")[0]["stdout"].strip()
    assert first_id not in machine_ids
    # the kernel RNG was reseeded: clones do not draw the template's numbers
    draws = [r["stdout"] for r in run_cmd(srv, "clones", "cat /proc/sys/kernel/random/uuid")]
    assert len(set(draws)) == 2, draws

    # the clock is today's, not the template's
    now = run_cmd(srv, "clones", "date +%s")
    assert all(abs(int(r["stdout"]) - time.time()) < 30 for r in now), now

    # disks apart: a file written in one clone is not in the other
    assert run_cmd(srv, "clones", "echo mine > /root/only-here", vms=["0"])[0]["exit_code"] == 0
    seen = run_cmd(srv, "clones", "test -e /root/only-here && echo yes || echo no")
    assert [r["stdout"] for r in seen] == ["yes\n", "no\n"]

    # SSH works, and sshd serves each clone's new host key
    res = run_cmd(srv, "clones", "id -un", use_ssh=True)
    assert [r["stdout"] for r in res] == ["root\n", "root\n"], res
    files = [r["stdout"].split()[1] for r in
             run_cmd(srv, "clones", "cat /etc/ssh/ssh_host_ed25519_key.pub")]
    served = [served_host_key(vm["ssh_port"]) for vm in env["vms"]]
    assert served == files, (served, files)
    # and the identity helper is gone from the clones
    assert [r["stdout"] for r in run_cmd(srv, "clones", "pgrep -c perl || true")] == ["0\n"] * 2

    ports = [p for vm in env["vms"] + first["vms"]
             for p in [vm["ssh_port"], *vm["ports"].values()]]
    for name in ("clones", "first"):
        assert requests.delete(f"{srv.url}/envs/{name}", timeout=120).status_code == 200
    gone = leftovers(sid, run_dir / "state", ports)
    assert gone == NOTHING_LEFT
    # the template stays for the next ENV; nothing of a build is left running
    assert [t["state"] for t in templates(srv) if t["key"] == KEY] == ["ready"]


@pytest.mark.slow  # ~55 s: a second server and a template build
def test_template_cache_shares_a_build_with_another_server(warm_server):
    """A second server on the cache clones at once from the first server's build (hard
    links in its own directory: its VMs survive the cache entry being removed)."""
    srv, run_dir = warm_server
    tpl = wait_template(srv)
    cached = run_dir / "cache" / tpl["build"]
    assert (cached / "meta.json").is_file()
    other = ServerProcess(run_dir / "other", port_range="42500-42999",
                          template_cache=run_dir / "cache").start()
    try:
        sid = other.server_id()
        env = create_env(other, "borrowed")
        assert env["vms"][0]["boot_mode"] == "warm"
        assert env["vms"][0]["boot_seconds"] < 30
        mine = run_dir / "other" / "templates" / tpl["build"]
        assert (mine / "memory.bin").stat().st_ino == (cached / "memory.bin").stat().st_ino
        shutil.rmtree(cached)
        assert run_cmd(other, "borrowed", "hostname")[0]["stdout"] == "borrowed-0\n"
        port = env["vms"][0]["ssh_port"]
        assert requests.delete(other.url + "/envs/borrowed", timeout=120).status_code == 200
        assert leftovers(sid, run_dir / "other", [port]) == NOTHING_LEFT
    finally:
        other.stop()


@pytest.mark.slow  # ~54 s (a template build): the default suite took 16:22 on 69abf2e
def test_a_template_without_the_helper_gives_identity_by_script(warm_server):
    """Guests without perl (or templates saved without the helper) still get their own
    identity, through the slower shell script."""
    srv, run_dir = warm_server
    tpl = wait_template(srv)
    meta_path = run_dir / "state" / "templates" / tpl["build"] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "helper": ""}))
    try:
        env = create_env(srv, "scripted", vm_number=2)
        assert [vm["boot_mode"] for vm in env["vms"]] == ["warm", "warm"]
        res = run_cmd(srv, "scripted", "hostname; cat /etc/machine-id; date +%s")
        hostnames, machine_ids, clocks = zip(*(r["stdout"].split() for r in res), strict=True)
        assert hostnames == ("scripted-0", "scripted-1")
        assert len(set(machine_ids)) == 2
        assert all(abs(int(now) - time.time()) < 30 for now in clocks), clocks
        assert requests.delete(srv.url + "/envs/scripted", timeout=120).status_code == 200
    finally:
        meta_path.write_text(json.dumps(meta))


@pytest.mark.slow
def test_a_broken_template_falls_back_to_a_cold_boot(warm_server):
    srv, run_dir = warm_server
    tpl = wait_template(srv)
    (run_dir / "state" / "templates" / tpl["build"] / "memory.bin").write_bytes(b"garbage")
    env = create_env(srv, "fallback")
    assert env["vms"][0]["boot_mode"] == "cold"
    assert run_cmd(srv, "fallback", "hostname")[0]["stdout"] == "fallback-0\n"
    log = srv.log.read_text(errors="replace")
    assert "warm clone of" in log and "booting cold" in log
    states = {t.get("build", t["key"]): t["state"] for t in templates(srv)}
    assert states.get(tpl["build"]) is None, "the broken template must be retired"
    assert requests.delete(srv.url + "/envs/fallback", timeout=120).status_code == 200
    # retired (marked), or already collected: no VM disk is a clone of it
    retired = run_dir / "state" / "templates" / tpl["build"]
    assert (retired / "retired").is_file() or not retired.exists()


@pytest.mark.slow
def test_a_template_whose_image_changed_is_rebuilt(warm_server):
    """A template saved from an image that was replaced since serves no clone (its disk
    and memory are the old image's): the next VM boots cold, the server builds a new
    template in the background, and the VMs after it are clones of that one."""
    _, run_dir = warm_server
    images = run_dir / "images"
    shutil.copytree(IMAGE_PATH / "qemu:debian-12:x86_64", images / "qemu:debian-12:x86_64")
    srv = ServerProcess(run_dir / "changed", images, port_range="42500-42999",
                        template_cache=None).start()
    try:
        old = wait_template(srv)  # built at start, unasked
        assert create_env(srv, "before")["vms"][0]["boot_mode"] == "warm"
        assert requests.delete(srv.url + "/envs/before", timeout=120).status_code == 200
        initrd = images / "qemu:debian-12:x86_64" / "initrd.img"  # "replaced": newer mtime
        os.utime(initrd, ns=(initrd.stat().st_atime_ns, initrd.stat().st_mtime_ns + 10**9))
        assert create_env(srv, "after")["vms"][0]["boot_mode"] == "cold"
        assert f"retiring template {old['build']}: its image changed" in srv.log.read_text()
        assert requests.delete(srv.url + "/envs/after", timeout=120).status_code == 200
        deadline = time.monotonic() + 600
        while not [t for t in templates(srv) if t["key"] == KEY and t["state"] == "ready"
                   and t["build"] != old["build"]]:
            assert time.monotonic() < deadline, templates(srv)
            time.sleep(2)
        assert create_env(srv, "rebuilt")["vms"][0]["boot_mode"] == "warm"
        assert requests.delete(srv.url + "/envs/rebuilt", timeout=120).status_code == 200
    finally:
        srv.stop()
