"""Sent by the controller to each VM in place of `xdist.remote` (through xdist's
`pytest_xdist_getremotemodule` hook) and run there as execnet's `__channelexec__`.

Why: xdist hands a `popen` worker the controller's `sys.path` and its raw command line.
In a VM both are wrong: the host's paths do not exist there, and path arguments must
name the shipped copy. This shim takes the first message, keeps the guest's own
`sys.path` (plus the shipped plugin and the project, as xdist does for `ssh` workers),
puts in the command line the controller prepared for this VM (`workerinput["tt_args"]`),
and then runs the guest's own `xdist.remote` unchanged. Standard library only.

It also sends one message per test instead of six. A worker sends logstart, three
reports, logfinish and protocol-complete for each test, and execnet writes each to its
pipe at once; here that pipe is sshd's, and under TCG each write, sshd's wake-up and its
SSH packet cost about 3.5 ms, and execnet's pure-Python encoding of a report about 1 ms
(sampled in a Debian 12 guest). Here a test's events (`BATCHED`) are kept and sent as one
`tt_events` message, JSON-encoded (C-accelerated; reports are JSON-safe by pytest's
contract, as pytest-reportlog relies on), when the test is complete: before the next
test's code runs, so a test that kills its worker never takes an earlier test's results
with it. Any other event sends the kept ones first; a test that runs long has its start
sent after at most `KEEP_AT_MOST` seconds. Reports with `record_property` values (any
Python value) go as they are, through execnet.

What a worker that dies loses is the events of the test it was running; the phase it
was in is noted in `ledger`, a file in the VM's /run (tmpfs), mapped into memory: no
system call per note (a `pwrite` per event on the root file system cost ~1 ms under
TCG, sampled). The controller reads it after the crash (`events.phase_after`).
"""

from __future__ import annotations

from typing import Any

BATCHED = ("logstart", "testreport", "logfinish", "runtest_protocol_complete")
KEEP_AT_MOST = 0.5  # seconds
LEDGER_SIZE = 4096  # bytes

if __name__ == "__channelexec__":
    import json
    import mmap
    import os
    import sys
    import threading

    class _BatchingChannel:
        """The channel, but its first receive() gives the rewritten set-up message, and the
        events of one test go out as one message (see the module docstring)."""

        def __init__(self, channel: object, first: object, ledger: str) -> None:
            self._channel = channel
            self._first: list = [first]
            self._kept: list = []
            self._lock = threading.Lock()
            self._wake = threading.Condition(self._lock)
            fd = os.open(ledger, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, LEDGER_SIZE)
                self._ledger = mmap.mmap(fd, LEDGER_SIZE)
            finally:
                os.close(fd)
            threading.Thread(target=self._flush_late, name="tt-flush", daemon=True).start()

        def send(self, item: object) -> None:
            with self._lock:
                name = item[0] if isinstance(item, tuple) and item else None
                if name in BATCHED:
                    self._note(item)
                    self._kept.append(item)
                    if len(self._kept) == 1:
                        self._wake.notify()
                    if name == "runtest_protocol_complete":
                        self._flush()
                else:
                    self._flush()
                    self._channel.send(item)  # type: ignore[attr-defined]

        def _note(self, item: Any) -> None:
            """The ledger: "nodeid\twhen" of the last event that tells the phase of a test
            (its logstart, its setup and call reports), as one line."""
            name, kwargs = item
            if name == "logstart":
                line = f"{kwargs.get('nodeid', '')}\tlogstart"
            elif name == "testreport" and kwargs["data"].get("when") in ("setup", "call"):
                line = f"{kwargs['data'].get('nodeid', '')}\t{kwargs['data']['when']}"
            else:
                return
            data = line.encode("utf-8", "replace")[:LEDGER_SIZE - 1] + b"\n"
            self._ledger[:len(data)] = data

        def _flush(self) -> None:
            if not self._kept:
                return
            kept, self._kept = self._kept, []
            try:  # user_properties may hold anything: those reports go as they are
                text = None if any(e[1].get("data", {}).get("user_properties")
                                   for e in kept) else json.dumps(kept)
            except (TypeError, ValueError):
                text = None
            if text is None:
                for item in kept:
                    self._channel.send(item)  # type: ignore[attr-defined]
            else:
                self._channel.send(("tt_events", {"json": text}))  # type: ignore[attr-defined]

        def _flush_late(self) -> None:
            with self._lock:
                while True:
                    while not self._kept:
                        self._wake.wait()
                    if not self._wake.wait_for(lambda: not self._kept, KEEP_AT_MOST):
                        try:
                            self._flush()
                        except (OSError, ValueError):  # closed: the gateway is going away
                            return

        def receive(self, *args: object, **kwargs: object) -> object:
            if self._first:
                return self._first.pop()
            return self._channel.receive(*args, **kwargs)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self._channel, name)

    def _release_session_in_children(io: Any) -> None:
        """A process a test forks (a daemon, a multiprocessing pool) inherits the
        worker's ends of its SSH session: execnet's copies of stdin and stdout, and
        pytest's saved copy of stderr while it captures. When one outlives a worker that
        dies, sshd keeps the session open and the controller never learns of the death
        (the run waited forever, as plain xdist does with a popen worker). In a forked
        child every such descriptor above 2 is pointed at /dev/null; its own 0-2 stay
        (with `-s` a child that keeps the worker's stderr still holds the session).
        Children that exec do not inherit execnet's copies (they are close-on-exec)."""
        def identity(fd: int) -> tuple[int, int] | None:
            try:
                st = os.fstat(fd)
            except OSError:
                return None
            return st.st_dev, st.st_ino

        session = {identity(fd) for fd in (0, 1, 2, io.infile.fileno(), io.outfile.fileno())}
        null_fd = os.open(os.devnull, os.O_RDONLY)
        session -= {None, identity(null_fd)}  # execnet pointed 0 and 1 there
        os.close(null_fd)

        def release() -> None:
            null = None
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd > 2 and identity(fd) in session:
                    if null is None:
                        null = os.open(os.devnull, os.O_RDWR)
                    os.dup2(null, fd, inheritable=os.get_inheritable(fd))
            if null is not None:
                os.close(null)

        os.register_at_fork(after_in_child=release)

    _release_session_in_children(channel.gateway._io)  # type: ignore[name-defined]  # noqa: F821
    workerinput, args, option_dict, _host_sys_path = channel.receive()  # type: ignore[name-defined]  # noqa: F821
    sys.path.insert(0, workerinput["tt_site"])
    args = workerinput["tt_args"]
    import importlib.util

    # found, not imported: importing the xdist package here, before pytest loads it as a
    # plugin, would keep pytest from rewriting its asserts (a warning in every run)
    spec = importlib.util.find_spec("xdist")
    path = os.path.join(os.path.dirname(spec.origin), "remote.py")  # type: ignore[union-attr,arg-type]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    # xdist names a basetemp under the *host's* temp dir; the guest's default is right
    option_dict.pop("basetemp", None)
    first = (workerinput, args, option_dict, None)  # None: keep sys.path, add the cwd
    batching = _BatchingChannel(channel, first, workerinput["tt_ledger"])  # type: ignore[name-defined]  # noqa: F821
    exec(code, {"__name__": "__channelexec__",  # noqa: S102 - xdist's own worker code
                "channel": batching})
