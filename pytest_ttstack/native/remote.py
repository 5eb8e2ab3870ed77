"""Sent by the controller to each VM in place of `xdist.remote` (through xdist's
`pytest_xdist_getremotemodule` hook) and run there as execnet's `__channelexec__`.

Why: xdist hands a `popen` worker the controller's `sys.path` and its raw command line.
In a VM both are wrong: the host's paths do not exist there, and path arguments must
name the shipped copy. This shim takes the first message, keeps the guest's own
`sys.path` (plus the shipped plugin and the project, as xdist does for `ssh` workers),
puts in the command line the controller prepared for this VM (`workerinput["tt_args"]`),
and then runs the guest's own `xdist.remote` unchanged. Standard library only.

It also sends a batch of events per message instead of one message per event. A worker
sends logstart, three reports, logfinish and protocol-complete for each test, and execnet
writes each to its pipe at once; here that pipe is sshd's, and under TCG each write,
sshd's wake-up and its SSH packet cost about 3.5 ms, and execnet's pure-Python encoding
of a report about 1 ms (sampled in a Debian 12 guest). Here events (`BATCHED`) are kept
and sent as one `tt_events` message, JSON-encoded (C-accelerated; pytest's own reports
are JSON-safe, as pytest-reportlog relies on): when the oldest kept event has waited
`KEEP_AT_MOST` seconds, when the worker has fewer than `LOW_WATER` items left to run
(the controller sends more as results come in), and before any other event. Reports
with Python values JSON would change or cannot hold (`record_property` values, a
subtest's keywords) go as they are, through execnet, with what execnet cannot send
either replaced by its repr(): such a report is sent after its test, where a failure
to send would end the worker.

The ledger keeps a dying worker's results: a file in the VM's /run (tmpfs; its pages
taken at the start, so a /run a test fills cannot fail a write to it), mapped into
memory (no system call per note: a `pwrite` per event on the root file system cost ~1 ms
under TCG, sampled). Its first part notes the last event that tells a test's phase; its
second holds each finished test's events until they are sent, a JSON line per test.
After a crash the controller reads both (`events.parse_ledger`): the finished tests'
results are reported as if sent, and the phase of the test that was running is known.
What a worker that dies loses is the events of the test it was running, unless its
whole VM dies: then the unsent finished tests go with it.
"""

from __future__ import annotations

from typing import Any

BATCHED = ("logstart", "testreport", "logfinish", "runtest_protocol_complete")
REPR_KEY = "__tt_repr__"  # a value sent as its repr (events.REPR_KEY)
KEEP_AT_MOST = 0.25  # seconds
LOW_WATER = 4  # items left to run

