"""The same native test suite on a QEMU VM and on containers (issue [engines]): a
generated CPU-bound suite of N tests run with `--tt-native` on `qemu:debian-12`,
`lxc:debian-12` and, when its image exists, `lxc:debian-12:aarch64` (arm64 binaries
through qemu-user), one after the other on one server (`--engines qemu,lxc`), in one run.
The server's image dir links those three images (the arm64 one from the foreign-image dir
of tests/test_multiarch.py: `TTSTACK_FOREIGN_TESTS=1 python3 -m pytest
tests/test_engines.py -k arm64` or `ttserver image build debian-12 --arch aarch64 --engine
lxc --image-path /var/lib/ttstack/images-foreign` makes it).

Run by hand on an otherwise idle host (TCG here):

    python3 benchmarks/engines.py [--tests 200] [--os qemu:debian-12,lxc:debian-12,...]

Printed per OS: start (the ENV's VM or container `running`, as the plugin reports it),
set-up (to the native workers' start: probe, ship, venv), suite (workers started to the
last result) and the ratios to the first OS's.
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
from helpers import IMAGE_PATH, ServerProcess, new_run_dir  # noqa: E402

FOREIGN = Path(os.environ.get("TTSTACK_FOREIGN_IMAGES", "/var/lib/ttstack/images-foreign"))
ARM = "lxc:debian-12:aarch64"

RUNNING = re.compile(r"running in ([\d.]+)s")
READY = "starting one pytest-xdist worker per VM"
DONE = re.compile(r"(\d+) passed")
TEST = '''
import pytest

@pytest.mark.parametrize("n", range({tests}))
def test_cpu(n):
    total = 0
    for i in range(60_000):  # ~10 ms of pure Python on this host, natively
        total += (i * n) % 7
    assert total >= 0
'''


def session(srv: ServerProcess, project: Path, os_name: str) -> dict[str, float]:
    """One `--tt-native` session on `os_name`: its figures in seconds."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
           f"--tt-server={srv.address}", f"--tt-os={os_name}", "--tt-native"]
    env = {**os.environ, "TT_CONFIG": str(project.parent / "none.json"),
           "TTSTACK_CACHE_DIR": str(project.parent / "cache"), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    ready = end = start = 0.0
    out = []
    with subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - started
            out.append(line)
            if (m := RUNNING.search(line)) and not start:
                start = float(m.group(1))
            if READY in line:
                ready = now
            if DONE.search(line) and "ttstack" not in line:
                end = now
    if proc.returncode != 0 or not (ready and end):
        raise SystemExit(f"{os_name}: the session failed ({proc.returncode}):\n"
                         + "".join(out[-30:]))
    return {"start": start, "setup": ready, "suite": end - ready}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", type=int, default=200)
    p.add_argument("--os", default="")
    args = p.parse_args()
    arm = (FOREIGN / ARM).is_dir()
    oses = args.os.split(",") if args.os else [
        "qemu:debian-12:x86_64", "lxc:debian-12:x86_64", *([ARM] if arm else [])]
    run_dir = new_run_dir("bench-engines-")
    project = run_dir / "project"
    project.mkdir()
    (project / "test_cpu.py").write_text(TEST.format(tests=args.tests))
    images = run_dir / "images"  # links: only the images measured, from both dirs
    images.mkdir()
    for name in ("qemu:debian-12:x86_64", "lxc:debian-12:x86_64", ARM):
        for where in (IMAGE_PATH, FOREIGN):
            if (where / name).is_dir():
                (images / name).symlink_to(where / name)
                break
    srv = ServerProcess(run_dir / "state", images, port_range="44500-44599",
                        extra=("--engines", "qemu,lxc")).start()
    try:
        rows = {o: session(srv, project, o) for o in oses}
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    base = rows[oses[0]]
    print(f"{args.tests} CPU-bound tests with --tt-native, one OS at a time, one server")
    print(f"{'OS':24} {'start s':>8} {'set-up s':>9} {'suite s':>8} "
          f"{'start ratio':>12} {'suite ratio':>12}")
    for o, r in rows.items():
        print(f"{o:24} {r['start']:8.2f} {r['setup']:9.1f} {r['suite']:8.1f} "
              f"{base['start'] / r['start']:11.1f}x {base['suite'] / r['suite']:11.1f}x")
    if not arm and not args.os:
        print(f"(no {ARM} image in {FOREIGN}: see this file's docstring)")


if __name__ == "__main__":
    main()
