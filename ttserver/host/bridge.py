"""Bridge networking (`--network bridge`): every VM on one Linux bridge with its own
address, host ports mapped to VM ports by nftables.

What is created, and by whom:
- the bridge (pyroute2) with the gateway address, in the network namespace ttserver runs
  in — a production host's own, or one a test made;
- one TAP per VM, opened *here* and handed to QEMU as a file descriptor (QMP `getfd`,
  `netdev_add`, `device_add` while the domain is still paused). The TAP is not persistent:
  it disappears with QEMU's descriptor, so a destroyed or crashed VM cannot leak one, and
  the TAP lives in ttserver's namespace even though libvirtd and QEMU run elsewhere;
- one nftables table holding a MAP `host port → VM address . VM port`, a SET of mapped
  host ports and a SET of VMs whose ENV denies outgoing traffic. A VM's entries are added
  and removed in one nft transaction each; the rules never change;
- one nftables table of the bridge family binding each TAP to its VM's MAC and leased
  IPv4 address: a frame a VM sends with another source MAC or address (IPv4 or ARP), or
  any IPv6 (no rogue router advertisements), is dropped at its bridge port, so
  deny-outgoing cannot be bypassed by taking another address;
- one dnsmasq answering DHCP only (no DNS), with a static lease per VM (MAC → address)
  from a hosts file it re-reads on SIGHUP.

Server stop removes table, dnsmasq and bridge; VMs keep running (ENVs survive restarts),
their TAPs are re-attached at the next start. Why the `nft` command and not the Python
binding: the binding ships only with Debian's python3 (not on PyPI), ttserver may run on
another interpreter, and `nft -f -` applies a whole file as one atomic transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import signal
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from ttclient.waiting import WaitTimeout, wait_for

from .ports import PortMap

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
NFT_TIMEOUT = 30
DNSMASQ_START_TIMEOUT = 10.0


class NetworkError(RuntimeError):
    """Setting up or changing the bridge network failed (nft, dnsmasq, a TAP, a too-small
    subnet); the message has the tool's error."""
    pass


@dataclass(frozen=True)
class Lease:
    """One VM's place on the bridge."""
    addr: str
    mac: str
    tap: str

    @classmethod
    def of(cls, vm_id: str, addr: str) -> Lease:
        """The lease of VM `vm_id` at `addr`: MAC and TAP name follow from them."""
        return cls(addr, mac_for(addr), tap_name(vm_id))


def tap_name(vm_id: str) -> str:
    """The TAP interface name of VM `vm_id`: `tt` and 12 hex digits of its hash (within the
    15-character limit)."""
    return "tt" + hashlib.sha256(vm_id.encode()).hexdigest()[:12]  # IFNAMSIZ: 15 chars


def mac_for(addr: str) -> str:
    """A locally administered MAC derived from the address: stable across restarts."""
    b = ipaddress.IPv4Address(addr).packed
    return "52:54:" + ":".join(f"{x:02x}" for x in b)


def nft(script: str, check: bool = True) -> str:
    """Apply an nft script as one transaction (an empty one is nothing to do)."""
    if not script:
        return ""
    res = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                         timeout=NFT_TIMEOUT)
    if check and res.returncode != 0:
        raise NetworkError(f"nft: {res.stderr.strip()}")
    return res.stdout


class BridgeNetwork:
    """The Linux bridge `bridge` on `subnet` (its first address the host's), its nftables
    table and its DHCP server; state files under `state_dir`. NetworkError for a subnet
    smaller than /29."""

    def __init__(self, state_dir: Path, bridge: str, subnet: str, allow_outgoing: bool) -> None:
        self.state_dir = state_dir
        self.bridge = bridge
        self.net = ipaddress.IPv4Network(subnet)
        if self.net.num_addresses < 8:
            raise NetworkError(f"--bridge-subnet {subnet} is too small (at least /29)")
        self.gateway = str(next(self.net.hosts()))
        self.allow_outgoing = allow_outgoing
        self.table = f"ttstack_{bridge}".replace("-", "_")
        self.hosts_file = state_dir / "dhcp-hosts"
        self.pid_file = state_dir / "dnsmasq.pid"
        self._lock = threading.Lock()
        self._dnsmasq: subprocess.Popen | None = None

    # --- server start and stop -----------------------------------------------------------
    def setup(self, live: dict[str, tuple[Lease, PortMap, bool]]) -> None:
        """Create bridge, rules and DHCP; re-attach and re-publish VMs that survived a
        restart (`live`: VM id → lease, port map, deny_outgoing)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale_dnsmasq()
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=self.bridge):
                ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.flush_addr(index=idx)
            ipr.addr("add", index=idx, address=self.gateway, prefixlen=self.net.prefixlen)
            ipr.link("set", index=idx, state="up")
            for vm_id, (lease, _, _) in live.items():
                tap = ipr.link_lookup(ifname=lease.tap)
                if tap:
                    ipr.link("set", index=tap[0], master=idx, state="up")
                else:
                    log.warning("VM %s has no TAP %s any more", vm_id, lease.tap)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        nft(self._ruleset() + self._port_ruleset())
        nft("".join(self._add(lease.addr, ports, deny) + self._bind(lease)
                    for lease, ports, deny in live.values()))
        self.hosts_file.write_text("".join(f"{lease.mac},{lease.addr}\n"
                                           for lease, _, _ in live.values()))
        self._start_dnsmasq()

    def close(self) -> None:
        """Server stop: everything this module made goes; running VMs lose their link
        until the next start."""
        self._kill_dnsmasq()
        nft(f"delete table ip {self.table}\n", check=False)
        nft(f"delete table bridge {self.table}\n", check=False)
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=self.bridge):
                ipr.link("del", index=idx)
        for f in (self.hosts_file, self.pid_file):
            f.unlink(missing_ok=True)

    def _ruleset(self) -> str:
        br, sub = self.bridge, str(self.net)
        outgoing = (f'    iifname "{br}" ip saddr {sub} accept\n' if self.allow_outgoing
                    else "")
        masq = (f'    ip saddr {sub} oifname != "{br}" masquerade\n' if self.allow_outgoing
                else "")
        # table ip: flush-and-define is one transaction, so a restart never has a gap
        return f"""table ip {self.table}
