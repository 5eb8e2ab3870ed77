"""Test ids in native mode carry the OS they ran on, as the first parameter id.

`t.py::test_a` on debian-12 is `t.py::test_a[debian-12:x86_64]`; a parametrized
`t.py::test_p[1]` is `t.py::test_p[debian-12:x86_64-1]` — the same shape as `tt_vm`
tests, so JUnit, `-k debian-13`, `--lf`, `--deselect` and the CI summary see one row per
test × OS. Standard library only (imported inside the VM too).
"""

from __future__ import annotations

from collections.abc import Iterable


def _split(nodeid: str) -> tuple[str, str, str | None]:
    """(prefix up to the item's name, that name, its parameter id or None).

    The parameter id starts at the first `[` after the path's `::`: class, function and
    doctest names never hold `[`, but a parameter id may hold `::` and a path may hold `[`.
    """
    sep = nodeid.find("::")
    start = nodeid.find("[", sep) if sep >= 0 else -1
    if start < 0 or not nodeid.endswith("]"):
        head, sep2, last = nodeid.rpartition("::")
        return head + sep2, last, None
    head, sep2, name = nodeid[:start].rpartition("::")
    return head + sep2, name, nodeid[start + 1:-1]


def tag(nodeid: str, os_id: str) -> str:
    """The id of `nodeid` run on `os_id` (`debian-12:x86_64`)."""
    prefix, name, params = _split(nodeid)
    return f"{prefix}{name}[{os_id}{'-' + params if params is not None else ''}]"


def untag(nodeid: str, os_ids: Iterable[str]) -> tuple[str | None, str]:
    """(the OS id `nodeid` is tagged with, the guest's own id), or (None, nodeid)."""
    prefix, name, params = _split(nodeid)
    if params is None:
        return None, nodeid
    for os_id in sorted(os_ids, key=len, reverse=True):
        if params == os_id:
            return os_id, prefix + name
        if params.startswith(os_id + "-"):
            return os_id, f"{prefix}{name}[{params[len(os_id) + 1:]}]"
    return None, nodeid
