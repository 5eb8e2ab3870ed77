"""How VMs are networked (`--network`): one variant each, chosen once at start.

- `UserNetwork` (`user`, the default): QEMU user networking. Forwards are QEMU `hostfwd`
  rules, in the domain XML at boot and through the HMP monitor on a running VM. With
  `--allow-outgoing` the LocalAddressGuard keeps QEMU's connections off the host's own
  addresses; a warm clone allowed out renews its DHCP lease (its template's came from a
  restricted network, which announces no router).
- `BridgedNetwork` (`bridge`): a TAP per VM on a host bridge. The domain starts paused so
  its NIC is plugged and its ports (nftables DNAT elements) and DHCP lease (dnsmasq) are
  published before the guest looks; a VM is running once it holds its address. A warm
  clone gets its NIC the same way, plugged where its template's was before the saved
  state loads (templates are made on user networking); the restored guest still uses the
  template's MAC and lease, so after its identity it takes its own MAC and renews its
  lease (the bridge's anti-spoofing rules drop what it sends before).

Both map ports the one way everything does (`PortMap`: guest port -> host port).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import libvirt

from ttclient.waiting import WaitCancelled, WaitTimeout, wait_for

from ..config import ServerConfig
from ..db import VMRow
from ..guest import agent, identity
from ..guest.transport import GuestError
from ..host.bridge import BridgeNetwork, Lease, NetworkError
from ..host.local_guard import LocalAddressGuard
from ..host.ports import PortMap
from .domainxml import NETDEV_ID
from .libvirt_domains import BootTimeout, Engine, console_tail

log = logging.getLogger(__name__)

Monitor = Callable[[VMRow, str, tuple[str, ...]], None]
"""Sends an HMP command to a VM's QEMU (GuestIO.monitor): (vm, command, ok phrases)."""


def lease(vm: VMRow) -> Lease:
    """The VM's bridge-mode DHCP lease (MAC and address from its id)."""
    return Lease.of(vm.id, vm.net_addr)


def port_map(vm: VMRow) -> PortMap:
    """The VM's forwarded ports, SSH (guest 22) included."""
    return {22: vm.ssh_port, **vm.forwards}


class VMNetwork(Protocol):
    """What the manager and the booter need of a network variant."""

    name: str  # "user" or "bridge", as --network and /status say
    warm_clones: bool  # whether VMs may start from memory snapshots

    def contain(self) -> None:
        """First thing at server start (VMs of an earlier run may be running): what keeps
        running VMs where they belong."""

    def setup(self, running: list[tuple[VMRow, bool]]) -> None:
        """At server start, after reconciliation, before any boot: make the host side,
        re-publishing the `running` VMs (with their deny_outgoing) of an earlier run."""

    def close(self, vms_running: int) -> None:
        """At server stop (`vms_running` of its VMs still run)."""

    def assign(self, vms: list[VMRow], taken: set[str]) -> None:
        """At admission: give each new VM its network address (`taken`: addresses held)."""

    def hostfwd(self, vm: VMRow, forward_addr: str) -> tuple[str, ...]:
        """QEMU user-network forwards for the VM's domain XML (none on a bridge)."""

    def start_domain(self, vm: VMRow, xml: str, nic: dict, deny_outgoing: bool) -> None:
        """Start the VM's domain with its network in place (`nic`: the NIC's QEMU device
        driver and address for the guest's arch, domainxml.nic_device)."""

    def wait_ready(self, vm: VMRow, timeout: float, console: Path,
                   cancel: threading.Event) -> None:
        """After the agent answers: until the guest's network is usable; BootTimeout."""

    def start_clone(self, vm: VMRow, xml: str, state: Path, nic: dict,
                    deny_outgoing: bool) -> libvirt.virDomain:
        """Start a warm clone's domain (`xml` waits for a saved state) from the template's
        device `state`, with its network in place, and resume it; the domain."""

    def adopt(self, vm: VMRow, dom: libvirt.virDomain, restricted: bool,
              timeout: float) -> None:
        """A warm clone after its identity: make the template's network configuration
        the clone's own (`restricted`: no outgoing traffic); IdentityError."""

    def unpublish(self, vm: VMRow) -> None:
        """At teardown or stop: drop what the host publishes for the VM (errors logged)."""

    def add_forward(self, vm: VMRow, guest: int, host: int) -> None:
        """Forward `host` to `guest` on a running VM; GuestError when it fails."""

    def remove_forward(self, vm: VMRow, host: int) -> None:
        """Stop forwarding `host` (already gone is fine); GuestError otherwise."""


