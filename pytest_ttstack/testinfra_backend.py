"""A pytest-testinfra backend on ttstack's run API, for the `tt_host` fixture.

testinfra's modules (`host.package`, `host.service`, `host.file`, ...) only need
`backend.run(command, *args)` returning a CommandResult; this backend sends that command
line through `VM.run` (the guest agent, or SSH with `use_ssh`), with the exact bytes
(`binary=True`) so testinfra decodes them as its other backends do. Imported only when
a test asks for `tt_host`: pytest-testinfra is an optional dependency
(`pip install 'ttstack[testinfra]'`).
"""

from __future__ import annotations

from typing import Any

from testinfra.backend.base import BaseBackend, CommandResult
from testinfra.host import Host

from .vm import VM


class TTStackBackend(BaseBackend):
    """testinfra's connection to one ttstack VM (`ttstack://NAME` in its ids)."""

    NAME = "ttstack"

    def __init__(self, vm: VM, use_ssh: bool = False, timeout: float = 600,
                 **kwargs: Any) -> None:
        self.vm = vm
        self.use_ssh = use_ssh
        self.timeout = timeout
        super().__init__(vm.name, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        """The command line (testinfra's `%s` arguments quoted in) run in the VM; a command
        that timed out has exit status -1, as testinfra's SSH backend reports a lost one.
        RuntimeError when the VM cannot run it."""
        line = self.get_command(command, *args)
        r = self.vm.run(line, timeout=self.timeout, use_ssh=self.use_ssh, binary=True)
        status = -1 if r.exit_code is None else r.exit_code
        return self.result(status, self.encode(line), r.stdout, r.stderr)


def host_for(vm: VM, **kwargs: Any) -> Host:
    """A testinfra Host whose commands run in `vm` (kwargs: TTStackBackend's, testinfra's
    `sudo`/`sudo_user`)."""
    backend = TTStackBackend(vm, **kwargs)
    host = Host(backend)
    backend.set_host(host)
    return host
