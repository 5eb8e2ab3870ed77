"""Native mode: per-test cost with the guest fork server vs a fresh `python3 -m pytest`
per test (`--tt-native-fresh`), in one run on one server (TCG here).

Run by hand on an otherwise idle host:

    python3 benchmarks/native.py [--tests 12] [--os debian-12]

Each mode runs a generated project of N trivial tests in its own session (own ENV). The
time per test is taken between the first and the last test's result line, so the ENV
boot, the copy and the fork server's one-time pytest import are not in it (they are
printed separately as "first result after").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import ServerProcess, new_run_dir  # noqa: E402

RESULT = re.compile(r"::test_\d+\[.*\] (PASSED|FAILED|ERROR)")


def session(srv: ServerProcess, project: Path, os_name: str,
            fresh: bool) -> tuple[float, float, int]:
    """(seconds to the first result, seconds per test after it, results seen)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--rootdir",
           str(project), "-c", os.devnull, f"--tt-server={srv.address}", f"--tt-os={os_name}",
           "--tt-native", *(["--tt-native-fresh"] if fresh else []), str(project)]
    env = {**os.environ, "TT_CONFIG": str(project / "none.json")}
    started = time.monotonic()
    stamps = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if RESULT.search(line):
                stamps.append(time.monotonic())
    assert stamps, "no test results: is the server able to boot the image?"
    per_test = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return stamps[0] - started, per_test, len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=12)
    parser.add_argument("--os", default="debian-12")
    args = parser.parse_args()
    run_dir = new_run_dir("bench-native-")
    project = run_dir / "project"
    project.mkdir()
    (project / "test_many.py").write_text("".join(
        f"def test_{i}():\n    assert {i} + 1 == {i + 1}\n\n" for i in range(args.tests)))
    srv = ServerProcess(run_dir / "state", port_range="44000-44499").start()
    try:
        rows = {}
        for label, fresh in (("fresh python3 per test (baseline)", True),
                             ("fork server", False)):
            rows[label] = session(srv, project, args.os, fresh)
            first, per_test, seen = rows[label]
            print(f"{label:36s} first result after {first:6.1f} s, then {per_test:5.2f} s "
                  f"per test ({seen} results)", flush=True)
        base = rows["fresh python3 per test (baseline)"][1]
        fork = rows["fork server"][1]
        print(f"per-test ratio baseline/fork server: {base / fork:.1f}x")
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
