"""A fresh VM per test (`tt_fresh_vm`) against the worker's shared VM (`tt_vm`): the same
generated suite of N tests that each run `true` in their VM, once with each fixture, in
one run on one server (TCG here, warm clones from the server's template cache).

Run by hand on an otherwise idle host:

    python3 benchmarks/fresh.py [--tests 10] [--os debian-12]

Printed: each session's wall time, and the cost of a fresh VM: (fresh - shared) / N
seconds per test (goal: <= 3 s under TCG once the template exists), with the ratio of
the two sessions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import ServerProcess, new_run_dir, wait_templates  # noqa: E402


def session(srv: ServerProcess, suite: Path, oses: str) -> float:
    env = {**os.environ, "TT_CONFIG": str(suite / "none.json")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "-c", os.devnull, "--rootdir", str(suite),
                           f"--tt-server={srv.address}", f"--tt-os={oses}", str(suite)],
                          capture_output=True, text=True, env=env, cwd=suite)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", type=int, default=10)
    ap.add_argument("--os", default="debian-12")
    args = ap.parse_args()
    run_dir = new_run_dir("bench-fresh-")
    srv = ServerProcess(run_dir / "state", port_range="44000-44899").start()
    try:
        wait_templates(srv, 900)
        times = {}
        for fixture in ("tt_vm", "tt_fresh_vm"):
            suite = run_dir / fixture
            suite.mkdir()
            (suite / "test_many.py").write_text(
                f"import pytest\n\n\n@pytest.mark.parametrize('n', range({args.tests}))\n"
                f"def test_n({fixture}, n):\n    assert {fixture}.run('true').ok\n")
            times[fixture] = session(srv, suite, args.os)
            print(f"{fixture:>12}: {args.tests} tests in {times[fixture]:.1f}s", flush=True)
        per = (times["tt_fresh_vm"] - times["tt_vm"]) / args.tests
        print(f"a fresh VM costs {per:.2f}s per test (goal <= 3 s); "
              f"fresh/shared session ratio {times['tt_fresh_vm'] / times['tt_vm']:.2f}x")
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
