"""ttclient/audit.py: audit lines, the JSON format, and no second timestamp under
journald; pure logic."""

from __future__ import annotations

import json
import logging

import pytest

from ttclient.audit import JsonFormatter, audit, configure_logging


@pytest.fixture(autouse=True)
def _root_logger_restored():
    """configure_logging replaces the root logger's handlers (pytest's among them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_audit_fields(capsys):
    configure_logging("info", "json")
    audit("create", env="e", token="alice", source="10.0.0.7", images=["a", "b"], vms=2,
          skipped=None)
    line = json.loads(capsys.readouterr().err.strip())
    assert line["logger"] == "ttstack.audit" and line["level"] == "info"
    assert (line["event"], line["env"], line["images"], line["vms"]) == ("create", "e",
                                                                         ["a", "b"], 2)
    assert "skipped" not in line and line["ts"].endswith("Z")
    assert line["msg"] == "audit event=create env=e token=alice source=10.0.0.7 images=a,b vms=2"


def test_text_values_are_quoted_when_needed(capsys):
    configure_logging("info", "text")
    audit("denied", reason='a "b" c', token="")
    err = capsys.readouterr().err
    assert 'audit event=denied reason="a \\"b\\" c" token=""' in err


def test_no_timestamp_of_our_own_under_journald(monkeypatch, capsys):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    configure_logging("info", "text")
    logging.getLogger("x").info("hello")
    assert capsys.readouterr().err == "INFO x: hello\n"
    monkeypatch.delenv("JOURNAL_STREAM")
    configure_logging("info", "text")
    logging.getLogger("x").info("hello")
    assert capsys.readouterr().err.split(" ", 2)[2] == "INFO x: hello\n"  # date time first


def test_exceptions_keep_their_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None,
                                   sys.exc_info())
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "failed" and "ValueError: boom" in out["exc"]
