"""Native mode's transport: OpenSSH to each VM's forwarded SSH port.

A key pair is made per session (its public half goes into the ENV's `ssh_keys`); host
keys are learnt on first contact into a session-private known_hosts file (the VMs are
new, there is nothing to compare with), so `~/.ssh` is never read or written (`-F none`).
execnet starts an xdist worker through a `popen` gateway whose "python" is a small
wrapper script that runs the guest's venv Python over this transport: a `popen` spec
makes xdist send neither rsync nor path rewrites, which the `ssh=` spec would.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttclient.waiting import WaitCancelled, WaitTimeout, wait_for

CONNECT_TIMEOUT = 20
# A master's control socket path, as ssh binds it: the ControlPath with `%C` expanded (40
# hex digits) plus a 17-byte random suffix while it is being set up, in a sockaddr_un's
# 108-byte sun_path with its NUL (unix(7)). Longer, the master fails at every try ("too
# long for Unix domain socket") and the session waited its whole timeout.
SOCKET_PATH_MAX = 107
_CONTROL_SUFFIX = 17
_short_dirs: dict[str, Path] = {}
_short_lock = threading.Lock()


def _control_dir(session_dir: Path) -> Path:
    """Where the session's control sockets go: its own directory, or, when that path is
    too long for them, a private (0700) directory under /tmp made once per session
    directory and removed when the process exits."""
    if len(str(session_dir)) + len("/cm-65535-") + 40 + _CONTROL_SUFFIX <= SOCKET_PATH_MAX:
        return session_dir
    with _short_lock:
        short = _short_dirs.get(str(session_dir))
        if short is None:
            short = Path(tempfile.mkdtemp(prefix="ttcm-", dir="/tmp"))
            _short_dirs[str(session_dir)] = short
            atexit.register(shutil.rmtree, short, True)
        return short


def _ssh_value(value: object) -> str:
    """An ssh_config value as `-o` takes it: double-quoted, so that a path with spaces
    stays one value (ssh splits unquoted values at whitespace; UserKnownHostsFile even
    takes several files)."""
    return '"' + str(value).replace('"', '') + '"'


class _MasterEnded(Exception):
    """The master connection's ssh exited before it was up (sshd not listening yet)."""


