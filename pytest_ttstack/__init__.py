"""ttstack's pytest plugin (entry point `pytest_ttstack.plugin`). What tests use by name:
`VM` (the `tt_vm` handle), `RunResult` and `CommandFailed` (its `run`), `WaitTimeout`
(from `VM.wait_for_port` and `ttclient.waiting.wait_for`).

They are imported on first use (PEP 562): native mode ships this package into the VMs
without ttclient, and its guest plugin imports `pytest_ttstack.native.guest` through here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttclient.waiting import WaitTimeout

    from .vm import VM, CommandFailed, RunResult

__all__ = ["VM", "CommandFailed", "RunResult", "WaitTimeout"]


def __getattr__(name: str) -> Any:
    if name == "WaitTimeout":
        from ttclient.waiting import WaitTimeout

        return WaitTimeout
    if name in ("VM", "CommandFailed", "RunResult"):
        from . import vm

        return getattr(vm, name)
    raise AttributeError(f"module 'pytest_ttstack' has no attribute {name!r}")
