"""Errors that map to HTTP answers: each carries the status and a message meant for users."""

from __future__ import annotations


class TTError(Exception):
    status = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0])


class NotFound(TTError):
    status = 404


class Conflict(TTError):
    status = 409


class InsufficientResources(TTError):
    # 507 would be tempting, but a request that can never fit is the client's to fix.
    status = 409


class BadRequest(TTError):
    status = 400


class VMError(TTError):
    """A VM failed to boot or answer; the message includes its console tail."""

    status = 502
