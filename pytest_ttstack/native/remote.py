"""Sent by the controller to each VM in place of `xdist.remote` (through xdist's
`pytest_xdist_getremotemodule` hook) and run there as execnet's `__channelexec__`.

Why: xdist hands a `popen` worker the controller's `sys.path` and its raw command line.
In a VM both are wrong: the host's paths do not exist there, and path arguments must
name the shipped copy. This shim takes the first message, keeps the guest's own
`sys.path` (plus the shipped plugin and the project, as xdist does for `ssh` workers),
puts in the command line the controller prepared for this VM (`workerinput["tt_args"]`),
and then runs the guest's own `xdist.remote` unchanged. Standard library only.

It also batches what the worker writes. A worker sends six messages per test (logstart,
three reports, logfinish, protocol-complete) and execnet writes each to its pipe at once;
here that pipe is sshd's, and under TCG one write, wake-up and SSH packet cost about 3 ms:
half the worker's time with trivial tests (sampled in a Debian 12 guest). The messages
that only mark a test's start and end (`KEPT`), and the teardown report (no test code runs
between it and the protocol-complete message), are kept and written with the next other
message: three writes per test. The setup and call reports are written at once: a test
that kills its worker then still has every earlier phase's report sent, which is how the
controller names the phase it died in (xdist's crash attribution needs the earlier tests'
results too), and a test that runs long has its start shown after at most
`KEEP_AT_MOST` seconds.
"""

from __future__ import annotations

KEPT = ("logstart", "logfinish")  # xdist worker events that may wait
KEEP_AT_MOST = 0.5  # seconds

if __name__ == "__channelexec__":
    import contextlib
    import sys
    import threading
    import time

    class _BatchedWrites:
        """Stands in for the write side of execnet's IO (`gateway._io`): a write made
        inside `keeping()` is kept; any other write goes out at once, after the kept ones,
        in one call."""

        def __init__(self, io: object) -> None:
            self._write = io.write  # type: ignore[attr-defined]
            self._close_write = io.close_write  # type: ignore[attr-defined]
            self._kept: list[bytes] = []
            self._lock = threading.Lock()
            self._keeper: int | None = None  # the thread whose writes are kept now
            self._kept_some = threading.Event()
            io.write = self.write  # type: ignore[attr-defined]
            io.close_write = self.close_write  # type: ignore[attr-defined]
            threading.Thread(target=self._flush_late, name="tt-flush", daemon=True).start()

        @contextlib.contextmanager
        def keeping(self):
            self._keeper = threading.get_ident()
            try:
                yield
            finally:
                self._keeper = None

        def write(self, data: bytes) -> None:
            with self._lock:  # held while writing: two writes never interleave
                self._kept.append(data)
                if self._keeper == threading.get_ident():
                    self._kept_some.set()
                else:
                    self._flush()

        def _flush(self) -> None:
            if self._kept:
                data = b"".join(self._kept)
                self._kept.clear()
                self._write(data)

        def close_write(self) -> None:
            with self._lock:
                self._flush()
            self._close_write()

        def _flush_late(self) -> None:
            while True:
                self._kept_some.wait()
                time.sleep(KEEP_AT_MOST)
                self._kept_some.clear()
                try:
                    with self._lock:
                        self._flush()
                except (OSError, ValueError):  # closed: the gateway is going away
                    return

    class _FirstMessage:
        """The channel, but its first receive() gives the rewritten set-up message, and
        the events in `KEPT` wait for the next other one."""

        def __init__(self, channel: object, first: object) -> None:
            self._channel = channel
            self._first: list = [first]
            self._writes = _BatchedWrites(channel.gateway._io)  # type: ignore[attr-defined]

        def send(self, item: object) -> None:
            if isinstance(item, tuple) and item and (item[0] in KEPT or (
                    item[0] == "testreport" and item[1]["data"].get("when") == "teardown")):
                with self._writes.keeping():
                    self._channel.send(item)  # type: ignore[attr-defined]
            else:
                self._channel.send(item)  # type: ignore[attr-defined]

        def receive(self, *args: object, **kwargs: object) -> object:
            if self._first:
                return self._first.pop()
            return self._channel.receive(*args, **kwargs)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self._channel, name)

    workerinput, args, option_dict, _host_sys_path = channel.receive()  # type: ignore[name-defined]  # noqa: F821
    sys.path.insert(0, workerinput["tt_site"])
    args = workerinput["tt_args"]
    import importlib.util
    import os

    # found, not imported: importing the xdist package here, before pytest loads it as a
    # plugin, would keep pytest from rewriting its asserts (a warning in every run)
    spec = importlib.util.find_spec("xdist")
    path = os.path.join(os.path.dirname(spec.origin), "remote.py")  # type: ignore[union-attr,arg-type]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    # xdist names a basetemp under the *host's* temp dir; the guest's default is right
    option_dict.pop("basetemp", None)
    first = (workerinput, args, option_dict, None)  # None: keep sys.path, add the cwd
    exec(code, {"__name__": "__channelexec__",  # noqa: S102 - xdist's own worker code
                "channel": _FirstMessage(channel, first)})  # type: ignore[name-defined]  # noqa: F821