delete table ip {self.table}
table ip {self.table} {{
  map forwards {{ type inet_service : ipv4_addr . inet_service; }}
  set host_ports {{ type inet_service; }}
  set denied {{ type ipv4_addr; }}
  chain to_vms {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local tcp dport @host_ports dnat ip to tcp dport map @forwards
  }}
  chain to_vms_local {{
    type nat hook output priority -100; policy accept;
    fib daddr type local tcp dport @host_ports dnat ip to tcp dport map @forwards
  }}
  chain from_vms_nat {{
    type nat hook postrouting priority srcnat; policy accept;
{masq}  }}
  chain from_vms_routed {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    ct status dnat accept
    iifname "{br}" ip saddr @denied drop
{outgoing}    iifname "{br}" drop
  }}
  chain from_vms_local {{
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    iifname "{br}" udp dport 67 accept
    iifname "{br}" drop
  }}
}}
"""

    def _port_ruleset(self) -> str:
        """The bridge-family table: what may enter the bridge from a VM's TAP."""
        return f"""table bridge {self.table}
delete table bridge {self.table}
table bridge {self.table} {{
  set taps {{ type ifname; }}
  set macs {{ type ifname . ether_addr; }}
  set bound {{ type ifname . ether_addr . ipv4_addr; }}
  chain from_vms {{
    type filter hook prerouting priority filter; policy accept;
    iifname != @taps accept
    ether type ip iifname . ether saddr . ip saddr @bound accept
    ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 iifname . ether saddr @macs accept
    ether type arp iifname . ether saddr . arp saddr ip @bound accept
    ether type arp arp saddr ip 0.0.0.0 iifname . ether saddr @macs accept
    counter drop
  }}
}}
"""

    def _bind(self, lease: Lease) -> str:
        """nft element additions binding the VM's TAP to its MAC and address."""
        t, tap = self.table, f'"{lease.tap}"'
        return (f"add element bridge {t} taps {{ {tap} }}\n"
                f"add element bridge {t} macs {{ {tap} . {lease.mac} }}\n"
                f"add element bridge {t} bound {{ {tap} . {lease.mac} . {lease.addr} }}\n")

    def _unbind(self, lease: Lease) -> list[str]:
        t, tap = self.table, f'"{lease.tap}"'
        return [f"delete element bridge {t} bound {{ {tap} . {lease.mac} . {lease.addr} }}\n",
                f"delete element bridge {t} macs {{ {tap} . {lease.mac} }}\n",
                f"delete element bridge {t} taps {{ {tap} }}\n"]

    # --- per VM ----------------------------------------------------------------------
    def lease(self, vm_id: str, taken: set[str]) -> Lease:
        """A free address (not the gateway, not `taken`) for a new VM."""
        for host in self.net.hosts():
            addr = str(host)
            if addr != self.gateway and addr not in taken:
                return Lease(addr, mac_for(addr), tap_name(vm_id))
        raise NetworkError(f"no free address left in {self.net}")

    def open_tap(self, lease: Lease) -> int:
        """Create the VM's TAP on the bridge; the caller hands the descriptor to QEMU and
        closes its own copy (the TAP then lives exactly as long as QEMU)."""
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", lease.tap.encode(),
                                                  IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            with IPRoute() as ipr:
                br = ipr.link_lookup(ifname=self.bridge)
                if not br:
                    raise NetworkError(f"bridge {self.bridge} is gone")
                idx = ipr.link_lookup(ifname=lease.tap)[0]
                ipr.link("set", index=idx, master=br[0], state="up")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def publish(self, lease: Lease, ports: PortMap, deny: bool) -> None:
        """Map the VM's forwarded ports and give it its DHCP lease."""
        with self._lock:
            nft(self._add(lease.addr, ports, deny) + self._bind(lease))
            self._set_dhcp_host(lease, present=True)

    def unpublish(self, lease: Lease, ports: PortMap) -> None:
        """Drop the VM's entries (missing ones are fine: this runs on every teardown)."""
        with self._lock:
            for host in ports.values():  # one transaction each: a missing one fails alone
                nft(self._unmap(host), check=False)
            nft(f"delete element ip {self.table} denied {{ {lease.addr} }}\n", check=False)
            for unbind in self._unbind(lease):
                nft(unbind, check=False)
            self._set_dhcp_host(lease, present=False)

    def map_port(self, addr: str, guest: int, host: int) -> None:
        """A running VM's new forward (`tt env update --port`)."""
        nft(self._add(addr, {guest: host}, deny=False))

    def unmap_port(self, host: int) -> None:
        """Drop host port `host`'s mapping to its VM; NetworkError from nft (also when it is
        not mapped)."""
        nft(self._unmap(host))

    def _add(self, addr: str, ports: PortMap, deny: bool) -> str:
        """nft element additions: each host port of `ports` mapped to its guest port on
        `addr`, and `addr` in the denied set."""
        t, out = self.table, ""
        if ports:
            items = sorted((h, g) for g, h in ports.items())
            out += (f"add element ip {t} forwards {{ "
                    + ", ".join(f"{h} : {addr} . {g}" for h, g in items) + " }\n"
                    f"add element ip {t} host_ports {{ "
                    + ", ".join(str(h) for h, _ in items) + " }\n")
        if deny:
            out += f"add element ip {t} denied {{ {addr} }}\n"
        return out

    def _unmap(self, host: int) -> str:
        return (f"delete element ip {self.table} host_ports {{ {host} }}\n"
                f"delete element ip {self.table} forwards {{ {host} }}\n")

    # --- dnsmasq ---------------------------------------------------------------------
    def _set_dhcp_host(self, lease: Lease, present: bool) -> None:
        """Add or drop the VM's static lease in dnsmasq's hosts file, and tell it."""
        lines: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            lines = [ln for ln in self.hosts_file.read_text().splitlines()
                     if ln and not ln.startswith(lease.mac + ",")]
        if present:
            lines.append(f"{lease.mac},{lease.addr}")
        self.hosts_file.write_text("".join(f"{ln}\n" for ln in lines))
        self._reload_dnsmasq()

    def _start_dnsmasq(self) -> None:
        first, last = str(self.net.network_address + 2), str(self.net.broadcast_address - 1)
        cmd = ["dnsmasq", "--keep-in-foreground", "--port=0", "--no-resolv", "--no-hosts",
               f"--interface={self.bridge}", "--bind-interfaces", "--except-interface=lo",
               f"--dhcp-range={first},{last},{self.net.netmask},1h",
               f"--dhcp-hostsfile={self.hosts_file}", "--dhcp-ignore=tag:!known",
               f"--dhcp-leasefile={self.state_dir / 'dnsmasq.leases'}",
               f"--pid-file={self.pid_file}", "--log-facility=-", "--quiet-dhcp",
               f"--dhcp-option=option:router,{self.gateway}", "--user=root"]
        log_file = open(self.state_dir / "dnsmasq.log", "ab")  # noqa: SIM115 - child keeps it
        try:
            self._dnsmasq = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        except FileNotFoundError as exc:
            raise NetworkError("dnsmasq is not installed (apt-get install dnsmasq-base)"
                               ) from exc
        finally:
            log_file.close()
        dnsmasq = self._dnsmasq

        def started() -> bool | None:
            if self.pid_file.is_file():
                return True
            if dnsmasq.poll() is not None:
                raise NetworkError(f"dnsmasq did not start: {self._dnsmasq_log()}")
            return None

        try:
            wait_for(started, DNSMASQ_START_TIMEOUT, interval=0.05, what="dnsmasq starting")
        except WaitTimeout:
            raise NetworkError(f"dnsmasq did not start: {self._dnsmasq_log()}") from None

    def _dnsmasq_log(self) -> str:
        """The tail (500 characters) of dnsmasq's log."""
        return (self.state_dir / "dnsmasq.log").read_text(errors="replace")[-500:]

    def _reload_dnsmasq(self) -> None:
        if self._dnsmasq and self._dnsmasq.poll() is None:
            self._dnsmasq.send_signal(signal.SIGHUP)

    def _kill_dnsmasq(self) -> None:
        if self._dnsmasq and self._dnsmasq.poll() is None:
            self._dnsmasq.terminate()
            try:
                self._dnsmasq.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._dnsmasq.kill()
                self._dnsmasq.wait(timeout=10)
        self._dnsmasq = None

    def _stop_stale_dnsmasq(self) -> None:
        """A dnsmasq left by a crashed server (its pid file names it)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(OSError):
            if "dnsmasq" in Path(f"/proc/{pid}/comm").read_text():
                os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(WaitTimeout):
                    wait_for(lambda: None if Path(f"/proc/{pid}").exists() else True, 5,
                             interval=0.05, what=f"dnsmasq {pid} ending")
        self.pid_file.unlink(missing_ok=True)
