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


def serve(app: Any, host: str, port: int, on_stop: Callable[[], None]) -> None:
    """Serve the ASGI `app` with uvicorn on host:port until SIGTERM or Ctrl-C, then call
    `on_stop`."""
    import uvicorn

    exit_on_sigterm()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        on_stop()
