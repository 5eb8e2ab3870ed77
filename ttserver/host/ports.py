"""Host ports for forwards: chosen from a range, skipping ports on record or in use.

QEMU binds the port a moment later, so a port is also checked by binding it here; the record
in SQLite (written in the same transaction) keeps two creates from picking the same one.
"""

from __future__ import annotations

import socket

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


class PortPool:
    """Host TCP ports `first`..`last` on `addr`, handed out round-robin; ValueError for a
    range outside 1024-65535."""

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
