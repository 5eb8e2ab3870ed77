"""Containers as the server's VMs: the rows of `lxc:` images run as containers
(nspawn.Runtime) named and placed like VMs (domain `tt-<vm id>`, directory
`<cfgdb>/vms/<vm id>`), so the ENV manager, teardown and reconciliation treat both alike
(MachineEngine: the libvirt engine that also knows the containers)."""

from __future__ import annotations

import logging
import resource
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..db import VMRow
from ..guest import sshexec
from ..vm.libvirt_domains import Engine
from . import limits
from .cgroups import CgroupError, Cgroups
from .forwards import Budget, Forward, ForwardError
from .nspawn import ContainerError, ContainerSpec, Runtime

log = logging.getLogger(__name__)

ENGINE = "lxc"
# Run in a new container as its root with $1 machine-id, $2 the SSH host key's length,
# $3 its public line, and on stdin the host key (private key file) then authorized_keys
# (secrets stay off command lines, which every host user can read): what a VM's first
# boot and identity step make (no systemd runs in a container to do it). dd reads the key
# a byte at a time: head -c would take more of the pipe than it writes.
IDENTITY = r"""set -e
umask 022
echo "$1" > /etc/machine-id
rm -f /etc/ssh/ssh_host_*
(umask 077; dd bs=1 count="$2" status=none > /etc/ssh/ssh_host_ed25519_key)
printf '%s\n' "$3" > /etc/ssh/ssh_host_ed25519_key.pub
(umask 077; mkdir -p /root/.ssh; cat > /root/.ssh/authorized_keys)
"""
# sshd at every start (its /run is new): it daemonizes and is reaped by the stub init
SSHD = """mkdir -p /run/sshd
exec /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o ListenAddress=::1 </dev/null >/dev/null
"""
SSHD_TIMEOUT = 10.0  # seconds for sshd to daemonize


@dataclass(frozen=True)
class EnteredShell:
    """sshexec.Shell into a running container: `prefix` (Runtime.enter_argv of
    `/bin/sh -c ""`, the container's leader looked up once) ends with the shell's
    script, to which the command is appended."""

    prefix: tuple[str, ...]
    what = "container"

    @classmethod
    def of(cls, runtime: Runtime, spec: ContainerSpec) -> EnteredShell:
        """The shell of the container `spec`; ContainerError when it is not running."""
        return cls(tuple(runtime.enter_argv(spec, ["/bin/sh", "-c", ""])))

    def argv(self, cmd: str) -> list[str]:
        return [*self.prefix[:-1], self.prefix[-1] + cmd]


def is_container(vm: VMRow) -> bool:
    """Whether the VM row is a container (its image's engine is lxc)."""
    return vm.image.split(":", 1)[0] == ENGINE


