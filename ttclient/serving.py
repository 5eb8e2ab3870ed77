"""Run a daemon's ASGI app until SIGTERM or SIGINT, then let the daemon clean up
(shared by ttserver and ttproxy; needs uvicorn, from the `[server]`/`[proxy]` extras).

Why not just `uvicorn.run` in a try/finally: since 0.29 uvicorn re-raises the signal it
caught once it has shut down, with the handler that was installed before it started. With
Python's default SIGTERM handler that kills the process on the spot and no `finally` runs
(measured: ttserver's bridge, nft table and dnsmasq outlived a `systemctl stop`). So a
handler that raises SystemExit is installed first: uvicorn's re-raise lands there, and
the daemon's clean-up runs.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any


def _exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks run (clean-up on `kill`)."""
    signal.signal(signal.SIGTERM, _exit)


def add_http_timeout_options(parser: Any) -> None:
    """`--http-header-timeout` and `--http-body-timeout` (seconds; into
    `http_header_timeout`, `http_body_timeout`) on a daemon's argparse parser."""
    parser.add_argument("--http-header-timeout", type=_seconds, default=60.0, metavar="S",
                        help="close a connection whose request headers are not complete S "
                             "seconds after they began (slowloris; default 60, as nginx)")
    parser.add_argument("--http-body-timeout", type=_seconds, default=60.0, metavar="S",
                        help="close a connection whose request body sends nothing for S "
                             "seconds (default 60, as nginx)")


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds, more than 0 and at most 86400, "
                                         f"got {text!r}")
    return value


def serve(app: Any, host: str, port: int, on_stop: Callable[[], None],
          header_timeout: float = 60.0, body_timeout: float = 60.0) -> None:
    """Serve the ASGI `app` with uvicorn on host:port until SIGTERM or Ctrl-C, then call
    `on_stop`. Connections whose request headers or body stall are closed after
    `header_timeout` / `body_timeout` seconds (timed_h11.py)."""
    import uvicorn

    from .timed_h11 import with_deadlines

    exit_on_sigterm()
    try:
        # log_config=None: uvicorn's lines go through the daemon's own handler (its
        # --log-format), not a second one of uvicorn's making; proxy_headers=False: the
        # client's address (the audit trail's source) is the peer's, never what an
        # X-Forwarded-For header claims
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    http=with_deadlines(header_timeout, body_timeout), log_config=None,
                    proxy_headers=False)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        on_stop()
