"""Loaded *inside the VM* by native mode (`-p ttnative_inner`): writes each phase's report
as JSON to $TTNATIVE_RESULT, so the host can turn them back into ordinary pytest reports.
Only the standard library and pytest may be imported here: the guest has nothing else.
"""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001 - pytest's TestReport
    longrepr = ""
    skip_reason = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        skip_reason = str(report.longrepr[2])
    elif report.longrepr is not None:
        longrepr = str(report.longrepr)
    entry = {"when": report.when, "outcome": report.outcome, "longrepr": longrepr,
             "skip_reason": skip_reason, "duration": report.duration,
             "sections": [list(s) for s in report.sections]}
    with open(os.environ["TTNATIVE_RESULT"], "a") as f:
        f.write(json.dumps(entry) + "\n")
