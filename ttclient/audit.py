"""The daemons' logs: `--log-format text|json`, and the audit trail (shared by ttserver and
ttproxy; standard library only).

Audit lines go to the `ttstack.audit` logger, one per ENV lifecycle event (create, delete,
stop, start, update, kick, expire) and per refused request (401, 403), with who asked
(the token's *name*, never its value), from where, and what:

    audit event=create env=ci-42 token=alice source=10.0.0.7 images=qemu:debian-12:x86_64 vms=2

or, with `--log-format json`, one JSON object per line with the same fields plus `ts`,
`level`, `logger` and `msg` (what journald's and Loki's JSON parsers read). Under
journald ($JOURNAL_STREAM set, as systemd does for a unit's stdout/stderr) the text format
leaves the timestamp out: journald stamps every line itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

AUDIT = logging.getLogger("ttstack.audit")
FORMATS = ("text", "json")


def audit(event: str, **fields: Any) -> None:
    """Log one audit line: `event` and `fields` (str, int, list of str; None left out)."""
    kept = {k: v for k, v in fields.items() if v is not None}
    AUDIT.info("audit event=%s %s", event, " ".join(f"{k}={_text(v)}" for k, v in
                                                    kept.items()),
               extra={"audit": {"event": event, **kept}})


def token_name(who: Any) -> str:
    """A caller's token name for the audit trail ("" without tokens; never the token)."""
    return str(getattr(who, "name", "") or "")


def denied(scope: Mapping[str, Any], status: int, reason: str) -> None:
    """The audit line of a refused request (401, 403), from its ASGI `scope`: method, path,
    the peer's address and, once authenticated, the token's name."""
    client = scope.get("client")
    audit("denied", status=status, method=scope.get("method", "WEBSOCKET"),
          path=scope.get("path", ""),
          token=token_name((scope.get("state") or {}).get("principal")),
          source=client[0] if client else "", reason=reason)


def _text(value: Any) -> str:
    """A field as logfmt: lists comma-joined; quoted when it has spaces, quotes or = ."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (RFC 3339, UTC), level, logger, msg, the audit
    fields when it is an audit line, and `exc` for an exception's traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}
        out.update(getattr(record, "audit", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """The root logger for a daemon: `level` (debug, info, warning), `fmt` text or json,
    on stderr; text without timestamps under journald."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def add_log_options(parser: Any) -> None:
    """`--log-level` and `--log-format` on a daemon's argparse parser."""
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="default info")
    parser.add_argument("--log-format", default="text", choices=FORMATS,
                        help="text (default; no timestamps under journald) or json (one "
                             "object per line, for journald/Loki); audit lines are logged by "
                             "ttstack.audit")
