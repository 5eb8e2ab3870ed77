"""Native mode (`--tt-native`): the project's whole suite runs inside every requested VM.

Each VM hosts one long-lived pytest-xdist worker that collects the project itself, with
the guest's own Python in a venv made in the VM; the user's pytest is the xdist
controller. The parts, each in its own module:

- `ids`        — test ids carry the OS: `tests/test_x.py::test_y[debian-12:x86_64]`.
- `project`    — which files are shipped (what git sees) and how host paths map into VMs.
- `wheelhouse` — requirements resolved for each guest's Python and arch, wheels gathered on
  the host, the venv cache key.
- `ssh`        — the transport: a per-session key, `ssh` argv, execnet gateway wrappers.
- `provision`  — probe each VM, ship the project, make or restore the venv.
- `scheduler`  — every collected item once per OS, load-balanced over that OS's workers.
- `controller` — the plugin object on the controller wiring the above into xdist's hooks.
- `guest`, `remote` — what runs inside the VM (stdlib and pytest only).

This package's `__init__` imports nothing: the guest imports `guest` and `ids` from it.
"""
