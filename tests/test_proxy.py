"""ttproxy over three real ttservers on loopback: an ENV spanning two servers, fan-out,
a server killed and brought back, placement that cannot succeed, a proxy restart — and
nothing left on any server at the end."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from test_plugin import check_common, run_sample

from helpers import (
    NOTHING_LEFT,
    ProxyProcess,
    ServerProcess,
    free_port,
    leftovers,
    new_run_dir,
    tt,
)

pytestmark = pytest.mark.vm
RANGES = ("44000-44299", "44300-44599", "44600-44899")


def start_cluster(count: int) -> tuple[list[ServerProcess], ProxyProcess, Path]:
    """`count` ttservers of 1 vCPU and 1 GiB each (so two VMs must span two servers)."""
    run_dir = new_run_dir("proxy-")
    servers = [ServerProcess(run_dir / f"state{i}", port_range=r,
                             extra=("--cpu-total", "1", "--mem-total", "1G")).start()
               for i, r in enumerate(RANGES[:count])]
    return servers, ProxyProcess([s.address for s in servers], run_dir).start(), run_dir


@pytest.fixture
def cluster() -> Iterator[tuple[list[ServerProcess], ProxyProcess, Path]]:
    servers, proxy, run_dir = start_cluster(3)
    try:
        yield servers, proxy, run_dir
    finally:
        proxy.stop()
        for s in servers:
            s.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def env_of(proxy: ProxyProcess, name: str) -> dict:
    return requests.get(f"{proxy.url}/envs/{name}", timeout=30).json()


def test_env_spans_servers_survives_a_dead_server_and_leaves_nothing(cluster):
    servers, proxy, run_dir = cluster
    a, b, c = servers
    ids = {s.address: s.server_id() for s in servers}

    st = json.loads(tt(proxy.address, "status", "--remote", "--json").stdout)
    assert [r["health"] for r in st["servers"]] == ["up"] * 3 and st["cpu_total"] == 3

    res = tt(proxy.address, "env", "add", "nope", "--os-prefix", "fedora")
    assert res.returncode == 1 and "'fedora' matches no image" in res.stderr
    assert "available: qemu:" in res.stderr
    resp = requests.post(proxy.url + "/envs", json={"name": "bad name!", "os_prefix": ["deb"]},
                         timeout=30)
    assert resp.status_code == 400 and "nothing was left" in resp.json()["detail"]

    # two VMs of 1 vCPU on servers of 1 vCPU each: the ENV must span two servers
    res = tt(proxy.address, "env", "add", "span", "--os-prefix", "debian-12",
             "--vm-number", "2", timeout=600)
    assert res.returncode == 0, res.stderr
    env = env_of(proxy, "span")
    assert env["state"] == "running" and len(env["servers"]) == 2
    holders = [vm["server"] for vm in env["vms"]]
    assert len(set(holders)) == 2 and [vm["name"] for vm in env["vms"]] == ["span-0", "span-1"]
    spare = next(s for s in servers if s.address not in holders)

    # run and push fan out over both servers and merge
    res = tt(proxy.address, "env", "run", "span", "--json", "--cmd", "hostname")
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout)["results"]
    assert [(r["stdout"], r["server"]) for r in results] == [
        ("span-0\n", holders[0]), ("span-1\n", holders[1])]
    reply = requests.put(f"{proxy.url}/envs/span/files", params={"path": "/root/f"},
                         data=b"hello", timeout=60).json()
    assert [r["bytes"] for r in reply["results"]] == [5, 5]
    got = requests.get(f"{proxy.url}/envs/span/vms/span-1/files", params={"path": "/root/f"},
                       timeout=60)
    assert got.content == b"hello"

    # kill the server holding span-1: marked down within seconds, the ENV is degraded
    victim = next(s for s in servers if s.address == holders[1])
    victim.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: [r for r in requests.get(proxy.url + "/status", timeout=30).json()
                      ["servers"] if r["address"] == victim.address and r["health"] == "down"],
             10, "the proxy to notice the dead server")
    assert time.monotonic() - killed_at < 10
    res = tt(proxy.address, "status", "--remote")
    assert f"{victim.address}  down" in res.stdout
    env = env_of(proxy, "span")
    assert env["state"] == "degraded" and f"server {victim.address} is down" in env["error"]
    assert [vm["state"] for vm in env["vms"]] == ["running", "unreachable"]
    res = tt(proxy.address, "env", "run", "span", "--cmd", "true")
    assert res.returncode == 1 and f"server {victim.address} is down" in res.stdout

    # new ENVs go to the servers that are up and have room
    res = tt(proxy.address, "env", "add", "after", "--os-prefix", "debian-12", timeout=600)
    assert res.returncode == 0, res.stderr
    assert [vm["server"] for vm in env_of(proxy, "after")["vms"]] == [spare.address]

    # a create that cannot be placed: a clear 409, nothing on any server
    resp = requests.post(proxy.url + "/envs", json={"name": "toobig", "os_prefix": ["deb"],
                                                    "vm_number": 1, "mem_size": "2G"},
                         timeout=30)
    assert resp.status_code == 409 and "cannot be placed" in resp.json()["detail"]
    assert "mem 1024 MiB" in resp.json()["detail"] or "mem 512 MiB" in resp.json()["detail"]
    for s in (a, b, c):
        if s is not victim:
            names = [e["name"] for e in requests.get(s.url + "/envs", timeout=10).json()]
            assert "toobig" not in names

    # the server comes back (its VM was adopted): the ENV is whole again
    revived = ServerProcess(victim.cfgdb, port=victim.port, port_range=victim.port_range,
                            extra=victim.extra).start()
    servers[servers.index(victim)] = revived
    wait_for(lambda: env_of(proxy, "span")["state"] == "running", 15, "span to recover")
    assert [r["stdout"] for r in json.loads(tt(proxy.address, "env", "run", "span", "--json",
                                               "--cmd", "hostname").stdout)["results"]] == [
        "span-0\n", "span-1\n"]

    # a proxy restart loses nothing: where ENVs live is learnt from the servers
    proxy.stop(signal.SIGKILL)
    proxy = ProxyProcess(proxy.servers, run_dir, port=proxy.port).start()
    cluster_proxy_listing = tt(proxy.address, "env", "listall").stdout
    assert "span" in cluster_proxy_listing and "after" in cluster_proxy_listing
    assert len(env_of(proxy, "span")["vms"]) == 2

    ports = [p for name in ("span", "after") for vm in env_of(proxy, name)["vms"]
             for p in [vm["ssh_port"], *vm["ports"].values()]]
    # kick through the proxy: every VM is refused; span-1, its server's whole part, goes
    # with that part (deleted there), span-0 stays
    res = tt(proxy.address, "env", "kick", "span", "span-0", "1")
    assert res.returncode == 1 and "every VM of ENV 'span'" in res.stderr, res.stderr
    res = tt(proxy.address, "env", "kick", "span", "span-1", "--json")
    assert res.returncode == 0, res.stderr
    assert [vm["name"] for vm in json.loads(res.stdout)["vms"]] == ["span-0"]
    holder = next(s for s in servers if s.address == holders[1])
    assert "span" not in [e["name"] for e in requests.get(holder.url + "/envs",
                                                          timeout=10).json()]
    for name in ("span", "after"):
        res = tt(proxy.address, "env", "del", name)
        assert res.returncode == 0, res.stderr
    assert requests.get(proxy.url + "/envs", timeout=30).json() == []
    for s in servers:
        assert leftovers(ids[s.address], s.cfgdb, ports) == NOTHING_LEFT
    proxy.stop()


@pytest.mark.slow
def test_pytest_plugin_plain_run_unchanged_through_the_proxy(tmp_path: Path):
    servers, proxy, run_dir = start_cluster(3)  # the third for the fresh VMs
    try:
        # the plain (no xdist) plugin run: test_plugin.py runs it under xdist
        proc, root = run_sample(proxy, tmp_path)
        check_common(proxy, proc, root)
        assert "booting" in proc.stdout and "deleted ENV pytest-" in proc.stdout
        for s in servers:
            assert requests.get(s.url + "/envs", timeout=10).json() == []
    finally:
        proxy.stop()
        for s in servers:
            s.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_proxy_with_no_server_up_and_bad_input_gives_clear_errors(tmp_path: Path):
    dead = f"127.0.0.1:{free_port()}"
    proxy = ProxyProcess([dead], tmp_path).start()
    try:
        st = requests.get(proxy.url + "/status", timeout=10).json()
        assert st["servers"][0]["health"] == "down" and st["servers_up"] == 0
        res = tt(proxy.address, "status", "--remote")
        assert f"{dead}  down" in res.stdout
        resp = requests.post(proxy.url + "/envs", json={"name": "x", "os_prefix": ["deb"]},
                             timeout=10)
        assert resp.status_code == 503 and "no ttserver is up" in resp.json()["detail"]
        resp = requests.get(proxy.url + "/envs/nope", timeout=10)
        assert resp.status_code == 404 and "does not exist" in resp.json()["detail"]
        res = tt(proxy.address, "env", "del", "nope")
        assert res.returncode == 1 and "ENV 'nope' does not exist" in res.stderr
    finally:
        proxy.stop()
    bad = subprocess.run([sys.executable, "-m", "ttproxy.cli", "--server-set", "nohost"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "not HOST:PORT" in bad.stderr
