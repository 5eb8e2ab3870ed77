"""What both daemons check before a request reaches a route: the Host header, the caller's
token, the body's type and size. Pure ASGI, standard library only (shared by ttserver and
ttproxy, which must not import each other).

Why in front of the routes and not in them: FastAPI reads and parses a request's whole
body before it runs a route's dependencies, so a token check written as a dependency
comes after an unauthenticated caller's body is in memory (bad JSON answered 422, not
401), and a size check on Content-Length alone lets a chunked upload grow without limit.
Here the order is: Host (DNS rebinding: a browser page whose name resolves to 127.0.0.1
must not reach a loopback server) and the browser's own word on where a request comes
from (Origin, Sec-Fetch-Site: a cross-site form POST needs no preflight), then the token,
then the body, its type and size checked as it arrives. WebSocket requests get the same
Host, origin and token checks (the daemons have no WebSocket route yet; browsers apply
no CORS to WebSockets).
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .audit import denied

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_LIMIT = 8 << 20  # bytes of a JSON body: a run's 1 Mi-character command, escaped
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


class _BodyRefused(Exception):
    """Raised inside the app's receive(): the body turned out unacceptable as it arrived."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.message)
        self.refused = refused


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
    IP literals are always accepted (see host_allowed)."""
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
        if authenticate is not None and inspect.iscoroutinefunction(authenticate):
            raise TypeError("Guard: authenticate must be a plain function (an unawaited "
                            "coroutine would pass for a principal)")
        self.app = app
        self.names = names
        self.upload_limit = upload_limit
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        raw = scope.get("headers", [])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        try:
            if sum(1 for k, _ in raw if k.lower() == b"host") > 1:
                raise Refused(400, "more than one Host header")
            self._check_caller(scope, headers)
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            upload, limit = self._check_body_headers(scope, headers)
        except Refused as exc:
            if exc.status in (401, 403):  # the audit trail names who was turned away
                denied(scope, exc.status, exc.message)
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _answer(send, exc)
            return
        await self._limited(scope, receive, send, headers, upload, limit)

    def _check_caller(self, scope: Scope, headers: dict[str, str]) -> None:
        """Host, the browser's origin and the token; the principal into the scope."""
        host = headers.get("host", "")
        if not host_allowed(host, self.names):
            raise Refused(400, f"Host {host!r} is not served here (a guard against DNS"
                               " rebinding); the operator can add the name with"
                               " --allowed-host")
        site = headers.get("sec-fetch-site", "").lower()
        origin = headers.get("origin", "")
        if site in ("cross-site", "same-site") or (
                origin and origin != "null" and origin.split("://", 1)[-1].lower()
                != host.lower()):
            raise Refused(403, "a browser page of another site may not call this API")
        if self.authenticate is not None and scope.get("path", "") not in OPEN_PATHS:
            try:
                principal = self.authenticate(headers.get("authorization"))
            except Exception as exc:  # AuthError and friends: they carry a status
                status = getattr(exc, "status", None)
                if not isinstance(status, int):
                    raise
                extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
                raise Refused(status, str(exc), extra) from exc
            scope.setdefault("state", {})["principal"] = principal

    def _check_body_headers(self, scope: Scope, headers: dict[str, str]) -> tuple[bool, int]:
        """The body as its headers announce it: (upload route?, its byte limit)."""
        upload = scope["method"] == "PUT" and scope.get("path", "").endswith("/files")
        limit = self.upload_limit if upload else JSON_LIMIT
        if scope["method"] in BODY_METHODS:
            length = headers.get("content-length")
            length = length.strip() if length is not None else None  # HTTP's optional spaces
            if length is not None and not (length.isascii() and length.isdigit()
                                           and len(length) <= 19):
                raise Refused(400, f"Content-Length {length[:40]!r} is not a byte count")
            has_body = (length is not None and int(length) > 0) or (
                "transfer-encoding" in headers)
            if has_body and not upload and not _is_json(headers):
                raise Refused(415, _not_json(headers))
            if length is not None and int(length) > limit:
                raise Refused(413, _too_large(limit, upload))
        return upload, limit

    async def _limited(self, scope: Scope, receive: Receive, send: Send,
                       headers: dict[str, str], upload: bool, limit: int) -> None:
        """Run the app with the body checked as it arrives: a JSON route's body must be
        typed JSON whatever its headers announced, and past `limit` nothing more is read;
        the caller then gets 415 or 413 (whatever the app was about to answer)."""
        seen = 0
        refused: Refused | None = None
        started = False

        async def checking_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                if chunk and not upload and not _is_json(headers):
                    refused = Refused(415, _not_json(headers))
                    raise _BodyRefused(refused)
                seen += chunk
                if seen > limit:
                    refused = Refused(413, _too_large(limit, upload), {"Connection": "close"})
                    raise _BodyRefused(refused)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None:
                return  # the app's answer to a refused body; ours goes out below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, checking_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is not None and not started:
            await _answer(send, refused)


def _content_type(headers: dict[str, str]) -> str:
    """The media type of the Content-Type header, lower case, without parameters."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(headers: dict[str, str]) -> bool:
    return _content_type(headers) == "application/json"


def _not_json(headers: dict[str, str]) -> str:
    return (f"the body must be JSON (Content-Type: application/json), not "
            f"{_content_type(headers) or 'untyped'}")


def _too_large(limit: int, upload: bool) -> str:
    size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
    if upload:
        return f"file over the {size} limit; copy big data from inside the VM instead"
    return f"request body over the {size} limit"


async def _answer(send: Send, refused: Refused) -> None:
    body = json.dumps({"detail": refused.message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refused.headers.items()]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
