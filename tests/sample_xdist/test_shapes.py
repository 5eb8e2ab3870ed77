"""A sample user suite of every test shape, for tests/test_plugin.py: plain,
parametrized, class-based and `tt_os`-marked tests, a module fixture on `tt_vm`, and a
test that kills its worker once. Each VM test writes (worker, VM) to $SAMPLE_OUT."""

import json
import os
import uuid

import pytest

OUT = os.environ.get("SAMPLE_OUT", "")
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def record(kind: str, vm) -> None:
    with open(os.path.join(OUT, f"{kind}-{uuid.uuid4().hex}.json"), "w") as f:
        json.dump({"kind": kind, "worker": WORKER, "vm": vm.name, "pid": os.getpid()}, f)


# first, so that the crash comes while most items are still to be handed out (xdist's
# replacement worker then gets some of them)
def test_kills_its_worker_once(tt_vm):
    record("test", tt_vm)
    flag = os.path.join(OUT, "killed")
    if WORKER != "main" and not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(9)  # as a segfault or the OOM killer would end it


def test_kills_its_worker_in_a_fresh_vm(tt_fresh_vm):
    """The worker dies with a fresh VM's ENV in hand: the session must still delete it."""
    record("fresh", tt_fresh_vm)
    flag = os.path.join(OUT, "killed-fresh")
    if WORKER != "main" and not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(9)


@pytest.fixture(scope="module")
def prepared(tt_vm):
    """Set each VM up once per module (a ScopeMismatch when tt_vm was function-scoped)."""
    record("module-fixture", tt_vm)
    tt_vm.run("touch /tmp/prepared", check=True)
    return tt_vm


def test_plain():
    pass


@pytest.mark.parametrize("n", [1, 2])
def test_param(tt_vm, n):
    record("test", tt_vm)


class TestInClass:
    def test_method(self, prepared):
        record("test", prepared)
        assert prepared.run("test -e /tmp/prepared").ok

    @pytest.mark.tt_os("debian-12")
    def test_marked(self, tt_vm):
        record("test", tt_vm)


@pytest.mark.parametrize("m", range(12))
def test_after_the_crash(tt_vm, m):
    record("test", tt_vm)
    tt_vm.run("sleep 1")
