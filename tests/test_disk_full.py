"""A full disk under --cfgdb-path: a create is refused with 507 and a message that says
so (it was a 500 from SQLite), reads still answer, and creates work again once there is
space. The state directory is a small tmpfs this test mounts."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from helpers import ServerProcess, new_run_dir


@pytest.fixture
def small_disk() -> Iterator[Path]:
    where = new_run_dir("diskfull-") / "mnt"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                   check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], timeout=30)
        shutil.rmtree(where.parent, ignore_errors=True)


def test_a_full_state_disk_refuses_creates_with_507(small_disk: Path):
    srv = ServerProcess(small_disk / "state", port_range="49900-49999",
                        extra=("--no-warm-clones",), template_cache=None).start()
    filler = small_disk / "filler"
    try:
        with open(filler, "wb") as f:  # every byte left, taken
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        resp = requests.post(srv.url + "/envs", json={"name": "full",
                                                      "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 507, resp.text
        assert "disk is full" in resp.json()["detail"]
        assert str(small_disk) in resp.json()["detail"]
        assert requests.get(srv.url + "/envs", timeout=10).json() == []
        filler.unlink()
        resp = requests.post(srv.url + "/envs", json={"name": "room",
                                                      "os_prefix": ["debian-12"]}, timeout=30)
        assert resp.status_code == 202, resp.text
        assert requests.delete(srv.url + "/envs/room", timeout=120).status_code == 200
    finally:
        filler.unlink(missing_ok=True)
        srv.stop()