class Containers:
    """The containers of one server (`server_id`), their directories under `vms_path`.
    setup() must run before the first start: CgroupError when the host cannot have
    containers."""

    def __init__(self, server_id: str, vms_path: Path, forward_addr: str) -> None:
        self.vms_path = vms_path
        self.forward_addr = forward_addr  # where forwarded ports listen
        self.runtime = Runtime(Cgroups(f"ttstack-{server_id}"))
        self._forwards: dict[str, dict[int, Forward]] = {}  # name -> host port -> forward
        self._budgets: dict[str, Budget] = {}  # name -> what its forwards relay at once
        self._lock = threading.Lock()

    def setup(self) -> None:
        """Check the host's cgroups and mount the census hierarchy (CgroupError), and
        raise the per-user kernel limits containers share with the host's root
        (limits.py; logged)."""
        self.runtime.cgroups.setup()
        for line in limits.raise_shared():
            log.warning("containers: %s", line)
        # each relayed connection holds two descriptors (forwards.Budget: 256 connections
        # per container): the soft limit is raised to the hard one
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # finite on Linux (nr_open)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def spec(self, vm: VMRow, rootfs: Path = Path("/"), hostname: str = "") -> ContainerSpec:
        """The container of a VM row (`rootfs` and `hostname`: needed to start it only)."""
        return ContainerSpec(name=vm.domain, rootfs=rootfs, dir=Path(vm.dir),
                             mem_mib=vm.mem_mib, cpus=vm.cpu, disk_mib=vm.disk_mib,
                             hostname=hostname)

    def _spec_of(self, name: str) -> ContainerSpec:
        """The container called `name` (a domain name `tt-<vm id>`), for removal."""
        return ContainerSpec(name=name, rootfs=Path("/"),
                             dir=self.vms_path / name.removeprefix("tt-"), mem_mib=0, cpus=0)

    def owns(self, name: str) -> bool:
        """Whether `name` is a container of this server (running, or not yet removed)."""
        spec = self._spec_of(name)
        return spec.disk.exists() or any(
            d.is_dir() for d in self.runtime.cgroups.dirs(name))

    def start(self, vm: VMRow, rootfs: Path, hostname: str, keys: str,
              fresh: bool = True) -> None:
        """Start the VM row's container on the image root `rootfs`, called `hostname`
        inside. `fresh`: a new one, given its own machine-id and SSH host key (made here)
        and root's authorized_keys `keys`, the host key pinned in `known_hosts` of its
        directory, as the SSH transport wants it; otherwise it runs again on the layer
        it kept, identity included. Either way sshd listens on its loopback (reached
        through the forwarded ssh_port). ContainerError (also when a step inside takes over
        30 s)."""
        spec = self.spec(vm, rootfs, hostname)
        self.runtime.start(spec)
        if fresh:
            private, public = sshexec.host_key_pair(hostname)
            self._run(spec, [IDENTITY, uuid.uuid4().hex, str(len(private)), public],
                      private + keys.encode())
            (spec.dir / "known_hosts").write_text(sshexec.known_hosts_line(vm.id, public))
        self._start_sshd(spec)

    def _run(self, spec: ContainerSpec, script: list[str], stdin: bytes = b"") -> None:
        """`sh -c SCRIPT ARGS...` in the container, `stdin` its input; ContainerError when
        it fails or takes over 30 s."""
        try:
            res = self.runtime.exec_argv(spec, ["/bin/sh", "-c", script[0], "sh",
                                                *script[1:]], stdin=stdin, timeout=30)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"container {spec.name}: setting it up took over 30 s"
                                 ) from None
        if res.returncode != 0:
            raise ContainerError(f"container {spec.name}: setting it up failed "
                                 f"({res.returncode}): {res.stderr.decode(errors='replace')}")

    def _start_sshd(self, spec: ContainerSpec) -> None:
        """Start sshd in the container; when it fails or does not daemonize within
        SSHD_TIMEOUT (its root removed or replaced it), the container runs without SSH,
        and why (the last line of what it printed, a bounded read: a replaced sshd sent
        200 MB there) goes to its console log and the server's log: a container whose
        sshd was gone could never start again."""
        code, last = sshexec.run_bounded(EnteredShell.of(self.runtime, spec), SSHD,
                                         SSHD_TIMEOUT)
        if code == 0:
            return
        why = (f"exit {code}" if code is not None else
               f"it did not start within {SSHD_TIMEOUT:.0f}s, or printed too much")
        note = (f"sshd did not start ({why}{': ' + last[:300] if last else ''}): SSH into "
                "this container (use_ssh, tt ssh, --tt-native) fails")
        log.warning("container %s: %s", spec.name, note)
        with open(spec.console, "a") as f:
            f.write(f"ttstack: {note}\n")

    def destroy(self, name: str) -> None:
        """End the container `name` now, as libvirt destroys a domain: its forwards and
        everything it ran; its directory (its own layer, the VM's "disk") stays for a
        restart or for the teardown to remove. Idempotent; ContainerError."""
        self.unpublish(name)
        self.runtime.stop(self._spec_of(name))

    # --- forwarded ports (forwards.py): the VM row's ssh_port to 22 and its `forwards`
    def publish(self, vm: VMRow) -> None:
        """Listen on every forwarded port of the VM row's container, its SSH port
        included (at its start, and again at a server start for the running ones); each
        port is tried, then ForwardError naming those that failed."""
        failed = []
        for guest, host in {22: vm.ssh_port, **vm.forwards}.items():
            if host:
                try:
                    self.add_forward(vm, guest, host)
                except ForwardError as exc:
                    failed.append(str(exc))
        if failed:
            raise ForwardError("; ".join(failed))

    def add_forward(self, vm: VMRow, guest: int, host: int) -> None:
        """Forward the host port `host` to `guest` in the container; ForwardError."""
        spec = self._spec_of(vm.domain)
        self.remove_forward(vm, host)  # a forward of this port before: its port is freed
        with self._lock:
            budget = self._budgets.setdefault(vm.domain, Budget())
        forward = Forward(self.forward_addr, host, guest,
                          lambda: f"/proc/{self.runtime.leader(spec)}/ns/net", budget)
        with self._lock:
            self._forwards.setdefault(vm.domain, {})[host] = forward

    def remove_forward(self, vm: VMRow, host: int) -> None:
        """Stop forwarding `host` (not forwarded: nothing to do)."""
        with self._lock:
            forward = self._forwards.get(vm.domain, {}).pop(host, None)
        if forward is not None:
            forward.close()

    def unpublish(self, name: str) -> None:
        """Stop every forward of the container `name`."""
        with self._lock:
            forwards = self._forwards.pop(name, {})
            self._budgets.pop(name, None)
        for forward in forwards.values():
            forward.close()

    def is_running(self, name: str) -> bool:
        """Whether the container's PID 1 still runs."""
        try:
            self.runtime.leader(self._spec_of(name))
            return True
        except ContainerError:
            return False

    def names(self) -> list[str]:
        """The containers that have cgroups (run, or were left by a crash)."""
        return self.runtime.cgroups.names()

    def shell(self, vm: VMRow) -> EnteredShell:
        """The container's /bin/sh (Runtime.enter_argv: as its root, in /root, with
        nothing of the server's environment); ContainerError when it is not running."""
        return EnteredShell.of(self.runtime, self.spec(vm))

    def close(self) -> None:
        """Server stop: stop forwarding (the containers run on; the next start forwards
        again) and remove this server's cgroup groups if no container is left."""
        with self._lock:
            names = list(self._forwards)
        for name in names:
            self.unpublish(name)
        self.runtime.cgroups.close()


class MachineEngine(Engine):
    """The libvirt engine, and the containers of `containers` under the same names: destroy,
    is_running and the domain listings cover both, so teardown and reconciliation need
    not tell them apart. libvirt-only calls (start, lookup, QMP, ...) are for VMs."""

    def __init__(self, uri: str, containers: Containers) -> None:
        super().__init__(uri)
        self.containers = containers

    def destroy(self, name: str) -> None:
        if self.containers.owns(name):
            try:
                self.containers.destroy(name)
            except (ContainerError, CgroupError) as exc:
                raise RuntimeError(str(exc)) from None
            return
        super().destroy(name)

    def is_running(self, name: str) -> bool:
        if self.containers.owns(name):
            return self.containers.is_running(name)
        return super().is_running(name)

    def active_domains(self, prefix: str) -> list[str]:
        return super().active_domains(prefix) + [
            n for n in self.containers.names()
            if n.startswith(prefix) and self.containers.is_running(n)]

    def domains_with_prefix(self, prefix: str) -> list[str]:
        return super().domains_with_prefix(prefix) + [
            n for n in self.containers.names() if n.startswith(prefix)]
