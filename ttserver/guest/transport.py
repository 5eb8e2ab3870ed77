"""One VM's way in: commands, files, clean shutdown and HMP commands to its QEMU.

Two Transports, chosen per request: the guest agent (default: no network needed, answers
before sshd) and SSH with the server's key (`use_ssh`: faster for big files, and the same
path users take). GuestIO raises GuestError with a message fit for users.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import libvirt
import libvirt_qemu

from ttclient.contract import Upload
from ttclient.waiting import WaitTimeout, wait_for

from ..config import ServerConfig
from ..containers.machines import Containers, is_container
from ..containers.nspawn import ContainerError
from ..db import VMRow
from ..vm.libvirt_domains import BootTimeout, Engine
from . import agent, command, placing, sshexec

# Generous per-file limit for copies; agent writes go in WRITE_CHUNK pieces.
COPY_TIMEOUT = 900.0
# How long a run waits for an agent that did not take its command (a guest rebooting
# under TCG is back in 15-30 s)
REBOOT_WAIT = 120.0
log = logging.getLogger(__name__)


class GuestError(RuntimeError):
    """A guest cannot be reached or refused the operation; the message is fit for users."""
    pass


class Transport(Protocol):
    """One way into a running guest. Each method raises agent.AgentError,
    sshexec.CopyError or OSError on failure (GuestIO words them as GuestError)."""

    def run(self, vm: VMRow, spec: command.RunSpec) -> command.Outcome:
        """A user's command in the guest, as guest/command.py describes."""

    def write(self, vm: VMRow, path: str, data: Upload, mode: int | None) -> None:
        """`data` to the guest's absolute `path` as guest/placing.py describes, file mode
        `mode` (None: the replaced file's, else 0644)."""

    def open_read(self, vm: VMRow, path: str, size: int) -> Iterator[bytes]:
        """The first `size` bytes of the guest's file at `path`, opened now and read a
        piece at a time as they are taken."""


class AgentTransport:
    """The QEMU guest agent over virtio-serial: no network needed, up before sshd."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def domain(self, vm: VMRow) -> libvirt.virDomain:
        """The VM's running libvirt domain; GuestError when it is not running."""
        dom = self.engine.lookup(vm.domain)
        if dom is None:
            raise GuestError("VM is not running")
        return dom

    def run(self, vm: VMRow, spec: command.RunSpec) -> command.Outcome:
        """When the agent did not take the command (the guest rebooting), once more after
        it answers again; when it went away during the command (the command rebooted the
        guest), the outcome the command's shell left in the guest. Each wait for the agent
        lasts REBOOT_WAIT seconds at most."""
        started = time.monotonic()
        try:
            return agent.run_command(self.domain(vm), spec)
        except agent.AgentUnavailable as exc:
            self._wait_agent(vm, f"did not take a command ({exc})")
            return agent.run_command(self.domain(vm), spec)
        except agent.AgentGone as exc:
            self._wait_agent(vm, f"went away while a command ran ({exc})")
            outcome = agent.recovered(self.domain(vm), spec, time.monotonic() - started)
            if outcome is None:
                raise GuestError("the guest rebooted while the command ran, before it "
                                 "finished (its agent went away)") from exc
            return outcome

    def _wait_agent(self, vm: VMRow, what: str) -> None:
        log.info("VM %s: the guest agent %s; waiting for it", vm.id, what)
        try:
            self.engine.wait_agent(vm.domain, REBOOT_WAIT, Path(vm.dir) / "console.log",
                                   lambda: False)
        except BootTimeout as late:
            if not self.engine.is_running(vm.domain):
                raise GuestError(f"the guest powered off: its agent {what}") from late
            raise GuestError(f"the guest agent {what} and did not answer for "
                             f"{REBOOT_WAIT:.0f}s (the guest may be hung): {late}") from late

    def write(self, vm: VMRow, path: str, data: Upload, mode: int | None) -> None:
        dom = self.domain(vm)
        res = agent.exec_argv(dom, ["/bin/sh", "-c", placing.PREPARE, "sh", path],
                              timeout=30)
        if res.exit_code == placing.NOT_REGULAR:
            raise GuestError(placing.refusal(path, res.stderr))
        if res.exit_code != 0 or not res.stdout.strip():
            raise GuestError(f"write {path}: {res.stderr.strip() or 'mktemp failed'}")
        tmp = res.stdout.strip()
        try:  # qemu-ga opens the 0600 file mktemp made ("w": truncate, mode kept)
            agent.write_file(dom, tmp, data.pieces(agent.WRITE_CHUNK))
            res = agent.exec_argv(dom, ["/bin/sh", "-c", placing.COMMIT, "sh", tmp, path,
                                        placing.mode_arg(mode)], timeout=30)
            if res.exit_code != 0:
                raise GuestError(f"write {path}: {res.stderr.strip()}")
        except BaseException:
            with contextlib.suppress(Exception):
                agent.exec_argv(dom, ["/bin/sh", "-c", placing.DISCARD, "sh", tmp], timeout=30)
            raise

    def read(self, vm: VMRow, path: str) -> bytes:
        """The bytes of a small guest file (the agent's own: its host key)."""
        return agent.read_file(self.domain(vm), path)

    def open_read(self, vm: VMRow, path: str, size: int) -> Iterator[bytes]:
        return agent.open_file(self.domain(vm), path, size)