class SSHError(Exception):
    """An ssh command failed; the message has the command's description and output.
    `returncode` is ssh's exit status: 255 when the connection itself failed."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def make_key(directory: Path) -> tuple[Path, str]:
    """(private key path, public key line) of a new ed25519 pair in `directory`."""
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ttstack-native",
                    "-f", str(key)], check=True, capture_output=True)
    return key, (directory / "id_ed25519.pub").read_text().strip()


@dataclass(frozen=True)
class SSHTarget:
    """One VM as `root@host:port`, reached with the session key."""

    host: str
    port: int
    key: Path
    known_hosts: Path

    @property
    def _control(self) -> str:
        return str(_control_dir(self.known_hosts.parent) / f"cm-{self.port}-%C")

    @property
    def destination(self) -> str:
        """`root@HOST`, the ssh destination."""
        return f"root@{self.host}"

    def options(self, master: bool = False) -> list[str]:
        """`ssh` and its options, without the destination.

        Commands go through the VM's master connection when it is open (OpenSSH
        ControlMaster, see `open_master`): an SSH handshake costs ~2 s under TCG, and
        xdist starts its gateways one at a time."""
        return ["ssh", "-F", "none", "-q", "-p", str(self.port), "-i", str(self.key),
                "-o", f"ControlMaster={'yes' if master else 'no'}",
                "-o", f"ControlPath={_ssh_value(self._control)}",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={_ssh_value(self.known_hosts)}",
                "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
                # a VM that stops answering (panic, OOM) ends its worker within a minute
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=6",
                "-o", "LogLevel=ERROR"]

    def argv(self, remote_command: str) -> list[str]:
        """The `ssh` command line that runs `remote_command` (a shell line) in the VM."""
        return [*self.options(), self.destination, remote_command]

    def run(self, remote_command: str, what: str, *, input: bytes | None = None,
            timeout: float = 300) -> str:
        """Run a shell line in the VM; returns its stdout; SSHError names `what` and the
        command's output when it fails or takes longer than `timeout` seconds."""
        return self._run(remote_command, what, input, subprocess.PIPE, timeout).decode(
            errors="replace")

    def fetch(self, remote_command: str, dest: Path, what: str, timeout: float = 300) -> None:
        """Run a shell line in the VM and write its stdout to `dest` (streamed)."""
        with open(dest, "wb") as out:
            self._run(remote_command, what, None, out, timeout)

    def _run(self, remote_command: str, what: str, input: bytes | None, stdout: Any,
             timeout: float) -> bytes:
        try:
            proc = subprocess.run(self.argv(remote_command), input=input, stdout=stdout,
                                  stderr=subprocess.PIPE, timeout=timeout)
        except FileNotFoundError as exc:
            raise SSHError("the OpenSSH client (ssh) is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise SSHError(f"{what}: no answer within {timeout:.0f}s") from exc
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip()
            tail = "\n".join(out.splitlines()[-25:])
            raise SSHError(f"{what} failed (exit {proc.returncode}):\n{tail}", proc.returncode)
        return proc.stdout or b""

    def open_master(self, timeout: float,
                    stop: threading.Event | None = None) -> subprocess.Popen:
        """Start the VM's master connection (`ssh -N`, owned by the caller, who ends it
        with `terminate()`); retried while sshd is not up yet. SSHError after `timeout` s,
        or as soon as `stop` is set."""
        deadline = time.monotonic() + timeout
        stop = stop or threading.Event()
        check = [*self.options(), "-O", "check", self.destination]
        where = f"ssh to root@{self.host}:{self.port}"

        def connected(master: subprocess.Popen) -> bool | None:
            if master.poll() is not None:
                raise _MasterEnded  # sshd refused or is not up yet: start another
            try:
                return True if subprocess.run(check, capture_output=True,
                                              timeout=30).returncode == 0 else None
            except subprocess.TimeoutExpired:
                return None

        def one_master() -> subprocess.Popen | None:
            try:
                master = subprocess.Popen([*self.options(master=True), "-N", self.destination],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            except FileNotFoundError as exc:
                raise SSHError("the OpenSSH client (ssh) is not installed") from exc
            try:
                wait_for(lambda: connected(master), deadline - time.monotonic(),
                         interval=0.2, cancel=stop, what=where)
                return master
            except _MasterEnded:
                pass
            except BaseException:
                master.kill()
                master.wait()
                raise
            master.kill()
            master.wait()
            return None

        try:
            return wait_for(one_master, timeout, interval=1, cancel=stop, what=where)
        except WaitCancelled:
            raise SSHError(f"{where}: given up", 255) from None
        except WaitTimeout:
            raise SSHError(f"{where}: no connection within {timeout:.0f}s", 255) from None

    def write_python_wrapper(self, path: Path, python: str, cwd: str) -> Path:
        """A script that behaves like `python` for execnet's popen gateway: it runs
        `python ARGS...` in the VM, in `cwd`, over this transport."""
        addopts = os.environ.get("PYTEST_ADDOPTS")  # ssh passes no environment
        env = f"PYTEST_ADDOPTS={shlex.quote(addopts)} " if addopts else ""
        prefix = f"cd {shlex.quote(cwd)} && {env}exec {shlex.quote(python)} "
        # two files: a kernel reads a shebang line up to its first space, so the Python
        # that runs the wrapper's code is named by a /bin/sh script, quoted
        code = path.with_name(path.name + ".py")
        code.write_text(
            "# ttstack native mode: execnet's 'python' for one VM (see ssh.py)\n"
            "import os, shlex, sys\n"
            f"argv = {[*self.options(), self.destination]!r}\n"
            f"os.execvp(argv[0], argv + [{prefix!r} + shlex.join(sys.argv[1:])])\n")
        path.write_text("#!/bin/sh\n"
                        f"exec {shlex.quote(sys.executable)} {shlex.quote(str(code))} \"$@\"\n")
        path.chmod(0o700)
        return path
