"""Talk to qemu-guest-agent through libvirt: ping, run a command, read and write files.

The agent is the default way in because it needs no network inside the VM and answers as
soon as the guest's userspace is up (seconds before sshd). Every call has a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from ttclient.waiting import WaitTimeout, wait_for

from . import command as cmdspec

# Bytes per guest-file-write: larger messages (~200 KiB+ of base64) to the guest make the
# agent channel stall under libvirt 9 / qemu-ga 7 (measured), so writes go in small chunks.
WRITE_CHUNK = 96 * 1024
READ_CHUNK = 1 << 20  # replies from the guest have no such limit
# A run's output is read in smaller pieces: each piece passes through libvirt's reply, its
# JSON and base64 (about 4x its size at once), and the output itself must stay the bulk
# of what a run holds (tests/test_guest_io.py measures it).
OUTPUT_PIECE = 256 * 1024


class AgentError(RuntimeError):
    """The guest agent did not answer or refused a command; the message has libvirt's error."""
    pass


class AgentUnavailable(AgentError):
    """The agent did not take a command, so nothing of it ran (e.g. the guest reboots)."""
    pass


class AgentGone(AgentError):
    """The agent took a command, then went away before it said how the command ended
    (the command rebooted or powered off the guest, say)."""
    pass


@dataclass
class ExecResult:
    """A command's outcome: exit code (128+n when signal n ended it, None when it did not
    finish), output as text, whether it timed out, its seconds, and the signal."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    signal: int | None = None


def command(dom: libvirt.virDomain, execute: str, arguments: dict | None = None,
            timeout: int = 10) -> Any:
    """The `return` member of a QEMU guest agent command's reply (its shape is the
    command's, per the qemu-ga QMP reference); AgentError when libvirt reports a failure."""
    payload: dict[str, Any] = {"execute": execute}
    if arguments is not None:
        payload["arguments"] = arguments
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(payload), timeout, 0)
    except libvirt.libvirtError as exc:
        raise AgentError(f"{execute}: {exc.get_error_message()}") from exc
    return json.loads(reply).get("return")


def ping(dom: libvirt.virDomain, timeout: int = 2) -> bool:
    """True when the guest agent answers within `timeout` seconds."""
    try:
        command(dom, "guest-ping", timeout=timeout)
        return True
    except AgentError:
        return False


