"""The one wait primitive of ttstack: poll a check until it gives an answer, with a
deadline and a way to cancel (as tmt's `wait`: every "until ready" loop is one call, so
deadlines, cancellation and the words of a timeout are the same everywhere).

Callers turn WaitTimeout into their own error (with a console tail, a log tail, ...).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """`what` did not happen within `timeout` seconds (the message says both)."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what}: not within {timeout:.0f}s")
        self.what = what
        self.timeout = timeout


class WaitCancelled(Exception):
    """The wait's `cancel` was set before `what` happened."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: cancelled")
        self.what = what


def wait_for(check: Callable[[], T | None], timeout: float, *, what: str,
             interval: float = 0.5, backoff: float = 1.0, max_interval: float = 5.0,
             cancel: threading.Event | Callable[[], bool] | None = None) -> T:
    """Call `check` until it returns something other than None, and return that.

    `check` runs at least once, then every `interval` seconds (multiplied by `backoff`
    after each check, up to `max_interval`) until `timeout` seconds have passed since the
    call (WaitTimeout) or `cancel` (an Event, or a function that returns True) is set
    (WaitCancelled; checked after each `check`). `check` raises to give up early; its
    exception propagates unchanged. Waiting between checks ends early when `cancel` is an
    Event that gets set."""
    deadline = time.monotonic() + timeout
    is_cancelled = cancel.is_set if isinstance(cancel, threading.Event) else cancel
    while True:
        answer = check()
        if answer is not None:
            return answer
        if is_cancelled is not None and is_cancelled():
            raise WaitCancelled(what)
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, timeout)
        if isinstance(cancel, threading.Event):
            cancel.wait(min(interval, left))
        else:
            time.sleep(min(interval, left))
        interval = min(interval * backoff, max(max_interval, interval))
