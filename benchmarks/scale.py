"""A big ENV through ttproxy: one ENV of N warm VMs of 128 MiB (default 100) placed over
two ttservers on this host, created, run (`true` on every VM), listed and deleted; the
seconds of each step, measured in one run.

Run by hand on an otherwise idle host (it needs ~15 GiB of free memory for 100 VMs):

    python3 benchmarks/scale.py [--vms 100]

First each server gets the warm template of the 128 MiB shape (a 1-VM ENV of that shape
boots cold and asks for it; both servers share the template cache, so one build serves
both). Then, through the proxy: POST /envs -> every VM `running` (with how many booted
warm), POST /envs/NAME/run `true` on all, GET /envs/NAME and GET /envs, DELETE. The
baseline printed beside them is the same steps for a 1-VM ENV in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import ProxyProcess, ServerProcess, new_run_dir, wait_env  # noqa: E402

MEM = 128  # MiB per VM


def steps(url: str, name: str, vms: int) -> dict[str, float]:
    """Seconds of each step for an ENV of `vms` VMs created through `url`."""
    took: dict[str, float] = {}
    started = time.monotonic()
    requests.post(url + "/envs", json={"name": name, "os_prefix": ["debian-12:x86_64"],
                                       "vm_number": vms, "mem_size": MEM},
                  timeout=300).raise_for_status()
    while True:
        env = requests.get(f"{url}/envs/{name}", timeout=60).json()
        if env["state"] != "creating":
            break
        time.sleep(0.2)
    took["create"] = time.monotonic() - started
    assert env["state"] == "running", env.get("error")
    modes = [vm["boot_mode"] for vm in env["vms"]]
    took["warm VMs"] = modes.count("warm")
    started = time.monotonic()
    res = requests.post(f"{url}/envs/{name}/run", json={"cmd": "true"}, timeout=600)
    res.raise_for_status()
    results = res.json()["results"]
    took["run true"] = time.monotonic() - started
    assert len(results) == vms and all(r["exit_code"] == 0 for r in results), results
    started = time.monotonic()
    requests.get(f"{url}/envs/{name}", timeout=60).raise_for_status()
    took["show"] = time.monotonic() - started
    started = time.monotonic()
    requests.get(f"{url}/envs", timeout=60).raise_for_status()
    took["list"] = time.monotonic() - started
    started = time.monotonic()
    requests.delete(f"{url}/envs/{name}", timeout=900).raise_for_status()
    took["delete"] = time.monotonic() - started
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=100)
    args = p.parse_args()
    per_server = (args.vms + 1) // 2
    run_dir = new_run_dir("bench-scale-")
    servers = [ServerProcess(run_dir / f"state{i}", port_range=ports, extra=(
        "--cpu-total", str(per_server + 2), "--mem-total", f"{(per_server + 2) * MEM}M",
        "--disk-total", f"{(per_server + 2) * 4}G")).start()
        for i, ports in enumerate(("44000-44249", "44250-44499"))]
    proxy = ProxyProcess([s.address for s in servers], run_dir).start()
    try:
        started = time.monotonic()
        first = servers[0]
        requests.post(first.url + "/envs", json={"name": "shape", "os_prefix": ["debian-12"],
                                                 "mem_size": MEM}, timeout=60)
        wait_env(first.url, "shape")
        requests.delete(first.url + "/envs/shape", timeout=300)
        while not any(t["state"] == "ready" and t["key"].endswith(f"-{MEM}m") for t in
                      requests.get(first.url + "/status", timeout=10).json()["templates"]):
            time.sleep(1)
        print(f"template of the {MEM} MiB shape ready after "
              f"{time.monotonic() - started:.0f}s", flush=True)
        one = steps(proxy.url, "one", 1)
        big = steps(proxy.url, "big", args.vms)
        print(f"\n{'step':>10} {'1 VM s':>8} {f'{args.vms} VMs s':>10} {'ratio':>7}")
        for key in one:
            if key == "warm VMs":
                print(f"{key:>10} {one[key]:8.0f} {big[key]:10.0f}")
            else:
                print(f"{key:>10} {one[key]:8.2f} {big[key]:10.2f} "
                      f"{big[key] / max(one[key], 1e-3):7.1f}")
    finally:
        proxy.stop()
        for srv in servers:
            srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
