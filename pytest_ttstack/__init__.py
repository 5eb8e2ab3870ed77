"""ttstack's pytest plugin (entry point `pytest_ttstack.plugin`). What tests use by name:
`VM` (the `tt_vm` handle), `RunResult` and `CommandFailed` (its `run`), `WaitTimeout`
(from `VM.wait_for_port` and `ttclient.waiting.wait_for`)."""

from ttclient.waiting import WaitTimeout

from .vm import VM, CommandFailed, RunResult

__all__ = ["VM", "CommandFailed", "RunResult", "WaitTimeout"]
