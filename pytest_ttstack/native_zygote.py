"""Runs *inside the VM* in native mode: a fork server for test runs.

Why: under TCG a fresh `python3 -m pytest NODEID` spends ~3 s importing pytest before it
runs a test of a few milliseconds. This process imports pytest once, then waits on a FIFO;
each request line forks a child that runs `pytest.main` for one node id with everything
already imported (the child is a fresh copy, so tests still never share state).

A request is one line, a path prefix `<tag>`: `<tag>.req` holds {"args": pytest args,
"cwd": dir, "timeout": seconds}, `<tag>.ack` is a FIFO the host side reads until the child
ends. The child writes its reports to `<tag>.jsonl` (native_inner) and its output to
`<tag>.log`. If this server is not running, the host side runs pytest directly.
Only the standard library and pytest may be imported here: the guest has nothing else.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import signal
import sys

import _pytest.config
import pytest


def _preload() -> None:
    """Import what `pytest.main` would import in every child: its builtin plugins (most of
    its start-up time). Then freeze the heap: children share it copy-on-write, and the
    full collections pytest runs at exit skip it (0.2 s each under TCG otherwise)."""
    for name in _pytest.config.default_plugins:
        with contextlib.suppress(ImportError):  # one this pytest lacks: the child says so
            importlib.import_module(f"_pytest.{name}")
    gc.collect()
    gc.freeze()


def _child(tag: str) -> None:
    """Run one request and exit. `<tag>.ack` is a FIFO the host side is reading: this
    process holds its write end, so the reader sees end-of-file when this process ends —
    however it ends (exit, crash, kill, the alarm), never a poll."""
    code = 3
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the test may wait for its children
        signal.alarm(600)  # until the request says better; nothing waits on us forever
        ack = os.open(f"{tag}.ack", os.O_WRONLY)
        with open(f"{tag}.req", encoding="utf-8") as f:
            request = json.load(f)
        signal.alarm(int(request["timeout"]) + 5)  # a hung test must not outlive its run
        log = os.open(f"{tag}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(request["cwd"])
        os.environ["TTNATIVE_RESULT"] = f"{tag}.jsonl"
        code = int(pytest.main(request["args"]))
        os.write(ack, f"{code}\n".encode())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(fifo: str) -> None:
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    tmp = f"{fifo}.new"
    if os.path.exists(tmp):
        os.unlink(tmp)
    os.mkfifo(tmp, 0o600)
    os.rename(tmp, fifo)  # appears only when we are ready to read it
    # read-write: a writer never blocks on open, and we never see end-of-file
    with open(os.open(fifo, os.O_RDWR), encoding="utf-8") as requests:
        for line in requests:
            if line.strip() and os.fork() == 0:
                _child(line.strip())


if __name__ == "__main__":
    serve(sys.argv[1])
