"""Start the workers' execnet gateways at the same time, not one after another.

xdist's NodeManager.setup_nodes makes one gateway after the other; each `makegateway`
waits until its Python answers. In native mode that Python starts in a VM, over SSH,
under TCG: ~2 s each (a session timeline, 2026-11-30: the second worker started 2.2 s
after the first), so N VMs cost N times that before the last worker can even import
pytest. `ParallelNodeManager` makes every gateway of the initial set at once (and, under
`-v`, asks each for the remote info xdist prints, which execnet caches), then lets xdist
set the nodes up in its own order with those gateways. Replacements of crashed workers
(`setup_node` called later by DSession) make theirs as xdist always does.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import execnet
from xdist import dsession
from xdist.workermanage import NodeManager


class ParallelNodeManager(NodeManager):
    """xdist's NodeManager, but the first set of gateways is made in parallel."""

    def setup_nodes(self, putevent: Callable[[tuple[str, dict[str, Any]]], None]) -> list:
        """As xdist's, but every spec's gateway is made at once (`make_at_once`) before
        the nodes are set up in spec order (hooks are called from this thread)."""
        self.config.hook.pytest_xdist_setupnodes(config=self.config, specs=self.specs)
        make = self.group.makegateway
        made = make_at_once(make, self.specs, rinfo=self.config.option.verbose > 0)

        def premade(spec: execnet.XSpec | str | None = None) -> execnet.Gateway:
            gateway = made.pop(str(spec.id), None) if isinstance(spec, execnet.XSpec) else None
            return gateway if gateway is not None else make(spec)

        self.group.makegateway = premade
        try:
            return [self.setup_node(spec, putevent) for spec in self.specs]
        finally:
            self.group.makegateway = make


def make_at_once(make: Callable[[execnet.XSpec], execnet.Gateway],
                 specs: list[execnet.XSpec], rinfo: bool) -> dict[str, execnet.Gateway]:
    """Gateway id -> the gateway `make` (a Group's makegateway) made for each spec, all
    started at once; with `rinfo`, each has also fetched its remote info (execnet caches
    it; xdist prints it under -v). The first error is raised once all have ended; the
    gateways made meanwhile are in the group, which xdist's teardown terminates."""
    made: dict[str, execnet.Gateway] = {}

    def start(spec: execnet.XSpec) -> None:
        gateway = make(spec)
        made[str(spec.id)] = gateway
        if rinfo:
            gateway._rinfo()

    with ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool:
        for done in [pool.submit(start, spec) for spec in specs]:
            done.result()
    return made


def install() -> Callable[[], None]:
    """Make xdist's DSession use a ParallelNodeManager from now on (it makes its
    NodeManager in its pytest_sessionstart, trylast); returns the function that undoes it."""
    original = dsession.NodeManager
    dsession.NodeManager = ParallelNodeManager

    def undo() -> None:
        dsession.NodeManager = original

    return undo
