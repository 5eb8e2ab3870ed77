"""Proxy latency benchmark: `GET /status` and `GET /envs/{name}` straight to a ttserver
and through a ttproxy in front of it, measured in the same run against the same ENV.

Run by hand on an otherwise idle host (it boots one VM under TCG first):

    python3 benchmarks/proxy.py [--requests 200]

Prints medians and p90 per endpoint and the ratio proxy/direct (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import ProxyProcess, ServerProcess, new_run_dir, wait_env  # noqa: E402


def timings(session: requests.Session, url: str, count: int) -> list[float]:
    session.get(url, timeout=30).raise_for_status()  # warm the connection
    out = []
    for _ in range(count):
        started = time.perf_counter()
        session.get(url, timeout=30).raise_for_status()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    run_dir = new_run_dir("bench-proxy-")
    srv = ServerProcess(run_dir / "state").start()
    proxy = ProxyProcess([srv.address], run_dir).start()
    try:
        requests.post(srv.url + "/envs", json={"name": "bench", "os_prefix": ["debian-12"]},
                      timeout=30).raise_for_status()
        env = wait_env(srv.url, "bench")
        assert env["state"] == "running", env["error"]
        session = requests.Session()
        print(f"{'endpoint':<16} {'direct ms':>22} {'proxy ms':>22} {'ratio':>7}")
        for path in ("/status", "/envs/bench"):
            direct = timings(session, srv.url + path, args.requests)
            proxied = timings(session, proxy.url + path, args.requests)

            def fmt(xs: list[float]) -> str:
                return (f"{statistics.median(xs):7.2f} (p90 "
                        f"{statistics.quantiles(xs, n=10)[-1]:6.2f})")

            ratio = statistics.median(proxied) / statistics.median(direct)
            print(f"{path:<16} {fmt(direct):>22} {fmt(proxied):>22} {ratio:7.2f}")
    finally:
        proxy.stop()
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
