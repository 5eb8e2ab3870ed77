"""The ttservers behind a proxy and whether each one answers.

A background thread asks every server's /health each `interval` seconds; two misses in a
row (or a connection error seen by a request) mark it down, so a dead server is skipped
within a few seconds. Coming back up is noticed the same way and reported to a callback
(the proxy then re-learns which ENVs live there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ttclient.api import ApiError, Client

log = logging.getLogger(__name__)

MISSES_TO_DOWN = 2


@dataclass
class Member:
    """One ttserver behind the proxy: its HOST:PORT, a client with the proxy's token, and
    its health (`up`, the last error, consecutive misses, last_seen in epoch seconds)."""

    address: str
    client: Client
    up: bool = False
    error: str = "not checked yet"
    misses: int = 0
    last_seen: float = 0.0
    server_id: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ServerSet:
    """The servers at `addresses` (HOST:PORT) and their health, probed every `interval`
    seconds; ValueError when `addresses` is empty."""

    def __init__(self, addresses: list[str], interval: float = 1.0,
                 request_timeout: float = 30.0, token: str | None = None) -> None:
        if not addresses:
            raise ValueError("--server-set needs at least one HOST:PORT")
        self.interval = interval
        # the proxy's own calls (placement, learning where ENVs are) use its own token,
        # which should be an admin token when the servers require tokens
        self.members = {a: Member(a, Client(f"http://{a}", timeout=request_timeout,
                                            token=token)) for a in addresses}
        self._probe = {a: Client(f"http://{a}", timeout=max(1.0, interval * 2), token=None)
                       for a in addresses}
        self._stop = threading.Event()
        self.on_up: Callable[[str], None] | None = None

    def __iter__(self):
        return iter(self.members.values())

    def up(self) -> list[Member]:
        """The members that answer now, in --server-set order."""
        return [m for m in self.members.values() if m.up]

    def get(self, address: str) -> Member:
        """The member at `address`; KeyError when it is not in the set."""
        return self.members[address]

    def check_all(self) -> None:
        """One health round, all servers in parallel (a slow one must not delay others)."""
        threads = [threading.Thread(target=self._check, args=(m,), daemon=True)
                   for m in self.members.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _check(self, m: Member) -> None:
        try:
            health = self._probe[m.address].session.get(
                f"http://{m.address}/health", timeout=max(1.0, self.interval * 2)).json()
            self.mark_up(m, health.get("server_id", ""))
        except Exception as exc:  # noqa: BLE001 - any failure means "did not answer"
            with m.lock:
                m.misses += 1
                if m.misses >= MISSES_TO_DOWN or not m.last_seen:
                    self._set_down(m, f"no answer to /health ({type(exc).__name__})")

    def mark_up(self, m: Member, server_id: str = "") -> None:
        """The server answered: clear its error and misses; when it was down, call `on_up`
        with its address."""
        with m.lock:
            was_up = m.up
            m.up, m.error, m.misses, m.last_seen = True, "", 0, time.time()
            m.server_id = server_id or m.server_id
        if not was_up:
            log.info("server %s is up", m.address)
            if self.on_up:
                self.on_up(m.address)

    def mark_down(self, address: str, error: str) -> None:
        """A request saw the server fail: skip it now rather than after the next probe."""
        m = self.members[address]
        with m.lock:
            self._set_down(m, error)

    @staticmethod
    def _set_down(m: Member, error: str) -> None:
        if m.up:
            log.warning("server %s is down: %s", m.address, error)
        m.up, m.error = False, error

    def start(self) -> None:
        """Run one health round now, then keep probing in a daemon thread."""
        self.check_all()
        threading.Thread(target=self._loop, name="health", daemon=True).start()

    def stop(self) -> None:
        """Stop the probing thread after its current round."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_all()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("health round")


def is_unreachable(exc: ApiError) -> bool:
    """A transport failure (server down), as opposed to the server's own 4xx/5xx answer."""
    return exc.status is None
