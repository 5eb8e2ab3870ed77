"""Choose KVM or TCG.

`/dev/kvm` existing is not proof that KVM boots guests: on PVM hosts (kvm_pvm) stock guest
kernels hang or abort. So `auto` really boots an image's kernel under KVM for a few seconds
and picks KVM only if it reaches its init; the verdict is cached per host kernel and guest
kernel, because probing costs seconds.

A probe that hangs under KVM (it does on PVM hosts) must not outlive the server: it runs
in its own process group, named `ttstack-kvm-probe-<server pid>`, is killed with its group
when the server stops, and a server that starts ends the probes of servers that are gone
(and unnamed probes of older versions that were left to init).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import images

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 20.0
PROBE_NAME = "ttstack-kvm-probe"  # QEMU -name of a probe: PROBE_NAME-<server pid>
_probes: set[subprocess.Popen] = set()
_probes_lock = threading.Lock()
_stopping = threading.Event()


class ProbeInterrupted(Exception):
    """The server stopped while the probe ran: no verdict (and nothing cached)."""
MARKERS = ("Run /bin/true as init process", "Attempted to kill init", "Kernel panic")


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator VMs get ("kvm" or "tcg") and why, for /status."""

    accel: str  # "kvm" or "tcg"
    reason: str


def _kvm_usable() -> str | None:
    """Why KVM cannot be used at all, or None if it might be."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    return None


def probe_kvm_boot(kernel: Path, initrd: Path, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot kernel+initrd under KVM until it starts init; True if it got there in time.
    ProbeInterrupted when stop_probes() ended it."""
    cmd = ["qemu-system-x86_64", "-name", f"{PROBE_NAME}-{os.getpid()}", "-accel", "kvm",
           "-m", "256", "-nodefaults", "-nographic",
           "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 rdinit=/bin/true"]
    started = time.monotonic()
    with _probes_lock:
        if _stopping.is_set():
            raise ProbeInterrupted()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _probes.add(proc)
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            timed_out = True
    finally:
        with _probes_lock:
            _probes.discard(proc)
    if _stopping.is_set():
        raise ProbeInterrupted()
    output = out.decode(errors="replace")
    if timed_out:
        if any(m in output for m in MARKERS):
            return True, f"guest kernel reached init under KVM in {timeout:.0f}s"
        return False, f"a guest kernel did not reach init under KVM within {timeout:.0f}s"
    if any(m in output for m in MARKERS):
        took = time.monotonic() - started
        return True, f"guest kernel reached init under KVM in {took:.1f}s"
    last = output.strip().splitlines()[-1:] or ["no output"]
    return False, f"guest kernel failed under KVM: {last[0]}"


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def stop_probes() -> None:
    """Server shutdown: kill every running probe (with its process group); later probes
    do not start."""
    with _probes_lock:
        _stopping.set()
        running = list(_probes)
    for proc in running:
        _kill_group(proc)


def end_leftover_probes() -> list[int]:
    """Kill probes of servers that are gone: named ones whose server pid no longer runs,
    and unnamed ones (before probes had names) that were left to init. The pids killed."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if not argv or not argv[0].endswith(b"qemu-system-x86_64"):
            continue
        if b"rdinit=/bin/true" not in argv[-1] or b"kvm" not in argv:
            continue
        name = argv[argv.index(b"-name") + 1].decode() if b"-name" in argv else ""
        if name.startswith(f"{PROBE_NAME}-"):
            owner = name.rsplit("-", 1)[1]
            if owner.isdigit() and Path(f"/proc/{owner}").exists():
                continue  # a live server's probe
        elif ppid != 1:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
    if killed:
        log.warning("ended %d KVM probe(s) left by stopped servers: %s", len(killed), killed)
    return killed


def choose(requested: str, kernel: Path | None, initrd: Path | None,
           cache_file: Path | None) -> AccelChoice:
    """Resolve `--accel auto|kvm|tcg` for guests of the host's own arch."""
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --accel tcg")
    why_not = _kvm_usable()
    if requested == "kvm":
        if why_not:
            raise RuntimeError(f"--accel kvm: {why_not}")
        return AccelChoice("kvm", "requested with --accel kvm")
    if why_not:
        return AccelChoice("tcg", why_not)
    if kernel is None or initrd is None:
        return AccelChoice("tcg", "no host-arch image to probe KVM with yet")
    key = f"{platform.release()}|{kernel}|{kernel.stat().st_mtime_ns}"
    if cache_file and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return AccelChoice(cached["accel"], cached["reason"] + " (cached)")
        except (OSError, ValueError, KeyError):
            pass
    try:
        ok, reason = probe_kvm_boot(kernel, initrd)
    except ProbeInterrupted:
        return AccelChoice("tcg", "the KVM probe was interrupted (server stopping)")
    choice = AccelChoice("kvm" if ok else "tcg", reason)
    log.info("accel auto -> %s: %s", choice.accel, choice.reason)
    if cache_file:
        cache_file.write_text(json.dumps({"key": key, "accel": choice.accel,
                                          "reason": choice.reason}))
    return choice


class Accelerator:
    """`--accel` resolved once for the host's own arch (thread-safe; `choose` above),
    and the accelerator a guest of any arch gets (TCG for foreign ones)."""

    def __init__(self, requested: str, image_path: Path, cache_file: Path) -> None:
        self.requested = requested
        self.image_path = image_path
        self.cache_file = cache_file
        self._choice: AccelChoice | None = None
        self._lock = threading.Lock()

    @property
    def known(self) -> AccelChoice | None:
        """The choice if made already, without probing (None while unknown)."""
        return self._choice

    def choice(self) -> AccelChoice:
        """The choice, probing on first call (may boot a kernel for seconds)."""
        with self._lock:
            if self._choice is None:
                native = [i for i in images.scan(self.image_path)
                          if i.name.arch == platform.machine()]
                kernel = native[0].kernel if native else None
                initrd = native[0].initrd if native else None
                choice = choose(self.requested, kernel, initrd, self.cache_file)
                if kernel is None and self.requested == "auto":
                    return choice  # decide again once an image exists
                self._choice = choice
            return self._choice

    def for_arch(self, arch: str) -> str:
        """"kvm" or "tcg" for a guest of `arch`."""
        return self.choice().accel if arch == platform.machine() else "tcg"
