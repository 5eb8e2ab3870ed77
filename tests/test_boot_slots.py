"""ttserver/vm/boot.py Slots: the server-wide boot slots (pure logic, fast)."""

from __future__ import annotations

import contextlib
import threading
import time

from ttserver.vm.boot import Slots


def _waiter(slots: Slots, name: str, order: list[str], stop: threading.Event,
            hold: float) -> threading.Thread:
    def run() -> None:
        with slots.held(stop) as held:
            order.append(name if held else f"{name} gave up")
            time.sleep(hold if held else 0)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_waiters_are_served_in_the_order_they_came():
    """A polling `Semaphore.acquire(timeout=...)` sent each waiter to the back of the queue
    at each time-out: the waiters of a big ENV kept a later, small ENV's waiting."""
    slots = Slots(1)
    order: list[str] = []
    never = threading.Event()
    threads = []
    with slots.held(never):
        for i in range(8):  # each queued before the next comes
            threads.append(_waiter(slots, f"w{i}", order, never, 0.13))  # longer than a
            deadline = time.monotonic() + 5                                # poll period
            while slots.waiting < i + 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=10)
    assert order == [f"w{i}" for i in range(8)] and slots.waiting == 0


def test_a_stopped_waiter_leaves_at_once_holding_nothing():
    slots = Slots(1)
    order: list[str] = []
    never, stop = threading.Event(), threading.Event()
    first = _waiter(slots, "first", order, never, 1.0)
    time.sleep(0.05)
    stopped = _waiter(slots, "stopped", order, stop, 0)
    time.sleep(0.05)
    last = _waiter(slots, "last", order, never, 0)
    time.sleep(0.05)
    started = time.monotonic()
    stop.set()
    stopped.join(timeout=5)
    assert time.monotonic() - started < 0.5 and order == ["first", "stopped gave up"]
    first.join(timeout=5)
    last.join(timeout=5)
    assert order == ["first", "stopped gave up", "last"]
    with slots.held(never) as held:  # every slot came back
        assert held


def test_count_slots_are_held_at_once_and_an_error_gives_its_slot_back():
    slots = Slots(2)
    never = threading.Event()
    inside, most = 0, 0
    lock = threading.Lock()

    def run() -> None:
        nonlocal inside, most
        with slots.held(never):
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.05)
            with lock:
                inside -= 1
            raise ValueError("boot failed")

    threads = [threading.Thread(target=lambda: _swallow(run)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert most == 2 and slots.count == 2
    with slots.held(never) as one, slots.held(never) as two:
        assert one and two


def _swallow(func) -> None:
    with contextlib.suppress(ValueError):
        func()


def test_a_stop_set_by_the_holder_before_its_release_keeps_the_next_waiter_out():
    """A failed boot sets its ENV's stop while it still holds its slot: the ENV's next VM
    used to take the freed slot anyway (woken by the release, it looked at the slot
    before the stop) and booted until its own boot timeout."""
    slots = Slots(1)
    order: list[str] = []
    give_up = threading.Event()
    with slots.held(give_up) as held:
        assert held
        waiter = _waiter(slots, "next", order, give_up, 0)
        time.sleep(0.05)
        give_up.set()
    waiter.join(timeout=5)
    assert order == ["next gave up"]
