"""Warm clones vs cold boots: time from `POST /envs` to the first successful `run` on
every VM, in one run on one server (TCG here), for a 1-VM ENV and an N-VM ENV.

Run by hand on an otherwise idle host:

    python3 benchmarks/warm.py [--vms 8] [--rounds 2] [--density 40]

The template is built (and timed) first; then each round creates a cold and a warm ENV
of each size. Prints medians and the ratio cold/warm (goal: >= 10x for one VM).
`--density N` (0 to skip; then --rounds 0 runs it alone): one ENV of N idle warm clones
of 512 MiB, and the summed proportional set size (PSS, /proc/PID/smaps_rollup) of their
QEMU processes with the per-clone figure (goal: <= 100 MiB per idle clone) — clones
map the template's RAM file privately, so the pages none of them wrote are shared.
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
from helpers import ServerProcess, new_run_dir, wait_env  # noqa: E402


def ready_seconds(url: str, name: str, vms: int, warm: bool) -> float:
    started = time.monotonic()
    requests.post(url + "/envs", json={"name": name, "os_prefix": ["debian-12"],
                                       "vm_number": vms, "warm": warm},
                  timeout=60).raise_for_status()
    deadline = time.monotonic() + 1800
    while True:  # poll at 10 Hz: wait_env's 1 s would dominate a warm clone's time
        env = requests.get(f"{url}/envs/{name}", timeout=30).json()
        if env["state"] != "creating" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert env["state"] == "running", env["error"]
    while True:
        res = requests.post(f"{url}/envs/{name}/run", json={"cmd": "true"}, timeout=120)
        if res.ok and all(r["exit_code"] == 0 for r in res.json()["results"]):
            break
        time.sleep(0.1)
    took = time.monotonic() - started
    modes = {vm["boot_mode"] for vm in env["vms"]}
    assert modes == {"warm" if warm else "cold"}, modes
    requests.delete(f"{url}/envs/{name}", timeout=300).raise_for_status()
    return took


def qemu_memory_kib(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of a process in KiB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Rss"):
            fields[name] = int(rest.split()[0])
    return fields["Pss"], fields["Rss"]


def density(url: str, vms: int, idle: float = 20.0) -> None:
    """One ENV of `vms` warm clones; print their QEMUs' summed PSS and RSS once idle."""
    started = time.monotonic()
    requests.post(url + "/envs", json={"name": "dense", "os_prefix": ["debian-12"],
                                       "vm_number": vms, "warm": True},
                  timeout=60).raise_for_status()
    env = wait_env(url, "dense", timeout=3600)
    assert env["state"] == "running", env["error"]
    up = time.monotonic() - started
    modes = [vm["boot_mode"] for vm in env["vms"]]
    time.sleep(idle)
    pss = rss = 0
    for vm in env["vms"]:
        pid = int(Path(f"/run/libvirt/qemu/tt-{vm['id']}.pid").read_text())
        p, r = qemu_memory_kib(pid)
        pss, rss = pss + p, rss + r
    print(f"density: {vms} clones ({modes.count('warm')} warm) running in {up:.1f}s; "
          f"after {idle:.0f}s idle their QEMUs' PSS {pss / 1024:.0f} MiB in all, "
          f"{pss / 1024 / vms:.1f} MiB per clone (goal <= 100); RSS {rss / 1024 / vms:.0f} "
          f"MiB per clone", flush=True)
    requests.delete(f"{url}/envs/dense", timeout=600).raise_for_status()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--density", type=int, default=40)
    args = p.parse_args()
    size = max(8, args.vms, args.density)
    run_dir = new_run_dir("bench-warm-")
    srv = ServerProcess(run_dir / "state", port_range="42500-42999",
                        extra=("--warm-clones", "--cpu-total", str(size),
                               "--mem-total", f"{size * 512}M",
                               "--disk-total", f"{size * 4}G")).start()
    try:
        started = time.monotonic()
        ready_seconds(srv.url, "seed", 1, warm=False)  # cold, and asks for the template
        requests.post(srv.url + "/envs", json={"name": "kick", "os_prefix": ["debian-12"],
                                               "warm": True}, timeout=60)
        wait_env(srv.url, "kick")
        requests.delete(srv.url + "/envs/kick", timeout=300)
        while not any(t["state"] == "ready" for t in
                      requests.get(srv.url + "/status", timeout=10).json()["templates"]):
            time.sleep(1)
        print(f"template ready after {time.monotonic() - started:.0f}s (incl. one cold ENV)")
        results: dict[tuple[int, bool], list[float]] = {}
        for r in range(args.rounds):
            for vms in (1, args.vms):
                for warm in (False, True):
                    took = ready_seconds(srv.url, f"b{r}-{vms}-{int(warm)}", vms, warm)
                    results.setdefault((vms, warm), []).append(took)
                    print(f"round {r + 1}: {vms} VM(s) {'warm' if warm else 'cold'}: "
                          f"{took:.1f}s", flush=True)
        if args.density:
            density(srv.url, args.density)
        if not args.rounds:
            return 0
        print(f"\n{'VMs':>4} {'cold s':>8} {'warm s':>8} {'cold/warm':>10}")
        for vms in (1, args.vms):
            cold = statistics.median(results[(vms, False)])
            warm = statistics.median(results[(vms, True)])
            print(f"{vms:>4} {cold:8.1f} {warm:8.1f} {cold / warm:10.1f}")
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
