"""The two steps every CI template runs, so GitHub's and GitLab's templates stay a few
lines of YAML and their logic is tested here:

    python -m pytest_ttstack.ci pytest            # run the suite as the TT_* variables say
    python -m pytest_ttstack.ci report github     # or: report gitlab, after it, always

`pytest` builds pytest's command line from the environment (TT_SERVER, TT_OS, TT_JUNIT,
TT_NATIVE, TT_NATIVE_INSTALL, TT_PYTEST_ARGS; TT_TOKEN is read by the plugin itself),
prints it, and replaces itself with it: the job's status is pytest's.

`report github` appends the test × OS table (summary.table) to $GITHUB_STEP_SUMMARY,
prints an `::error` workflow command per failed test (file and line from the JUnit
failure text, so GitHub shows it on the diff), writes `passed`, `failed`, `errors`,
`skipped`, `total`, `junit-file` and `artifact-name` to $GITHUB_OUTPUT, and prints one
result line. `report gitlab` writes the table as ttstack-summary.md and .html (a job
artifact a browser shows) and prints the result line to the job log. Both exit 0 unless
the usage is wrong (2): the pytest step decides the job.

Workflow commands and $GITHUB_OUTPUT: docs.github.com, "Workflow commands for GitHub
Actions" (escaping of `%`, CR, LF, and of `:` `,` in properties).
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import secrets
import shlex
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .summary import Outcome, outcomes, table

DEFAULT_JUNIT = "report.xml"
MAX_ANNOTATIONS = 50  # GitHub shows at most 50 error annotations per job
# "file.py:12: AssertionError": the location line pytest ends a failure's text with
LOCATION = re.compile(r"^(?P<file>[^\s:][^:\n]*\.py):(?P<line>\d+): ", re.MULTILINE)
# what upload-artifact refuses in a name: " : < > | * ? \r \n \ /
ARTIFACT_UNSAFE = re.compile(r'[":<>|*?\r\n\\/]+')


class UsageError(Exception):
    """A bad TT_* variable or argument; main prints it and exits 2."""


def pytest_argv(env: Mapping[str, str]) -> list[str]:
    """pytest's command line (after `python -m pytest`) for the TT_* variables in `env`:
    --tt-server, --tt-os, --junitxml (TT_JUNIT, default report.xml), --tt-native when
    TT_NATIVE is true, a --tt-native-install per line of TT_NATIVE_INSTALL, then
    TT_PYTEST_ARGS split as a POSIX shell would (quotes kept together). UsageError for an
    unset TT_OS, a TT_NATIVE that is not true/false, or unbalanced quotes."""
    os_list = env.get("TT_OS", "").strip()
    if not os_list:
        raise UsageError("TT_OS is empty: give OS prefixes (the `os` input), e.g. "
                         "debian-12,debian-13")
    argv = [f"--tt-os={os_list}", f"--junitxml={env.get('TT_JUNIT') or DEFAULT_JUNIT}"]
    if env.get("TT_SERVER", "").strip():
        argv.insert(0, f"--tt-server={env['TT_SERVER'].strip()}")
    native = env.get("TT_NATIVE", "").strip().lower()
    if native not in ("", "true", "false"):
        raise UsageError(f"TT_NATIVE={env['TT_NATIVE']!r}: give true or false (the "
                         "`native` input)")
    if native == "true":
        argv.append("--tt-native")
    argv += [f"--tt-native-install={spec.strip()}"
             for spec in env.get("TT_NATIVE_INSTALL", "").splitlines() if spec.strip()]
    try:
        argv += shlex.split(env.get("TT_PYTEST_ARGS", ""))
    except ValueError as exc:
        raise UsageError(f"TT_PYTEST_ARGS: {exc} (the `pytest-args` input)") from None
    return argv


@dataclass(frozen=True)
class Failure:
    """A failed or erroring test case: its id, where it failed (file relative to the
    working directory, or "" when the text names none; line 0 when unknown), and the
    first line of its message."""

    test: str
    file: str
    line: int
    message: str


def failures(report: Path) -> list[Failure]:
    """The failed and erroring test cases of the JUnit XML `report`, in report order."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        text = bad.text or ""
        where = list(LOCATION.finditer(text))
        file, line = (where[-1]["file"], int(where[-1]["line"])) if where else ("", 0)
        if not file and case.get("file"):  # junit_family=xunit1 names the file itself
            given = case.get("line") or "0"
            file, line = case.get("file", ""), int(given) if given.isdigit() else 0
        message = (bad.get("message") or text or "failed").strip().splitlines()[0]
        name = case.get("name", "?")
        test = f"{case.get('classname')}::{name}" if case.get("classname") else name
        out.append(Failure(test, file, line, message))
    return out


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(failure: Failure) -> str:
    """The `::error` workflow command for one failure (file and line when known)."""
    props = [f"title={_escape_property(failure.test)}"]
    if failure.file:
        props.insert(0, f"file={_escape_property(failure.file)}")
        if failure.line:
            props.insert(1, f"line={failure.line}")
    return f"::error {','.join(props)}::{_escape_data(failure.message)}"


def counts(items: list[Outcome]) -> dict[str, int]:
    """{passed, failed, errors, skipped, total} of the report's test cases."""
    got = {r: sum(o.result == r for o in items) for r in ("passed", "failed", "error",
                                                          "skipped")}
    return {"passed": got["passed"], "failed": got["failed"], "errors": got["error"],
            "skipped": got["skipped"], "total": len(items)}


