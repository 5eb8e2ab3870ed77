"""uvicorn's h11 protocol with the two read deadlines uvicorn lacks (ttserver, ttproxy).

uvicorn times out only an idle kept-alive connection (`timeout_keep_alive`, after a
response). A client that opens a connection and sends nothing, or sends a request's
headers a byte at a time, or announces a body and stops sending it, holds a connection
and its buffers for good (slowloris); a few hundred of them exhaust the daemon's file
descriptors. As nginx does (`client_header_timeout`, `client_body_timeout`, 60 s each by
default), a connection is closed when a request's headers are not complete within
`header_timeout` seconds of its first byte (or of the connection, or of the previous
response), and when a body being sent stalls for `body_timeout` seconds between two
reads. While uvicorn itself has paused reading (the app is slower than the client, e.g.
a push to a guest under TCG), the body deadline waits. Needs uvicorn (the daemons'
extras); imported only by `serving.serve`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """H11Protocol whose connections close when a request's headers or body stall (see
    the module docstring); `header_timeout` and `body_timeout` are seconds, set on a
    subclass by `with_deadlines`."""

    header_timeout = 60.0
    body_timeout = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind: str | None = None
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(progress=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(None)
        super().connection_lost(exc)

    def _watch(self, progress: bool = False) -> None:
        """Arm the deadline the client's state calls for: waiting for a request's head
        (armed once per request), sending a body (re-armed on each read), or none."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._deadline_kind != "header":
                self._set_deadline("header")
        elif state is h11.SEND_BODY:
            if progress or self._deadline_kind != "body":
                self._set_deadline("body")
        else:
            self._set_deadline(None)

    def _set_deadline(self, kind: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline_kind = kind
        self._deadline = None if kind is None else self.loop.call_later(
            self.header_timeout if kind == "header" else self.body_timeout, self._expired)

    def _expired(self) -> None:
        if self.transport.is_closing():
            return
        if self._deadline_kind == "body" and self.flow.read_paused:
            self._set_deadline("body")  # we stopped reading, not the client
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self.logger.info("closing a connection from %s: its request's %s stalled", client,
                         "body" if self._deadline_kind == "body" else "headers")
        self._deadline_kind = self._deadline = None
        self.transport.close()


def with_deadlines(header_timeout: float, body_timeout: float) -> type[Any]:
    """A TimedH11Protocol class with these deadlines (seconds), for uvicorn's `http=`."""
    return type("TimedH11Protocol", (TimedH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})
