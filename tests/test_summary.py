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
        ("tests.test_a::test_x", "debian-12:x86_64", "passed"),
        ("tests.test_a::test_x", "debian-13:aarch64", "failed"),
        ("tests.test_a::test_y", "debian-13:aarch64", "skipped"),
        ("tests.test_a::test_z", "debian-12:x86_64", "error"),
        ("tests.test_a::test_plain[3]", "-", "passed"),  # a non-OS parameter stays
    }
    md = table(items)
    assert "| test | `debian-12:x86_64` | `debian-13:aarch64` | `-` |" in md
    assert "| `tests.test_a::test_x` | ✅ pass | ❌ fail |  |" in md
    assert "2 passed, 1 failed, 1 error, 1 skipped" in md


def test_missing_report_still_prints_a_summary_and_exits_0(tmp_path: Path, capsys):
    assert main([str(tmp_path / "none.xml")]) == 0
    assert "no JUnit report" in capsys.readouterr().out
    assert main([]) == 2


PROPERTIES = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="6">
<testcase classname="tests.test_a" name="test_x[debian-12:x86_64]">
  <properties><property name="tt_os" value="debian-12:x86_64"/></properties></testcase>
<testcase classname="tests.test_b" name="test_x[debian-12:x86_64]">
  <properties><property name="tt_os" value="debian-12:x86_64"/></properties>
  <failure message="boom"/></testcase>
<testcase classname="tests.test_a.TestK" name="test_p[debian-12:x86_64-1]">
  <properties><property name="tt_os" value="debian-12:x86_64"/></properties></testcase>
<testcase classname="tests.test_a.TestK" name="test_p[7-debian-13:x86_64]">
  <properties><property name="tt_os" value="debian-13:x86_64"/></properties></testcase>
<testcase classname="tests.test_a.TestK" name="test_p[a-debian-13:x86_64-b]">
  <properties><property name="tt_os" value="debian-13:x86_64"/></properties></testcase>
<testcase classname="tests.test_a" name="test_q[debian-12:x86_64]"/>
</testsuite></testsuites>
"""


def test_rows_key_on_the_whole_classname_and_os_comes_from_the_property(tmp_path: Path):
    """Same-named tests of two modules merged into one row (a failure could show as a
    pass), and an OS id next to a user's parameter made a bogus column."""
    report = tmp_path / "r.xml"
    report.write_text(PROPERTIES)
    assert [(o.test, o.os, o.result) for o in outcomes(report)] == [
        ("tests.test_a::test_x", "debian-12:x86_64", "passed"),
        ("tests.test_b::test_x", "debian-12:x86_64", "failed"),
        ("tests.test_a.TestK::test_p[1]", "debian-12:x86_64", "passed"),
        ("tests.test_a.TestK::test_p[7]", "debian-13:x86_64", "passed"),
        ("tests.test_a.TestK::test_p[a-b]", "debian-13:x86_64", "passed"),
        ("tests.test_a::test_q", "debian-12:x86_64", "passed"),  # no property: by the id
    ]
    md = table(outcomes(report))
    assert "| test | `debian-12:x86_64` | `debian-13:x86_64` |" in md


def test_a_report_without_the_os_property_gets_it_from_its_node_id():
    """xdist makes a crashed worker's report on the controller from the node id alone: it
    had no tt_os property, so the per-OS line and the CI summary left the failure out."""
    from pytest_ttstack.tally import os_in_nodeid

    ids = ["debian-12:x86_64", "debian-13:x86_64", "debian-13:x86_64-lts"]
    assert os_in_nodeid("t.py::test_z[debian-12:x86_64]", ids) == "debian-12:x86_64"
    assert os_in_nodeid("t.py::C::test[7-debian-13:x86_64]", ids) == "debian-13:x86_64"
    assert os_in_nodeid("t.py::test[debian-12:x86_64-1]", ids) == "debian-12:x86_64"
    assert os_in_nodeid("t.py::test[debian-13:x86_64-lts]", ids) == "debian-13:x86_64-lts"
    assert os_in_nodeid("t.py::test[xdebian-12:x86_64]", ids) is None
    assert os_in_nodeid("t.py::test_plain", ids) is None


def test_help_is_help_not_a_file_name(capsys):
    """`--help` was read as a report's file name."""
    assert main(["--help"]) == 0
    assert "usage: python -m pytest_ttstack.summary REPORT.xml" in capsys.readouterr().out
    assert main(["--junit"]) == 2
