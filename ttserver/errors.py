"""Errors that map to HTTP answers: each carries the status and a message meant for users."""

from __future__ import annotations

from ttclient.contract import ServiceError


class TTError(ServiceError):
    """An error with a user-facing message and the HTTP status to answer (400 unless the
    subclass or `status` says otherwise)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, status)


class NotFound(TTError):
    """No such ENV, VM or image (404)."""

    status = 404


class Conflict(TTError):
    """The request clashes with the current state: a name in use, an ENV in the wrong state
    for the action (409)."""

    status = 409


class InsufficientResources(TTError):
    """The request does not fit in the CPUs, memory or disk left (409); the message has the
    numbers."""

    # 507 would be tempting, but a request that can never fit is the client's to fix.
    status = 409


class BadRequest(TTError):
    """The request breaks a rule; the message says what to change (400)."""

    status = 400


class VMError(TTError):
    """A VM failed to boot or answer; the message includes its console tail."""

    status = 502


class DiskFull(TTError):
    """The server's state directory has no space left (507); the message names it."""

    status = 507
