"""The test × OS job summary built from a JUnit report (pure logic)."""

from __future__ import annotations

from pathlib import Path

from pytest_ttstack.summary import main, outcomes, table

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.test_a" name="test_x[debian-12:x86_64]" time="1"/>
<testcase classname="tests.test_a" name="test_x[debian-13:aarch64]" time="1">
  <failure message="boom">assert 1 == 2</failure></testcase>
<testcase classname="tests.test_a" name="test_y[debian-13:aarch64]" time="0">
  <skipped message="tt_os"/></testcase>
<testcase classname="tests.test_a" name="test_z[debian-12:x86_64]" time="0">
  <error message="setup"/></testcase>
<testcase classname="tests.test_a" name="test_plain[3]" time="0"/>
</testsuite></testsuites>
"""


def test_rows_are_tests_columns_are_os(tmp_path: Path):
    report = tmp_path / "r.xml"
    report.write_text(REPORT)
    items = outcomes(report)
    assert {(o.test, o.os, o.result) for o in items} == {
        ("test_a::test_x", "debian-12:x86_64", "passed"),
        ("test_a::test_x", "debian-13:aarch64", "failed"),
        ("test_a::test_y", "debian-13:aarch64", "skipped"),
        ("test_a::test_z", "debian-12:x86_64", "error"),
        ("test_a::test_plain[3]", "-", "passed"),  # a non-OS parameter stays in the name
    }
    md = table(items)
    assert "| test | `debian-12:x86_64` | `debian-13:aarch64` | `-` |" in md
    assert "| `test_a::test_x` | ✅ pass | ❌ fail |  |" in md
    assert "2 passed, 1 failed, 1 error, 1 skipped" in md


def test_missing_report_still_prints_a_summary_and_exits_0(tmp_path: Path, capsys):
    assert main([str(tmp_path / "none.xml")]) == 0
    assert "no JUnit report" in capsys.readouterr().out
    assert main([]) == 2
