"""Sent by the controller to each VM in place of `xdist.remote` (through xdist's
`pytest_xdist_getremotemodule` hook) and run there as execnet's `__channelexec__`.

Why: xdist hands a `popen` worker the controller's `sys.path` and its raw command line.
In a VM both are wrong: the host's paths do not exist there, and path arguments must
name the shipped copy. This shim takes the first message, keeps the guest's own
`sys.path` (plus the shipped plugin and the project, as xdist does for `ssh` workers),
puts in the command line the controller prepared for this VM (`workerinput["tt_args"]`),
and then runs the guest's own `xdist.remote` unchanged. Standard library only.
"""

from __future__ import annotations

if __name__ == "__channelexec__":
    import sys

    class _FirstMessage:
        """The channel, but its first receive() gives the rewritten set-up message."""

        def __init__(self, channel: object, first: object) -> None:
            self._channel = channel
            self._first: list = [first]

        def receive(self, *args: object, **kwargs: object) -> object:
            if self._first:
                return self._first.pop()
            return self._channel.receive(*args, **kwargs)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self._channel, name)

    workerinput, args, option_dict, _host_sys_path = channel.receive()  # type: ignore[name-defined]  # noqa: F821
    sys.path.insert(0, workerinput["tt_site"])
    args = workerinput["tt_args"]
    import importlib.util
    import os

    # found, not imported: importing the xdist package here, before pytest loads it as a
    # plugin, would keep pytest from rewriting its asserts (a warning in every run)
    spec = importlib.util.find_spec("xdist")
    path = os.path.join(os.path.dirname(spec.origin), "remote.py")  # type: ignore[union-attr]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    # xdist names a basetemp under the *host's* temp dir; the guest's default is right
    option_dict.pop("basetemp", None)
    first = (workerinput, args, option_dict, None)  # None: keep sys.path, add the cwd
    exec(code, {"__name__": "__channelexec__",  # noqa: S102 - xdist's own worker code
                "channel": _FirstMessage(channel, first)})  # type: ignore[name-defined]  # noqa: F821
