"""Warm clones vs cold boots, in one run on one server started with no warm-clone flag
(TCG here): for a 1-VM ENV and an N-VM ENV, seconds from `POST /envs` to `running`, and
to the first successful `run` of `true` on every VM.

Run by hand on an otherwise idle host:

    python3 benchmarks/warm.py [--vms 8] [--rounds 2] [--density 40] [--tcg-tb-cache MIB]

The server builds its template of the default shape by itself at start (no template
cache: its own build is timed; the measurements start once it built every image's); each
round then creates a cold and a warm ENV of each size. Prints medians, the ratio
cold/warm (goal: >= 10x for one VM; warm `running` goal <= 1.0 s for 1 VM, <= 4.0 s for
8), and the warm clones' restore, agent and identity seconds from the server's log.
`--density N` (0 to skip; then --rounds 0 runs it alone): one ENV of N idle warm clones
of 512 MiB, and the summed proportional set size (PSS, /proc/PID/smaps_rollup) of their
QEMU processes with the per-clone figure (goal: <= 100 MiB per idle clone) — clones
map the template's RAM file privately, so the pages none of them wrote are shared.
The rest of an idle clone is mostly QEMU's TCG translation buffer (decision 76): it is
printed apart, and `--tcg-tb-cache MIB` passes the server its bound.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import ServerProcess, new_run_dir, wait_env, wait_templates  # noqa: E402


def ready_seconds(url: str, name: str, vms: int, warm: bool) -> tuple[float, float]:
    """(seconds to `running`, seconds to the first successful `run` on every VM)."""
    started = time.monotonic()
    requests.post(url + "/envs", json={"name": name, "os_prefix": ["debian-12"],
                                       "vm_number": vms, "warm": warm},
                  timeout=60).raise_for_status()
    deadline = time.monotonic() + 1800
    while True:  # poll at 20 Hz: finer than wait_env's polls (0.2 s, then longer)
        env = requests.get(f"{url}/envs/{name}", timeout=30).json()
        if env["state"] != "creating" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    running = time.monotonic() - started
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
    return running, took


WARM_LOG = re.compile(r"warm clone \S+: restore ([\d.]+)s, agent ([\d.]+)s, identity ([\d.]+)s")


def qemu_memory_kib(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of a process in KiB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Rss"):
            fields[name] = int(rest.split()[0])
    return fields["Pss"], fields["Rss"]


def translated_code_kib(pid: int) -> int:
    """PSS in KiB of a QEMU's TCG translation buffer: its one private mapping that is
    readable, writable and executable (/proc/PID/smaps; QEMU 7.2 without split-wx)."""
    kib, in_buffer = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
            in_buffer = fields[1] == "rwxp" and len(fields) == 5
        elif in_buffer and fields[0] == "Pss:":
            kib += int(fields[1])
    return kib


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
    pss = rss = code = 0
    for vm in env["vms"]:
        pid = int(Path(f"/run/libvirt/qemu/tt-{vm['id']}.pid").read_text())
        p, r = qemu_memory_kib(pid)
        pss, rss, code = pss + p, rss + r, code + translated_code_kib(pid)
    print(f"density: {vms} clones ({modes.count('warm')} warm) running in {up:.1f}s; "
          f"after {idle:.0f}s idle their QEMUs' PSS {pss / 1024:.0f} MiB in all, "
          f"{pss / 1024 / vms:.1f} MiB per clone (goal <= 100), of which TCG's translated "
          f"code {code / 1024 / vms:.1f} MiB; RSS {rss / 1024 / vms:.0f} MiB per clone",
          flush=True)
    requests.delete(f"{url}/envs/dense", timeout=600).raise_for_status()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--density", type=int, default=40)
    p.add_argument("--tcg-tb-cache", type=int, default=None, metavar="MIB",
                   help="pass the server this --tcg-tb-cache (default: the server's own)")
    args = p.parse_args()
    tb_cache = () if args.tcg_tb_cache is None else ("--tcg-tb-cache", str(args.tcg_tb_cache))
    size = max(8, args.vms, args.density)
    run_dir = new_run_dir("bench-warm-")
    srv = ServerProcess(run_dir / "state", port_range="42500-42999", template_cache=None,
                        extra=("--cpu-total", str(size), "--mem-total", f"{size * 512}M",
                               "--disk-total", f"{size * 4}G", *tb_cache)).start()
    try:
        started = time.monotonic()
        while not any(t["state"] == "ready" and t["key"].startswith("qemu:debian-12:")
                      for t in requests.get(srv.url + "/status", timeout=10).json()
                      ["templates"]):
            time.sleep(1)
        print(f"the server's own debian-12 template ready {time.monotonic() - started:.0f}s "
              "after its start", flush=True)
        wait_templates(srv, 3600)  # the server goes on with its other images' templates
        print(f"its other images' templates done {time.monotonic() - started:.0f}s after its "
              "start", flush=True)
        results: dict[tuple[int, bool], list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            for vms in (1, args.vms):
                for warm in (True, False):  # the first ENV after the build is warm
                    took = ready_seconds(srv.url, f"b{r}-{vms}-{int(warm)}", vms, warm)
                    results.setdefault((vms, warm), []).append(took)
                    print(f"round {r + 1}: {vms} VM(s) {'warm' if warm else 'cold'}: running "
                          f"{took[0]:.2f}s, first run done {took[1]:.2f}s", flush=True)
        if args.density:
            density(srv.url, args.density)
        if not args.rounds:
            return 0
        print(f"\n{'VMs':>4} {'to running: cold s':>19} {'warm s':>7} {'ratio':>6}"
              f" {'to first run: cold s':>21} {'warm s':>7} {'ratio':>6}")
        for vms in (1, args.vms):
            row = f"{vms:>4}"
            for i, width in ((0, 19), (1, 21)):
                cold_s = statistics.median(t[i] for t in results[(vms, False)])
                warm_s = statistics.median(t[i] for t in results[(vms, True)])
                row += f" {cold_s:{width}.2f} {warm_s:7.2f} {cold_s / warm_s:6.1f}"
            print(row)
        steps = [tuple(map(float, m.groups())) for m in WARM_LOG.finditer(srv.log.read_text())]
        if steps:
            print("warm clones' steps (server log), median s: "
                  + ", ".join(f"{name} {statistics.median(s[i] for s in steps):.2f}"
                              for i, name in enumerate(("restore", "agent", "identity")))
                  + f" ({len(steps)} clones)")
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