class UserNetwork:
    """QEMU user networking (see the module docstring)."""

    name = "user"
    warm_clones = True

    def __init__(self, cfg: ServerConfig, engine: Engine, monitor: Monitor,
                 guard: LocalAddressGuard | None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.monitor = monitor
        self.guard = guard  # --allow-outgoing: QEMU kept off host-local addresses

    def contain(self) -> None:
        if self.guard:
            self.guard.setup()

    def setup(self, running: list[tuple[VMRow, bool]]) -> None:
        return None

    def close(self, vms_running: int) -> None:
        if self.guard:
            self.guard.close(vms_running)

    def assign(self, vms: list[VMRow], taken: set[str]) -> None:
        return None

    def hostfwd(self, vm: VMRow, forward_addr: str) -> tuple[str, ...]:
        return tuple(f"tcp:{forward_addr}:{host}-:{guest}"
                     for guest, host in port_map(vm).items())

    def start_domain(self, vm: VMRow, xml: str, nic: dict, deny_outgoing: bool) -> None:
        self.engine.start(xml)

    def wait_ready(self, vm: VMRow, timeout: float, console: Path,
                   cancel: threading.Event) -> None:
        return None

    def start_clone(self, vm: VMRow, xml: str, state: Path, nic: dict,
                    deny_outgoing: bool) -> libvirt.virDomain:
        return self.engine.start_from_memory(xml, state)

    def adopt(self, vm: VMRow, dom: libvirt.virDomain, restricted: bool,
              timeout: float) -> None:
        if not restricted:  # the template's lease came from a restricted network, which
            identity.renew_lease(dom, timeout)  # announces no router: one with a router

    def unpublish(self, vm: VMRow) -> None:
        return None

    def add_forward(self, vm: VMRow, guest: int, host: int) -> None:
        self.monitor(vm, f"hostfwd_add {NETDEV_ID} tcp:{self.cfg.forward_addr}:{host}-:{guest}",
                     ())

    def remove_forward(self, vm: VMRow, host: int) -> None:
        # "not found" is fine: the goal (no such forward) holds, e.g. after a retry
        self.monitor(vm, f"hostfwd_remove {NETDEV_ID} tcp:{self.cfg.forward_addr}:{host}",
                     ("removed", "not found"))


class BridgedNetwork:
    """A TAP per VM on a host bridge (see the module docstring)."""

    name = "bridge"
    warm_clones = True

    def __init__(self, engine: Engine, bridge: BridgeNetwork) -> None:
        self.engine = engine
        self.bridge = bridge

    def contain(self) -> None:
        return None

    def setup(self, running: list[tuple[VMRow, bool]]) -> None:
        self.bridge.setup({vm.id: (lease(vm), port_map(vm), deny)
                           for vm, deny in running if vm.net_addr})

    def close(self, vms_running: int) -> None:
        self.bridge.close()

    def assign(self, vms: list[VMRow], taken: set[str]) -> None:
        taken = set(taken)
        for vm in vms:
            vm.net_addr = self.bridge.lease(vm.id, taken).addr
            taken.add(vm.net_addr)

    def hostfwd(self, vm: VMRow, forward_addr: str) -> tuple[str, ...]:
        return ()

    def start_domain(self, vm: VMRow, xml: str, nic: dict, deny_outgoing: bool) -> None:
        dom = self.engine.start(xml, paused=True)
        self._plug(vm, dom, nic, deny_outgoing)
        dom.resume()

    def start_clone(self, vm: VMRow, xml: str, state: Path, nic: dict,
                    deny_outgoing: bool) -> libvirt.virDomain:
        return self.engine.start_from_memory(
            xml, state, before_load=lambda dom: self._plug(vm, dom, nic, deny_outgoing))

    def _plug(self, vm: VMRow, dom: libvirt.virDomain, nic: dict,
              deny_outgoing: bool) -> None:
        """A paused domain's NIC on the VM's TAP; its ports and lease published."""
        tap = lease(vm)
        fd = self.bridge.open_tap(tap)
        try:
            self.engine.plug_nic(dom, fd, tap.mac, nic)
        finally:
            os.close(fd)
        self.bridge.publish(tap, port_map(vm), deny_outgoing)

    def adopt(self, vm: VMRow, dom: libvirt.virDomain, restricted: bool,
              timeout: float) -> None:
        identity.take_mac(dom, lease(vm).mac, timeout)

    def wait_ready(self, vm: VMRow, timeout: float, console: Path,
                   cancel: threading.Event) -> None:
        """Until the guest holds its DHCP address (the agent can answer before the
        guest's DHCP client is done, and then SSH through the mapped port fails)."""
        want = lease(vm).addr

        def holds_address() -> bool | None:
            try:
                nics = agent.command(self.engine.lookup(vm.domain),
                                     "guest-network-get-interfaces") or []
            except agent.AgentError:
                nics = []
            return True if any(a.get("ip-address") == want for nic in nics
                               for a in nic.get("ip-addresses", [])) else None

        try:
            wait_for(holds_address, max(timeout, 5.0), cancel=cancel,
                     what=f"VM {vm.domain} taking its DHCP address {want}")
        except WaitCancelled:
            raise BootTimeout(f"VM {vm.domain}: boot cancelled (ENV deleted)") from None
        except WaitTimeout as exc:
            raise BootTimeout(f"{exc}; console tail:\n{console_tail(console)}") from None

    def unpublish(self, vm: VMRow) -> None:
        if not vm.net_addr:
            return
        try:
            self.bridge.unpublish(lease(vm), port_map(vm))
        except Exception:  # noqa: BLE001 - teardown goes on; setup() rebuilds the table
            log.exception("unpublishing %s", vm.id)

    def add_forward(self, vm: VMRow, guest: int, host: int) -> None:
        try:
            self.bridge.map_port(vm.net_addr, guest, host)
        except NetworkError as exc:
            raise GuestError(str(exc)) from exc

    def remove_forward(self, vm: VMRow, host: int) -> None:
        try:
            self.bridge.unmap_port(host)
        except NetworkError as exc:
            if "No such file" not in str(exc):  # not mapped: fine, the goal holds
                raise GuestError(str(exc)) from exc


def choose(cfg: ServerConfig, engine: Engine, monitor: Monitor,
           server_id: str, qemu_uid: int) -> VMNetwork:
    """The variant `cfg.network` names. GuardError (from LocalAddressGuard) when
    --allow-outgoing with user networking cannot be made safe."""
    if cfg.network == "bridge":
        return BridgedNetwork(engine, BridgeNetwork(cfg.cfgdb_path / "bridge",
                                                    cfg.bridge_name, cfg.bridge_subnet,
                                                    cfg.allow_outgoing))
    # user networking with outgoing allowed: QEMU's connections to host-local addresses
    # are refused (the guest's 10.0.2.2 is the host's loopback)
    guard = LocalAddressGuard(server_id, qemu_uid) if cfg.allow_outgoing else None
    return UserNetwork(cfg, engine, monitor, guard)