class ShellTransport:
    """Commands and files as shell command lines in the guest's /bin/sh (guest/sshexec.py:
    the run protocol of guest/command.py, placing.py's writes, `head -c` reads), through
    the `sshexec.Shell` that `shell(vm)` gives: SSH, or entering a container."""

    def shell(self, vm: VMRow) -> sshexec.Shell:
        """The way into `vm`'s shell; GuestError when there is none."""
        raise NotImplementedError

    def run(self, vm: VMRow, spec: command.RunSpec) -> command.Outcome:
        return sshexec.run_command(self.shell(vm), spec)

    def write(self, vm: VMRow, path: str, data: Upload, mode: int | None) -> None:
        sshexec.write_file(self.shell(vm), path, data, mode, COPY_TIMEOUT)

    def open_read(self, vm: VMRow, path: str, size: int) -> Iterator[bytes]:
        return sshexec.open_file(self.shell(vm), path, size, COPY_TIMEOUT)


class SSHTransport(ShellTransport):
    """OpenSSH with the server's key: the path users take, faster for big files. On the
    bridge straight to the VM's address; otherwise through its forwarded SSH port.

    The guest's host key is pinned: read once through the guest agent (a channel no one
    on the network can sit in) into `known_hosts` in the VM's directory, and ssh accepts
    no other key — whoever holds the forwarded port or the VM's address cannot pose as
    the VM."""

    def __init__(self, cfg: ServerConfig, agent_io: AgentTransport) -> None:
        self.cfg = cfg
        self.agent_io = agent_io

    def _known_hosts(self, vm: VMRow) -> Path:
        known = Path(vm.dir) / "known_hosts"
        if not known.is_file():
            try:
                line = sshexec.known_hosts_line(vm.id, self.agent_io.read(
                    vm, sshexec.HOST_KEY).decode(errors="replace"))
            except ValueError as exc:
                raise GuestError(f"cannot pin the VM's SSH host key: {exc}") from exc
            # the VM's directory is writable by QEMU's user: never follow a link there
            fd = os.open(known, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(line)
        return known

    def shell(self, vm: VMRow) -> sshexec.Target:
        known = self._known_hosts(vm)
        if vm.net_addr:  # on the bridge: no port mapping in between
            return sshexec.Target(self.cfg.ssh_key, vm.net_addr, 22, known, vm.id)
        return sshexec.Target(self.cfg.ssh_key, self.cfg.connect_addr, vm.ssh_port, known,
                              vm.id)


class ContainerTransport(ShellTransport):
    """Into a container (the lxc engine) by entering its namespaces: the same shell-level
    commands as over SSH, without a network or sshd."""

    def __init__(self, containers: Containers) -> None:
        self.containers = containers

    def shell(self, vm: VMRow) -> sshexec.Shell:
        try:
            return self.containers.shell(vm)
        except ContainerError as exc:
            raise GuestError(str(exc)) from None


class GuestIO:
    """Commands, files, shutdown and HMP commands (the user network's live forwards) for
    one VM at a time, through a Transport (the agent by default, SSH on request); every
    failure raises GuestError."""

    def __init__(self, engine: Engine, cfg: ServerConfig,
                 containers: Containers | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self._agent_io = AgentTransport(engine)
        self.agent: Transport = self._agent_io
        self.ssh: Transport = SSHTransport(cfg, self._agent_io)
        self.container: Transport | None = (ContainerTransport(containers)
                                            if containers is not None else None)
        self._slots = command.Slots()

    def _transport(self, vm: VMRow, use_ssh: bool) -> Transport:
        """The way into `vm`: with `use_ssh` SSH (a container's sshd, its host key pinned
        at its start), else a container is entered and a VM reached through its agent."""
        if use_ssh:
            return self.ssh
        if is_container(vm):
            if self.container is None:
                raise GuestError("containers are not enabled on this server any more")
            return self.container
        return self.agent

    def run(self, vm: VMRow, cmd: str, timeout: float, use_ssh: bool,
            cap: int | None = None) -> command.Outcome:
        """`cmd` in the guest's /bin/sh, ended by the guest at `timeout` seconds, keeping
        at most `cap` bytes of each stream (the server's --run-output-cap when None), as
        guest/command.py describes. GuestError when the VM cannot be reached or the agent
        fails."""
        slot, cookie = self._slots.acquire(vm)
        spec = command.RunSpec(cmd, timeout, self.cfg.run_output_cap if cap is None else cap,
                               slot, cookie)
        try:
            return self._transport(vm, use_ssh).run(vm, spec)
        except (agent.AgentError, OSError, libvirt.libvirtError) as exc:
            raise GuestError(str(exc)) from exc
        finally:
            self._slots.release(vm, slot)

    def write(self, vm: VMRow, path: str, data: Upload, mode: int | None,
              use_ssh: bool) -> None:
        """Write `data` to the guest's absolute `path` as guest/placing.py describes, with
        file `mode` (None: the replaced file's, else 0644); GuestError when it cannot be
        written."""
        try:
            self._transport(vm, use_ssh).write(vm, path, data, mode)
        except (agent.AgentError, sshexec.CopyError, OSError) as exc:
            raise GuestError(str(exc)) from exc

    def open_read(self, vm: VMRow, path: str, size: int, use_ssh: bool) -> Iterator[bytes]:
        """The first `size` bytes of the guest's file at `path`, opened now and read a
        piece at a time as they are taken; GuestError when it cannot be opened or read
        (while reading: the answer then ends short of its Content-Length)."""
        try:
            pieces = self._transport(vm, use_ssh).open_read(vm, path, size)
        except (agent.AgentError, sshexec.CopyError, OSError) as exc:
            raise GuestError(str(exc)) from exc
        return _guest_errors(pieces)

    def shutdown(self, vm: VMRow, timeout: float) -> bool:
        """Power the guest off through its agent (so it syncs its disk); force it off after
        `timeout`. Returns True when the guest went down by itself. A container is ended
        at once (the engine's destroy keeps its files): nothing in it needs a shutdown."""
        if is_container(vm):
            self.engine.destroy(vm.domain)
            return True
        dom = self.engine.lookup(vm.domain)
        if dom is None:
            return True
        # Not the agent's guest-shutdown: it runs `shutdown +0`, which needs D-Bus and
        # logind, absent from our lean images. systemctl reaches systemd over its private
        # socket. Agent gone or busy: fall through to the forced stop.
        with contextlib.suppress(agent.AgentError):
            agent.command(dom, "guest-exec", {
                "path": "/bin/sh",
                "arg": ["-c", "sync; systemctl poweroff --no-block || poweroff -f"]})
        try:
            wait_for(lambda: None if self.engine.is_running(vm.domain) else True, timeout,
                     what=f"VM {vm.domain} powering off")
            clean = True
        except WaitTimeout:
            clean = False
        self.engine.destroy(vm.domain)  # transient: usually already gone after a power-off
        return clean

    def monitor(self, vm: VMRow, command: str, ok: tuple[str, ...] = ()) -> None:
        """An HMP command to the VM's QEMU; success is silence or one of the `ok` phrases,
        else GuestError with QEMU's or libvirt's answer."""
        try:
            out = libvirt_qemu.qemuMonitorCommand(
                self._agent_io.domain(vm), command,
                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        except libvirt.libvirtError as exc:
            raise GuestError(f"{command}: {exc.get_error_message()}") from exc
        if out.strip() and not any(phrase in out for phrase in ok):
            raise GuestError(f"{command}: {out.strip()}")


def _guest_errors(pieces: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from pieces
    except (agent.AgentError, sshexec.CopyError, OSError) as exc:
        raise GuestError(str(exc)) from exc
