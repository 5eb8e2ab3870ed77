"""The plugin's command-line options and ini keys, declared once.

Imported by the plugin on the host and by native mode's guest plugin inside each VM (an
xdist worker parses the controller's command line, `--tt-*` options included), so this
module may import only the standard library and pytest.
"""

from __future__ import annotations

import pytest

NATIVE_TIMEOUT = 300.0


def add_options(parser: pytest.Parser) -> None:
    """Register every `--tt-*` option (and the ini keys that mirror some of them)."""
    group = parser.getgroup("ttstack", "ttstack: run tests on real VMs")

    def both(name: str, help: str, **kw: object) -> None:
        group.addoption("--" + name.replace("_", "-"), dest=name, default=None, help=help, **kw)
        parser.addini(name, help=help, default=None)

    both("tt_os", "comma list of OS prefixes, e.g. debian-12,debian-12-arm64 "
                  "(same matching as the server)")
    both("tt_server", "ttserver or ttproxy as HOST:PORT (default: from 'tt config')")
    both("tt_life_time", "seconds the session ENV may live (default 3600)")
    both("tt_mem", "MiB of memory per VM (default 512)")
    both("tt_cpu", "vCPUs per VM (default 1)")
    both("tt_port", "comma list of guest TCP ports every session VM forwards from the "
                    "start (tt_vm.ports / tt_vm.port(); more on demand with tt_vm.port())")
    both("tt_env", "use this existing ENV (made with 'tt env add', or kept by --tt-keep) "
                   "instead of creating one; it is not deleted at the end. --tt-os, when "
                   "given, narrows the run to the ENV's images matching it")
    group.addoption("--tt-keep", action="store_true", default=False,
                    help="keep the ENV when a test failed, and print how to reach it")
    group.addoption("--tt-native", action="store_true", default=False,
                    help="run the whole suite inside each requested OS's VM, one pytest-xdist "
                         "worker per VM (-n N: N VMs per OS)")
    group.addoption("--tt-native-install", dest="tt_native_install", action="append",
                    default=None, metavar="SPEC",
                    help="native mode: pip requirement to install into each VM's venv, "
                         "relative to the rootdir (repeatable): '.', '.[test]', "
                         "'-r requirements-test.txt', 'attrs>=23'")
    parser.addini("tt_native_install", type="linelist", default=[],
                  help="native mode: pip requirements for each VM's venv, one per line")
    group.addoption("--tt-native-setup-timeout", type=float, default=NATIVE_TIMEOUT,
                    help="native mode: seconds a VM may take to unpack the project and "
                         f"install its venv (default {NATIVE_TIMEOUT:.0f})")
