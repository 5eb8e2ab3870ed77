"""Run commands over SSH with the server's own key (`tt env run --use-ssh`).

argv goes straight to the ssh binary: the command string is interpreted only by the guest's
shell, never by a host shell.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .agent import ExecResult

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def ensure_key(key: Path) -> str:
    """Create the server's SSH key once; return the public key line to put into guests."""
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ttserver",
                        "-f", str(key)], check=True, timeout=30)
    return Path(str(key) + ".pub").read_text().strip()


# sshd starts a few seconds after the guest agent; until then connections are reset.
NOT_YET_UP = ("Connection refused", "Connection reset", "kex_exchange_identification",
              "Connection closed")
SSHD_GRACE = 60.0


def run(key: Path, host: str, port: int, cmd: str, timeout: float) -> ExecResult:
    """Run cmd over SSH, retrying while sshd in a fresh VM is not listening yet."""
    started = time.monotonic()
    while True:
        res = _run_once(key, host, port, cmd, timeout - (time.monotonic() - started))
        waited = time.monotonic() - started
        if (res.exit_code == 255 and any(m in res.stderr for m in NOT_YET_UP)
                and waited < min(SSHD_GRACE, timeout - 1)):
            time.sleep(1)
            continue
        res.seconds = waited
        return res


def _run_once(key: Path, host: str, port: int, cmd: str, timeout: float) -> ExecResult:
    argv = ["ssh", "-i", str(key), *SSH_OPTS, "-p", str(port), "root@" + host, cmd]
    started = time.monotonic()
    timeout = max(timeout, 1.0)
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return ExecResult(None, (exc.stdout or b"").decode(errors="replace"),
                          (exc.stderr or b"").decode(errors="replace"), True,
                          time.monotonic() - started)
    return ExecResult(proc.returncode, proc.stdout.decode(errors="replace"),
                      proc.stderr.decode(errors="replace"), False, time.monotonic() - started)
