"""Run commands and copy files over SSH with the server's own key (`--use-ssh`), or over
any other way into a guest's shell (a `Shell`: a container's namespaces).

argv goes straight to the ssh binary: the command string is interpreted only by the guest's
shell, never by a host shell. File copies are `cat` over the SSH channel (no scp/sftp
needed in the guest), with paths quoted by shlex for the guest's shell.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from ttclient.contract import Upload
from ttclient.waiting import wait_for

from . import command as cmdspec
from . import placing

SSH_OPTS = ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
# the guest's SSH host key, pinned (read through the guest agent, or made by the server)
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"


def ensure_key(key: Path) -> str:
    """Create the server's SSH key once; return the public key line to put into guests."""
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ttserver",
                        "-f", str(key)], check=True, timeout=30)
    return Path(str(key) + ".pub").read_text().strip()


def host_key_pair(comment: str) -> tuple[bytes, str]:
    """A fresh ed25519 SSH host key (private key file bytes, public key line)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{comment}",
                        "-f", str(path)], check=True, timeout=30, capture_output=True)
        return path.read_bytes(), Path(str(path) + ".pub").read_text().strip()


# sshd starts a few seconds after the guest agent; until then connections are reset.
NOT_YET_UP = ("Connection refused", "Connection reset", "kex_exchange_identification",
              "Connection closed")
SSHD_GRACE = 60.0
READ_PIECE = 1 << 20
# what a session may send on a stream beyond what its command says it will: a guest's
# root can replace the commands that cap it (head, stat, sh), and reading on kept all of
# it in the server (800 MiB of output: 1.7 GB of server memory)
SMALL_OUTPUT = 1 << 20
ERR_KEPT = 4096  # of a copy's or a helper command's stderr: its error is in its last line
ERR_GRACE = 2.0  # seconds stderr may stay open after stdout ended


@dataclass
class _Raw:
    exit_code: int | None
    stdout: bytes | bytearray
    stderr: bytes | bytearray
    timed_out: bool
    seconds: float
    overflow: bool = False  # it sent more than its limit: killed, the rest not read


@dataclass
class Target:
    """Where SSH goes: the private key, host and TCP port of a guest's sshd (as root),
    and the known_hosts file that pins its ed25519 host key under the name `alias`."""

    key: Path
    host: str
    port: int
    known_hosts: Path
    alias: str

    what = "ssh"  # how errors name this way in

    def argv(self, cmd: str) -> list[str]:
        """ssh running `cmd` in root's login shell on the guest."""
        return [*self.options(), "root@" + self.host, cmd]

    def options(self) -> list[str]:
        """ssh's arguments up to the destination: only the pinned host key is accepted
        (values double-quoted: ssh splits them at whitespace)."""
        return ["ssh", "-i", str(self.key), *SSH_OPTS, "-o", "StrictHostKeyChecking=yes",
                "-o", f'UserKnownHostsFile="{self.known_hosts}"',
                "-o", f"HostKeyAlias={self.alias}", "-o", "HostKeyAlgorithms=ssh-ed25519",
                "-p", str(self.port)]


def known_hosts_line(alias: str, public_key: str) -> str:
    """The known_hosts line pinning `public_key` (an OpenSSH public key line: type, key,
    comment) under `alias`; ValueError for anything that is not one ed25519 key."""
    parts = public_key.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519" or "\n" in public_key.strip():
        raise ValueError(f"not an ed25519 host key: {public_key[:80]!r}")
    return f"{alias} {parts[0]} {parts[1]}\n"


class Shell(Protocol):
    """A way to run a command string in a guest's shell as root: SSH (Target) or entering
    a container's namespaces (guest/transport.py ContainerTransport)."""

    what: str  # how an error names it: "ssh", "container"

    def argv(self, cmd: str) -> list[str]:
        """The host command that runs `cmd` in the guest's /bin/sh."""