def result_line(items: list[Outcome]) -> str:
    """One line for the job log: `ttstack: 5 passed, 1 failed on debian-12:x86_64, ...`."""
    n = counts(items)
    done = ", ".join(f"{n[k]} {k}" for k in ("passed", "failed", "errors", "skipped")
                     if n[k]) or "no tests"
    oses = sorted({o.os for o in items} - {"-"})
    return f"ttstack: {done}" + (f" on {', '.join(oses)}" if oses else "")


def artifact_name(env: Mapping[str, str]) -> str:
    """TT_ARTIFACT_NAME, else a name unique per job, inputs and attempt, so two jobs of a
    run (a matrix, two calls) never upload to the same name (upload-artifact v4+ refuses
    a second upload: 409): ttstack-junit-JOB-OS-HASH-ATTEMPT, with the characters
    upload-artifact refuses replaced by `_`."""
    if env.get("TT_ARTIFACT_NAME", "").strip():
        return ARTIFACT_UNSAFE.sub("_", env["TT_ARTIFACT_NAME"].strip())
    keys = ("TT_OS", "TT_PYTEST_ARGS", "TT_NATIVE", "TT_NATIVE_INSTALL", "TT_JUNIT",
            "TT_PYTHON_VERSION", "TT_PACKAGE", "GITHUB_ACTION")
    digest = hashlib.sha256("\0".join(env.get(k, "") for k in keys).encode()).hexdigest()
    os_part = ARTIFACT_UNSAFE.sub("_", env.get("TT_OS", "")).replace(",", "+")[:60]
    return (f"ttstack-junit-{env.get('GITHUB_JOB', 'job')}-{os_part}-{digest[:8]}-"
            f"{env.get('GITHUB_RUN_ATTEMPT', '1')}")


def html_page(markdown: str, title: str) -> str:
    """The summary table as a standalone HTML page (what GitLab's artifact browser can
    show; it shows Markdown as plain text)."""
    rows: list[str] = []
    body: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("| ---"):
            continue
        if line.startswith("|"):  # cells split at unescaped pipes, code fences dropped
            cells = [re.sub(r"^(`+) ?(.*?) ?\1$", r"\2", c.strip()).replace("\\|", "|")
                     for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells)
                        + "</tr>")
        elif line.startswith("### "):
            body.append(f"<h2>{html.escape(line[4:])}</h2>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>\n<style>table{{border-collapse:collapse}}"
            "td,th{border:1px solid #999;padding:2px 8px;font-family:monospace}</style>"
            "</head><body>\n" + "\n".join(body) + "\n<table>\n" + "\n".join(rows)
            + "\n</table>\n</body></html>\n")


def report(kind: str, env: Mapping[str, str], out: Path = Path(".")) -> list[str]:
    """Do the `report github|gitlab` step for the JUnit file TT_JUNIT (default
    report.xml); return the lines to print. A missing or unreadable report gives a
    summary saying so (the pytest step failed before writing it)."""
    junit = env.get("TT_JUNIT") or DEFAULT_JUNIT
    try:
        items = outcomes(Path(junit))
        bad = failures(Path(junit))
        markdown = table(items)
        line = result_line(items)
    except (OSError, ET.ParseError) as exc:
        items, bad = [], []
        markdown = f"### ttstack: no JUnit report ({junit})\n"
        line = f"ttstack: no JUnit report at {junit} ({exc}); see the pytest step's log"
    printed = [annotation(b) for b in bad[:MAX_ANNOTATIONS]] if kind == "github" else []
    writes: list[tuple[Path, str]] = []  # (file, text to append)
    if kind == "github":
        values = {**counts(items), "junit-file": junit, "artifact-name": artifact_name(env)}
        if env.get("GITHUB_STEP_SUMMARY"):
            writes.append((Path(env["GITHUB_STEP_SUMMARY"]), markdown))
        if env.get("GITHUB_OUTPUT"):
            writes.append((Path(env["GITHUB_OUTPUT"]),
                           "".join(output_line(k, str(v)) for k, v in values.items())))
    else:
        writes += [(out / "ttstack-summary.md", markdown),
                   (out / "ttstack-summary.html", html_page(markdown, line))]
    for path, text in writes:  # the report step informs; it never fails the job
        try:
            with open(path, "a" if kind == "github" else "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            printed.append(f"ttstack: could not write the summary or outputs: {exc}")
    return printed + [line]


def output_line(key: str, value: str) -> str:
    """One $GITHUB_OUTPUT entry; a value with a line break in the multiline form with a
    random delimiter (GitHub's documented form), so it cannot add entries of its own."""
    if "\n" not in value and "\r" not in value:
        return f"{key}={value}\n"
    delimiter = f"ttstack_{secrets.token_hex(8)}"
    return f"{key}<<{delimiter}\n{value}\n{delimiter}\n"


USAGE = "usage: python -m pytest_ttstack.ci pytest | report github|gitlab"


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run a step (see the module's docstring); `pytest` does not return (exec), `report`
    returns 0; 2 with a line on stderr for bad usage or a bad TT_* variable."""
    args = sys.argv[1:] if argv is None else argv
    environ = os.environ if env is None else env
    try:
        if args == ["pytest"]:
            command = [sys.executable, "-m", "pytest", *pytest_argv(environ)]
            print("+ " + shlex.join(["python", *command[1:]]), flush=True)
            os.execv(sys.executable, command)
        if len(args) == 2 and args[0] == "report" and args[1] in ("github", "gitlab"):
            print("\n".join(report(args[1], environ)))
            return 0
    except UsageError as exc:
        print(f"ttstack ci: {exc}", file=sys.stderr)
        return 2
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
