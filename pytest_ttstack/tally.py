"""What the terminal shows about the OS matrix: the report header (server, images, accel,
how the VMs booted) and, at the end, one line per OS with its outcomes. Registered on the
controlling process only (the only process, or the xdist controller)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from .matrix import image_id
from .session import SessionEnv

ORDER = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def os_of(report: pytest.TestReport) -> str | None:
    """The OS id a report's test ran on: its `tt_os` user property (plugin.py writes it
    for `tt_vm` items, the native controller for native ones), else None."""
    return next((str(v) for k, v in report.user_properties if k == "tt_os"), None)


def os_in_nodeid(nodeid: str, os_ids: list[str]) -> str | None:
    """The OS id (`debian-12:x86_64`) among `os_ids` that a node id's parameters hold as
    one of its dash-joined parts (`test[debian-12:x86_64]`, `test[7-debian-12:x86_64-a]`),
    the longest when several match; None when none does."""
    start = nodeid.find("[", max(0, nodeid.find("::")))  # as native/ids.py splits ids
    params = nodeid[start + 1:] if start >= 0 and nodeid.endswith("]") else ""
    found = [o for o in os_ids
             if re.search(r"(?:^|-)" + re.escape(o) + r"(?:-|\]$)", params)]
    return max(found, key=len) if found else None


def outcome(report: pytest.TestReport) -> str | None:
    """The test's outcome this report settles, in the terminal reporter's words
    (`pytest_report_teststatus`'s categories): a call's result, a setup that did not
    pass, a teardown error, a failure in no known phase (a crashed xdist worker's
    test); None for reports that settle nothing."""
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return "xpassed" if report.passed else "xfailed"
        return report.outcome
    if report.when == "setup" and not report.passed:
        return "skipped" if report.skipped else "error"
    if report.when == "teardown" and report.failed:
        return "error"
    if report.when not in ("setup", "call", "teardown") and report.failed:
        return "failed"  # xdist's report of a test whose worker died ("???")
    return None


class OSTally:
    """Counts outcomes per OS; `lines()` are the terminal summary's."""

    def __init__(self, env: SessionEnv, status: dict | None) -> None:
        self.env = env
        self.status = status or {}
        self.counts: dict[str, Counter[str]] = {}
        # what node ids name the OSes by
        self.os_ids = [image_id(i, env.images) for i in env.images]

    def header(self) -> list[str]:
        """`ttstack: server ... (accel tcg)` and one line per image: its VMs and how they
        booted (warm clone or cold boot)."""
        accel = self.status.get("accel")
        lines = [f"ttstack: server {self.env.server}, ENV {self.env.name}"
                 + (f", accel {accel}" if accel else "")]
        for image in self.env.images:
            vms = [v for v in self.env.vms if v["image"] == image]
            modes = Counter(v.get("boot_mode") or "?" for v in vms)
            lines.append(f"ttstack:   {image}: {len(vms)} VM(s), "
                         + ", ".join(f"{n} {m}" for m, n in sorted(modes.items())))
        return lines

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count the outcome the report settles under its OS. A report without the
        `tt_os` property (xdist makes a crashed worker's test's report on the controller,
        from its node id alone) first gets it from the OS id in the node id's parameters:
        tryfirst, so that junitxml writes it too."""
        os_id = os_of(report)
        if os_id is None:
            os_id = os_in_nodeid(report.nodeid, self.os_ids)
            if os_id:
                report.user_properties = [*report.user_properties, ("tt_os", os_id)]
        result = outcome(report)
        if os_id and result:
            self.counts.setdefault(os_id, Counter())[result] += 1

    def lines(self) -> list[str]:
        """One line per OS: `debian-12:x86_64: 5 passed, 1 failed`."""
        return [f"{os_id}: " + ", ".join(f"{c[k]} {k}" for k in ORDER if c[k])
                for os_id, c in self.counts.items()]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The per-OS lines, under a `ttstack` separator."""
        if self.counts:
            terminalreporter.write_sep("-", "ttstack: results per OS")
            for line in self.lines():
                terminalreporter.write_line(line)
