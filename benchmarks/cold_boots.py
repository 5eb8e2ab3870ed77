"""Cold boots at once: one ENV of N cold VMs, with the server's default of one cold boot
per host CPU against all N at once (`--cold-boots N`, what every server did before
decision 78), a 1-VM cold ENV on each server as the same run's baseline.

Run by hand on an otherwise idle host (VMs under TCG are CPU-bound):

    python3 benchmarks/cold_boots.py [--vms 6] [--os debian-12]

Prints, for each setting, seconds from `POST /envs` to `running` for the 1-VM and the
N-VM ENV and the range of the VMs' own boot times (`boot_seconds`: from each VM's
domain start to its agent's answer), then the ratio of the N-VM times.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ttserver.vm.boot import host_cpus  # noqa: E402

from helpers import ServerProcess, new_run_dir  # noqa: E402


def cold_env(url: str, name: str, oses: str, vms: int) -> tuple[float, list[float]]:
    """(seconds from POST to `running`, each VM's boot_seconds) of one cold ENV."""
    started = time.monotonic()
    requests.post(url + "/envs", json={"name": name, "os_prefix": [oses], "vm_number": vms,
                                       "warm": False}, timeout=60).raise_for_status()
    while (env := requests.get(f"{url}/envs/{name}", timeout=30).json())["state"] == "creating":
        time.sleep(0.2)
    took = time.monotonic() - started
    assert env["state"] == "running", env["error"]
    requests.delete(f"{url}/envs/{name}", timeout=300).raise_for_status()
    return took, sorted(vm["boot_seconds"] for vm in env["vms"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=6)
    parser.add_argument("--os", default="debian-12")
    args = parser.parse_args()
    many: dict[str, float] = {}
    for label, at_once in ((f"{host_cpus()} at once (default)", 0),
                           (f"{args.vms} at once", args.vms)):
        run_dir = new_run_dir("bench-cold-")
        srv = ServerProcess(run_dir / "state", port_range="42500-42999", template_cache=None,
                            extra=("--no-warm-clones", "--cold-boots", str(at_once),
                                   "--cpu-total", str(2 * args.vms), "--mem-total", "16G",
                                   "--disk-total", "400G", "--boot-timeout", "1800")).start()
        try:
            one, _ = cold_env(srv.url, "one", args.os, 1)
            many[label], boots = cold_env(srv.url, "many", args.os, args.vms)
            print(f"{label}: 1-VM ENV {one:.1f}s; {args.vms}-VM ENV {many[label]:.1f}s, "
                  f"each VM's boot {boots[0]:.1f}-{boots[-1]:.1f}s", flush=True)
        finally:
            srv.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
    default, all_at_once = many.values()
    print(f"{args.vms}-VM ENV: all at once / default = {all_at_once / default:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
