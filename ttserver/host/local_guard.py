"""Keep VMs off the host's own addresses when QEMU user networking lets them out.

With `--allow-outgoing` and user networking, QEMU's slirp makes a guest's connections
from the host, as the QEMU process: the guest's 10.0.2.2 is the host's 127.0.0.1, so a VM
reached the API and every other VM's forwarded ports (issue 24). Slirp has no option to
refuse host-local destinations (`restrict=on` cuts everything), so the host does it:
an nftables output rule rejects new connections that sockets of QEMU's user (libvirt's
DAC user, `libvirt-qemu` on Debian) open to any local address (`fib daddr type local`:
loopback and the host's own addresses), except DNS, which slirp forwards to the host's
resolver. Connections QEMU accepted (port forwards) are established, not new, so they
pass; libvirt talks to QEMU over UNIX sockets and file descriptors, not affected.

The rule is per uid, so it covers every QEMU of that user on the host. Each server
keeps its own table (`ttstack_guard_<server id>`), made at start before any VM boots;
a stop removes it only when none of the server's VMs still runs (they keep running
across restarts, and must stay guarded meanwhile).
"""

from __future__ import annotations

import logging

from .bridge import nft

log = logging.getLogger(__name__)


class GuardError(RuntimeError):
    """The guard cannot be set up; the message says what to change."""


class LocalAddressGuard:
    """The nftables table that keeps QEMU's user (`qemu_uid`) off host-local addresses."""

    def __init__(self, server_id: str, qemu_uid: int) -> None:
        if qemu_uid == 0:
            raise GuardError(
                "--allow-outgoing with user networking needs QEMU to run as its own user "
                "(libvirt-qemu): as root, its guests would reach the host's own addresses "
                "(the API, other VMs' ports). Use --network bridge, or drop --allow-outgoing")
        self.uid = qemu_uid
        self.table = f"ttstack_guard_{server_id}".replace("-", "_")

    def script(self) -> str:
        """The table as one nft transaction (flush-and-define: no gap on a restart)."""
        match = f"meta skuid {self.uid} ct state new fib daddr type local"
        return (f"table inet {self.table}\n"
                f"delete table inet {self.table}\n"
                f"table inet {self.table} {{\n"
                f"  chain output {{\n"
                f"    type filter hook output priority filter; policy accept;\n"
                f"    {match} meta l4proto {{ tcp, udp }} th dport 53 accept\n"
                f"    {match} counter reject\n"
                f"  }}\n"
                f"}}\n")

    def setup(self) -> None:
        """Make (or remake) the table; GuardError when nft fails (e.g. not installed)."""
        try:
            nft(self.script())
        except (OSError, RuntimeError) as exc:
            raise GuardError(f"--allow-outgoing: cannot keep VMs off the host's addresses"
                             f" ({exc}); install nftables or drop --allow-outgoing") from exc

    def close(self, vms_running: int) -> None:
        """Remove the table, unless `vms_running` VMs of this server still run."""
        if vms_running:
            log.info("keeping nft table %s: %d VM(s) still running", self.table, vms_running)
            return
        nft(f"delete table inet {self.table}\n", check=False)
