"""Forwarded ports into containers: the server listens on the host port and, for each
connection, dials the guest port on the container's own loopback from inside its network
namespace, then copies bytes both ways.

A container's network namespace has only `lo` (nspawn --private-network): nothing can be
routed into it, so the server makes the connection there itself. A thread enters the
namespace (setns(2) with CLONE_NEWNET applies to the calling thread only), creates and
connects the socket and ends; the socket keeps its namespace for life and is used from
any thread. The same way QEMU's user networking forwards a host port to a VM (hostfwd):
a process on the host accepts and connects on the guest's side.

The relays run as asyncio tasks on one event loop thread for all forwards of the process
(a thread pair per connection let 3000 held connections make 6000 threads); a thread only
enters the namespace to make the socket, the connect is the loop's (with dials on a
shared pool of threads, one container whose port never answered the SYN held them all,
and every other container's SSH waited). A container's forwards relay at most
MAX_CONNECTIONS at once, all its ports together (more are closed at accept: 32 ports of
128 each held 8000 of the server's file descriptors), and once one side of a connection
has ended, the other has HALF_CLOSE_GRACE seconds to end too (socat's `-t`, longer): a
client that went away no longer holds its relay for as long as the guest keeps its end
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000  # <sched.h>
DIAL_TIMEOUT = 5.0  # a loopback connect answers at once, or never
PIECE = 1 << 16
MAX_CONNECTIONS = 256  # at once, per container (Budget)
HALF_CLOSE_GRACE = 30.0  # seconds the other direction may go on after one ended
_libc = ctypes.CDLL(None, use_errno=True)


class ForwardError(RuntimeError):
    """A forward cannot be set up (its host port is taken, the container is gone)."""


def socket_in(netns: str) -> socket.socket:
    """A new TCP socket of the network namespace at `netns` (e.g. /proc/PID/ns/net), not
    connected yet; OSError when the namespace cannot be entered."""
    got: dict[str, socket.socket | OSError] = {}

    def inside() -> None:  # a thread of its own: it never leaves the namespace
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            got["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            got["error"] = exc

    thread = threading.Thread(target=inside, name="forward-netns", daemon=True)
    thread.start()
    thread.join()
    result = got.get("sock") or got.get("error") or OSError(f"entering {netns} failed")
    if isinstance(result, OSError):
        raise result
    return result


class Budget:
    """How many connections a container's forwards may relay at once, all its ports
    together (SSH included): one container cannot take the server's file descriptors.
    Touched on the relays' loop only."""

    def __init__(self, limit: int = MAX_CONNECTIONS) -> None:
        self.limit, self.used = limit, 0


class _Loop:
    """The event loop all relays of this process run on, in a daemon thread of its own,
    started at the first forward; dials go to a small pool of threads."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    dials = ThreadPoolExecutor(max_workers=8, thread_name_prefix="forward-dial")

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        """The loop, started at the first call."""
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="forwards",
                                 daemon=True).start()
                cls._loop = loop
            return cls._loop


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy `src` to `dst` until `src` ends, then end `dst`'s sending side."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while piece := await src.read(PIECE):
            dst.write(piece)
            await dst.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if dst.can_write_eof():
            dst.write_eof()


class Forward:
    """One forwarded port: listens on (`addr`, `host_port`) and relays each connection to
    `guest_port` in the namespace `netns()` names (called per connection, so a restarted
    container is found again). ForwardError when the host port cannot be bound."""

    def __init__(self, addr: str, host_port: int, guest_port: int,
                 netns: Callable[[], str], budget: Budget | None = None) -> None:
        self.host_port, self.guest_port, self.netns = host_port, guest_port, netns
        self.budget = budget or Budget()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((addr, host_port))
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise ForwardError(f"cannot listen on {addr}:{host_port}: {exc.strerror}") from None
        self._loop = _Loop.get()
        self._relays: set[asyncio.Task] = set()  # touched on the loop's thread only
        self._said, self._refused = -60.0, 0  # when refusals were last logged, since
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, sock=listener), self._loop).result(10)

    async def _relay(self, outside_r: asyncio.StreamReader,
                     outside_w: asyncio.StreamWriter) -> None:
        if self.budget.used >= self.budget.limit:
            self._refused += 1
            now = time.monotonic()
            if now - self._said >= 60:  # a flood of them must not flood the log
                log.warning("forward %d -> %d: its container relays %d connections; %d "
                            "refused", self.host_port, self.guest_port, self.budget.limit,
                            self._refused)
                self._said, self._refused = now, 0
            outside_w.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        self.budget.used += 1
        inside_w: asyncio.StreamWriter | None = None
        try:
            # only entering the namespace takes a thread (briefly): the connect is the
            # loop's, so a guest port that never answers holds no thread of other forwards
            sock = await self._loop.run_in_executor(_Loop.dials, socket_in, self.netns())
            sock.setblocking(False)
            try:
                await asyncio.wait_for(self._loop.sock_connect(
                    sock, ("127.0.0.1", self.guest_port)), DIAL_TIMEOUT)
            except BaseException:
                sock.close()
                raise
            inside_r, inside_w = await asyncio.open_connection(sock=sock)
            ways = [asyncio.ensure_future(_pump(outside_r, inside_w)),
                    asyncio.ensure_future(_pump(inside_r, outside_w))]
            try:
                _done, pending = await asyncio.wait(ways, return_when=asyncio.FIRST_COMPLETED)
                if pending:
                    await asyncio.wait(pending, timeout=HALF_CLOSE_GRACE)
            finally:
                for way in ways:
                    way.cancel()
        except (TimeoutError, OSError, RuntimeError) as exc:
            log.info("forward %d -> %d: %s", self.host_port, self.guest_port,
                     exc or "connecting timed out")
        finally:
            for writer in (outside_w, inside_w):
                if writer is not None:
                    writer.close()
            self._relays.discard(task)
            self.budget.used -= 1

    async def _close(self) -> None:
        self._server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    def close(self) -> None:
        """Stop listening and end the connections in flight."""
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