if __name__ == "__channelexec__":
    import hashlib
    import json
    import mmap
    import os
    import sys
    import threading
    import time
    import traceback

    import execnet

    def _encoded(events: list) -> str | None:
        """The events as one JSON array, or None when a report has user_properties (any
        Python value, which JSON would change or cannot hold): those go as they are,
        through execnet. A subtest's keywords, which only name it (by their repr), go as
        {REPR_KEY: repr(value)} (events.retupled makes them objects with that repr)."""
        if any(e[1].get("data", {}).get("user_properties") for e in events):
            return None
        for event in events:
            context = event[1].get("data", {}).get("_subtest.context")
            if isinstance(context, dict) and context.get("kwargs"):
                context["kwargs"] = {k: {REPR_KEY: repr(v)}
                                     for k, v in context["kwargs"].items()}
        try:
            return json.dumps(events)
        except (TypeError, ValueError):
            return None

    def _sendable(event: object) -> object:
        """The event as execnet can send it: values it cannot serialize (a subtest's
        `range` keyword, an object in user_properties) become their repr(). With xdist's
        own sending the test then fails; here the report is sent after the test, where
        an error would end the worker."""
        try:
            execnet.dumps(event)
            return event
        except execnet.DumpError:
            return _sanitized(event)

    _PLAIN = (str, bytes, int, float, bool, type(None))

    def _sanitized(value: object) -> object:
        """`value` in the plain types execnet sends (exact types: it refuses subclasses,
        a namedtuple or a str enum); anything else as its repr()."""
        if isinstance(value, dict):
            return {k if type(k) in _PLAIN else repr(k): _sanitized(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [_sanitized(v) for v in value]
        if isinstance(value, tuple):
            return tuple(_sanitized(v) for v in value)
        return value if type(value) in _PLAIN else repr(value)

    def _mapped(path: str, size: int) -> mmap.mmap:
        """`size` bytes of `path` mapped, its pages taken now (posix_fallocate): a write to
        a page of a tmpfs that has filled up would kill the worker with SIGBUS. When they
        cannot be taken, anonymous memory: no ledger, so no replay after a crash."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            return mmap.mmap(fd, size)
        except OSError as exc:
            sys.stderr.write(f"ttstack: no ledger in {path} ({exc}); a crash of this "
                             "worker loses its unsent results\n")
            return mmap.mmap(-1, size)
        finally:
            os.close(fd)

    class _BatchingChannel:
        """The channel, but its first receive() gives the rewritten set-up message, and
        events go out in batches (see the module docstring)."""

        def __init__(self, channel: object, first: object, ledger: str,
                     sizes: tuple[int, int]) -> None:
            self._channel = channel
            self._first: list = [first]
            self._current: list = []  # events of the test in progress, not sent
            self._finished: list[str] = []  # JSON arrays of finished tests, not sent
            self._since: float | None = None  # when the oldest unsent event came
            self._queued = 0  # items received to run, less those finished or given back
            self._no_more = False  # the controller said shutdown: no more items come
            self._lock = threading.Lock()
            self._wake = threading.Condition(self._lock)
            self._note_size, unsent_size = sizes
            self._ledger = _mapped(ledger, self._note_size + unsent_size)
            self._end = self._note_size  # where the next unsent test's line goes
            threading.Thread(target=self._flush_late, name="tt-flush", daemon=True).start()

        def send(self, item: object) -> None:
            with self._lock:
                name = item[0] if isinstance(item, tuple) and item else None
                if name not in BATCHED:
                    self._flush()
                    if name == "unscheduled":  # worksteal: items given back
                        self._queued -= len(item[1].get("indices", ()))  # type: ignore[index]
                    self._channel.send(item)  # type: ignore[attr-defined]
                    return
                self._note(item)
                self._current.append(item)
                self._kept()
                if name == "runtest_protocol_complete":
                    self._queued -= 1
                    self._finish()
                    if self._queued < LOW_WATER and not self._no_more:
                        self._flush()

        def _note(self, item: Any) -> None:
            """The ledger's note: "sha1 of the nodeid\twhen" of the last event that tells
            the phase of a test (its logstart, its setup and call reports), as one line (a
            digest: node ids may be longer than the note)."""
            name, kwargs = item
            if name == "logstart":
                nodeid, when = kwargs.get("nodeid", ""), "logstart"
            elif name == "testreport" and kwargs["data"].get("when") in ("setup", "call"):
                nodeid, when = kwargs["data"].get("nodeid", ""), kwargs["data"]["when"]
            else:
                return
            digest = hashlib.sha1(nodeid.encode("utf-8", "surrogatepass")).hexdigest()
            data = f"{digest}\t{when}\n".encode()
            self._ledger[:len(data)] = data

        def _finish(self) -> None:
            """The test in progress is complete: keep its events as one JSON line, in
            the ledger too (sent at once when they are not JSON or do not fit)."""
            events, self._current = self._current, []
            text = _encoded(events)
            if text is None:
                self._flush()
                for event in events:
                    self._channel.send(_sendable(event))  # type: ignore[attr-defined]
                return
            line = text.encode() + b"\n"
            if self._end + len(line) > len(self._ledger):
                self._flush()
            if self._end + len(line) > len(self._ledger):
                self._channel.send(("tt_events", {"json": text}))  # type: ignore[attr-defined]
                return
            self._ledger[self._end:self._end + len(line)] = line
            self._end += len(line)
            self._finished.append(text)
            self._kept()

        def _kept(self) -> None:
            """Something is kept: the clock of KEEP_AT_MOST runs from its first event."""
            if self._since is None:
                self._since = time.monotonic()
                self._wake.notify()

        def _flush(self) -> None:
            """Send every kept event as one message; empty the ledger's unsent part. What
            is kept is taken first, so a send that fails never sends it twice."""
            self._since = None
            current, self._current = self._current, []
            finished, self._finished = self._finished, []
            raw = []
            parts = [text[1:-1] for text in finished]
            if current:
                text = _encoded(current)
                if text is None:
                    raw = current
                else:
                    parts.append(text[1:-1])
            if parts:
                self._channel.send(  # type: ignore[attr-defined]
                    ("tt_events", {"json": "[" + ",".join(parts) + "]"}))
            if self._end > self._note_size:
                self._ledger[self._note_size:self._end] = bytes(self._end - self._note_size)
                self._end = self._note_size
            for event in raw:
                self._channel.send(_sendable(event))  # type: ignore[attr-defined]

        def _flush_late(self) -> None:
            with self._lock:
                while True:
                    if self._since is None:
                        self._wake.wait()
                        continue
                    wait = self._since + KEEP_AT_MOST - time.monotonic()
                    if wait > 0:
                        self._wake.wait(wait)
                        continue
                    try:
                        self._flush()
                    except (OSError, ValueError):  # closed: the gateway is going away
                        return
                    except Exception:  # noqa: BLE001 - the thread must go on flushing
                        traceback.print_exc()

        def setcallback(self, callback: Any, **kwargs: Any) -> object:
            """The channel's, counting the items the controller sends to run."""
            def counted(command: object) -> None:
                if isinstance(command, tuple) and len(command) == 2:
                    with self._lock:
                        if command[0] == "runtests":
                            self._queued += len(command[1].get("indices", ()))
                        elif command[0] in ("runtests_all", "shutdown"):  # all sent
                            self._no_more = True
                callback(command)
            return self._channel.setcallback(counted, **kwargs)  # type: ignore[attr-defined]

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
    batching = _BatchingChannel(channel, first, workerinput["tt_ledger"],  # type: ignore[name-defined]  # noqa: F821
                                tuple(workerinput["tt_ledger_sizes"]))
    exec(code, {"__name__": "__channelexec__",  # noqa: S102 - xdist's own worker code
                "channel": batching})
