"""xdist scheduling for native mode: every collected item once per requested OS.

Workers are grouped by the OS of their VM; each group has its own xdist scheduler of the
kind `--dist` names (`load` by default; `loadscope`, `loadfile`, `loadgroup`, `worksteal`
too), sized to that group, so items are load-balanced over that OS's workers only.
Each group's collection is that OS's truth: OSes may collect different items (a module
skipped at import on one of them); workers of one OS must agree, as xdist requires.
A group starts as soon as its own collection is in, without waiting for slower OSes.
A group whose VMs all died is abandoned: its items not run are handed back (the
controller reports them failed) and the rest of the run goes on without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest
from xdist.remote import Producer
from xdist.scheduler import (
    LoadFileScheduling,
    LoadGroupScheduling,
    LoadScheduling,
    LoadScopeScheduling,
    WorkStealingScheduling,
)
from xdist.workermanage import WorkerController

KINDS = {"load": LoadScheduling, "loadscope": LoadScopeScheduling,
         "loadfile": LoadFileScheduling, "loadgroup": LoadGroupScheduling,
         "worksteal": WorkStealingScheduling}


class OSMatrixScheduling:
    """xdist's `Scheduling` protocol over one sub-scheduler per OS."""

    def __init__(self, config: pytest.Config, log: Producer, workers_per_os: dict[str, int],
                 os_of: Callable[[WorkerController], str],
                 on_count: Callable[[dict[str, int]], None] = lambda counts: None) -> None:
        kind = KINDS[config.getvalue("dist") if config.getvalue("dist") in KINDS else "load"]
        self.os_of = os_of
        self.on_count = on_count  # OS -> its items, as each OS's collection comes in
        self.counts: dict[str, int] = {}
        self.done: dict[str, set[int]] = {}  # OS -> indices of its items run to the end
        self.abandoned: set[str] = set()
        self.groups = {}
        for os_id, count in workers_per_os.items():
            group = kind(config, getattr(log, os_id.replace(":", "_")))
            group.numnodes = count  # xdist sizes it from all --tx specs
            self.groups[os_id] = group

    def _group(self, node: WorkerController):  # noqa: ANN202 - one of KINDS
        return self.groups[self.os_of(node)]

    @property
    def nodes(self) -> list[WorkerController]:
        """Every worker, of every OS."""
        return [n for g in self.groups.values() for n in g.nodes]

    @property
    def collection_is_completed(self) -> bool:
        """True once any OS has its collection: DSession then calls schedule(), which
        starts exactly the OSes that are complete (and later ones as they complete)."""
        return any(g.collection_is_completed for g in self.groups.values())

    def _live(self):  # noqa: ANN202 - (OS, one of KINDS) pairs
        return [(o, g) for o, g in self.groups.items() if o not in self.abandoned]

    @property
    def tests_finished(self) -> bool:
        """True when every OS not abandoned has collected and run all its items."""
        return all(g.collection_is_completed and g.tests_finished for _, g in self._live())

    @property
    def has_pending(self) -> bool:
        """True while any collected OS (not abandoned) has items not yet run."""
        return any(g.collection_is_completed and g.has_pending for _, g in self._live())

    def abandon(self, os_id: str, crashed: str | None) -> list[str]:
        """Stop scheduling `os_id` (its VMs are gone); the ids of its collected items that
        were neither run to the end nor `crashed` (reported already)."""
        self.abandoned.add(os_id)
        group = self.groups[os_id]
        done = self.done.get(os_id, set())
        return [nodeid for i, nodeid in enumerate(group.collection or [])
                if i not in done and nodeid != crashed]

    def add_node(self, node: WorkerController) -> None:
        """Add the worker to its OS's scheduler."""
        self._group(node).add_node(node)

    def add_node_collection(self, node: WorkerController, collection: Sequence[str]) -> None:
        """Hand the worker's collection to its OS's scheduler and report the item count of
        each OS collected so far to `on_count`."""
        self._group(node).add_node_collection(node, collection)
        self.counts.setdefault(self.os_of(node), len(collection))
        self.on_count(dict(self.counts))

    def mark_test_complete(self, node: WorkerController, item_index: int,
                           duration: float = 0) -> None:
        """Pass the completion on to the worker's OS's scheduler."""
        self.done.setdefault(self.os_of(node), set()).add(item_index)
        # OSError "cannot send": the worker is gone; its results from the ledger come just
        # before its end is handled, and remove_node re-queues what it was sent
        with contextlib.suppress(OSError):
            self._group(node).mark_test_complete(node, item_index, duration)

    def mark_test_pending(self, item: str) -> None:
        """Mark `item` pending again in every OS whose collection has it."""
        for group in self.groups.values():
            if group.collection and item in group.collection:
                group.mark_test_pending(item)

    def remove_pending_tests_from_node(self, node: WorkerController,
                                       indices: Sequence[int]) -> None:
        """Pass the removal on to the worker's OS's scheduler."""
        self._group(node).remove_pending_tests_from_node(node, indices)

    def remove_node(self, node: WorkerController) -> str | None:
        """Remove the worker from its OS's scheduler; the item it was running when it died,
        or None."""
        return self._group(node).remove_node(node)

    def schedule(self) -> None:
        """Schedule every OS whose collection is complete."""
        for _, group in self._live():
            if group.collection_is_completed:
                group.schedule()
