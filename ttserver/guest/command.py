"""How a user's command runs in a guest, the same through the agent and over SSH.

The guest runs, with no process besides the two it always took (coreutils `timeout` and
/bin/sh):

    timeout --kill-after=2 T /bin/sh -c 'exec >OUT 2>ERR </dev/null; export TTSTACK_RUN=ID;
                                         eval "set --; $CMD"'

- Output goes to two files in the guest (`/var/tmp/ttstack-run-<slot>.out|.err`), never
  through the agent's or SSH's own pipes: the server reads at most `cap` bytes of each,
  in pieces, so what a command prints cannot break the agent (qemu-ga answers its
  guest-exec capture in one message, which libvirt refuses above about 3 MiB) nor fill
  the server's memory, and bytes stay bytes.
- The run ends when the shell exits: background children hold the files, not a pipe the
  transport waits on (`sleep 60 & echo started` returns at once; the child lives on).
- On a timeout, `timeout` ends the shell's process group (TERM, then KILL 2 s later), and a
  sweep kills every process that still carries the run's `TTSTACK_RUN` cookie in its
  environment (`setsid` children included), the technique of Jenkins' ProcessTreeKiller.
- A command longer than ARGV_SAFE bytes once shell-quoted (Linux limits one argv string
  to 128 KiB, MAX_ARG_STRLEN) is written to `<slot>.sh` first and read with the shell's `.`.
- Through the agent the command gets root's HOME, PATH and working directory (/root), as
  over SSH.
- A command killed by signal n exits 128+n, as shells report it; through the agent the
  signal is known exactly (timeout re-raises it, qemu-ga reports it), over SSH it is
  inferred from a status above 128 (OpenSSH's client does not pass exit-signal on).

Slots are numbered per VM and reused, so the guest keeps two small files per concurrent
run rather than one set per run ever made; files over TRIM_OVER bytes are emptied after
they are read.
"""

from __future__ import annotations

import itertools
import secrets
import shlex
import threading
from dataclasses import dataclass

from ttclient.jsonstream import Base64, Buffer, Text

from ..db import VMRow

RUN_DIR = "/var/tmp"
ARGV_SAFE = 96 * 1024  # bytes; Linux's MAX_ARG_STRLEN is 128 KiB per argv string
TRIM_OVER = 1 << 20  # output files larger than this are emptied once read
KILL_AFTER = 2  # seconds between timeout's TERM and KILL
COOKIE = "TTSTACK_RUN"

# the shell's status also goes to <slot>.status at its exit: a run whose agent went away
# (the command rebooted the guest) still learns how the command ended
# The files are removed first: a background child of an earlier run in the same slot
# still holds the old ones open, and truncating them in place let it write on into the
# new run's output (behind a run of NULs, at its old offset). The agent starts commands
# with no HOME, cwd / and systemd's PATH; they get what an SSH login as root has.
_PROLOGUE = ('rm -f "$1" "$2"; '
             '[ -n "$HOME" ] || { export HOME=/root '
             'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; '
             'cd /root 2>/dev/null; }; '
             f'exec >"$1" 2>"$2" </dev/null; export {COOKIE}="$3"; '
             "__tt_status=${1%.out}.status; : >\"$__tt_status\"; "
             "trap 'echo $? >\"$__tt_status\"' EXIT; ")
INLINE_SCRIPT = _PROLOGUE + 'eval "set --; $4"'
FILE_SCRIPT = _PROLOGUE + '__tt_cmd_file=$4; set --; . "$__tt_cmd_file"'
# every process whose environment holds the cookie, killed until none is left
SWEEP_SCRIPT = (f'for round in 1 2 3 4 5; do found=; '
                f'for f in $(grep -lszxF "{COOKIE}=$1" /proc/[0-9]*/environ); do '
                'p=${f#/proc/}; p=${p%/environ}; kill -9 "$p" 2>/dev/null && found=1; done; '
                '[ -n "$found" ] || exit 0; sleep 0.2; done')


