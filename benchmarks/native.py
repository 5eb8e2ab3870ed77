"""Native mode throughput: a generated suite of N trivial tests run with --tt-native on
two OSes, against the same suite run by hand in the same OSes' VMs (`tt env push` the
project, `tt env run '... -m pytest -q'`), both measured in one run on one server.

Run by hand on an otherwise idle host (TCG here):

    python3 benchmarks/native.py [--tests 600] [--os debian-12,debian-13] [--rounds 3]

Printed:
- marginal seconds per item: time between the first and the last result line of the
  native session divided by the items in between (worker start-up and collection are
  before the first result, so not in it); goal <= 0.05 s under TCG.
- set-up to last result, natively (from the ENV's last VM running to the last result:
  the guest probe when the image's build is new, ship, venv from the cache, worker
  start, collection, tests) vs by hand (push + one pytest per
  VM, in parallel, with the same venv already in place): the ratio; goal <= 1.3x.
  The two alternate for `--rounds` rounds (this host's speed drifts by ~20% within
  minutes); each round's figures are printed, then the median ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import ServerProcess, new_run_dir  # noqa: E402

RESULT = re.compile(r"\] (PASSED|FAILED|ERROR) ")
RUNNING = re.compile(r"^ttstack:   \S+ +\S+ +running\b")  # a VM of the ENV is up


def native_session(srv: ServerProcess, project: Path, oses: str,
                   cache: Path) -> tuple[float, float, int]:
    """(seconds from the ENV being up to the last result, marginal s/item, results)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
           f"--tt-server={srv.address}", f"--tt-os={oses}", "--tt-native"]
    env = {**os.environ, "TT_CONFIG": str(project.parent / "none.json"),
           "TTSTACK_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    up = None  # when the last of the ENV's VMs (one per OS) is running
    running = 0
    stamps: list[float] = []
    # Results are timed as their text arrives, not their line: pytest ends a line only
    # when it writes the next one, so the last result's line came at the session's end,
    # after the workers' shutdown and the ENV's deletion.
    tail = pending = ""
    with subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env, bufsize=0) as proc:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            now = time.monotonic()
            text = chunk.decode(errors="replace")
            new = len(RESULT.findall(tail + text)) - len(RESULT.findall(tail))
            stamps.extend([now] * new)
            tail = (tail + text)[-64:]
            *lines, pending = (pending + text).split("\n")
            for line in lines:
                if up is None and RUNNING.search(line):
                    running += 1
                    up = now if running == len(oses.split(",")) else None
    assert stamps and up is not None, "no results: can the server boot the images?"
    marginal = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return stamps[-1] - up, marginal, len(stamps)


def tt(srv: ServerProcess, *args: str, data: bytes | None = None) -> str:
    env = {**os.environ, "TT_CONFIG": "/nonexistent/tt.json"}
    proc = subprocess.run([sys.executable, "-m", "ttclient.cli", "--server", srv.address,
                           *args], input=data, capture_output=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"tt {' '.join(args)}: {proc.stderr.decode()}")
    return proc.stdout.decode()


def by_hand(srv: ServerProcess, project: Path, oses: str, cache: Path) -> float:
    """Seconds for push + `pytest -q` in each OS's VM (in parallel), venv already there."""
    name = "bench-by-hand"
    tt(srv, "env", "add", name, f"--os-prefix={oses}", "--vm-number", "1")
    try:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(project, arcname="p")
        tmp = project.parent / "upload"
        tmp.mkdir(exist_ok=True)
        for venv in cache.glob("native-venvs/*.tar.gz"):  # not timed: "pytest installed"
            tt(srv, "env", "push", name, "--local", str(venv),
               "--remote", f"/root/venv-{_venv_python(venv)}.tar.gz")
        tt(srv, "env", "run", name, "--cmd",
           "mkdir -p /root/ttnative && tar -xzf /root/venv-$(python3 -c 'import sys; "
           "print(\"%d.%d\" % sys.version_info[:2])').tar.gz -C /root/ttnative")
        (tmp / "p.tar").write_bytes(buf.getvalue())
        started = time.monotonic()
        tt(srv, "env", "push", name, "--local", str(tmp / "p.tar"), "--remote", "/root/p.tar")
        tt(srv, "env", "run", name, "--timeout", "3000", "--cmd",
           "cd /root && tar -xf p.tar && cd p && "
           "/root/ttnative/venv/bin/python -m pytest -q -p no:cacheprovider")
        return time.monotonic() - started
    finally:
        tt(srv, "env", "del", name)


def _venv_python(venv_tar: Path) -> str:
    with tarfile.open(venv_tar) as tar:
        for name in tar.getnames():
            m = re.match(r"venv/lib/python(3\.\d+)/", name)
            if m:
                return m.group(1)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=600)
    parser.add_argument("--os", default="debian-12,debian-13")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run_dir = new_run_dir("bench-native-")
    project = run_dir / "project"
    project.mkdir()
    (project / "test_many.py").write_text("".join(
        f"def test_{i}():\n    assert {i} + 1 == {i + 1}\n\n" for i in range(args.tests)))
    cache = run_dir / "cache"
    srv = ServerProcess(run_dir / "state", port_range="44000-44499").start()
    try:
        native_session(srv, project, args.os, cache)  # warm-up: fills the venv cache
        ratios = []
        for n in range(1, args.rounds + 1):
            native, marginal, seen = native_session(srv, project, args.os, cache)
            hand = by_hand(srv, project, args.os, cache)
            ratios.append(native / hand)
            print(f"round {n}: native {seen} results, marginal {marginal:.3f} s per item "
                  f"(goal <= 0.05), set-up to last result {native:.1f} s; by hand (push + "
                  f"pytest -q per VM, in parallel) {hand:.1f} s; ratio {native / hand:.2f}x",
                  flush=True)
        print(f"ratio native / by hand, median of {len(ratios)}: "
              f"{statistics.median(ratios):.2f}x (goal <= 1.3x)")
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
