"""`--allow-outgoing` with QEMU user networking on real VMs: a VM reaches addresses
outside the host (here: a network namespace this test makes, with a listener) but never
the host's own addresses — the guest's 10.0.2.2 is the host's loopback, where the API and
every other VM's forwarded ports listen (issue 24). Port forwards into the VM still
work; deny-outgoing ENVs reach nothing; the guard's nft table goes with the server."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import requests

from helpers import ServerProcess, new_run_dir, veth_namespace, wait_env

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nsenter", "nft", "ip")),
    reason="needs nsenter, nft and ip (scripts/setup-host.sh)")]

OUTER, INNER = "10.233.7.1", "10.233.7.2"  # veth ends: this namespace / the test's one
LISTENER = 8080
REPLY = "outside-listener"
# reads the request before answering: closing a socket with unread data sends a RST,
# which can reach the guest before the answer (a flaky FAILED)
SERVE = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    conn.settimeout(10)
    got = b""
    try:
        while b"\\r\\n\\r\\n" not in got and (chunk := conn.recv(4096)):
            got += chunk
        conn.sendall(sys.argv[2].encode() + b"\\n")
    except OSError:
        pass
    conn.close()
"""


@pytest.fixture(scope="module")
def outside() -> Iterator[str]:
    """A namespace with a TCP listener that answers REPLY: the "outside" a VM with
    outgoing allowed may reach."""
    with veth_namespace("tto", OUTER, INNER) as (ns, _, _):
        listener = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "python3", "-c",
                                     SERVE, str(LISTENER), REPLY])
        try:
            yield INNER
        finally:
            listener.kill()
            listener.wait()


def guard_tables() -> list[str]:
    out = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True,
                         timeout=30).stdout
    return [line.split()[-1] for line in out.splitlines() if "ttstack_guard_" in line]


def tcp(host: str, port: int) -> str:
    """A guest shell command: connect, print what the peer says (or FAILED)."""
    return (f"timeout 15 bash -c 'exec 3<>/dev/tcp/{host}/{port} && "
            f"printf \"GET /health HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n\" >&3 && "
            f"timeout 5 cat <&3' 2>&1 || echo FAILED")


@pytest.mark.slow
def test_outgoing_allowed_but_never_to_the_host(outside: str):
    before = guard_tables()
    run_dir = new_run_dir("outgoing-")
    srv = ServerProcess(run_dir / "state", port_range="42500-42999",
                        extra=("--allow-outgoing",))
    try:
        srv.start()
        assert f"ttstack_guard_{srv.sid}" in guard_tables()
        for name, extra in (("open", {"ports": [8080]}), ("closed", {"deny_outgoing": True})):
            resp = requests.post(srv.url + "/envs", json={
                "name": name, "os_prefix": ["debian-12"], **extra}, timeout=30)
            assert resp.status_code == 202, resp.text
        envs = {name: wait_env(srv.url, name) for name in ("open", "closed")}
        assert all(e["state"] == "running" for e in envs.values()), envs
        assert envs["open"]["outgoing"] == "allowed"
        forwarded = envs["closed"]["vms"][0]["ssh_port"]

        def run(env: str, cmd: str, use_ssh: bool = False) -> str:
            resp = requests.post(f"{srv.url}/envs/{env}/run", timeout=120,
                                 json={"cmd": cmd, "use_ssh": use_ssh})
            assert resp.status_code == 200, resp.text
            result = resp.json()["results"][0]
            assert result["error"] == "", result
            return result["stdout"]

        # the outside (a namespace of this test) is reachable...
        assert REPLY in run("open", tcp(outside, LISTENER))
        # ...the host is not: not the API (10.0.2.2 is the host's 127.0.0.1), not another
        # VM's forwarded port, not any loopback address
        api = run("open", tcp("10.0.2.2", srv.port))
        assert "FAILED" in api and '"ok"' not in api, api
        assert "FAILED" in run("open", tcp("10.0.2.2", forwarded))
        # deny-outgoing: nothing at all
        assert "FAILED" in run("closed", tcp(outside, LISTENER))
        # connections into the VMs (QEMU accepted them) still work: SSH through the port
        assert run("open", "echo via-ssh", use_ssh=True).strip() == "via-ssh"
        for name in ("open", "closed"):
            assert requests.delete(f"{srv.url}/envs/{name}", timeout=120).status_code == 200
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert guard_tables() == before


def test_allow_outgoing_refuses_a_server_that_cannot_guard(tmp_path, run_dir):
    """nft fails (here: an nft that refuses, first on PATH): the server does not start (VMs
    would reach the host), and says why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nft"
    fake.write_text("#!/bin/sh\necho 'Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    before = guard_tables()
    srv = ServerProcess(run_dir / "state", port_range="42500-42999",
                        extra=("--allow-outgoing",),
                        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    with pytest.raises(RuntimeError, match="--allow-outgoing: cannot keep VMs off the host"):
        srv.start(timeout=60)
    assert guard_tables() == before
