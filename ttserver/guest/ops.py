"""Commands, files and consoles of an ENV's running VMs: which VMs a request means, the
guest access itself (through guestio, agent or SSH), and one result per VM.

A VM that cannot be reached gives an error result with its console tail instead of
failing the whole request, so a command never silently runs on fewer VMs than asked.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ttclient.contract import MAX_UPLOAD, Download, Upload

from ..db import StateDB, VMRow
from ..errors import BadRequest, Conflict, NotFound, TTError
from ..states import FAILED, READY, RUNNING, STOPPED
from ..views import vm_ref, vm_refs
from ..vm.libvirt_domains import console_tail
from .command import Outcome, Output
from .transport import GuestError, GuestIO

GUEST_PATH = re.compile(r"/[^\0]{0,4095}")  # fullmatch
MAX_PARALLEL_RUNS = 16
NOT_RUN = Outcome(None, None, Output(b"", 0), Output(b"", 0), False, 0.0)
# File copies move whole files through one agent channel or SSH session each; a few at a
# time keep the host responsive (and the agent channels from starving each other).
MAX_PARALLEL_COPIES = 4

# files stat says are this small are read whole before the answer (see GuestOps._small)
SMALL_FILE = 1 << 20

class GuestOps:
    """run / push / pull / console on the VMs of ENVs recorded in `db`, through `io`."""

    def __init__(self, db: StateDB, io: GuestIO) -> None:
        self.db = db
        self.io = io

    def running_vms(self, name: str, only: list[str] | None = None) -> list[VMRow]:
        """The ENV's running VMs (and the failed ones of a running ENV, which get error
        results), narrowed to VM ids, names or indexes in `only`. NotFound for an unknown
        ENV or VM; Conflict when the ENV is not running."""
        env = self.db.get_env(name)
        if env is None:
            raise NotFound(f"ENV {name!r} does not exist")
        if env.state != READY:
            raise Conflict(f"ENV {name!r} is {env.state}, not running"
                           + (f": {env.error.splitlines()[0]}" if env.error else ""))
        # a running ENV's failed VMs were lost in a server restart: they get error rows,
        # so a command never silently runs on fewer VMs than the ENV has
        # (and its stopped ones: their guest powered off while the ENV ran)
        vms = [vm for vm in env.vms if vm.state in (RUNNING, FAILED, STOPPED)]
        if only:
            refs = set(only)
            picked = [vm for vm in vms if refs & vm_refs(vm)]
            unknown = sorted(refs.difference(*map(vm_refs, picked)))
            if unknown:
                raise NotFound(f"ENV {name!r} has no running VM {', '.join(unknown)}")
            vms = picked
        return vms

    def console(self, name: str, vm: str, lines: int) -> str:
        """The last `lines` (1..2000) lines of the VM's serial console; NotFound."""
        env = self.db.get_env(name)
        if env is None:
            raise NotFound(f"ENV {name!r} does not exist")
        for row in env.vms:
            if vm in vm_refs(row):
                return console_tail(Path(row.dir) / "console.log", max(1, min(lines, 2000)))
        raise NotFound(f"ENV {name!r} has no VM {vm!r}")

    def run(self, name: str, cmd: str, use_ssh: bool, timeout: float,
            only: list[str] | None = None, binary: bool = False) -> list[dict]:
        """`cmd` in each selected VM's /bin/sh, in parallel: one result per VM
        (views.vm_ref + the fields of ttclient.contract.CommandResult; `binary`: output
        as base64 bytes). BadRequest for an empty command or a timeout outside
        1..86400 s."""
        if not cmd.strip():
            raise BadRequest("cmd is empty")
        if not 1 <= timeout <= 24 * 3600:
            raise BadRequest("timeout must be 1..86400 seconds")
        vms = self.running_vms(name, only)

        def one(vm: VMRow) -> dict:
            try:
                _check_alive(vm)
                res = self.io.run(vm, cmd, timeout, use_ssh)
                return {**vm_ref(vm), **res.fields(binary), "error": ""}
            except GuestError as exc:
                return {**vm_ref(vm), **NOT_RUN.fields(binary), "error": f"{exc}\n"
                        f"console tail:\n{console_tail(Path(vm.dir) / 'console.log')}"}

        return _fan_out(vms, one, MAX_PARALLEL_RUNS)

    def push(self, name: str, path: str, data: Upload, mode: int | None,
             only: list[str] | None = None, use_ssh: bool = False) -> list[dict]:
        """Write `data` to the absolute guest `path` of each selected VM: one result per
        VM (views.vm_ref + bytes, seconds, error). BadRequest for a relative path."""
        _check_guest_path(path)
        vms = self.running_vms(name, only)

        def one(vm: VMRow) -> dict:
            started = time.monotonic()
            try:
                _check_alive(vm)
                self.io.write(vm, path, data, mode, use_ssh)
                return {**vm_ref(vm), "bytes": data.size, "error": "",
                        "seconds": round(time.monotonic() - started, 3)}
            except GuestError as exc:
                return {**vm_ref(vm), "bytes": 0, "error": str(exc),
                        "seconds": round(time.monotonic() - started, 3)}

        return _fan_out(vms, one, MAX_PARALLEL_COPIES)

    def pull(self, name: str, vm: str, path: str, use_ssh: bool = False) -> Download:
        """The absolute guest `path` in one VM, read a piece at a time as it is sent (its
        size as `stat` gave it, and at most that many bytes); TTError (404) when it cannot
        be read, BadRequest when it is not a regular file, 413 over MAX_UPLOAD."""
        _check_guest_path(path)
        row = self.running_vms(name, [vm])[0]
        try:
            _check_alive(row)
            kind, size = self._file_kind(row, path, use_ssh)
        except GuestError as exc:
            raise TTError(f"cannot read {path} from {vm}: {exc}", status=404) from exc
        if kind not in ("regular file", "regular empty file"):  # /dev/zero, a FIFO:
            raise BadRequest(f"cannot get {path} from {vm}: it is a {kind}, not a regular "
                             f"file (copy it to a file first, e.g. with 'tt env run')")
        if size > MAX_UPLOAD:  # the same ceiling as a push's body
            raise TTError(f"cannot get {path} from {vm}: it is {size} bytes, over the "
                          f"{MAX_UPLOAD} bytes a get may carry (split it in the guest, or "
                          f"copy it with scp)", status=413)
        try:
            if size <= SMALL_FILE:
                return self._small(row, vm, path, size, use_ssh)
            return Download(size, self.io.open_read(row, path, size, use_ssh))
        except GuestError as exc:
            raise TTError(f"cannot read {path} from {vm}: {exc}", status=404) from exc

    def _small(self, row: VMRow, vm: str, path: str, size: int, use_ssh: bool) -> Download:
        """A file stat says is at most SMALL_FILE bytes, read whole before the answer
        starts: files of /proc say 0 and hold more, files of /sys say 4096 and hold less,
        and a streamed answer has promised its length before the first byte."""
        res = self.io.run(row, f"head -c {SMALL_FILE + 1} -- {shlex.quote(path)}", 60,
                          use_ssh, cap=SMALL_FILE + 1)
        if res.exit_code != 0:
            raise GuestError(bytes(res.stderr.data).decode(errors="replace").strip()
                             or f"head failed (exit {res.exit_code})")
        data = bytes(res.stdout.data)
        if len(data) > SMALL_FILE:
            raise TTError(f"cannot get {path} from {vm}: it says it is {size} bytes but "
                          f"holds more than {SMALL_FILE} (a file that grows, or a kernel "
                          f"file): copy it to a file first", status=413)
        return Download(len(data), iter([data]))

    def _file_kind(self, vm: VMRow, path: str, use_ssh: bool) -> tuple[str, int]:
        """(stat's file type of the guest `path`, links followed — "regular file",
        "directory", "character special file", "fifo", ... — and its size in bytes);
        GuestError when it does not exist or cannot be examined."""
        res = self.io.run(vm, f"stat -L -c '%F|%s' -- {shlex.quote(path)}", 30, use_ssh,
                          cap=64 * 1024)
        kind, _, size = bytes(res.stdout.data).decode(errors="replace").strip().rpartition("|")
        if res.exit_code != 0 or not size.isdigit():
            raise GuestError(bytes(res.stderr.data).decode(errors="replace").strip()
                             or f"stat failed (exit {res.exit_code})")
        return kind, int(size)


def _fan_out(vms: list[VMRow], fn: Callable[[VMRow], dict], limit: int) -> list[dict]:
    with ThreadPoolExecutor(max_workers=min(limit, max(1, len(vms)))) as pool:
        return list(pool.map(fn, vms))


def _check_alive(vm: VMRow) -> None:
    if vm.state != RUNNING:
        raise GuestError(f"VM is {vm.state}: {vm.error}")


def _check_guest_path(path: str) -> None:
    if not GUEST_PATH.fullmatch(path):
        raise BadRequest(f"guest path {path!r} must be absolute")
