"""Forwarded ports into containers: the server listens on the host port and, for each
connection, dials the guest port on the container's own loopback from inside its network
namespace, then copies bytes both ways.

A container's network namespace has only `lo` (nspawn --private-network): nothing can be
routed into it, so the server makes the connection there itself. A thread enters the
namespace (setns(2) with CLONE_NEWNET applies to the calling thread only), creates and
connects the socket and ends; the socket keeps its namespace for life and is used from
any thread. The same way QEMU's user networking forwards a host port to a VM (hostfwd):
a process on the host accepts and connects on the guest's side.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000  # <sched.h>
DIAL_TIMEOUT = 10.0
PIECE = 1 << 16
_libc = ctypes.CDLL(None, use_errno=True)


class ForwardError(RuntimeError):
    """A forward cannot be set up (its host port is taken, the container is gone)."""


def dial(netns: str, port: int, timeout: float = DIAL_TIMEOUT) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` inside the network namespace at `netns`
    (e.g. /proc/PID/ns/net); OSError when it cannot be made."""
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
            sock = socket.create_connection(("127.0.0.1", port), timeout)
            # the timeout was the connect's: a relayed connection may be silent for
            # as long as its ends like (an SSH session, a command printing nothing)
            sock.settimeout(None)
            got["sock"] = sock
        except OSError as exc:
            got["error"] = exc

    thread = threading.Thread(target=inside, name=f"dial-{port}", daemon=True)
    thread.start()
    thread.join()
    result = got.get("sock") or got.get("error") or OSError(f"dialing {port} failed")
    if isinstance(result, OSError):
        raise result
    return result


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """Copy `src` to `dst` until `src` ends, then end `dst`'s sending side."""
    try:
        while piece := src.recv(PIECE):
            dst.sendall(piece)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class Forward:
    """One forwarded port: listens on (`addr`, `host_port`) and relays each connection to
    `guest_port` in the namespace `netns()` names (called per connection, so a restarted
    container is found again). ForwardError when the host port cannot be bound."""

    def __init__(self, addr: str, host_port: int, guest_port: int,
                 netns: Callable[[], str]) -> None:
        self.host_port, self.guest_port, self.netns = host_port, guest_port, netns
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((addr, host_port))
            self.listener.listen(64)
        except OSError as exc:
            self.listener.close()
            raise ForwardError(f"cannot listen on {addr}:{host_port}: {exc.strerror}") from None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"forward-{host_port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                outside, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._relay, args=(outside,), daemon=True,
                             name=f"forward-{self.host_port}-conn").start()

    def _relay(self, outside: socket.socket) -> None:
        try:
            inside = dial(self.netns(), self.guest_port)
        except (OSError, RuntimeError) as exc:
            log.info("forward %d -> %d: %s", self.host_port, self.guest_port, exc)
            outside.close()
            return
        with self._lock:
            self._open.update((outside, inside))
        back = threading.Thread(target=_copy, args=(inside, outside), daemon=True)
        back.start()
        _copy(outside, inside)
        back.join()
        with self._lock:
            self._open.difference_update((outside, inside))
        outside.close()
        inside.close()

    def close(self) -> None:
        """Stop listening and end the connections in flight."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
