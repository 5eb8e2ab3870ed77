"""Host ports for forwards: chosen from a range, skipping ports on record or in use.

QEMU binds the port when the VM boots, so a port is also checked by binding it here; the
record in SQLite (written in the same transaction) keeps two creates from picking the same
one. Between the two, minutes when VMs wait for a boot slot, the kernel could hand the
port to any outgoing connection of the host as its local port (the default ephemeral range,
32768-60999, holds the default forward range): QEMU's bind then failed ("Could not set
up host forwarding rule"). So the server reserves its range from automatic assignment
(`net.ipv4.ip_local_reserved_ports`, Documentation/networking/ip-sysctl.rst), which leaves
explicit binds, QEMU's, as they are.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ..errors import Conflict

PortMap = dict[int, int]
"""Forwarded ports of one VM: guest port -> host port (the only direction, everywhere:
the state DB, QEMU's hostfwd, the bridge's nftables map)."""


def is_free(addr: str, port: int) -> bool:
    """True when a TCP socket can bind `port` on `addr` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVE_LOCK = Path("/run/ttstack-reserved-ports.lock")


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """`ip_local_reserved_ports` syntax ("8080,40000-49999"; "" for none) as (first, last)
    pairs; ValueError when malformed."""
    out = []
    for part in text.replace("\n", "").split(","):
        if part.strip():
            first, _, last = part.strip().partition("-")
            out.append((int(first), int(last or first)))
    return out


def covers(ranges: list[tuple[int, int]], first: int, last: int) -> bool:
    """True when every port of first..last is in one of `ranges`."""
    port = first
    for low, high in sorted(ranges):
        if low <= port <= high:
            port = high + 1
        if port > last:
            return True
    return port > last


def _read_all(path: Path) -> str:
    """A sysctl file's whole text: one read() of up to 1 MiB (the kernel serves a large
    bitmap sysctl only to a read at offset 0; Path.read_text reads 8 KiB at a time)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20).decode()
    finally:
        os.close(fd)


def reserve(first: int, last: int, sysctl: Path = RESERVED_PORTS,
            ephemeral: Path = EPHEMERAL_PORTS, lock: Path = RESERVE_LOCK) -> str:
    """Add first..last to the kernel's reserved ports (of this network namespace), so no
    outgoing connection takes one as its local port; "" when they are (or already were),
    else why not: not root, a read-only /proc/sys in a container, or a range that would
    leave fewer than half of the kernel's automatic ports (`ip_local_port_range`) to
    outgoing connections. A write replaces the kernel's whole list: servers starting at
    once on the host take turns (flock on `lock`)."""
    try:
        low, high = (int(n) for n in _read_all(ephemeral).split())
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            current = _read_all(sysctl).strip()
            ranges = parse_ranges(current)
            if covers(ranges, first, last):
                return ""
            reserved: set[int] = set()
            for start, end in [*ranges, (first, last)]:
                reserved.update(range(max(start, low), min(end, high) + 1))
            free = high - low + 1 - len(reserved)
            if free < (high - low + 1) / 2:
                return (f"it would leave {free} of the {high - low + 1} automatic ports "
                        f"{low}-{high} (net.ipv4.ip_local_port_range) to outgoing "
                        "connections; choose a --port-range outside them")
            with open(sysctl, "w") as out:
                out.write(",".join(filter(None, [current, f"{first}-{last}"])) + "\n")
            if covers(parse_ranges(_read_all(sysctl)), first, last):
                return ""
            return f"{sysctl} does not list {first}-{last} after writing it"
    except (OSError, ValueError) as exc:
        return f"{sysctl}: {exc}"


class PortPool:
    """Host TCP ports `first`..`last` on `addr`, handed out round-robin; ValueError for a
    range outside 1024-65535 (the server also reserves it from the kernel's automatic
    port assignment: `reserve`)."""

    def __init__(self, addr: str, first: int, last: int) -> None:
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
        self.addr = addr
        self.first, self.last = first, last
        self._next = first

    def take(self, count: int, used: set[int]) -> list[int]:
        """Pick `count` free ports, round-robin so a just-freed port is not reused at once."""
        if count <= 0:
            return []
        span = self.last - self.first + 1
        out: list[int] = []
        for _ in range(span):
            port = self._next
            self._next = self.first + (self._next - self.first + 1) % span
            if port in used or port in out or not is_free(self.addr, port):
                continue
            out.append(port)
            if len(out) == count:
                return out
        raise Conflict(f"no {count} free host port(s) left in {self.first}-{self.last}; delete"
                       " ENVs or widen the server's --port-range")
