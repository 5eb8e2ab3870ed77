"""pytest entry point (`pytest11: pytest_ttstack`): options, hooks and fixtures only; the
work happens in session.py (the ENV), matrix.py (parametrization) and vm.py (the handle).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Generator, Iterator

import pytest

from . import matrix
from .native import controller as native
from .options import add_options
from .session import (
    EnvOwner,
    SessionEnv,
    Settings,
    TTSetupError,
    default_server,
    resolve_images,
)
from .vm import VM

ENV_KEY = pytest.StashKey[SessionEnv | None]()
OWNER_KEY = pytest.StashKey[EnvOwner | None]()
FAILED_KEY = pytest.StashKey[bool]()
NATIVE_KEY = pytest.StashKey[native.NativeSession | None]()
SIGTERM_KEY = pytest.StashKey[object]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the `--tt-*` options and ini settings."""
    add_options(parser)


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


def _sigterm_interrupts(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
    raise KeyboardInterrupt("SIGTERM")


def _catch_sigterm(config: pytest.Config) -> None:
    """SIGTERM (what CI runners and `timeout` send to end a job) ends the session like
    Ctrl-C, so that pytest_sessionfinish deletes the ENV: Python's default for SIGTERM
    ends the process at once, running neither sessionfinish nor atexit hooks, and the
    VMs stayed until their lifetime ran out. A handler the user's code installed stays."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        config.stash[SIGTERM_KEY] = signal.signal(signal.SIGTERM, _sigterm_interrupts)


def _restore_sigterm(config: pytest.Config) -> None:
    previous = config.stash.get(SIGTERM_KEY, None)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]
        del config.stash[SIGTERM_KEY]


def _say(config: pytest.Config, text: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)
    else:
        print(text, file=sys.stderr, flush=True)


def pytest_configure(config: pytest.Config) -> None:
    """Register the tt_os marker, take the ENV from xdist's workerinput in a worker, and set
    native mode up (UsageError for --tt-native without --tt-os)."""
    config.addinivalue_line("markers", "tt_os(*prefixes): run this test only on the requested "
                                       "OS images matching these prefixes")
    config.stash[ENV_KEY] = None
    config.stash[OWNER_KEY] = None
    config.stash[FAILED_KEY] = False
    workerinput = getattr(config, "workerinput", None)  # set by xdist in its workers
    if _is_worker(config) and workerinput and workerinput.get("tt_env"):
        config.stash[ENV_KEY] = SessionEnv.from_dict(workerinput["tt_env"])
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "ttstack-xdist")
    config.stash[NATIVE_KEY] = None
    if config.getoption("tt_native") and not _opt(config, "tt_os"):
        raise pytest.UsageError("--tt-native needs --tt-os (the OSes to run the suite on)")
    if (config.getoption("tt_native") and _opt(config, "tt_os") and not _is_worker(config)
            and not config.option.collectonly):
        native.check_usable(config)
        session = native.NativeSession(config)
        session.configure(len(str(_opt(config, "tt_os")).split(",")))
        config.stash[NATIVE_KEY] = session
        config.pluginmanager.register(session, "ttstack-native")


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
    session_native = config.stash[NATIVE_KEY]
    if session_native is not None:
        settings.workers = native.workers_per_os(config)
        settings.extra_ssh_keys = [session_native.public_key]
    owner = EnvOwner(settings, lambda text: _say(config, text))
    config.stash[OWNER_KEY] = owner
    _catch_sigterm(config)
    try:
        env = owner.create()
        config.stash[ENV_KEY] = env
        if session_native is not None:
            if env.error:
                raise TTSetupError(f"the session ENV {env.name} failed:\n{env.error}")
            session_native.start(env, lambda text: _say(config, text))
    except BaseException as exc:  # also Ctrl-C, SIGTERM, a bug: nothing may outlive it
        owner.delete()
        if session_native is not None:
            session_native.cleanup()
        if isinstance(exc, TTSetupError):
            raise pytest.UsageError(str(exc)) from None
        raise


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last resort (pytest calls it even when the session never started properly): native
    mode's SSH connections and session folder (it holds a private key) go."""
    session_native = config.stash.get(NATIVE_KEY, None)
    if session_native is not None:
        session_native.cleanup()
    _restore_sigterm(config)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After xdist has torn its workers down: end native mode's SSH connections, delete
    the ENV (or keep it, --tt-keep)."""
    session_native = session.config.stash.get(NATIVE_KEY, None)
    if session_native is not None:
        session_native.cleanup()
    owner = session.config.stash.get(OWNER_KEY, None)
    if owner is not None:
        keep = owner.settings.keep and (session.testsfailed > 0
                                        or session.config.stash.get(FAILED_KEY, False))
        owner.delete(keep=keep)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize tests that use `tt_vm` over the session's images."""
    env = metafunc.config.stash.get(ENV_KEY, None)
    if "tt_vm" in metafunc.fixturenames:
        matrix.parametrize(metafunc, env.images if env else None)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--tt-native --collect-only`: list each item once per OS, with the run's ids (the
    host collects; the images are resolved on the server, nothing boots)."""
    prefixes = _opt(config, "tt_os")
    if not (config.getoption("tt_native") and config.option.collectonly and prefixes):
        return
    server = _opt(config, "tt_server") or default_server()
    try:
        images = resolve_images(EnvOwner.client_for(server), [prefixes])
    except TTSetupError as exc:
        raise pytest.UsageError(str(exc)) from None
    items[:] = native.collect_only_items(items, images)


class _XdistHooks:
    """Registered only when pytest-xdist is installed (its hooks are unknown otherwise)."""

    def pytest_configure_node(self, node: object) -> None:
        """Send the session's ENV to the worker, as a dict (None when there is none)."""
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


@pytest.fixture
def tt_vm(request: pytest.FixtureRequest, tt_env: SessionEnv) -> Iterator[VM]:
    """A VM of the current matrix OS, used by this worker only."""
    image = getattr(request, "param", None)
    if image is None:
        pytest.skip("ttstack: no --tt-os given")
    yield tt_env.vm_for(image, _worker_index(request.config))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo) -> Generator[None, pytest.TestReport,
                                                                  pytest.TestReport]:
    """Mark the session failed on a failed report, and add the VM's console tail (30 lines)
    to it when the test used `tt_vm`."""
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
            addsection = getattr(report.longrepr, "addsection", None)
            if addsection is not None:
                addsection(title, tail)
    return report


__all__ = ["TTSetupError", "VM"]
