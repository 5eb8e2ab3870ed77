"""Slow clients against real ttserver and ttproxy processes (no VMs): a connection whose
request headers or body stall is closed after --http-header-timeout /
--http-body-timeout seconds (ttclient/timed_h11.py), while other callers are served;
uvicorn alone kept such connections open for good (slowloris)."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from helpers import DaemonProcess, ProxyProcess, ServerProcess, free_port, new_run_dir

DEADLINE = 1.0  # seconds, both deadlines, for the daemons under test
WAIT = 6.0  # seconds a test waits for a close that should come after DEADLINE


@pytest.fixture(params=["ttserver", "ttproxy"])
def daemon(request: pytest.FixtureRequest) -> Iterator[DaemonProcess]:
    timeouts = ("--http-header-timeout", str(DEADLINE), "--http-body-timeout", str(DEADLINE))
    run_dir = new_run_dir("deadlines-")
    proc: DaemonProcess
    if request.param == "ttserver":
        proc = ServerProcess(run_dir / "state", extra=("--no-warm-clones", *timeouts),
                             port_range="44900-44949", template_cache=None).start()
    else:  # its one server is down: the proxy still answers /health
        proc = ProxyProcess([f"127.0.0.1:{free_port()}"], run_dir, extra=timeouts).start()
    yield proc
    proc.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def connect(proc: DaemonProcess) -> socket.socket:
    host, port = proc.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    return sock


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the daemon closed `sock` (sending `trickle` every 0.2 s meanwhile),
    or None when it was still open after `seconds`."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None


def test_stalled_requests_are_closed_and_others_served(daemon):
    silent = connect(daemon)  # connects, sends nothing
    head = connect(daemon)
    head.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    body = connect(daemon)
    body.sendall(b"POST /envs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 1000\r\n\r\n{\"name\": ")
    try:
        assert requests.get(daemon.url + "/health", timeout=10).status_code == 200
        assert closed_within(silent, WAIT) is not None, "a silent connection stayed open"
        # one header line every 0.2 s: the headers never end, the deadline counts from
        # their start, not from the last byte
        assert closed_within(head, WAIT, trickle=b"X-Slow: 1\r\n") is not None
        assert closed_within(body, WAIT) is not None, "a stalled body stayed open"
        assert requests.get(daemon.url + "/health", timeout=10).status_code == 200
    finally:
        for sock in (silent, head, body):
            sock.close()


def test_a_slow_but_steady_body_is_read_to_the_end(daemon):
    """The body deadline is between two reads, not for the whole body: a body sent a byte
    every 0.3 s for longer than both deadlines gets its answer (here: bad JSON, 4xx)."""
    payload = b'{"name": "x", "vm_number": 0, "os_prefix": ["debian-12"]'  # no closing }
    sock = connect(daemon)
    try:
        sock.sendall(b"POST /envs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: "
                     + str(len(payload)).encode() + b"\r\n\r\n")
        started = time.monotonic()
        for i in range(0, len(payload), 4):
            sock.sendall(payload[i:i + 4])
            time.sleep(0.3 * DEADLINE)
        assert time.monotonic() - started > 2 * DEADLINE
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 4"), reply
    finally:
        sock.close()
