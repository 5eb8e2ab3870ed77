"""`tt` against a hostile server (or a man in the middle): what the server says must not
make the client write outside the directory the user named. A real HTTP server on
loopback plays the hostile side; no VM."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import tt

VM_NAMES = ["../../escaped", "/tmp/absolute-escape", "..", "ok-0"]


class Hostile(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/envs/x/vms/"):
            body, ctype = b"payload\n", "application/octet-stream"
        elif self.path == "/envs/x":
            body = json.dumps({"name": "x", "state": "running", "vms": [
                {"id": f"id{i}", "name": n, "state": "running"}
                for i, n in enumerate(VM_NAMES)]}).encode()
            ctype = "application/json"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


def test_env_get_refuses_vm_names_that_are_paths(hostile: str, tmp_path: Path):
    local = tmp_path / "a" / "b" / "out"
    local.mkdir(parents=True)
    res = tt(hostile, "env", "get", "x", "--remote", "/etc/hostname", "--local", str(local))
    assert res.returncode == 1, res.stdout + res.stderr
    assert (local / "ok-0" / "hostname").read_bytes() == b"payload\n"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["a/b/out/ok-0/hostname"], written
    assert not Path("/tmp/absolute-escape").exists()
    assert res.stdout.count("refusing a VM name") == 3, res.stdout
