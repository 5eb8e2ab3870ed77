"""Bounded load: 20 clients create and delete ENVs at once, against one ttserver and
against a ttproxy over two. Resources never go negative or over the totals, every
accepted ENV can be found and deleted, and nothing is left afterwards."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import NOTHING_LEFT, ProxyProcess, ServerProcess, leftovers, new_run_dir

pytestmark = pytest.mark.vm
CLIENTS = 20
ROUNDS = 3


class Sampler(threading.Thread):
    """Polls /status of each server; records any moment resources were out of bounds."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.stop = threading.Event()
        self.samples = 0
        self.peak_cpu = 0
        self.bad: list[dict] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for url in self.urls:
                st = requests.get(url + "/status", timeout=30).json()
                self.samples += 1
                self.peak_cpu = max(self.peak_cpu, st["cpu_used"])
                for key in ("cpu", "mem", "disk"):
                    used = st[f"{key}_used" if key == "cpu" else f"{key}_used_mib"]
                    total = st[f"{key}_total" if key == "cpu" else f"{key}_total_mib"]
                    if not 0 <= used <= total:
                        self.bad.append(st)
            time.sleep(0.1)


def client(url: str, i: int) -> dict[str, int]:
    rng = random.Random(i)
    seen = {"accepted": 0, "refused": 0}
    for k in range(ROUNDS):
        name = f"load-{i}-{k}"
        resp = requests.post(url + "/envs", json={"name": name, "os_prefix": ["debian-12"],
                                                  "life_time": 600}, timeout=120)
        if resp.status_code == 409:
            assert "not enough resources" in resp.json()["detail"] or "cannot be placed" in \
                resp.json()["detail"], resp.text
            seen["refused"] += 1
            continue
        assert resp.status_code == 202, resp.text
        seen["accepted"] += 1
        time.sleep(rng.uniform(0, 2))
        got = requests.get(f"{url}/envs/{name}", timeout=60)
        assert got.status_code == 200, f"accepted ENV {name} was lost: {got.text}"
        resp = requests.delete(f"{url}/envs/{name}", timeout=180)
        assert resp.status_code == 200, f"delete {name}: {resp.text}"
    return seen


def hammer(entry: str, servers: list[ServerProcess]) -> dict[str, int]:
    sampler = Sampler([s.url for s in servers])
    sampler.start()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = list(pool.map(lambda i: client(entry, i), range(CLIENTS)))
    sampler.stop.set()
    sampler.join()
    assert sampler.bad == [], f"resources out of bounds: {sampler.bad[:3]}"
    totals = {k: sum(r[k] for r in results) for k in ("accepted", "refused")}
    assert totals["accepted"] >= 2 and totals["accepted"] + totals["refused"] == CLIENTS * ROUNDS
    assert sampler.samples > 10 and sampler.peak_cpu >= 1
    for s in servers:
        assert requests.get(s.url + "/envs", timeout=30).json() == []
        st = requests.get(s.url + "/status", timeout=30).json()
        assert (st["cpu_used"], st["mem_used_mib"], st["disk_used_mib"]) == (0, 0, 0)
    return totals


@pytest.fixture
def run_dir() -> Iterator:
    path = new_run_dir("load-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_twenty_clients_at_one_server(run_dir):
    srv = ServerProcess(run_dir / "state", port_range="49500-49699",
                        extra=("--cpu-total", "2", "--mem-total", "1G")).start()
    try:
        sid = srv.server_id()
        totals = hammer(srv.url, [srv])
        print(f"\none server: {totals}")
        assert leftovers(sid, run_dir / "state", list(range(49500, 49700))) == NOTHING_LEFT
    finally:
        srv.stop()


@pytest.mark.slow
def test_twenty_clients_through_a_proxy(run_dir):
    servers = [ServerProcess(run_dir / f"state{i}", port_range=r,
                             extra=("--cpu-total", "1", "--mem-total", "1G")).start()
               for i, r in enumerate(("49700-49799", "49800-49899"))]
    proxy = ProxyProcess([s.address for s in servers], run_dir).start()
    try:
        ids = [s.server_id() for s in servers]
        totals = hammer(proxy.url, servers)
        print(f"\nproxy over two servers: {totals}")
        assert requests.get(proxy.url + "/envs", timeout=30).json() == []
        for s, sid, first in zip(servers, ids, (49700, 49800), strict=True):
            assert leftovers(sid, s.cfgdb, list(range(first, first + 100))) == NOTHING_LEFT
    finally:
        proxy.stop()
        for s in servers:
            s.stop()
