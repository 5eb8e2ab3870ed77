"""API tokens: who is calling, and may they touch this ENV.

The tokens file (`--tokens-file`) has one line per token, `NAME ROLE SHA256`, written by
`ttserver token add`; the token itself is shown once and never stored, so a leaked file
or backup does not leak access. The file is re-read when it changes (no restart to add or
revoke a token); a file that is deleted, emptied, made readable by others or broken
accepts no token until it is fixed (fail closed). Without a tokens file the API is open,
as on a single developer's host (loopback only, unless the operator says
--insecure-no-auth: see cli.py).

Each ENV is owned by the token name that created it; other tokens get 403 on it and do
not see it in listings; `admin` tokens see and may do everything. Tokens are compared in
constant time and never logged or echoed in errors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from ttclient.contract import ServiceError

log = logging.getLogger(__name__)
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # fullmatch
ROLES = ("user", "admin")


class AuthError(ServiceError):
    """The caller may not use the API: the message says why (never echoing the token),
    `status` is the HTTP status to answer (401)."""


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the token's name ("" when the API is open) and whether it
    is an admin token."""

    name: str
    admin: bool

    def may_use(self, owner: str) -> bool:
        """True when this caller may act on an ENV owned by `owner`: an admin, or the owner
        itself."""
        return self.admin or owner == self.name


OPEN = Principal("", admin=True)  # no tokens file: everyone may do everything


def digest(token: str) -> str:
    """The token's SHA-256, as 64 hex digits (what the tokens file stores)."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse(text: str, source: str = "tokens file") -> dict[str, tuple[str, str]]:
    """{sha256: (name, role)}; ValueError names the bad line."""
    out: dict[str, tuple[str, str]] = {}
    names: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if (len(parts) != 3 or not TOKEN_NAME.fullmatch(parts[0]) or parts[1] not in ROLES
                or not re.fullmatch(r"[0-9a-f]{64}", parts[2])):
            raise ValueError(f"{source} line {n}: expected 'NAME user|admin SHA256'")
        if parts[0] in names:
            raise ValueError(f"{source} line {n}: token name {parts[0]!r} is listed twice")
        names.add(parts[0])
        out[parts[2]] = (parts[0], parts[1])
    return out


class TokenStore:
    """The tokens file at `path` (None: the API is open), re-read when it changes;
    ValueError at start when it is malformed or readable by others."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        # what the file was when read: a chmod changes its mode and ctime, not its mtime
        self._stamp: tuple | None = None
        self._tokens: dict[str, tuple[str, str]] = {}
        if path is not None:
            self._load()  # fail at start-up, not at the first request

    @property
    def enabled(self) -> bool:
        """True when the server has a tokens file (the API needs a token)."""
        return self.path is not None

    def _load(self) -> None:
        assert self.path is not None
        st = self.path.stat()
        if st.st_mode & 0o077:
            raise ValueError(f"tokens file {self.path} must not be readable by others"
                             f" (chmod 600 {self.path})")
        self._tokens = parse(self.path.read_text(), str(self.path))
        self._stamp = _stamp(st)

    def principal(self, authorization: str | None) -> Principal:
        """The caller behind an `Authorization` header value (OPEN without a tokens file);
        AuthError (401) for a missing or unknown bearer token."""
        if self.path is None:
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("this server needs an API token: 'tt config --token TOKEN' or"
                            " $TT_TOKEN (ask the operator for one)", 401)
        with self._lock:
            try:
                if _stamp(self.path.stat()) != self._stamp:
                    self._load()
            except (OSError, ValueError) as exc:  # fail closed until the file is fixed
                if self._tokens or self._stamp is not None:
                    log.error("tokens file unusable, accepting no token: %s", exc)
                self._tokens, self._stamp = {}, None
            wanted = digest(token.strip())
            for known, (name, role) in self._tokens.items():
                if hmac.compare_digest(known, wanted):
                    return Principal(name, role == "admin")
        raise AuthError("API token not accepted (revoked or mistyped)", 401)


def _stamp(st: os.stat_result) -> tuple:
    """What tells a changed tokens file: inode, size, mode, modification and change
    times (nanoseconds)."""
    return (st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)


def add_token(path: Path, name: str, admin: bool) -> str:
    """Append a new token for `name`; return it (the only time it is shown)."""
    if not TOKEN_NAME.fullmatch(name):
        raise ValueError(f"token name {name!r}: 1-64 of letters, digits, '_.@-'")
    existing = parse(path.read_text(), str(path)) if path.exists() else {}
    if any(n == name for n, _ in existing.values()):
        raise ValueError(f"token name {name!r} exists; delete it first to replace it")
    token = "tt_" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name} {'admin' if admin else 'user'} {digest(token)}\n")
    os.chmod(path, 0o600)
    return token


def delete_token(path: Path, name: str) -> None:
    """Remove the token named `name` from the file at `path` (rewritten atomically, mode
    0600); ValueError when there is no such token."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split()[:1] != [name]]
    if len(kept) == len(lines):
        raise ValueError(f"no token named {name!r} in {path}")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    tmp.replace(path)
