"""ttclient/waiting.py: the one wait primitive (pure logic, fast)."""

from __future__ import annotations

import threading
import time

import pytest

from ttclient.waiting import WaitCancelled, WaitTimeout, wait_for


def test_returns_the_first_answer_that_is_not_none():
    answers = iter([None, None, 0, 5])
    assert wait_for(lambda: next(answers), 5, interval=0.01, what="x") == 0  # falsy counts


def test_checks_once_even_with_no_time_and_times_out_naming_what():
    calls = []
    with pytest.raises(WaitTimeout, match=r"the agent answering: not within 0s") as info:
        wait_for(lambda: calls.append(1), 0, what="the agent answering")
    assert calls == [1]
    assert info.value.what == "the agent answering"


def test_a_check_that_raises_gives_up_at_once():
    def broken() -> None:
        raise RuntimeError("dead domain")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="dead domain"):
        wait_for(broken, 30, what="x")
    assert time.monotonic() - started < 1


def test_cancel_by_function_and_by_event_which_also_ends_the_sleep():
    with pytest.raises(WaitCancelled, match="boot: cancelled"):
        wait_for(lambda: None, 30, cancel=lambda: True, what="boot")
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(WaitCancelled):
        wait_for(lambda: None, 30, interval=20, cancel=stop, what="ssh")
    assert time.monotonic() - started < 5  # not the 20 s interval


def test_backoff_grows_the_interval_up_to_its_cap():
    stamps: list[float] = []
    with pytest.raises(WaitTimeout):
        wait_for(lambda: stamps.append(time.monotonic()), 1.0, interval=0.01, backoff=2,
                 max_interval=0.16, what="x")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert gaps[0] < 0.1
    assert max(gaps) < 0.4  # capped (0.16 s + scheduling slack), never 0.01 * 2**n
    assert len(stamps) < 20
