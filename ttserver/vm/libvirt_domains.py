"""The QEMU/libvirt engine: start, wait for, and destroy one VM.

Domains are transient (`createXML`): destroying one removes it from libvirt entirely, and
running ones survive a libvirtd or ttserver restart, which reconciliation relies on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import libvirt_qemu

from ttclient.waiting import WaitCancelled, WaitTimeout, wait_for

from ..guest import agent
from . import domainxml

MIGRATION_TIMEOUT = 120.0
# libvirt keepalive (virConnectSetKeepAlive): a ping after KEEPALIVE_INTERVAL s without
# traffic; KEEPALIVE_COUNT unanswered pings close the connection, so a call to a libvirtd
# that hangs fails after about interval * (count + 1) s instead of blocking its thread.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

log = logging.getLogger(__name__)

CONSOLE_TAIL_LINES = 25
# terminal control sequences getty and systemd write; useless (and noisy) in reports
ANSI_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def _quiet_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them as exceptions."""


libvirt.registerErrorHandler(_quiet_libvirt_errors, None)

_event_loop_lock = threading.Lock()
_event_loop: threading.Thread | None = None


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per
    process. Keepalive needs it (libvirt's virConnectSetKeepAlive: "the client has to
    implement and run an event loop"); it only applies to connections opened afterwards."""
    global _event_loop
    with _event_loop_lock:
        if _event_loop is None:
            libvirt.virEventRegisterDefaultImpl()
            _event_loop = threading.Thread(target=_run_event_loop, name="libvirt-events",
                                           daemon=True)
            _event_loop.start()


def qemu_user() -> tuple[int, int]:
    """uid/gid QEMU runs as: Debian's libvirt-qemu when present, else root."""
    try:
        pw = pwd.getpwnam("libvirt-qemu")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 0, 0


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last `lines` lines of the console log at `path` (read from its last 16 KiB,
    control sequences stripped), or a note that it is missing or empty."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no console log)"
    text = ANSI_ESCAPES.sub("", text.replace("\r", ""))
    return "\n".join(text.splitlines()[-lines:]) or "(console log is empty)"


class BootTimeout(RuntimeError):
    """A VM did not come up: it stopped, its boot was cancelled, or its agent did not answer
    in time; the message has its console tail when there is one."""
    pass


class Engine:
    """VMs as transient libvirt domains on the hypervisor at `uri`; libvirt failures raise
    libvirt.libvirtError unless a method says otherwise."""

    def __init__(self, uri: str = "qemu:///system",
                 keepalive: tuple[int, int] = (KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)) -> None:
        self.uri = uri
        self.keepalive = keepalive
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None

    def conn(self) -> libvirt.virConnect:
        """One shared connection with keepalive (`keepalive`: interval s, count), reopened
        when libvirtd went away or stopped answering."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
            ensure_event_loop()
            conn = libvirt.open(self.uri)
            conn.setKeepAlive(*self.keepalive)
            self._conn = conn
            return conn

    def start(self, xml: str, paused: bool = False) -> libvirt.virDomain:
        """Create and start a transient domain from its XML (`paused`: leave its CPUs
        stopped); the domain."""
        return self.conn().createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)

    def plug_nic(self, dom: libvirt.virDomain, tap_fd: int, mac: str, device: dict) -> None:
        """Give a paused domain its NIC on a TAP opened by us: the guest finds it at boot
        like any other device, and the TAP lives in *our* network namespace. `device`:
        the NIC's QEMU driver and bus address (domainxml.nic_device)."""
        self.qmp(dom, "getfd", {"fdname": "tttap"}, tap_fd)
        self.qmp(dom, "netdev_add", {"type": "tap", "id": domainxml.NETDEV_ID, "fd": "tttap"})
        self.qmp(dom, "device_add", {**device, "netdev": domainxml.NETDEV_ID,
                                     "mac": mac, "id": "ttnic0"})

    # --- memory snapshots (warm clones) --------------------------------------------------
    # QEMU's own migration stream over a file descriptor handed in with QMP `getfd`:
    # libvirt's save/restore insists on the saved domain's UUID, so it cannot start many
    # clones from one snapshot, and `exec:` URIs are blocked by QEMU's seccomp sandbox.
    @staticmethod
    def qmp(dom: libvirt.virDomain, command: str, arguments: dict | None = None,
            fd: int | None = None) -> dict:
        """The `return` member of a QMP command's reply from the domain's QEMU, handing it
        `fd` when given; RuntimeError with QEMU's message when it fails."""
        payload = json.dumps({"execute": command,
                              **({"arguments": arguments} if arguments else {})})
        if fd is None:
            reply = libvirt_qemu.qemuMonitorCommand(dom, payload, 0)
        else:
            reply = libvirt_qemu.qemuMonitorCommandWithFiles(dom, payload, [fd], 0)[0]
        out = json.loads(reply)
        if "error" in out:
            raise RuntimeError(f"QMP {command}: {out['error'].get('desc', out['error'])}")
        return out.get("return", {})

    def _migration(self, dom: libvirt.virDomain, what: str) -> None:
        def finished() -> bool | None:
            status = self.qmp(dom, "query-migrate")
            state = status.get("status")
            if state in ("failed", "cancelled"):
                raise RuntimeError(f"{what} failed: {status.get('error-desc', state)}")
            return True if state == "completed" else None

        try:
            wait_for(finished, MIGRATION_TIMEOUT, interval=0.02, what=what)
        except WaitTimeout as exc:
            raise RuntimeError(str(exc)) from None

    def _hand_file(self, dom: libvirt.virDomain, path: Path, flags: int, name: str) -> None:
        """Open `path` here and give QEMU the descriptor under `name` (QMP getfd)."""
        fd = os.open(path, flags, 0o644)
        try:
            self.qmp(dom, "getfd", {"fdname": name}, fd)
        finally:
            os.close(fd)

    def _ignore_shared(self, dom: libvirt.virDomain) -> None:
        """Leave RAM in a file-backed shared backend out of the migration stream
        (QEMU's `x-ignore-shared` capability): the file already holds it."""
        self.qmp(dom, "migrate-set-capabilities",
                 {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})

    def save_memory(self, dom: libvirt.virDomain, path: Path) -> None:
        """Pause the VM and write its device state to `path`; its RAM, in the file of its
        shared memory backend (domainxml `memory_file`), stays there."""
        dom.suspend()
        self._ignore_shared(dom)
        self._hand_file(dom, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "ttsave")
        self.qmp(dom, "migrate", {"uri": "fd:ttsave"})
        self._migration(dom, "saving the VM's memory")

    def start_from_memory(self, xml: str, path: Path,
                          before_load: Callable[[libvirt.virDomain], None] | None = None
                          ) -> libvirt.virDomain:
        """Start a domain (its XML must pass `-incoming defer` and map the template's RAM
        file privately) from a saved device state: the RAM is not read, it is the
        file's pages, copied on a write only. `before_load(dom)` runs while the domain
        waits for the state (e.g. to plug a NIC the saved guest had)."""
        dom = self.conn().createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        try:
            if before_load is not None:
                before_load(dom)
            self._ignore_shared(dom)
            self._hand_file(dom, path, os.O_RDONLY, "ttload")
            self.qmp(dom, "migrate-incoming", {"uri": "fd:ttload"})
            self._migration(dom, "loading the VM's memory")
            dom.resume()
        except Exception:
            self.destroy(dom.name())
            raise
        return dom

    @staticmethod
    def channel_path(dom: libvirt.virDomain, name: str) -> str:
        """The host path of the UNIX socket behind the running domain's virtio channel
        `name` (libvirt picks it when the XML names none, and shows it in the live XML);
        RuntimeError when the domain has no such channel."""
        for channel in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/channel"):
            target, source = channel.find("target"), channel.find("source")
            if (target is not None and target.get("name") == name and source is not None
                    and source.get("path")):
                return str(source.get("path"))
        raise RuntimeError(f"domain {dom.name()} has no channel {name}")

    def lookup(self, name: str) -> libvirt.virDomain | None:
        """The domain named `name`, or None when libvirt has none."""
        try:
            return self.conn().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def is_running(self, name: str) -> bool:
        """True when the domain exists and is active."""
        dom = self.lookup(name)
        try:
            return bool(dom and dom.isActive())
        except libvirt.libvirtError:
            return False

    def destroy(self, name: str) -> None:
        """Kill the domain now (throwaway VMs need no clean shutdown); idempotent.
        libvirt.libvirtError when it cannot be killed."""
        dom = self.lookup(name)
        if dom is None:
            return
        try:
            dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_DEFAULT)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN,
                                            libvirt.VIR_ERR_OPERATION_INVALID):
                raise
        try:
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError:
            pass
        Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)

    def lower_priority(self, name: str, niceness: int, cpu_shares: int) -> None:
        """Lower the running domain's claim on the host's CPUs (best effort: logged, never
        raised): every thread of its QEMU process to `niceness`, one by one because Linux
        applies a nice value per thread (setpriority(2), NOTES; the pid from libvirt's pid
        file for qemu:///system domains), and the domain's CPU weight to `cpu_shares`
        (libvirt's cpu_shares: cgroup v1 cpu.shares, default 1024; v2 cpu.weight). Each
        domain has a cgroup of its own, so the nice value alone orders only its own
        threads, not the domain against other VMs. Set at run time, not in the domain
        XML: a host whose domains have no cpu controller refuses <cputune> at start."""
        try:
            pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
        except (OSError, ValueError) as exc:
            log.warning("could not renice %s: %s", name, exc)
        try:
            dom = self.lookup(name)
            if dom is not None:
                dom.setSchedulerParameters({"cpu_shares": cpu_shares})
        except libvirt.libvirtError as exc:
            log.warning("could not set the CPU weight of %s: %s", name, exc)

    def active_domains(self, prefix: str) -> list[str]:
        """Names of the running libvirt domains whose name starts with `prefix`."""
        return [d.name() for d in self.conn().listAllDomains(
            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) if d.name().startswith(prefix)]

    def domains_with_prefix(self, prefix: str) -> list[str]:
        """Names of every libvirt domain (of any state) whose name starts with `prefix`."""
        return [d.name() for d in self.conn().listAllDomains(0) if d.name().startswith(prefix)]

    def wait_agent(self, name: str, timeout: float, console: Path,
                   cancelled: Callable[[], bool], interval: float = 0.5) -> float:
        """Block until the guest agent answers; return seconds waited.

        Fails early (with the console tail) if the domain dies, and at `timeout` at most.
        """
        started = time.monotonic()

        def answers() -> float | None:
            if not self.is_running(name):
                raise BootTimeout(f"VM {name} stopped while booting; console tail:\n"
                                  f"{console_tail(console)}")
            dom = self.lookup(name)
            answered = dom is not None and agent.ping(dom, timeout=2)
            return time.monotonic() - started if answered else None

        try:
            return wait_for(answers, timeout, interval=interval, cancel=cancelled,
                            what=f"VM {name}: the guest agent answering")
        except WaitCancelled:
            raise BootTimeout(f"VM {name}: boot cancelled (its ENV was deleted, or another of"
                              " its VMs failed)") from None
        except WaitTimeout as exc:
            raise BootTimeout(f"{exc}; console tail:\n{console_tail(console)}") from None
