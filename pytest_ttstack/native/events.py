"""The controller's side of remote.py's two changes to xdist's worker protocol: one
`tt_events` message per test (unpacked here, in the order the worker sent the events),
and the ledger in the VM naming the phase a worker died in. Pure logic, no VM."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

PHASES = ("setup", "call", "teardown")


def ledger_path(gateway_id: str) -> str:
    """The guest file where worker `gateway_id` notes its last event (see remote.py)."""
    return f"/run/ttnative-ledger-{gateway_id}"


def phase_after(crashitem: str, ledger: str) -> str:
    """The phase `crashitem` was in when its worker died, from the worker's ledger line
    ("nodeid\twhen" of its last event): the one after the last report of that item
    (setup when the line is of another item, or the item's logstart)."""
    nodeid, _, when = ledger.partition("\t")
    if nodeid == crashitem and when in PHASES[:2]:
        return PHASES[PHASES.index(when) + 1]
    return "setup"


def unbatching(process_from_remote: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a WorkerController's receiver: a `tt_events` message (one test's events, sent
    as one by remote.py) is handed on as the events it holds, in order."""

    def receive(eventcall: Any) -> None:
        if not (isinstance(eventcall, tuple) and eventcall[0] == "tt_events"):
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
            process_from_remote((name, retupled(kwargs)))

    return receive


def retupled(kwargs: dict[str, Any]) -> dict[str, Any]:
    """An event's arguments as xdist sent them, from their JSON form: the tuples JSON made
    lists (`location`; a report's `location`, `sections` and skip `longrepr`, which
    pytest's JUnit and terminal reporters check for) tuples again."""
    if "location" in kwargs:
        kwargs["location"] = tuple(kwargs["location"])
    data = kwargs.get("data")
    if isinstance(data, dict):
        for key in ("location", "longrepr"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if isinstance(data.get("sections"), list):
            data["sections"] = [tuple(section) for section in data["sections"]]
    return kwargs
