"""A test × OS table from a JUnit report, in Markdown: what a CI job summary should show
for an OS matrix (one row per test, one column per OS image).

    python -m pytest_ttstack.summary report.xml >> "$GITHUB_STEP_SUMMARY"

A test's OS is its JUnit property `tt_os` (written by the plugin for `tt_vm` and native
tests) and is taken out of its parameter id (`test_x[debian-12:x86_64-1]` is row
`test_x[1]`); reports without the property (older plugins) are read by the id alone, when
the OS is its only parameter. Rows are keyed on the JUnit classname (module path and
class) and name, so tests of the same name in two modules stay two rows. Tests without
an OS land in the `-` column. Exit code 0 always: the summary is information,
the pytest step decides the job's status.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

OS_PARAM = re.compile(r"^(?P<test>.+)\[(?P<os>[a-z0-9][a-z0-9._-]*:[a-z0-9_]+)\]$")
MARKS = {"passed": "✅ pass", "failed": "❌ fail", "error": "💥 error", "skipped": "⏭ skip"}


@dataclass(frozen=True)
class Outcome:
    """One test case of the report: test id without its OS parameter, OS id ("-" for none)
    and result."""

    test: str  # classname::name without the OS parameter: "tests.test_a.TestX::test_x"
    os: str  # "debian-12:x86_64", or "-" for tests without an OS
    result: str  # passed | failed | error | skipped


def outcomes(report: Path) -> list[Outcome]:
    """Every test case of the JUnit XML `report`, in report order; OSError or
    ElementTree.ParseError when it cannot be read."""
    root = ET.parse(report).getroot()
    out = []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        os_id = next((p.get("value", "") for p in case.iter("property")
                      if p.get("name") == "tt_os"), None)
        if os_id:
            test = without_os(name, os_id)
        else:
            match = OS_PARAM.match(name)
            test, os_id = (match["test"], match["os"]) if match else (name, "-")
        classname = case.get("classname", "")
        if classname:
            test = f"{classname}::{test}"
        result = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                result = {"failure": "failed"}.get(tag, tag)
                break
        out.append(Outcome(test, os_id, result))
    return out


def without_os(name: str, os_id: str) -> str:
    """`name` (a test's name with its parameter id) without the `os_id` part of that id:
    `t[debian-12:x86_64]` -> `t`, `t[debian-12:x86_64-1]` and `t[1-debian-12:x86_64]` ->
    `t[1]`; `name` unchanged when its id has no such part."""
    head, bracket, params = name.partition("[")
    if not bracket or not params.endswith("]"):
        return name
    params = params[:-1]
    if params == os_id:
        return head
    if params.startswith(os_id + "-"):
        return f"{head}[{params[len(os_id) + 1:]}]"
    if params.endswith("-" + os_id):
        return f"{head}[{params[:-len(os_id) - 1]}]"
    if f"-{os_id}-" in params:
        return f"{head}[{params.replace(f'-{os_id}-', '-', 1)}]"
    return name


def table(items: list[Outcome]) -> str:
    """The Markdown summary: a counts line, then a table with a row per test and a column
    per OS (`-` last)."""
    oses = sorted({o.os for o in items} - {"-"}) + (["-"] if any(o.os == "-" for o in items)
                                                     else [])
    tests = list(dict.fromkeys(o.test for o in items))
    cell = {(o.test, o.os): MARKS[o.result] for o in items}
    counts = {r: sum(o.result == r for o in items) for r in MARKS}
    lines = ["### ttstack: tests × OS", "",
             ", ".join(f"{n} {r}" for r, n in counts.items() if n) or "no tests", "",
             "| test | " + " | ".join(code(o) for o in oses) + " |",
             "| --- |" + " --- |" * len(oses)]
    for test in tests:
        lines.append(f"| {code(test)} | " + " | ".join(cell.get((test, o), "") for o in oses)
                     + " |")
    return "\n".join(lines) + "\n"


def code(text: str) -> str:
    """`text` as a Markdown code span inside a table cell: a fence longer than any run of
    backticks in it, and `|` escaped (GitHub-flavoured Markdown's table rule)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def main(argv: list[str] | None = None) -> int:
    """Print the table of the report named in `argv`; 0 (a line saying so when the report
    cannot be read), 2 for bad usage."""
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m pytest_ttstack.summary REPORT.xml"
    if args in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__.strip()}")
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    try:
        print(table(outcomes(Path(args[0]))), end="")
    except (OSError, ET.ParseError) as exc:
        print(f"ttstack summary: cannot read {args[0]}: {exc}", file=sys.stderr)
        print(f"### ttstack: no JUnit report ({args[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
