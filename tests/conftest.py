"""Shared fixtures: real ttserver processes over real images, and per-test state dirs.

State lives under /var/lib/ttstack/test-runs (not pytest's 0700 tmp dirs) because QEMU runs
as libvirt-qemu and must reach the VM disks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    CHILD_PYTEST_ADDOPTS,
    IMAGE_PATH,
    ServerProcess,
    new_run_dir,
    warm_template_cache,
)

BASE_IMAGE = "qemu:debian-12:x86_64"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (long end-to-end scenarios; "
                          "CI runs them after the default suite)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default suite leaves out the `slow` tests (it must stay under 15 minutes on a
    2-core TCG host): they run with --run-slow, or when -m names them (`-m slow`)."""
    if config.getoption("--run-slow") or "slow" in (config.option.markexpr or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_configure(config: pytest.Config) -> None:
    """Child pytest runs inherit CHILD_PYTEST_ADDOPTS (this run has read its own)."""
    own = os.environ.get("PYTEST_ADDOPTS", "")
    os.environ["PYTEST_ADDOPTS"] = f"{own} {CHILD_PYTEST_ADDOPTS}".strip()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (IMAGE_PATH / BASE_IMAGE / "disk.qcow2").is_file():
        pytest.exit(f"test image {BASE_IMAGE} is missing under {IMAGE_PATH}; build it with "
                    f"'ttserver image build debian-12 --image-path {IMAGE_PATH}' "
                    "(bash .ci/run does this)", returncode=4)


@pytest.fixture(scope="session", autouse=True)
def template_cache(request: pytest.FixtureRequest) -> None:
    """Before the first VM test: every image's default-shape warm-clone template in the
    suite's shared cache (built once per machine, ~1 min per image under TCG; reused while
    the image is unchanged), so the suite's servers clone VMs instead of booting them."""
    if any(item.get_closest_marker("vm") for item in request.session.items):
        found = warm_template_cache()
        failed = [t for t in found if t["state"] != "ready"]
        if failed:
            print(f"\nwarm-clone templates not ready, VMs boot cold: {failed}")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = new_run_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(run_dir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(run_dir / "state").start()
    yield srv
    srv.stop()
