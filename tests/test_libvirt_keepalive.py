"""A libvirtd that stops answering fails ttserver's libvirt calls instead of blocking them.

The real system libvirtd is frozen with SIGSTOP for a few seconds (and always continued):
without keepalive the call below blocks until libvirtd runs again, holding its API thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import libvirt

from ttserver.vm.libvirt_domains import Engine


def libvirtd_pid() -> int:
    out = subprocess.run(["pgrep", "-o", "-x", "libvirtd"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[0])


def test_a_libvirtd_that_stops_answering_fails_calls_and_is_reconnected():
    engine = Engine(keepalive=(1, 2))
    conn = engine.conn()
    conn.getLibVersion()
    outcome: dict[str, object] = {}

    def call() -> None:
        started = time.monotonic()
        try:
            conn.listAllDomains(0)
            outcome["result"] = "answered"
        except libvirt.libvirtError as exc:
            outcome["result"] = exc
        outcome["seconds"] = time.monotonic() - started

    pid = libvirtd_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(15)
        failed_in_time = not worker.is_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    worker.join(30)
    assert failed_in_time, "the call blocked for 15 s on a frozen libvirtd"
    assert isinstance(outcome["result"], libvirt.libvirtError), outcome
    assert outcome["seconds"] < 10, outcome
    again = engine.conn()
    assert again is not conn
    assert again.isAlive() and again.getLibVersion() > 0
