"""What both daemons check before a request reaches a route: the Host header, the caller's
token, the body's type and size. Pure ASGI, standard library only (shared by ttserver and
ttproxy, which must not import each other).

Why in front of the routes and not in them: FastAPI reads and parses a request's whole
body before it runs a route's dependencies, so a token check written as a dependency
comes after an unauthenticated caller's body is in memory (bad JSON answered 422, not
401), and a size check on Content-Length alone lets a chunked upload grow without limit.
Here the order is: Host (DNS rebinding: a browser page whose name resolves to 127.0.0.1
must not reach a loopback server), then the token, then the body, counted as it arrives.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_LIMIT = 1 << 20  # bytes of a JSON body (an ENV request is a few hundred)
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Refused(Exception):
    """A request the guard answers itself: HTTP `status`, a one-line `message`, and extra
    response `headers`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _TooLarge(Exception):
    pass


def add_allowed_host_option(parser: Any, what: str) -> None:
    """`--allowed-host NAME` (repeatable, into `allowed_host`) on a daemon's argparse
    parser; `what` names the daemon for the help text."""
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help=f"a DNS name clients use for this {what}, besides localhost and"
                             " the machine's host name (other Host headers are refused: DNS"
                             " rebinding); repeatable")


def served_names(bind: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names a daemon bound to `bind` answers to (lower case): localhost, this
    machine's host name and FQDN, `bind` when it is a name, and `extra` (--allowed-host).
    IP literals are always accepted (see HostCheck)."""
    names = {"localhost", socket.gethostname(), socket.getfqdn(), bind, *extra}
    return frozenset(n.lower().rstrip(".") for n in names if n)


def host_allowed(host_header: str, names: frozenset[str]) -> bool:
    """True for a Host header naming an IP literal (no DNS, so no rebinding), one of
    `names`, or none at all (HTTP/1.0); any port."""
    if not host_header:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host.rstrip(".") in names


class Guard:
    """ASGI middleware: refuse a request whose Host is not served (400), whose caller
    `authenticate` rejects (401/403, before any body byte is read; the principal goes to
    `scope["state"]["principal"]`), whose JSON body is not `application/json` (415), or
    whose body is over its limit (413: `upload_limit` for `PUT .../files`, JSON_LIMIT
    otherwise), counted as it arrives whatever the framing.

    `authenticate(authorization_header)` returns the principal or raises an exception with
    `status` (an int) and a message; None: the app authenticates nobody (ttproxy passes
    tokens on to the servers)."""

    def __init__(self, app: Any, *, names: frozenset[str], upload_limit: int,
                 authenticate: Callable[[str | None], Any] | None = None) -> None:
        self.app = app
        self.names = names
        self.upload_limit = upload_limit
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        try:
            limit = self._check(scope, headers)
        except Refused as exc:
            await _answer(send, exc)
            return
        await self._limited(scope, receive, send, limit)

    def _check(self, scope: Scope, headers: dict[str, str]) -> int:
        """Host, token and body type; the body limit for this request."""
        if not host_allowed(headers.get("host", ""), self.names):
            raise Refused(400, f"Host {headers.get('host')!r} is not served here (a guard"
                               " against DNS rebinding); the operator can add the name with"
                               " --allowed-host")
        path = scope.get("path", "")
        if self.authenticate is not None and path not in OPEN_PATHS:
            try:
                principal = self.authenticate(headers.get("authorization"))
            except Exception as exc:  # AuthError and friends: they carry a status
                status = getattr(exc, "status", None)
                if not isinstance(status, int):
                    raise
                extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
                raise Refused(status, str(exc), extra) from exc
            scope.setdefault("state", {})["principal"] = principal
        upload = scope["method"] == "PUT" and path.endswith("/files")
        limit = self.upload_limit if upload else JSON_LIMIT
        if scope["method"] in BODY_METHODS:
            length = headers.get("content-length")
            has_body = (length not in (None, "0")) or "transfer-encoding" in headers
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if has_body and not upload and ctype != "application/json":
                raise Refused(415, f"the body must be JSON (Content-Type: application/json),"
                                   f" not {ctype or 'untyped'}")
            if length is not None and length.isdigit() and int(length) > limit:
                raise Refused(413, _too_large(limit, upload))
        return limit

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with the body counted: past `limit` it reads no more and the caller
        gets 413 (whatever the app was about to answer)."""
        seen = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a cut-off body; ours goes out below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        upload = scope["method"] == "PUT"
        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _answer(send, Refused(413, _too_large(limit, upload),
                                        {"Connection": "close"}))


def _too_large(limit: int, upload: bool) -> str:
    if upload:
        return (f"file over the {limit >> 20} MiB limit; copy big data from inside the VM"
                " instead")
    return f"request body over the {limit >> 10} KiB limit"


async def _answer(send: Send, refused: Refused) -> None:
    body = json.dumps({"detail": refused.message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refused.headers.items()]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
