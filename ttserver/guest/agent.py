"""Talk to qemu-guest-agent through libvirt: ping, run a command, read and write files.

The agent is the default way in because it needs no network inside the VM and answers as
soon as the guest's userspace is up (seconds before sshd). Every call has a deadline.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from ttclient.waiting import WaitTimeout, wait_for

# Bytes per guest-file-write: larger messages (~200 KiB+ of base64) to the guest make the
# agent channel stall under libvirt 9 / qemu-ga 7 (measured), so writes go in small chunks.
WRITE_CHUNK = 96 * 1024
READ_CHUNK = 1 << 20  # replies from the guest have no such limit


class AgentError(RuntimeError):
    """The guest agent did not answer or refused a command; the message has libvirt's error."""
    pass


@dataclass
class ExecResult:
    """A command's outcome: exit code (the signal number when killed, None when it did not
    finish), output as text, whether it timed out, and its seconds."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    def to_dict(self) -> dict:
        """The fields as a dict, `seconds` rounded to milliseconds."""
        return {"exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr,
                "timed_out": self.timed_out, "seconds": round(self.seconds, 3)}


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
    pid = command(dom, "guest-exec", args)["pid"]

    def exited() -> ExecResult | None:
        status = command(dom, "guest-exec-status", {"pid": pid})
        if not status.get("exited"):
            return None
        return ExecResult(status.get("exitcode", status.get("signal")),
                          _decode(status.get("out-data")), _decode(status.get("err-data")),
                          False, time.monotonic() - started)

    try:  # most commands take milliseconds in the guest: poll fast, then back off
        return wait_for(exited, timeout, interval=0.005, backoff=1.5, max_interval=0.1,
                        what=f"{argv[0]} in the guest")
    except WaitTimeout:
        return ExecResult(None, "", "", True, time.monotonic() - started)


def run_shell(dom: libvirt.virDomain, cmd: str, timeout: float) -> ExecResult:
    """Run a shell command line in the guest, as `tt env run --cmd` promises.

    The string goes to the *guest's* /bin/sh on purpose (pipes, globs and `cd` work as users
    expect); it never touches a host shell. coreutils `timeout` in the guest kills it at the
    deadline so nothing keeps running in the VM after we report a timeout.
    """
    return settle_timeout(exec_argv(dom, bounded(cmd, timeout), timeout=timeout + 5), timeout)


def bounded(cmd: str, timeout: float) -> list[str]:
    """argv running `cmd` in the guest's /bin/sh under coreutils `timeout`: the guest ends
    it at the deadline itself, whatever becomes of the channel we started it through."""
    return ["/usr/bin/timeout", "--kill-after=2", str(max(1, int(timeout))), "/bin/sh", "-c",
            cmd]


def settle_timeout(res: ExecResult, timeout: float) -> ExecResult:
    """A `bounded` command that `timeout` ended (124 at the deadline) timed out."""
    if res.exit_code == 124 and res.seconds >= timeout - 0.5:
        res.timed_out = True
    if res.timed_out:
        res.exit_code = None  # the command never finished: it has no exit code
    return res


def write_file(dom: libvirt.virDomain, path: str, data: bytes, mode: str = "w") -> None:
    """Write `data` to the guest file `path` (opened in binary `mode`, default "w"), in
    WRITE_CHUNK pieces; AgentError."""
    handle = command(dom, "guest-file-open", {"path": path, "mode": mode + "b"})
    try:
        for off in range(0, len(data), WRITE_CHUNK) or [0]:
            chunk = data[off:off + WRITE_CHUNK]
            command(dom, "guest-file-write",
                    {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()}, timeout=60)
    finally:
        command(dom, "guest-file-close", {"handle": handle})


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