def _decode(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace") if data else ""


def exec_argv(dom: libvirt.virDomain, argv: list[str], *, timeout: float,
              stdin: bytes | None = None) -> ExecResult:
    """Run argv in the guest, wait at most `timeout` s; the guest kills it too (see run())."""
    args: dict = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if stdin is not None:
        args["input-data"] = base64.b64encode(stdin).decode()
    started = time.monotonic()
    try:
        pid = command(dom, "guest-exec", args)["pid"]
    except AgentError as exc:
        raise AgentUnavailable(str(exc)) from exc

    def exited() -> ExecResult | None:
        status = command(dom, "guest-exec-status", {"pid": pid})
        if not status.get("exited"):
            return None
        signal = status.get("signal")
        return ExecResult(128 + signal if signal is not None else status.get("exitcode"),
                          _decode(status.get("out-data")), _decode(status.get("err-data")),
                          False, time.monotonic() - started, signal)

    try:  # most commands take milliseconds in the guest: poll fast, then back off
        return wait_for(exited, timeout, interval=0.005, backoff=1.5, max_interval=0.1,
                        what=f"{argv[0]} in the guest")
    except WaitTimeout:
        return ExecResult(None, "", "", True, time.monotonic() - started)


def run_command(dom: libvirt.virDomain, spec: cmdspec.RunSpec) -> cmdspec.Outcome:
    """Run a user's command in the guest as guest/command.py describes: its outcome, with
    at most `spec.cap` bytes of each stream; AgentError when the agent fails."""
    started = time.monotonic()
    if spec.cmd_file:
        try:
            write_file(dom, spec.cmd_file, spec.cmd.encode())
        except AgentError as exc:
            raise AgentUnavailable(str(exc)) from exc
    try:
        res = exec_argv(dom, spec.argv(), timeout=spec.timeout + cmdspec.KILL_AFTER + 5)
    except AgentUnavailable:
        raise
    except AgentError as exc:  # it took the command, then went away
        raise AgentGone(str(exc)) from exc
    exit_code, signal, timed_out = cmdspec.settle(
        None if res.timed_out else res.exit_code, res.signal, res.seconds, spec.timeout)
    if timed_out:
        with contextlib.suppress(AgentError):
            exec_argv(dom, spec.sweep_argv(), timeout=30)
    # The run's shell sends everything to its files at once: what reached the agent's
    # own pipes came before that, from a shell that could not start or open its files
    # (`timeout` could not fork, say), and the files, if any, are an earlier run's.
    if res.stdout or res.stderr:
        return cmdspec.Outcome(exit_code, signal, _piped(res.stdout, spec.cap),
                               _piped(res.stderr, spec.cap), timed_out,
                               time.monotonic() - started)
    try:
        stdout = read_capped(dom, spec.out_path, spec.cap)
        stderr = read_capped(dom, spec.err_path, spec.cap)
    except AgentError:
        if exit_code is None:
            raise
        stdout = stderr = cmdspec.Output(b"", 0)  # the shell never made them
    return cmdspec.Outcome(exit_code, signal, stdout, stderr, timed_out,
                           time.monotonic() - started)


def _piped(text: str, cap: int) -> cmdspec.Output:
    data = text.encode()
    return cmdspec.Output(data[:cap], len(data))


def recovered(dom: libvirt.virDomain, spec: cmdspec.RunSpec,
              seconds: float) -> cmdspec.Outcome | None:
    """After AgentGone, once the agent answers again: the command's outcome from the
    status its shell wrote at exit (signal inferred from a status over 128, as over SSH),
    or None when it has none (the shell was killed, by the shutdown say). AgentError."""
    try:
        status = read_file(dom, spec.status_path).decode(errors="replace").strip()
    except AgentError:
        return None
    if not status.isdigit():
        return None
    code = int(status)
    return cmdspec.Outcome(code, cmdspec.signal_of(code),
                           read_capped(dom, spec.out_path, spec.cap),
                           read_capped(dom, spec.err_path, spec.cap), False, seconds)


def read_capped(dom: libvirt.virDomain, path: str, cap: int) -> cmdspec.Output:
    """The first `cap` bytes of the guest file `path` (OUTPUT_PIECE at a time) and its size;
    a file over cmdspec.TRIM_OVER bytes is emptied after. AgentError.

    Past the first piece the file's size is asked first and the buffer made at its final
    length: a buffer grown piece by piece may be copied whole when it moves."""
    handle = command(dom, "guest-file-open", {"path": path, "mode": "rb"})

    def read(count: int) -> tuple[bytes, bool]:
        res = command(dom, "guest-file-read", {"handle": handle, "count": count}, timeout=60)
        return (base64.b64decode(res.get("buf-b64", "")),
                bool(res.get("eof")) or not res.get("count"))

    def seek(offset: int, whence: str) -> int:
        return command(dom, "guest-file-seek",
                       {"handle": handle, "offset": offset, "whence": whence})["position"]

    try:
        first, eof = read(min(OUTPUT_PIECE, cap))
        if eof or len(first) >= cap:
            size = len(first) if eof else seek(0, "end")
            return _trimmed(dom, path, cmdspec.Output(first, size))
        size = seek(0, "end")
        seek(len(first), "set")
        data = bytearray(min(size, cap))
        data[:len(first)] = first
        got = len(first)
        while got < len(data) and not eof:
            piece, eof = read(min(OUTPUT_PIECE, len(data) - got))
            data[got:got + len(piece)] = piece
            got += len(piece)
        del data[got:]  # a file that shrank meanwhile
    finally:
        command(dom, "guest-file-close", {"handle": handle})
    return _trimmed(dom, path, cmdspec.Output(data, max(size, got)))


def _trimmed(dom: libvirt.virDomain, path: str, out: cmdspec.Output) -> cmdspec.Output:
    """`out`, after emptying the guest file `path` when it is over cmdspec.TRIM_OVER."""
    if out.size > cmdspec.TRIM_OVER:
        command(dom, "guest-file-close",
                {"handle": command(dom, "guest-file-open", {"path": path, "mode": "wb"})})
    return out


def write_file(dom: libvirt.virDomain, path: str, data: bytes | Iterable[bytes],
               mode: str = "w") -> None:
    """Write `data` (bytes, or pieces of them taken one at a time) to the guest file
    `path` (opened in binary `mode`, default "w"), WRITE_CHUNK bytes per agent call;
    AgentError."""
    handle = command(dom, "guest-file-open", {"path": path, "mode": mode + "b"})
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            for off in range(0, len(piece), WRITE_CHUNK):
                chunk = piece[off:off + WRITE_CHUNK]
                command(dom, "guest-file-write",
                        {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()},
                        timeout=60)
    finally:
        command(dom, "guest-file-close", {"handle": handle})


def open_file(dom: libvirt.virDomain, path: str, size: int) -> Iterator[bytes]:
    """The first `size` bytes of the guest file `path`, READ_CHUNK at a time: opened now
    (AgentError), read and closed as the pieces are taken (AgentError then too)."""
    handle = command(dom, "guest-file-open", {"path": path, "mode": "rb"})

    def pieces() -> Iterator[bytes]:
        got = 0
        try:
            while got < size:
                res = command(dom, "guest-file-read",
                              {"handle": handle, "count": min(READ_CHUNK, size - got)},
                              timeout=60)
                piece = base64.b64decode(res.get("buf-b64", ""))
                if piece:
                    got += len(piece)
                    yield piece
                if res.get("eof") or not res.get("count"):
                    break
        finally:
            with contextlib.suppress(AgentError):
                command(dom, "guest-file-close", {"handle": handle})

    return pieces()


def read_file(dom: libvirt.virDomain, path: str) -> bytes:
    """The bytes of the guest file `path`, read in READ_CHUNK pieces; AgentError."""
    handle = command(dom, "guest-file-open", {"path": path, "mode": "rb"})
    out = bytearray()
    try:
        while True:
            res = command(dom, "guest-file-read", {"handle": handle, "count": READ_CHUNK},
                          timeout=60)
            out += base64.b64decode(res.get("buf-b64", ""))
            if res.get("eof") or not res.get("count"):
                break
    finally:
        command(dom, "guest-file-close", {"handle": handle})
    return bytes(out)
