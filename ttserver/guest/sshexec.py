"""Run commands and copy files over SSH with the server's own key (`--use-ssh`).

argv goes straight to the ssh binary: the command string is interpreted only by the guest's
shell, never by a host shell. File copies are `cat` over the SSH channel (no scp/sftp
needed in the guest), with paths quoted by shlex for the guest's shell.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ttclient.waiting import wait_for

from .agent import ExecResult, bounded, settle_timeout

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


@dataclass
class _Raw:
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    seconds: float


@dataclass
class Target:
    """Where SSH goes: the private key, host and TCP port of a guest's sshd (as root),
    and the known_hosts file that pins its ed25519 host key under the name `alias`."""

    key: Path
    host: str
    port: int
    known_hosts: Path
    alias: str

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


def _once(t: Target, cmd: str, timeout: float, stdin: bytes | None) -> _Raw:
    argv = [*t.options(), "root@" + t.host, cmd]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=max(timeout, 1.0),
                              input=stdin if stdin is not None else b"")
    except subprocess.TimeoutExpired as exc:
        return _Raw(None, exc.stdout or b"", exc.stderr or b"", True,
                    time.monotonic() - started)
    return _Raw(proc.returncode, proc.stdout, proc.stderr, False, time.monotonic() - started)


def _with_retry(t: Target, cmd: str, timeout: float, stdin: bytes | None = None) -> _Raw:
    """Run once, retrying while sshd in a fresh VM is not listening yet."""
    started = time.monotonic()

    def attempt() -> _Raw | None:
        res = _once(t, cmd, timeout - (time.monotonic() - started), stdin)
        res.seconds = waited = time.monotonic() - started
        not_up = res.exit_code == 255 and any(m in res.stderr.decode(errors="replace")
                                              for m in NOT_YET_UP)
        return None if not_up and waited < min(SSHD_GRACE, timeout - 1) else res

    # the attempt itself says when the grace is over: the timeout is only a backstop
    return wait_for(attempt, timeout + SSHD_GRACE, interval=1, what="sshd answering")


def run(t: Target, cmd: str, timeout: float) -> ExecResult:
    """`cmd` under the guest's own `timeout` (as through the agent): without a TTY, sshd
    leaves a command running when our ssh client gives up, so the guest must end it."""
    res = _with_retry(t, shlex.join(bounded(cmd, timeout)), timeout + 5)
    return settle_timeout(ExecResult(res.exit_code, res.stdout.decode(errors="replace"),
                                     res.stderr.decode(errors="replace"), res.timed_out,
                                     res.seconds), timeout)


class CopyError(RuntimeError):
    """A copy over SSH failed or timed out; the message has the last line of ssh's error."""
    pass


def _check(res: _Raw, what: str) -> None:
    if res.timed_out:
        raise CopyError(f"{what}: timed out after {res.seconds:.0f}s")
    if res.exit_code != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise CopyError(f"{what}: {err[-1] if err else f'exit {res.exit_code}'}")


def write_file(t: Target, path: str, data: bytes, mode: int, timeout: float) -> None:
    """Write `data` to the guest's `path` and set its `mode`, within `timeout` seconds;
    CopyError."""
    cmd = f"cat > {shlex.quote(path)} && chmod {mode:o} {shlex.quote(path)}"
    _check(_with_retry(t, cmd, timeout, data), f"write {path}")


def read_file(t: Target, path: str, timeout: float) -> bytes:
    """The bytes of the guest's file at `path`, read within `timeout` seconds; CopyError."""
    res = _with_retry(t, f"cat -- {shlex.quote(path)}", timeout)
    _check(res, f"read {path}")
    return res.stdout