def _once(t: Shell, cmd: str, timeout: float, stdin: bytes | Upload | None,
          limit: int) -> _Raw:
    """One session: its output read into growing buffers as it arrives, so what it
    sends is held once (subprocess.communicate joins a list of pieces: twice, briefly);
    killed once stdout passes `limit` bytes or stderr SMALL_OUTPUT (`overflow`)."""
    argv = t.argv(cmd)
    started = time.monotonic()
    deadline = started + max(timeout, 1.0)
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdin and proc.stdout and proc.stderr
        feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin or b""), daemon=True)
        feeder.start()
        out, err = bytearray(), bytearray()
        buffers = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        with selectors.DefaultSelector() as sel:
            for pipe in (proc.stdout, proc.stderr):
                sel.register(pipe, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    return _Raw(None, out, err, True, time.monotonic() - started)
                for key, _ in sel.select(left):
                    piece = os.read(key.fd, READ_PIECE)
                    if piece:
                        buffers[key.fd] += piece
                    else:
                        sel.unregister(key.fileobj)
                if len(out) > limit or len(err) > SMALL_OUTPUT:
                    proc.kill()
                    return _Raw(None, out, err, False, time.monotonic() - started, True)
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            return _Raw(None, out, err, True, time.monotonic() - started)
    return _Raw(code, out, err, False, time.monotonic() - started)


def _feed(pipe: IO[bytes], data: bytes | Upload) -> None:
    with contextlib.suppress(OSError), pipe:  # ssh ended early: its error says why
        for piece in [data] if isinstance(data, bytes) else data.pieces():
            pipe.write(piece)


def _with_retry(t: Shell, cmd: str, timeout: float, stdin: bytes | Upload | None = None,
                limit: int = SMALL_OUTPUT) -> _Raw:
    """Run once, retrying while sshd in a fresh VM is not listening yet; `limit`: the
    most stdout a session may send (_once)."""
    started = time.monotonic()

    def attempt() -> _Raw | None:
        res = _once(t, cmd, timeout - (time.monotonic() - started), stdin, limit)
        res.seconds = waited = time.monotonic() - started
        not_up = res.exit_code == 255 and any(m in res.stderr.decode(errors="replace")
                                              for m in NOT_YET_UP)
        return None if not_up and waited < min(SSHD_GRACE, timeout - 1) else res

    # the attempt itself says when the grace is over: the timeout is only a backstop
    return wait_for(attempt, timeout + SSHD_GRACE, interval=1, what="sshd answering")


HEADER = b"ttstack-run"


def run_command(t: Shell, spec: cmdspec.RunSpec) -> cmdspec.Outcome:
    """Run a user's command in the guest as guest/command.py describes, in one SSH session
    that also sends back at most `spec.cap` bytes of each stream; OSError when ssh fails.

    The login shell of root removes the run's output files, runs the run, then prints
    `ttstack-run STATUS OUT ERR` (the status and the sizes of both output files, `-` for
    a file the run did not make) and the files' first bytes. A run that made neither
    file never started its shell (`timeout` could not fork, say): its stderr is what the
    session printed there, not an earlier run's file. Without a TTY sshd leaves a
    command running when our ssh client gives up, so the guest's `timeout` ends it. The
    signal is inferred from a status over 128 (OpenSSH's client drops exit-signal)."""
    q = shlex.quote
    out, err = q(spec.out_path), q(spec.err_path)
    size = "{v}=$(stat -c %s -- {f} 2>/dev/null) || {v}=-; "
    head = ('[ "${v}" = - ] || {{ n=${v}; [ "$n" -gt {cap} ] && n={cap}; '
            'head -c "$n" -- {f} 2>/dev/null; }}; ')
    trim = '[ "${v}" != - ] && [ "${v}" -gt {over} ] && : > {f}; '
    script = (f"rm -f -- {out} {err}; "
              + (f"cat > {q(spec.cmd_file)} || exit 125; " if spec.cmd_file else "")
              + shlex.join(spec.argv()) + "; s=$?; "
              + size.format(v="o", f=out) + size.format(v="e", f=err)
              + f"printf '{HEADER.decode()} %s %s %s\\n' \"$s\" \"$o\" \"$e\"; "
              + head.format(v="o", f=out, cap=spec.cap) + head.format(v="e", f=err, cap=spec.cap)
              + trim.format(v="o", f=out, over=cmdspec.TRIM_OVER)
              + trim.format(v="e", f=err, over=cmdspec.TRIM_OVER) + "exit 0")
    stdin = spec.cmd.encode() if spec.cmd_file else None
    res = _with_retry(t, script, spec.timeout + cmdspec.KILL_AFTER + 60, stdin,
                      limit=2 * spec.cap + 256)  # the header line, then both capped streams
    if res.overflow:
        raise OSError(f"{t.what}: the guest sent more than the run's output cap "
                      f"({spec.cap} bytes a stream): its head, stat or sh are not Debian's?")
    if res.timed_out:
        return cmdspec.Outcome(None, None, cmdspec.Output(b"", 0), cmdspec.Output(b"", 0),
                               True, res.seconds)
    line, sep, _rest = bytes(res.stdout[:200]).partition(b"\n")
    fields = line.split()
    if not sep or len(fields) != 4 or fields[0] != HEADER or not fields[1].isdigit() or not all(
            f.isdigit() or f == b"-" for f in fields[2:]):
        code = res.exit_code or 0
        raise OSError(f"{t.what}: " + (_last_line(res.stderr) or (
            f"killed by signal {-code}" if code < 0 else f"exit {code}")))
    status = int(fields[1])
    if fields[2:] == [b"-", b"-"]:  # the run's shell never started: the session says why
        stdout, stderr = cmdspec.Output(b"", 0), cmdspec.Output(
            bytes(res.stderr[:spec.cap]), len(res.stderr))
    else:
        out_size, err_size = (int(f) if f.isdigit() else 0 for f in fields[2:])
        n_out, n_err = min(out_size, spec.cap), min(err_size, spec.cap)
        body = memoryview(res.stdout)[len(line) + 1:]  # slices of the buffer, not copies
        if len(body) < n_out + n_err:  # not a cut at the cap: the output never came
            raise OSError(f"{t.what}: the session ended {n_out + n_err - len(body)} bytes "
                          "short of the run's output (could the guest not start head?)")
        stdout = cmdspec.Output(body[:n_out], out_size)
        stderr = cmdspec.Output(body[n_out:n_out + n_err], err_size)
    exit_code, signal, timed_out = cmdspec.settle(
        status, cmdspec.signal_of(status), res.seconds, spec.timeout)
    if timed_out:
        _with_retry(t, shlex.join(spec.sweep_argv()), 30)
    return cmdspec.Outcome(exit_code, signal, stdout, stderr, timed_out, res.seconds)


def _last_line(err: bytes | bytearray) -> str:
    """The last non-empty line of a command's stderr ("" when it printed nothing): where
    ssh, sh and coreutils say what went wrong."""
    lines = bytes(err).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


class CopyError(RuntimeError):
    """A copy over SSH failed or timed out; the message has the last line of ssh's error."""
    pass


def _check(res: _Raw, what: str) -> None:
    if res.overflow:
        raise CopyError(f"{what}: the guest sent more output than the copy ever prints")
    if res.timed_out:
        raise CopyError(f"{what}: timed out after {res.seconds:.0f}s")
    if res.exit_code != 0:
        raise CopyError(f"{what}: {_last_line(res.stderr) or f'exit {res.exit_code}'}")


def write_file(t: Shell, path: str, data: Upload, mode: int | None,
               timeout: float) -> None:
    """Write `data` to the guest's `path` (from its file, a piece at a time) as
    guest/placing.py describes, with `mode` (None: the replaced file's, else 0644),
    within `timeout` seconds; CopyError."""
    res = _with_retry(t, placing.ssh_command(path, mode), timeout, data)
    if res.exit_code == placing.NOT_REGULAR:
        raise CopyError(placing.refusal(path, res.stderr.decode(errors="replace")))
    _check(res, f"write {path}")


def open_file(t: Shell, path: str, size: int, timeout: float) -> Iterator[bytes]:
    """The first `size` bytes of the guest file `path` (`head -c`), READ_PIECE at a time
    as they are taken, within `timeout` seconds; CopyError when ssh fails, ends short or
    runs out of time. Both streams are read against the deadline, and of stderr only its
    first ERR_KEPT bytes are kept: a guest root that replaced head sent 300 MiB there (the
    server held it all) and held the streams open (the read never ended)."""
    argv = t.argv(f"head -c {int(size)} -- {shlex.quote(path)}")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout

    def pieces() -> Iterator[bytes]:
        got, err = 0, bytearray()
        try:
            assert proc.stdout and proc.stderr
            with selectors.DefaultSelector() as sel:
                for pipe in (proc.stdout, proc.stderr):
                    sel.register(pipe, selectors.EVENT_READ)
                end = deadline
                while sel.get_map():
                    left = end - time.monotonic()
                    if left <= 0 and end < deadline:
                        break  # stdout ended: stderr had its grace
                    if left <= 0:
                        raise CopyError(f"read {path}: timed out after {timeout:.0f}s, "
                                        f"{got} of {size} bytes read")
                    for key, _ in sel.select(left):
                        piece = os.read(key.fd, READ_PIECE)
                        if not piece:
                            sel.unregister(key.fileobj)
                            if key.fileobj is proc.stdout:
                                end = min(deadline, time.monotonic() + ERR_GRACE)
                        elif key.fileobj is proc.stderr:
                            err += piece[:ERR_KEPT - len(err)]
                        elif got + len(piece) > size:  # never past the size declared
                            yield piece[:size - got]
                            raise CopyError(f"read {path}: the guest sent more than its "
                                            f"{size} bytes (its head is not Debian's?)")
                        else:
                            got += len(piece)
                            yield piece
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise CopyError(f"read {path}: timed out after {timeout:.0f}s") from None
            if code != 0 or got < size:
                raise CopyError(f"read {path}: {_last_line(err) or f'exit {code}'} "
                                f"after {got} of {size} bytes")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()

    return pieces()


def run_bounded(t: Shell, cmd: str, timeout: float) -> tuple[int | None, str]:
    """Run `cmd` once (its stdout must be small), within `timeout` seconds: its exit
    status (None when it ran out of time or sent too much) and the last line of the
    first ERR_KEPT bytes of its stderr."""
    res = _once(t, cmd, timeout, None, ERR_KEPT)
    return ((None if res.timed_out or res.overflow else res.exit_code),
            _last_line(res.stderr[:ERR_KEPT]))
