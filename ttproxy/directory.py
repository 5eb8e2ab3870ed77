"""Where ENVs live, as the proxy has learnt it: which servers hold a part of each ENV (in
VM order) and the last view each of them gave of its part (shown while it is down).

Learnt, never authoritative: the servers are (`Proxy.refresh` re-reads them). Thread-safe.
"""

from __future__ import annotations

import threading


class EnvDirectory:
    """ENV name -> holder addresses, and (ENV, address) -> last view seen there."""

    def __init__(self) -> None:
        self._where: dict[str, list[str]] = {}
        self._last: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()

    def remember(self, name: str, address: str, view: dict) -> None:
        """`address` holds part of ENV `name`; `view` is that part as just seen."""
        with self._lock:
            holders = self._where.setdefault(name, [])
            if address not in holders:
                holders.append(address)
            self._last[(name, address)] = view

    def forget(self, name: str, address: str | None = None) -> None:
        """`address` no longer holds part of `name` (None: no server does)."""
        with self._lock:
            if address is None:
                self._where.pop(name, None)
                for key in [k for k in self._last if k[0] == name]:
                    del self._last[key]
                return
            holders = self._where.get(name, [])
            if address in holders:
                holders.remove(address)
            self._last.pop((name, address), None)
            if not holders:
                self._where.pop(name, None)

    def holders(self, name: str) -> list[str]:
        """The addresses holding a part of `name`, in VM order; [] when unknown."""
        with self._lock:
            return list(self._where.get(name, []))

    def last(self, name: str, address: str) -> dict | None:
        """The last view of `name`'s part on `address`, or None if never seen."""
        with self._lock:
            return self._last.get((name, address))

    def parts(self) -> list[tuple[str, str, dict | None]]:
        """Every (ENV name, holder address, last view) known, as a snapshot."""
        with self._lock:
            return [(name, address, self._last.get((name, address)))
                    for name, holders in self._where.items() for address in holders]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._where

    def name_like(self, name: str) -> str | None:
        """The known ENV name equal to `name` ignoring case, or None (as ttserver's
        StateDB.name_like)."""
        with self._lock:
            return next((n for n in self._where if n.lower() == name.lower()), None)

    def __len__(self) -> int:
        """How many ENVs are known."""
        with self._lock:
            return len(self._where)