@dataclass
class RunSpec:
    """One run of `cmd` in a guest: its deadline (s), the output cap (bytes per stream),
    the guest paths of its files and its cookie."""

    cmd: str
    timeout: float
    cap: int
    slot: int
    cookie: str

    @property
    def out_path(self) -> str:
        return f"{RUN_DIR}/ttstack-run-{self.slot}.out"

    @property
    def err_path(self) -> str:
        return f"{RUN_DIR}/ttstack-run-{self.slot}.err"

    @property
    def status_path(self) -> str:
        return f"{RUN_DIR}/ttstack-run-{self.slot}.status"

    @property
    def cmd_file(self) -> str | None:
        """Where the command is written first when it is too long for an argv string."""
        # measured as SSH sends it: shell-quoted inside one remote command line, where
        # each ' takes four bytes
        if len(shlex.quote(self.cmd).encode()) <= ARGV_SAFE:
            return None
        return f"{RUN_DIR}/ttstack-run-{self.slot}.sh"

    def argv(self) -> list[str]:
        """What the guest executes (the command is in the file when cmd_file is set)."""
        script, last = ((INLINE_SCRIPT, self.cmd) if self.cmd_file is None
                        else (FILE_SCRIPT, self.cmd_file))
        return ["/usr/bin/timeout", f"--kill-after={KILL_AFTER}",
                str(max(1, int(self.timeout))), "/bin/sh", "-c", script, "sh",
                self.out_path, self.err_path, self.cookie, last]

    def sweep_argv(self) -> list[str]:
        """Kills what is left of this run (after a timeout)."""
        return ["/bin/sh", "-c", SWEEP_SCRIPT, "sh", self.cookie]


@dataclass
class Output:
    """What a command printed on one stream: the first `cap` bytes (`data`) and how many
    it printed in all (`size`)."""

    data: Buffer
    size: int

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)


@dataclass
class Outcome:
    """A command's outcome. `exit_code` is 128+n when signal n ended it and None when it
    did not finish (`timed_out`); `seconds` is wall time seen by the server."""

    exit_code: int | None
    signal: int | None
    stdout: Output
    stderr: Output
    timed_out: bool
    seconds: float

    def fields(self, binary: bool = False) -> dict:
        """The API's fields of a result (ttclient.contract.CommandResult) for
        ttclient.jsonstream, which writes the output without copying it: text with bytes
        that are not UTF-8 escaped as \\xNN (`escaped`, added by jsonstream), or with
        `binary` the exact bytes in base64 (`stdout_b64`, `stderr_b64`) and empty text."""
        fields: dict = {"exit_code": self.exit_code, "signal": self.signal,
                        "timed_out": self.timed_out, "seconds": round(self.seconds, 3),
                        "truncated": self.stdout.truncated or self.stderr.truncated,
                        "stdout_bytes": self.stdout.size, "stderr_bytes": self.stderr.size}
        if binary:
            return {**fields, "stdout": "", "stderr": "", "escaped": False,
                    "stdout_b64": Base64(self.stdout.data),
                    "stderr_b64": Base64(self.stderr.data)}
        return {**fields, "stdout_b64": None, "stderr_b64": None,
                "stdout": Text(self.stdout.data), "stderr": Text(self.stderr.data)}


def signal_of(status: int) -> int | None:
    """The signal a shell's exit status of 129..192 (128+n) stands for, else None: all
    that can be known where only the status came back (over SSH; a status file)."""
    return status - 128 if 128 < status <= 128 + 64 else None


def settle(exit_code: int | None, signal: int | None, seconds: float,
           timeout: float) -> tuple[int | None, int | None, bool]:
    """(exit code, signal, timed out) of a run from what ended `timeout`: 124 when it
    ended the command at the deadline, KILL (137) when the command ignored TERM."""
    timed_out = exit_code is None or (
        (exit_code == 124 or exit_code == 128 + 9) and seconds >= timeout - 0.5)
    if timed_out:
        return None, None, True
    return exit_code, signal, False


class Slots:
    """Slot numbers per VM id, lowest free first; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[str, set[int]] = {}

    def acquire(self, vm: VMRow) -> tuple[int, str]:
        """(a free slot of the VM, a random cookie for this run)."""
        with self._lock:
            busy = self._busy.setdefault(vm.id, set())
            slot = next(n for n in itertools.count() if n not in busy)
            busy.add(slot)
            return slot, secrets.token_hex(8)

    def release(self, vm: VMRow, slot: int) -> None:
        with self._lock:
            busy = self._busy.get(vm.id, set())
            busy.discard(slot)
            if not busy:
                self._busy.pop(vm.id, None)
