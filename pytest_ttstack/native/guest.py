"""The guest side of native mode: a pytest plugin loaded by each VM's xdist worker
(`-p pytest_ttstack.native.guest`, from /root/ttnative/site).

It knows the `--tt-*` options (the worker parses the controller's command line), tags
every collected item's id with this VM's OS (`ids.tag`) before `-k`, `--lf` and
`--deselect` look at it, and deselects everything when the command line named tests of
other OSes only. Standard library and pytest only: this runs in the guest's venv.
"""

from __future__ import annotations

import pytest

from pytest_ttstack.native.ids import tag
from pytest_ttstack.options import add_options


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the `--tt-*` options, so the worker parses the controller's command line."""
    add_options(parser)


def _os_id(config: pytest.Config) -> str | None:
    return getattr(config, "workerinput", {}).get("tt_os_id")


class _SilentReporter:
    """The worker's terminal reporter without its hooks: what pytest and plugins read from
    it (`_tw` for assertion explanations and --setup-show, `write_line`, ...) still works,
    but nothing is formatted per item."""

    def __init__(self, reporter: object) -> None:
        self._reporter = reporter

    def __getattr__(self, name: str) -> object:
        if name.startswith("pytest_"):
            raise AttributeError(name)  # pluggy must find no hooks here
        return getattr(self._reporter, name)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """A worker's terminal output goes nowhere (the controller reports), but formatting it
    costs per item — much under TCG (-18% per item measured): the terminal reporter is
    replaced by a stand-in without hooks."""
    if _os_id(config):
        _CONFIG["config"] = config
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)
            config.pluginmanager.register(_SilentReporter(reporter), "terminalreporter")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Ask pytest_report_teststatus about each call report, as the terminal reporter would
    have before xdist sends it: plugins change reports there (pytest 9's subtests fails a
    test whose subtests failed), and without the reporter nothing asked them."""
    config = _CONFIG.get("config")  # a native worker's, set at its pytest_configure
    if report.when == "call" and config is not None:
        config.hook.pytest_report_teststatus(report=report, config=config)


_CONFIG: dict[str, pytest.Config] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_itemcollected(item: pytest.Item) -> None:
    """Tag the item's id, its keywords and the test name in its location (the headline
    of its section under FAILURES and PASSES) with this VM's OS."""
    os_id = _os_id(item.config)
    if os_id:
        item._nodeid = tag(item.nodeid, os_id)
        item.extra_keyword_matches.add(os_id)
        path, lineno, domain = item.location
        item.__dict__["location"] = (path, lineno, tag(domain, os_id))  # a cached_property


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect every item when the command line named only other OSes' tests."""
    if getattr(config, "workerinput", {}).get("tt_run_nothing") and items:
        config.hook.pytest_deselected(items=list(items))
        items[:] = []


def pytest_report_header(config: pytest.Config) -> str | None:
    """Name the worker's OS in the header; None outside native mode."""
    os_id = _os_id(config)
    return f"ttstack native worker on {os_id}" if os_id else None
