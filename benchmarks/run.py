"""What a `run` costs over the guest agent's own floor, in one run on one VM (TCG here).

Run by hand on an otherwise idle host:

    python3 benchmarks/run.py [--rounds 40]

Baseline: a bare qemu-ga `guest-exec` of `/bin/true` with output capture and the same
polling (ttserver/guest/agent.exec_argv), straight through libvirt on the same VM: what
any agent-based run must pay. Measured: `POST /run` of `true`, of a command printing
1 KB, and of one printing 1 MB (API, server, guest files and their reads). Prints medians
and each one's ratio to the baseline; run it on two commits for an A/B.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import libvirt
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ttserver.guest import agent  # noqa: E402

from helpers import ServerProcess, new_run_dir, wait_env  # noqa: E402


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.monotonic()
        fn()
        times.append(time.monotonic() - started)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    run_dir = new_run_dir("bench-run-")
    srv = ServerProcess(run_dir / "state", port_range="44000-44099").start()
    try:
        requests.post(srv.url + "/envs", json={"name": "bench", "os_prefix": ["debian-12"]},
                      timeout=60).raise_for_status()
        env = wait_env(srv.url, "bench")
        assert env["state"] == "running", env["error"]
        dom = libvirt.open("qemu:///system").lookupByName(f"tt-{env['vms'][0]['id']}")

        def api(cmd: str) -> Callable[[], object]:
            def call() -> object:
                res = requests.post(f"{srv.url}/envs/bench/run", json={"cmd": cmd},
                                    timeout=120)
                assert res.ok and res.json()["results"][0]["exit_code"] == 0, res.text
                return res
            return call

        base = median_seconds(lambda: agent.exec_argv(dom, ["/bin/true"], timeout=60),
                              args.rounds)
        print(f"baseline: bare guest-exec of /bin/true  {base * 1000:7.1f} ms")
        for label, cmd in (("run `true`", "true"),
                           ("run printing 1 KB", "head -c 1000 /dev/zero"),
                           ("run printing 1 MB", "head -c 1000000 /dev/zero")):
            took = median_seconds(api(cmd), args.rounds)
            print(f"{label:<22}  {took * 1000:7.1f} ms  ratio {took / base:5.2f}")
        requests.delete(srv.url + "/envs/bench", timeout=300).raise_for_status()
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
