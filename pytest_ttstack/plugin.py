"""pytest entry point (registered as `pytest_ttstack` in the pytest11 group)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ttstack", "ttstack: run tests on real VMs")
    group.addoption("--tt-os", default=None,
                    help="comma list of OS prefixes (same matching as the server)")
    group.addoption("--tt-server", default=None, help="HOST:PORT (default: from 'tt config')")
