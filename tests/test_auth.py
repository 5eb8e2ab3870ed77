"""API tokens on a real ttserver (and through a real ttproxy): who may see, run in and
delete an ENV; tokens never logged; the client keeps its token 0600."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from helpers import ProxyProcess, ServerProcess, add_token, new_run_dir, tt, wait_env

pytestmark = pytest.mark.vm


def h(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[ServerProcess, Path, dict[str, str]]]:
    run_dir = new_run_dir("auth-")
    tokens_file = run_dir / "tokens"
    tokens = {"alice": add_token(tokens_file, "alice"), "bob": add_token(tokens_file, "bob"),
              "root": add_token(tokens_file, "root", "--admin")}
    srv = ServerProcess(run_dir / "state", port_range="47000-47999",
                        extra=("--tokens-file", str(tokens_file))).start()
    try:
        yield srv, tokens_file, tokens
    finally:
        for name in [e["name"] for e in requests.get(srv.url + "/envs", headers=h(
                tokens["root"]), timeout=10).json()]:
            requests.delete(f"{srv.url}/envs/{name}", headers=h(tokens["root"]), timeout=120)
        srv.stop(clean=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_tokens_file_stores_only_hashes_and_is_private(secured):
    _, tokens_file, tokens = secured
    text = tokens_file.read_text()
    assert all(t not in text for t in tokens.values())
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"
    assert [line.split()[:2] for line in text.splitlines()] == [
        ["alice", "user"], ["bob", "user"], ["root", "admin"]]


def test_requests_without_a_valid_token_are_refused(secured):
    srv, _, tokens = secured
    assert requests.get(srv.url + "/health", timeout=10).ok  # health stays open
    for path in ("/status", "/envs", "/envs/x", "/images"):
        resp = requests.get(srv.url + path, timeout=10)
        assert resp.status_code == 401 and "needs an API token" in resp.json()["detail"]
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    resp = requests.get(srv.url + "/status", headers=h(tokens["alice"] + "x"), timeout=10)
    assert resp.status_code == 401 and "not accepted" in resp.json()["detail"]
    res = tt(srv.address, "status", "--remote")
    assert res.returncode == 1 and "needs an API token" in res.stderr


def test_an_env_belongs_to_its_token(secured):
    srv, _, tokens = secured
    resp = requests.post(srv.url + "/envs", headers=h(tokens["alice"]),
                         json={"name": "mine", "os_prefix": ["debian-12"], "owner": "bob"},
                         timeout=30)
    assert resp.status_code == 202, resp.text
    assert resp.json()["owner"] == "alice", "the owner is the token's name, not the body's"

    bob = h(tokens["bob"])
    for method, path, kw in (("GET", "/envs/mine", {}),
                             ("POST", "/envs/mine/run", {"json": {"cmd": "id"}}),
                             ("PUT", "/envs/mine/files?path=/x", {"data": b"x"}),
                             ("GET", "/envs/mine/vms/0/files?path=/etc/hostname", {}),
                             ("GET", "/envs/mine/vms/0/console", {}),
                             ("PATCH", "/envs/mine", {"json": {"life_time": 60}}),
                             ("POST", "/envs/mine/stop", {}),
                             ("DELETE", "/envs/mine", {})):
        resp = requests.request(method, srv.url + path, headers=bob, timeout=30, **kw)
        assert resp.status_code == 403, (method, path, resp.text)
        assert "belongs to another token" in resp.json()["detail"]
    assert requests.get(srv.url + "/envs", headers=bob, timeout=10).json() == []
    res = tt(srv.address, "env", "listall", token=tokens["bob"])
    assert res.returncode == 0 and "mine" not in res.stdout
    res = tt(srv.address, "env", "del", "mine", token=tokens["bob"])
    assert res.returncode == 1 and "belongs to another token" in res.stderr

    mine = requests.get(srv.url + "/envs", headers=h(tokens["alice"]), timeout=10).json()
    assert [e["name"] for e in mine] == ["mine"]
    every = requests.get(srv.url + "/envs", headers=h(tokens["root"]), timeout=10).json()
    assert [e["name"] for e in every] == ["mine"]
    whoami = requests.get(srv.url + "/whoami", headers=h(tokens["root"]), timeout=10).json()
    assert whoami == {"name": "root", "admin": True, "auth": True}
    res = tt(srv.address, "env", "del", "mine", token=tokens["root"])
    assert res.returncode == 0, res.stderr


def test_an_upload_lands_only_in_the_env_it_was_allowed_for(secured):
    """Ownership is checked before the body (no unauthorised bytes are read) and again
    once it is in: alice's slow upload to her ENV must not land in bob's ENV of the same
    name, made while the body was on its way (it was written into bob's VM)."""
    srv, _, tokens = secured
    alice, bob, root = h(tokens["alice"]), h(tokens["bob"]), h(tokens["root"])
    resp = requests.post(srv.url + "/envs", headers=alice, timeout=30,
                         json={"name": "race", "os_prefix": ["debian-12"]})
    assert resp.status_code == 202, resp.text
    release = threading.Event()
    answer: dict = {}

    def body():
        yield b"from alice\n"
        release.wait(300)
        yield b"the end\n"

    def upload() -> None:
        answer["resp"] = requests.put(srv.url + "/envs/race/files", headers=alice,
                                      params={"path": "/root/alice.txt"}, data=body(),
                                      timeout=600)

    sender = threading.Thread(target=upload)
    sender.start()
    try:
        time.sleep(2)  # the first chunk is in; the route waits for the rest
        assert requests.delete(srv.url + "/envs/race", headers=root, timeout=120).ok
        resp = requests.post(srv.url + "/envs", headers=bob, timeout=30,
                             json={"name": "race", "os_prefix": ["debian-12"]})
        assert resp.status_code == 202, resp.text
        assert wait_env(srv.url, "race", headers=bob)["state"] == "running"
    finally:
        release.set()
        sender.join(600)
    resp = answer["resp"]
    assert resp.status_code == 403, resp.text
    assert "belongs to another token" in resp.json()["detail"]
    check = requests.post(srv.url + "/envs/race/run", headers=bob, timeout=120,
                          json={"cmd": "test -e /root/alice.txt && echo LANDED || echo absent"})
    assert check.json()["results"][0]["stdout"].strip() == "absent", check.text
    assert requests.delete(srv.url + "/envs/race", headers=bob, timeout=120).ok


def test_a_token_is_held_to_its_limits_and_an_admin_is_not(secured, run_dir: Path):
    """--token-max-vms: a second ENV over the limit is a 403 that says why, before
    anything is made; admin tokens are not limited; deleting makes room again."""
    _, tokens_file, tokens = secured
    srv = ServerProcess(run_dir / "state", port_range="47500-47999",
                        extra=("--tokens-file", str(tokens_file), "--token-max-vms", "1",
                               "--token-max-mem", "1G")).start()
    alice, root = h(tokens["alice"]), h(tokens["root"])

    def create(name: str, who: dict, **extra: object) -> requests.Response:
        return requests.post(srv.url + "/envs", headers=who, timeout=30,
                             json={"name": name, "os_prefix": ["debian-12"], **extra})

    try:
        assert create("one", alice).status_code == 202
        resp = create("two", alice)
        assert resp.status_code == 403, resp.text
        assert "1 VM(s) on record + 1 > --token-max-vms 1" in resp.json()["detail"]
        assert requests.get(srv.url + "/envs/two", headers=alice, timeout=10).status_code == 404
        resp = create("big", h(tokens["bob"]), vm_number=1, mem_size="2G")
        assert resp.status_code == 403 and "--token-max-mem 1024 MiB" in resp.text
        assert create("admins", root, vm_number=2).status_code == 202  # not limited
        assert requests.delete(srv.url + "/envs/one", headers=alice, timeout=120).ok
        assert create("two", alice).status_code == 202
    finally:
        for env in requests.get(srv.url + "/envs", headers=root, timeout=10).json():
            requests.delete(f"{srv.url}/envs/{env['name']}", headers=root, timeout=120)
        srv.stop(clean=False)


def root_proxy(servers: list[str], tokens: dict[str, str], tmp_path: Path) -> ProxyProcess:
    """A started ttproxy over `servers` with the admin token as its own (--token-file)."""
    token_file = tmp_path / "proxy-token"
    token_file.write_text(tokens["root"] + "\n")
    return ProxyProcess(servers, tmp_path, extra=("--token-file", str(token_file))).start()


def test_the_proxy_passes_tokens_through(secured, tmp_path: Path):
    srv, _, tokens = secured
    proxy = root_proxy([srv.address], tokens, tmp_path)
    try:
        resp = requests.post(proxy.url + "/envs", headers=h(tokens["alice"]),
                             json={"name": "viaproxy", "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        assert resp.json()["owner"] == "alice"
        resp = requests.get(proxy.url + "/envs/viaproxy", headers=h(tokens["bob"]), timeout=10)
        assert resp.status_code == 403 and "belongs to another token" in resp.json()["detail"]
        assert requests.get(proxy.url + "/envs", headers=h(tokens["bob"]), timeout=10).json() == []
        assert requests.get(proxy.url + "/envs/viaproxy", timeout=10).status_code == 401
        res = tt(proxy.address, "env", "del", "viaproxy", token=tokens["alice"])
        assert res.returncode == 0, res.stderr
    finally:
        proxy.stop()


def test_the_proxy_asks_for_a_token_before_saying_an_env_does_not_exist(secured, tmp_path):
    """Without a token, `GET /envs/NAME` of a name no server holds answered 404 through
    the proxy where a ttserver answers 401."""
    srv, _, tokens = secured
    proxy = root_proxy([srv.address], tokens, tmp_path)
    try:
        for headers in ({}, h("not-a-token")):
            direct = requests.get(srv.url + "/envs/nosuch", headers=headers, timeout=10)
            via = requests.get(proxy.url + "/envs/nosuch", headers=headers, timeout=10)
            assert direct.status_code == via.status_code == 401, via.text
            assert via.json()["detail"]
        via = requests.get(proxy.url + "/envs/nosuch", headers=h(tokens["bob"]), timeout=10)
        assert via.status_code == 404 and "does not exist" in via.json()["detail"]
        assert requests.delete(proxy.url + "/envs/nosuch", timeout=10).status_code == 401
    finally:
        proxy.stop()


def test_the_proxy_never_shows_cached_views_or_hides_a_refusal(secured, tmp_path: Path,
                                                              run_dir: Path):
    """Through ttproxy: another token's delete is the server's 403 (it was reported as a
    503 'down'); while the ENV's only server is down, its last-seen view is shown to no
    caller the proxy cannot vouch for (it was shown to callers without a token)."""
    srv, tokens_file, tokens = secured
    other = ServerProcess(run_dir / "state", port_range="47500-47999",
                          extra=("--tokens-file", str(tokens_file))).start()
    proxy = root_proxy([other.address], tokens, tmp_path)
    try:
        resp = requests.post(proxy.url + "/envs", headers=h(tokens["alice"]),
                             json={"name": "cached", "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        resp = requests.delete(proxy.url + "/envs/cached", headers=h(tokens["bob"]),
                               timeout=60)
        assert resp.status_code == 403, resp.text
        assert "belongs to another token" in resp.json()["detail"]
        assert requests.get(proxy.url + "/envs/cached", headers=h(tokens["alice"]),
                            timeout=10).status_code == 200  # seen (and cached) by the proxy

        other.proc.send_signal(signal.SIGSTOP)  # the ENV's only server stops answering
        try:
            deadline = time.monotonic() + 30
            while requests.get(proxy.url + "/health", timeout=30).json()["servers_up"]:
                assert time.monotonic() < deadline, "the proxy did not notice"
                time.sleep(0.5)
            for headers in ({}, h(tokens["bob"]), h("not-a-token")):
                resp = requests.get(proxy.url + "/envs/cached", headers=headers, timeout=30)
                assert resp.status_code == 503, resp.text
                assert "alice" not in resp.text and "vms" not in resp.text
        finally:
            other.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while requests.get(proxy.url + "/envs/cached", headers=h(tokens["alice"]),
                           timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.5)
        resp = requests.delete(proxy.url + "/envs/cached", headers=h(tokens["alice"]),
                               timeout=120)
        assert resp.status_code == 200, resp.text
    finally:
        proxy.stop()
        for env in requests.get(other.url + "/envs", headers=h(tokens["root"]),
                                timeout=10).json():
            requests.delete(f"{other.url}/envs/{env['name']}", headers=h(tokens["root"]),
                            timeout=120)
        other.stop(clean=False)


def test_revoking_a_token_takes_effect_without_a_restart(secured):
    srv, tokens_file, tokens = secured
    assert requests.get(srv.url + "/envs", headers=h(tokens["bob"]), timeout=10).ok
    proc = subprocess.run([sys.executable, "-m", "ttserver.cli", "token", "--tokens-file",
                           str(tokens_file), "del", "bob"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    resp = requests.get(srv.url + "/envs", headers=h(tokens["bob"]), timeout=10)
    assert resp.status_code == 401


def test_tokens_never_reach_the_log(secured):
    srv, _, tokens = secured
    log = srv.log.read_text(errors="replace")
    assert log, "the server log should not be empty"
    assert all(t not in log for t in tokens.values())


def test_client_keeps_its_token_private(secured, tmp_path: Path):
    srv, _, tokens = secured
    config = tmp_path / "cfg" / "tt.json"
    res = tt(None, "config", "--serv-addr", "127.0.0.1", "--serv-port", str(srv.port),
             "--token", "-", config=str(config), stdin=tokens["alice"] + "\n")
    assert res.returncode == 0, res.stderr
    assert tokens["alice"] not in res.stdout + res.stderr
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    res = tt(None, "status", "--remote", config=str(config))
    assert res.returncode == 0 and "accel=" in res.stdout, res.stderr


def test_a_tokens_file_readable_by_others_stops_the_server(tmp_path: Path):
    bad = tmp_path / "tokens"
    add_token(bad, "x")
    os.chmod(bad, 0o644)
    run_dir = new_run_dir("auth-bad-")
    try:
        with pytest.raises(RuntimeError, match="must not be readable by others"):
            ServerProcess(run_dir / "state", extra=("--tokens-file", str(bad))).start(timeout=30)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def status_before_the_body(port: int, method: str, path: str) -> int:
    """Send a request's head and the first MiB of an unending chunked body; the status
    the daemon answers without waiting for the rest (socket.timeout if it waits)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  "100000\r\n".encode() + b" " * 0x100000 + b"\r\n")
        return int(s.recv(4096).split()[1])


def test_nothing_is_read_before_the_caller_is_known(secured, tmp_path: Path):
    """Authentication comes before the body: bad JSON, a body of the wrong type or an
    endless chunked upload without a token get 401, through the proxy as well."""
    srv, _, tokens = secured
    resp = requests.post(srv.url + "/envs", data=b"{not json", timeout=10,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 401, resp.text  # FastAPI alone answered 422

    assert status_before_the_body(srv.port, "PUT", "/envs/x/files?path=/x") == 401
    assert status_before_the_body(srv.port, "POST", "/envs") == 401
    resp = requests.post(srv.url + "/envs", headers={**h(tokens["alice"]),
                         "Content-Type": "text/plain"}, timeout=10,
                         data=b'{"name": "csrf", "os_prefix": ["debian-12"]}')
    assert resp.status_code == 415 and "application/json" in resp.json()["detail"]
    resp = requests.post(srv.url + "/envs", headers=h(tokens["alice"]), timeout=30,
                         json={"name": "big", "os_prefix": ["debian-12"],
                               "ssh_keys": ["x" * (9 << 20)]})  # JSON_LIMIT: 8 MiB
    assert resp.status_code == 413, resp.text

    resp = requests.post(srv.url + "/envs", headers=h(tokens["alice"]), timeout=30,
                         json={"name": "held", "os_prefix": ["debian-12"]})
    assert resp.status_code == 202, resp.text
    proxy = root_proxy([srv.address], tokens, tmp_path)  # its own admin token (operator.md)
    try:
        # the proxy used to read the whole body before a server saw the token
        assert status_before_the_body(proxy.port, "PUT", "/envs/held/files?path=/x") == 401
        resp = requests.post(proxy.url + "/envs", headers={**h(tokens["alice"]),
                             "Content-Type": "text/plain"}, data=b"{}", timeout=10)
        assert resp.status_code == 415
    finally:
        proxy.stop()
        requests.delete(srv.url + "/envs/held", headers=h(tokens["alice"]), timeout=120)


def test_a_chunked_upload_stops_at_the_limit(secured):
    """The upload limit holds whatever the framing (it was checked on Content-Length only,
    so a chunked upload had none)."""
    srv, _, tokens = secured
    resp = requests.post(srv.url + "/envs", headers=h(tokens["alice"]), timeout=30,
                         json={"name": "sink", "os_prefix": ["debian-12"]})
    assert resp.status_code == 202, resp.text
    sent = 0

    def chunks():
        nonlocal sent
        while sent <= (1 << 30) + (16 << 20):
            sent += 4 << 20
            yield b"\0" * (4 << 20)

    try:
        resp = requests.put(srv.url + "/envs/sink/files?path=/tmp/big",
                            headers=h(tokens["alice"]), data=chunks(), timeout=300)
        assert resp.status_code == 413 and "limit" in resp.json()["detail"], resp.text
    except requests.ConnectionError:  # the server closed the connection once it answered
        assert sent <= (1 << 30) + (16 << 20)
    assert requests.get(srv.url + "/health", timeout=10).ok
    requests.delete(srv.url + "/envs/sink", headers=h(tokens["alice"]), timeout=120)


def test_foreign_host_names_are_refused(secured):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach the API."""
    srv, _, tokens = secured
    for host in ("evil.example", "evil.example:80", f"attacker.test:{srv.port}"):
        resp = requests.get(srv.url + "/envs", headers={**h(tokens["root"]), "Host": host},
                            timeout=10)
        assert resp.status_code == 400 and "--allowed-host" in resp.json()["detail"], host
    for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "[::1]"):
        resp = requests.get(srv.url + "/envs", headers={**h(tokens["root"]), "Host": host},
                            timeout=10)
        assert resp.status_code == 200, (host, resp.text)


def test_an_unusable_tokens_file_accepts_no_token(secured):
    """Fail closed: a tokens file deleted, emptied or opened to others stops every token
    (the old set used to stay valid) until it is fixed."""
    srv, tokens_file, tokens = secured
    good = tokens_file.read_bytes()
    root = h(tokens["root"])
    try:
        for breakage in ("delete", "empty", "chmod", "garbage"):
            if breakage == "delete":
                tokens_file.unlink()
            elif breakage == "empty":
                tokens_file.write_bytes(b"")
            elif breakage == "chmod":
                tokens_file.write_bytes(good)
                tokens_file.chmod(0o644)
            else:
                tokens_file.chmod(0o600)
                tokens_file.write_bytes(good + b"not a token line\n")
            resp = requests.get(srv.url + "/envs", headers=root, timeout=10)
            assert resp.status_code == 401, (breakage, resp.text)
    finally:
        tokens_file.write_bytes(good)
        tokens_file.chmod(0o600)
    assert requests.get(srv.url + "/envs", headers=root, timeout=10).ok


def test_an_open_api_on_a_reachable_address_does_not_start(tmp_path: Path):
    """Without tokens the API is open: only on loopback, or when the operator says so."""
    if Path("/etc/ttstack/tokens").exists():
        pytest.skip("this host has a default tokens file: the server would start with it")
    proc = subprocess.run([sys.executable, "-m", "ttserver.cli", "--image-path",
                           str(tmp_path), "--cfgdb-path", str(tmp_path / "state"),
                           "--serv-addr", "0.0.0.0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--insecure-no-auth" in proc.stderr and "ttserver token add" in proc.stderr
