"""Bad input gets a clear 4xx (API) or one line and exit != 0 (CLI), and changes nothing.

These run against a real ttserver process; none of them needs a VM to boot.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from helpers import ServerProcess, tt


def run_tt(server: ServerProcess, *args: str, tmp_config: str) -> subprocess.CompletedProcess:
    return tt(server.address, *args, config=tmp_config, timeout=60)


@pytest.fixture
def cfg(tmp_path):
    return str(tmp_path / "tt.json")


def assert_untouched(server: ServerProcess) -> None:
    status = requests.get(server.url + "/status", timeout=10).json()
    assert status["env_count"] == 0
    assert (status["cpu_used"], status["mem_used_mib"], status["disk_used_mib"]) == (0, 0, 0)
    assert requests.get(server.url + "/envs", timeout=10).json() == []


def create(server: ServerProcess, **body) -> requests.Response:
    return requests.post(server.url + "/envs", json={"name": "bad", "os_prefix": ["debian-12"],
                                                     **body}, timeout=30)


def test_unknown_os_prefix_lists_available_images(server, cfg):
    resp = create(server, os_prefix=["fedora"])
    assert resp.status_code == 404
    assert "'fedora' matches no image" in resp.json()["detail"]
    assert "qemu:debian-12:x86_64" in resp.json()["detail"]
    res = run_tt(server, "env", "add", "bad", "--os-prefix=fedora", tmp_config=cfg)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "matches no image" in res.stderr
    assert_untouched(server)


def test_oversize_request_is_refused_with_numbers(server, cfg):
    resp = create(server, vm_number=3, cpu_num=2)  # 6 vCPUs of 4
    assert resp.status_code == 409
    assert "not enough resources" in resp.json()["detail"]
    assert "cpu: need 6, free 4 of 4" in resp.json()["detail"]
    resp = create(server, mem_size="64G")
    assert resp.status_code == 409 and "mem_mib" in resp.json()["detail"]
    res = run_tt(server, "env", "add", "bad", "--os-prefix=debian-12", "--disk-size", "1T",
             tmp_config=cfg)
    assert res.returncode == 1 and "disk_mib: need" in res.stderr
    assert_untouched(server)


def test_missing_env_is_404_everywhere(server, cfg):
    for method, path, body in [("GET", "/envs/nope", None), ("DELETE", "/envs/nope", None),
                               ("POST", "/envs/nope/run", {"cmd": "true"}),
                               ("GET", "/envs/nope/vms/0/files?path=/etc/hostname", None)]:
        resp = requests.request(method, server.url + path, json=body, timeout=10)
        assert resp.status_code == 404, (method, path)
        assert resp.json()["detail"] == "ENV 'nope' does not exist"
    for args in (["env", "show", "nope"], ["env", "del", "nope"],
                 ["env", "run", "nope", "--cmd", "true"]):
        res = run_tt(server, *args, tmp_config=cfg)
        assert res.returncode == 1
        assert res.stderr == "tt: error: ENV 'nope' does not exist\n"
    assert_untouched(server)


@pytest.mark.parametrize("body,fragment", [
    ({"name": "../etc"}, "ENV name"),
    ({"name": "a" * 41}, "ENV name"),
    ({"name": ""}, "ENV name"),
    ({"os_prefix": ["qemu:../../etc:x86_64"]}, "bad OS-VERSION"),  # 400, not 404
    ({"vm_number": 0}, "vm_number"),
    # 500 VMs per ENV in all: 2 x 300 was refused only as "counts must add up to
    # 1..64" when ttproxy split it, and 2 x 64 was taken here
    ({"os_prefix": ["debian-12:x86_64", "debian-13:x86_64"], "vm_number": 300},
     "an ENV holds at most 500 VMs; 300 per"
     " image x 2 matched image(s) is 600"),
    ({"mem_size": "lots"}, "mem_size"),
    ({"life_time": 0}, "life_time"),
    ({"ports": [22]}, "22 is always"),
    ({"ssh_keys": ["not a key"]}, "ssh_keys"),
])
def test_invalid_create_fields(server, body, fragment):
    resp = create(server, **body)
    assert resp.status_code in (400, 422), resp.text
    assert fragment in str(resp.json()["detail"])
    assert_untouched(server)


def test_cli_usage_errors_and_unreachable_server(server, cfg, tmp_path):
    res = run_tt(server, "env", "add", "x", "--mem-size", "lots", tmp_config=cfg)
    assert res.returncode == 2 and "mem-size" in res.stderr
    for bad in ("0", "-5", "soon"):  # was a 422 from the server, exit 1
        res = run_tt(server, "env", "run", "x", "--cmd", "true", "--timeout", bad,
                     tmp_config=cfg)
        assert res.returncode == 2 and "--timeout" in res.stderr, res.stderr
    env = {**os.environ, "TT_CONFIG": cfg, "TT_SERVER": "127.0.0.1:1"}
    res = subprocess.run([sys.executable, "-m", "ttclient.cli", "env", "list"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1
    assert "cannot reach the server at http://127.0.0.1:1" in res.stderr
    assert "$TT_SERVER" in res.stderr  # where the address came from
    res = run_tt(server, "env", "add", "x", tmp_config=cfg)
    assert res.returncode == 2 and "--os-prefix" in res.stderr


def test_config_is_saved_private_and_used(server, cfg):
    env = {**os.environ, "TT_CONFIG": cfg}
    env.pop("TT_SERVER", None)
    host, port = server.address.split(":")
    res = subprocess.run([sys.executable, "-m", "ttclient.cli", "config", "--serv-addr", host,
                          "--serv-port", port], capture_output=True, text=True, env=env)
    assert res.returncode == 0
    assert oct(os.stat(cfg).st_mode & 0o777) == "0o600"
    res = subprocess.run([sys.executable, "-m", "ttclient.cli", "status", "--server"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "CPU 0/4" in res.stdout and "qemu:debian-12:x86_64" in res.stdout


def test_openapi_spec_is_served(server):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/envs", "/envs/{name}", "/envs/{name}/run", "/status"} <= set(spec["paths"])


def test_a_state_dir_qemu_cannot_reach_stops_the_server(tmp_path):
    """--cfgdb-path under a directory QEMU's user may not enter (pytest's tmp dirs are
    0700): the server does not start, and names the directory. It used to start, fail
    each warm clone with libvirt's "Permission denied" and retire the image's good
    template from the template cache shared with other servers."""
    srv = ServerProcess(tmp_path / "state")
    with pytest.raises(RuntimeError, match="QEMU runs as uid .* cannot enter "):
        srv.start(timeout=60)
    assert f"cannot enter {tmp_path.parent.parent}" in srv.log_tail() or \
        "chmod o+x" in srv.log_tail()
