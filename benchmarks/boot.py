"""Boot benchmark: create -> guest agent ready through ttserver, against a bare QEMU boot of
the same image measured in the same run (same kernel, initrd, overlay, agent channel).

Run by hand on an otherwise idle host (VMs under TCG are CPU-bound):

    python3 benchmarks/boot.py [--image qemu:debian-12:x86_64] [--rounds 3]

Prints each round and the median ratio ttserver/bare (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ttserver.images import DEFAULT_CMDLINE  # noqa: E402

from helpers import IMAGE_PATH, ServerProcess, new_run_dir  # noqa: E402


def bare_boot(image_dir: Path, work: Path, timeout: float = 300) -> float:
    """qemu-system-x86_64 directly: TCG, 1 vCPU, 512 MiB, overlay disk, agent on a socket."""
    overlay = work / "bare.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(image_dir / "disk.qcow2"), str(overlay)], check=True)
    sock = work / "qga.sock"
    sock.unlink(missing_ok=True)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults",
           "-display", "none", "-machine", "pc",
           "-kernel", str(image_dir / "vmlinuz"), "-initrd", str(image_dir / "initrd.img"),
           "-append", DEFAULT_CMDLINE,
           "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
           "-serial", f"file:{work / 'bare-console.log'}",
           "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
           "-device", "virtio-serial",
           "-chardev", f"socket,path={sock},server=on,wait=off,id=qga0",
           "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < timeout:
            if sock.exists() and _agent_ping(sock):
                return time.monotonic() - started
            time.sleep(0.3)
        raise RuntimeError("bare QEMU: agent did not answer")
    finally:
        proc.kill()
        proc.wait()


def _agent_ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            s.connect(str(sock))
            s.sendall(b'{"execute":"guest-ping"}\n')
            return b"return" in s.recv(4096)
    except OSError:
        return False


def ttserver_boot(srv: ServerProcess, image: str, name: str, timeout: float = 300) -> float:
    started = time.monotonic()
    resp = requests.post(srv.url + "/envs", json={"name": name, "os_prefix": [image]},
                         timeout=30)
    resp.raise_for_status()
    while time.monotonic() - started < timeout:
        env = requests.get(f"{srv.url}/envs/{name}", timeout=10).json()
        if env["state"] == "running":
            took = time.monotonic() - started
            requests.delete(f"{srv.url}/envs/{name}", timeout=60)
            return took
        if env["state"] == "failed":
            raise RuntimeError(env["error"])
        time.sleep(0.2)
    raise RuntimeError("ttserver: ENV not running in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="qemu:debian-12:x86_64")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    image_dir = IMAGE_PATH / args.image
    work = new_run_dir("bench-")
    srv = ServerProcess(work / "state", port_range="44000-44999").start()
    rows = []
    try:
        for i in range(args.rounds):
            bare = bare_boot(image_dir, work)
            served = ttserver_boot(srv, args.image, f"bench{i}")
            rows.append((bare, served))
            print(f"round {i + 1}: bare QEMU {bare:6.1f}s   ttserver {served:6.1f}s   "
                  f"ratio {served / bare:.2f}", flush=True)
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    ratios = [s / b for b, s in rows]
    summary = {"image": args.image, "rounds": args.rounds,
               "bare_median_s": round(statistics.median(b for b, _ in rows), 2),
               "ttserver_median_s": round(statistics.median(s for _, s in rows), 2),
               "ratio_median": round(statistics.median(ratios), 2)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
