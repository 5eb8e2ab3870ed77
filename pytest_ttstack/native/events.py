"""The controller's side of remote.py's two changes to xdist's worker protocol: events
sent in batches as `tt_events` messages (unpacked here, in the order the worker sent
them), and the ledger in the VM: the phase a worker died in, and the finished tests
whose events it had not sent yet (replayed here before xdist hears of the death).
Pure logic, no VM."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

PHASES = ("setup", "call", "teardown")
NOTE_SIZE = 4096  # bytes at the ledger's start: the "sha1(nodeid)\twhen" note of the last event
UNSENT_SIZE = 256 * 1024  # bytes after it: finished tests' events not sent yet, a JSON
# array per test and line; a test whose events are longer is sent at once
SEPARATOR = "\x1e"  # between the two parts in what read_command prints (JSON escapes it)


def ledger_path(gateway_id: str) -> str:
    """The guest file where worker `gateway_id` keeps its ledger (see remote.py)."""
    return f"/run/ttnative-ledger-{gateway_id}"


def read_command(gateway_id: str) -> str:
    """The guest shell command printing worker `gateway_id`'s ledger for `parse_ledger`
    (exit status 1 when there is none yet)."""
    path = ledger_path(gateway_id)
    return (f"test -f {path} || exit 1; head -c {NOTE_SIZE} {path} | tr -d '\\000'; "
            f"printf '\\036'; tail -c +{NOTE_SIZE + 1} {path} | tr -d '\\000'")


def parse_ledger(text: str) -> tuple[str, list[list[Any]]]:
    """(the note of the last event, the unsent finished tests' event lists) from what
    `read_command` printed. Lines that are not whole JSON arrays (a worker killed while
    it wrote one) are left out."""
    note, _, unsent = text.partition(SEPARATOR)
    tests = []
    for line in unsent.splitlines():
        try:
            events = json.loads(line)
        except ValueError:
            continue
        if isinstance(events, list):
            tests.append(events)
    return note.partition("\n")[0], tests


def not_received(tests: list[list[Any]], received: set[int]) -> list[Any]:
    """The events of `tests` (from `parse_ledger`) whose test's completion (the item
    index of its runtest_protocol_complete) is not in `received`, in order."""
    events = []
    for test in tests:
        done = [kwargs.get("item_index") for name, kwargs in test
                if name == "runtest_protocol_complete"]
        if not (done and done[0] in received):
            events.extend(test)
    return events


def phase_after(crashitem: str, ledger: str) -> str:
    """The phase `crashitem` was in when its worker died, from the worker's ledger line
    ("sha1 of the nodeid\twhen" of its last event): the one after the last report of that item
    (setup when the line is of another item, or the item's logstart)."""
    digest, _, when = ledger.partition("\t")
    mine = hashlib.sha1(crashitem.encode("utf-8", "surrogatepass")).hexdigest()
    if digest == mine and when in PHASES[:2]:
        return PHASES[PHASES.index(when) + 1]
    return "setup"


def unbatching(process_from_remote: Callable[[Any], None],
               unsent: Callable[[], list[list[Any]]] = list) -> Callable[[Any], None]:
    """Wrap a WorkerController's receiver: a `tt_events` message (a batch of events, sent
    as one by remote.py) is handed on as the events it holds, in order. Before the end
    of a worker that did not finish (the channel's end marker, not a tuple, with no
    workerfinished before it), the finished tests `unsent()` returns (from the worker's
    ledger) are handed on, less those whose completion came through: xdist then blames
    the test that was running, not the first one it has no result of."""
    received: set[int] = set()
    finished = False

    def forward(name: str, kwargs: dict[str, Any]) -> None:
        nonlocal finished
        if name == "runtest_protocol_complete":
            received.add(kwargs.get("item_index", -1))
        finished = finished or name == "workerfinished"
        process_from_remote((name, kwargs))

    def receive(eventcall: Any) -> None:
        if not isinstance(eventcall, tuple) and not finished:  # xdist's end marker
            for name, kwargs in not_received(unsent(), received):
                forward(name, retupled(kwargs))
        if not (isinstance(eventcall, tuple) and eventcall[0] == "tt_events"):
            if isinstance(eventcall, tuple) and len(eventcall) == 2:
                # remote.py may have turned a subtest's keywords into reprs before an
                # event fell back to execnet: the same restoring as for a batch
                forward(eventcall[0], retupled(eventcall[1]))
            else:
                process_from_remote(eventcall)
            return
        try:
            events = json.loads(eventcall[1]["json"])
        except (ValueError, KeyError, TypeError) as exc:
            process_from_remote(("internal_error", {
                "formatted_error": f"native mode: a batch of worker events is unreadable: "
                                   f"{exc!r}"}))
            return
        for name, kwargs in events:
            forward(name, retupled(kwargs))

    return receive


REPR_KEY = "__tt_repr__"  # remote.py sends a subtest's keyword values as {REPR_KEY: repr}


class Repr(str):
    """A value known by its repr() only (a subtest's keyword, sent from the worker): its
    repr is that text, so a subtest's description reads as on the host."""

    def __repr__(self) -> str:
        return str(self)


def retupled(kwargs: dict[str, Any]) -> dict[str, Any]:
    """An event's arguments as xdist sent them, from their JSON form: the tuples JSON made
    lists (`location`; a report's `location`, `sections` and skip `longrepr`, which
    pytest's JUnit and terminal reporters check for) tuples again, and a subtest's
    keywords objects with their repr."""
    if "location" in kwargs:
        kwargs["location"] = tuple(kwargs["location"])
    data = kwargs.get("data")
    if isinstance(data, dict):
        for key in ("location", "longrepr"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if isinstance(data.get("sections"), list):
            data["sections"] = [tuple(section) for section in data["sections"]]
        context = data.get("_subtest.context")
        if isinstance(context, dict) and isinstance(context.get("kwargs"), dict):
            context["kwargs"] = {k: Repr(v[REPR_KEY]) if isinstance(v, dict) and REPR_KEY in v
                                 else v for k, v in context["kwargs"].items()}
    return kwargs
