"""pytest entry point (`pytest11: pytest_ttstack`): options, hooks and fixtures only; the
work happens in session.py (the ENV), matrix.py (parametrization) and vm.py (the handle).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from . import matrix, native
from .session import EnvOwner, SessionEnv, Settings, TTSetupError, default_server
from .vm import VM

ENV_KEY = pytest.StashKey[SessionEnv | None]()
OWNER_KEY = pytest.StashKey[EnvOwner | None]()
FAILED_KEY = pytest.StashKey[bool]()
NATIVE_FIXTURE = "tt_native_image"


def pytest_addoption(parser: pytest.Parser) -> None:
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
    group.addoption("--tt-keep", action="store_true", default=False,
                    help="keep the ENV when a test failed, and print how to reach it")
    group.addoption("--tt-native", action="store_true", default=False,
                    help="run every test function inside each requested OS's VM")
    group.addoption("--tt-native-timeout", type=float, default=300.0,
                    help="seconds one native test may take in its VM (default 300)")
    group.addoption("--tt-native-fresh", action="store_true", default=False,
                    help="native mode: start a fresh python3 for every test instead of "
                         "forking one that has pytest imported (slower; inherits nothing)")


def _opt(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name)
    return value if value is not None else config.getini(name)


def _workers(config: pytest.Config) -> int:
    n = getattr(config.option, "numprocesses", None)
    if isinstance(n, int):
        return max(1, n)
    if n in ("auto", "logical"):
        return os.cpu_count() or 1
    return 1


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _worker_index(config: pytest.Config) -> int:
    wid = getattr(config, "workerinput", {}).get("workerid", "gw0")
    return int(wid[2:]) if wid.startswith("gw") and wid[2:].isdigit() else 0


def _say(config: pytest.Config, text: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)
    else:
        print(text, file=sys.stderr, flush=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tt_os(*prefixes): run this test only on the requested "
                                       "OS images matching these prefixes")
    config.stash[ENV_KEY] = None
    config.stash[OWNER_KEY] = None
    config.stash[FAILED_KEY] = False
    if _is_worker(config) and config.workerinput.get("tt_env"):
        config.stash[ENV_KEY] = SessionEnv.from_dict(config.workerinput["tt_env"])
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "ttstack-xdist")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Create the ENV before xdist starts its workers, so they can be handed its name."""
    config = session.config
    prefixes = _opt(config, "tt_os")
    if _is_worker(config) or not prefixes or config.option.collectonly:
        return
    settings = Settings(os_prefixes=[prefixes], server=_opt(config, "tt_server") or
                        default_server(), keep=config.getoption("tt_keep"),
                        life_time=int(_opt(config, "tt_life_time") or 3600),
                        cpu=int(_opt(config, "tt_cpu") or 1),
                        mem=int(_opt(config, "tt_mem") or 512), workers=_workers(config))
    owner = EnvOwner(settings, lambda text: _say(config, text))
    config.stash[OWNER_KEY] = owner
    try:
        env = owner.create()
        config.stash[ENV_KEY] = env
        if config.getoption("tt_native") and not env.error:
            _say(config, "ttstack: native mode: copying the project and pytest into the VMs")
            native.ship(env, config.rootpath,
                        fork_server=not config.getoption("tt_native_fresh"))
    except TTSetupError as exc:
        owner.delete()
        raise pytest.UsageError(str(exc)) from None


def pytest_sessionfinish(session: pytest.Session) -> None:
    owner = session.config.stash.get(OWNER_KEY, None)
    if owner is not None:
        keep = owner.settings.keep and (session.testsfailed > 0
                                        or session.config.stash.get(FAILED_KEY, False))
        owner.delete(keep=keep)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    env = metafunc.config.stash.get(ENV_KEY, None)
    if metafunc.config.getoption("tt_native"):
        if env is not None and NATIVE_FIXTURE in metafunc.fixturenames:
            matrix.parametrize(metafunc, env.images, NATIVE_FIXTURE)
        return
    if "tt_vm" in metafunc.fixturenames:
        matrix.parametrize(metafunc, env.images if env else None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Native mode: the item runs in its VM; the reports come back from there."""
    callspec = getattr(item, "callspec", None)
    if not item.config.getoption("tt_native") or callspec is None:
        return None
    image = callspec.params.get(NATIVE_FIXTURE)
    env = item.config.stash.get(ENV_KEY, None)
    if image is None or env is None:
        return None
    vm = env.vm_for(image, _worker_index(item.config))
    return native.run_item(item, vm, matrix.image_id(image),
                           item.config.getoption("tt_native_timeout"))


class _XdistHooks:
    """Registered only when pytest-xdist is installed (its hooks are unknown otherwise)."""

    def pytest_configure_node(self, node: object) -> None:
        env = node.config.stash.get(ENV_KEY, None)  # type: ignore[attr-defined]
        node.workerinput["tt_env"] = env.to_dict() if env else None  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tt_env(request: pytest.FixtureRequest) -> SessionEnv:
    """The session's ENV (name, server, images, VMs); skips when no --tt-os was given."""
    env = request.config.stash.get(ENV_KEY, None)
    if env is None:
        pytest.skip("ttstack: no --tt-os given")
    if env.error:
        pytest.fail(f"ttstack: the session ENV {env.name} failed:\n{env.error}", pytrace=False)
    return env


@pytest.fixture(autouse=True)
def tt_native_image(request: pytest.FixtureRequest) -> str | None:
    """In native mode, the image a test item runs on (the item never runs on the host)."""
    return getattr(request, "param", None)


@pytest.fixture
def tt_vm(request: pytest.FixtureRequest, tt_env: SessionEnv) -> Iterator[VM]:
    """A VM of the current matrix OS, used by this worker only."""
    image = getattr(request, "param", None)
    if image is None:
        pytest.skip("ttstack: no --tt-os given")
    yield tt_env.vm_for(image, _worker_index(request.config))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    if report.failed:
        item.config.stash[FAILED_KEY] = True
        vm = getattr(item, "funcargs", {}).get("tt_vm")
        if isinstance(vm, VM):
            try:
                tail = vm.console_tail(30)
            except Exception as exc:  # the report matters more than the tail
                tail = f"(console tail unavailable: {exc})"
            title = f"ttstack console tail of {vm.name} ({vm.image})"
            report.sections.append((title, tail))
            if hasattr(report.longrepr, "addsection"):
                report.longrepr.addsection(title, tail)
    return report


__all__ = ["TTSetupError", "VM"]
