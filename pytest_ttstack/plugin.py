"""pytest entry point (`pytest11: pytest_ttstack`): options, hooks and fixtures only; the
work happens in session.py (the ENV), matrix.py (parametrization) and vm.py (the handle).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from ttclient.config import join_server, parse_server
from ttclient.units import parse_mib

from . import matrix
from .options import add_options
from .session import (
    EnvOwner,
    SessionEnv,
    Settings,
    TTSetupError,
    default_server,
    finish_deletes,
    resolve_images,
)
from .tally import OSTally
from .vm import VM

if TYPE_CHECKING:  # native mode is imported when asked for (xdist's DSession, execnet...)
    from .native.controller import NativeSession

ENV_KEY = pytest.StashKey[SessionEnv | None]()
OWNER_KEY = pytest.StashKey[EnvOwner | None]()
FAILED_KEY = pytest.StashKey[bool]()
NATIVE_KEY: pytest.StashKey[NativeSession | None] = pytest.StashKey()
SIGTERM_KEY = pytest.StashKey[object]()
TALLY_KEY = pytest.StashKey[OSTally]()
IMAGES_KEY = pytest.StashKey[list[str]]()  # the images --tt-os selects, before an ENV exists
LAZY_KEY = pytest.StashKey[EnvOwner]()  # an ENV to make once collection shows it is needed


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the `--tt-*` options and ini settings."""
    add_options(parser)


def _opt(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name)
    return value if value is not None else config.getini(name)


def _workers(config: pytest.Config) -> int:
    """How many xdist workers the session starts at once: the `--tx` specs xdist expands
    (`-n N` became N of them, capped by `--maxprocesses`, in xdist's pytest_cmdline_main,
    which ran before any session hook), when xdist distributes at all; else 1."""
    if not _distributed(config):
        return 1
    from xdist.workermanage import parse_tx_spec_config

    return max(1, len(parse_tx_spec_config(config)))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` / `-n logical` with --tt-os: as many workers as the server has room for
    (each takes one VM per requested image, --tt-cpu vCPUs and --tt-mem MiB each), at
    least 1 and, unless --tt-native, at most this host's CPUs (the tests' own code runs
    here); None (xdist's own rule) without --tt-os, with $PYTEST_XDIST_AUTO_NUM_WORKERS
    set, or when the server cannot be asked."""
    prefixes = _opt(config, "tt_os")
    if not prefixes or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    try:
        client = EnvOwner.client_for(_server(config))
        cpu = _number(config, "tt_cpu", 1, "")
        mem = _number(config, "tt_mem", 512, "", parse=parse_mib)
        images = len(resolve_images(client, [prefixes]))
        status = client.status()
    except Exception:  # the session start says what is wrong (a bad option, the server)
        return None
    room = min((status["cpu_total"] - status["cpu_used"]) // max(1, images * cpu),
               (status["mem_total_mib"] - status["mem_used_mib"]) // max(1, images * mem))
    if not config.getoption("tt_native"):  # native tests run in the VMs, not here
        room = min(room, os.cpu_count() or 1)
    return max(1, room)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _worker_index(config: pytest.Config) -> int:
    """The VM slot the controller gave this worker (`_XdistHooks`); 0 outside xdist."""
    return int(getattr(config, "workerinput", {}).get("tt_slot", 0))


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
    given = config.getoption("tt_os")
    if given is not None and not given.strip() and not _is_worker(config):
        raise pytest.UsageError("--tt-os is empty: give OS prefixes, e.g. "
                                "--tt-os=debian-12,debian-13 (an unset variable in "
                                "--tt-os=$VAR gives this)")
    if config.getoption("tt_native") and not _opt(config, "tt_os"):
        raise pytest.UsageError("--tt-native needs --tt-os (the OSes to run the suite on)")
    if config.getoption("tt_native") and _opt(config, "tt_env"):
        raise pytest.UsageError("--tt-native makes its own ENV (its VMs need the session's "
                                "SSH key); drop --tt-env")
    if (config.getoption("tt_native") and _opt(config, "tt_os") and not _is_worker(config)
            and not config.option.collectonly):
        from .native import controller as native

        native.check_usable(config)
        session = native.NativeSession(config)
        session.configure(len(str(_opt(config, "tt_os")).split(",")))
        config.stash[NATIVE_KEY] = session
        config.pluginmanager.register(session, "ttstack-native")


def _ports(text: str | None) -> list[int]:
    """--tt-port's ports; UsageError for anything but a comma list of numbers (the
    server checks the range and port 22)."""
    try:
        return [int(p) for p in (text or "").split(",") if p.strip()]
    except ValueError:
        raise pytest.UsageError(f"--tt-port {text!r}: give guest TCP ports as a comma "
                                "list, e.g. --tt-port=8000,5432") from None


def _server(config: pytest.Config) -> str:
    """HOST:PORT of the server: --tt-server, else the ini's tt_server, else $TT_SERVER or
    the `tt config` file (session.default_server); an `http://` URL is taken too.
    UsageError naming where a bad value came from."""
    given, source = config.getoption("tt_server"), "--tt-server"
    if given is None:
        given, source = config.getini("tt_server") or None, "the ini setting tt_server"
    try:
        if given is None:
            source = "$TT_SERVER" if os.environ.get("TT_SERVER") else "the 'tt config' file"
            return default_server()
        host, port = parse_server(str(given))
    except ValueError as exc:
        raise pytest.UsageError(f"{source}: {exc}; give HOST:PORT, e.g. 127.0.0.1:20000"
                                ) from None
    return join_server(host, port)


def _number(config: pytest.Config, name: str, default: int, what: str,
            parse: Any = int) -> int:
    """The positive whole number option/ini `name` gives (`parse` reads it), else
    `default`; UsageError saying what to give."""
    raw = _opt(config, name)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = parse(str(raw).strip())
    except ValueError:
        value = 0
    if not isinstance(value, int) or value < 1:
        flag = "--" + name.replace("_", "-")
        raise pytest.UsageError(f"{flag} {raw!r}: give {what}")
    return value


def _settings(config: pytest.Config, prefixes: str | None) -> Settings:
    """The session's Settings from the `--tt-*` options and ini keys; UsageError for a
    bad value (before anything is created)."""
    return Settings(os_prefixes=[prefixes] if prefixes else [], server=_server(config),
                    keep=config.getoption("tt_keep"),
                    life_time=_number(config, "tt_life_time", 3600, "a number of seconds, "
                                      "e.g. --tt-life-time=7200"),
                    cpu=_number(config, "tt_cpu", 1, "a number of vCPUs, e.g. --tt-cpu=2"),
                    mem=_number(config, "tt_mem", 512, "MiB or a size like 512M or 2G",
                                parse=parse_mib),
                    workers=_workers(config), ports=_ports(_opt(config, "tt_port")))


def _distributed(config: pytest.Config) -> bool:
    """Whether xdist runs this session's tests in workers (its own rule)."""
    return (config.pluginmanager.hasplugin("xdist") and config.getoption("dist", "no") != "no"
            and bool(config.getoption("tx", None)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Create the ENV (or, --tt-env, take the existing one) before xdist starts its
    workers, so they can be handed its name. Without xdist only the images are resolved
    here (for the ids); the ENV is made once collection shows a selected test needs it
    (pytest_collection_finish), so `-k` without VM tests boots nothing. Under
    --collect-only nothing boots either."""
    config = session.config
    prefixes = _opt(config, "tt_os")
    attach = _opt(config, "tt_env")
    if _is_worker(config) or not (prefixes or attach):
        return
    settings = _settings(config, prefixes)
    session_native = config.stash[NATIVE_KEY]
    if session_native is not None:
        from .native.controller import workers_per_os

        settings.workers = workers_per_os(config)
        settings.extra_ssh_keys = [session_native.public_key]
    owner = EnvOwner(settings, lambda text: _say(config, text))
    lazy = not (session_native is not None or _distributed(config))
    if prefixes and not attach and (lazy or config.option.collectonly):
        try:
            config.stash[IMAGES_KEY] = resolve_images(owner.client, [prefixes])
        except TTSetupError as exc:
            raise pytest.UsageError(str(exc)) from None
        if not config.option.collectonly:
            config.stash[LAZY_KEY] = owner
        return
    _start_env(config, owner, attach)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Without xdist: make the ENV now, of the images the selected tests use (a `tt_vm`
    or `tt_fresh_vm` item needs its image; one that uses `tt_env` otherwise needs them
    all); nothing when no selected test needs a VM."""
    owner = session.config.stash.get(LAZY_KEY, None)
    if owner is None:
        return
    del session.config.stash[LAZY_KEY]
    images = session.config.stash.get(IMAGES_KEY, [])
    needed = _images_needed(session.items, images)
    if needed:
        owner.settings.images = needed
        _start_env(session.config, owner, None)
        tally = session.config.stash.get(TALLY_KEY, None)
        for line in tally.header() if tally is not None else []:
            _say(session.config, line)
    else:
        _say(session.config, "ttstack: no selected test uses a VM; nothing booted")


def _images_needed(items: list[pytest.Item], images: list[str]) -> list[str]:
    """The images (of `images`, in their order) the items need a VM of."""
    needed: set[str] = set()
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if "tt_image" in names:
            image = callspec.params.get("tt_image") if callspec is not None else None
            if image:  # None: skipped (no image of its tt_os marker was requested)
                needed.add(str(image))
        elif "tt_env" in names:
            return list(images)
    return [i for i in images if i in needed]


def _start_env(config: pytest.Config, owner: EnvOwner, attach: str | None) -> None:
    """Create the ENV (or take --tt-env's), register the tally and start native mode;
    whatever goes wrong, nothing made outlives it (UsageError for a TTSetupError)."""
    session_native = config.stash[NATIVE_KEY]
    config.stash[OWNER_KEY] = owner
    _catch_sigterm(config)
    try:
        env = owner.attach(attach) if attach else owner.create()
        config.stash[ENV_KEY] = env
        _tally(config, env, owner)
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


def _tally(config: pytest.Config, env: SessionEnv, owner: EnvOwner) -> None:
    """Register the per-OS header and summary (tally.py) on the controlling process."""
    try:
        status = owner.client.status()
    except Exception:  # the header loses its accel word, the run goes on
        status = None
    tally = OSTally(env, status)
    config.stash[TALLY_KEY] = tally
    config.pluginmanager.register(tally, "ttstack-tally")


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """The server, the ENV, accel, and each image's VMs with how they booted."""
    tally = config.stash.get(TALLY_KEY, None)
    return tally.header() if tally is not None else None


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
    the ENV (or keep it, --tt-keep); in every process, wait for the fresh VMs'
    deletions still under way."""
    finish_deletes()
    session_native = session.config.stash.get(NATIVE_KEY, None)
    if session_native is not None:
        session_native.cleanup()
    owner = session.config.stash.get(OWNER_KEY, None)
    if owner is not None:
        keep = owner.settings.keep and (session.testsfailed > 0
                                        or session.config.stash.get(FAILED_KEY, False))
        owner.delete(keep=keep)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize tests that use `tt_vm` or `tt_fresh_vm` (through `tt_image`, the one
    parameter both take their image from) over the session's images."""
    env = metafunc.config.stash.get(ENV_KEY, None)
    if "tt_image" in metafunc.fixturenames:
        collect_only = (None if metafunc.config.getoption("tt_native")  # tagged per OS later
                        else metafunc.config.stash.get(IMAGES_KEY, None))
        matrix.parametrize(metafunc, env.images if env else collect_only)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--tt-native --collect-only`: list each item once per OS, with the run's ids (the
    host collects; the images were resolved in pytest_sessionstart, nothing boots).
    Every `tt_vm`/`tt_fresh_vm` item gets the JUnit property `tt_os` (its image's id)."""
    images = config.stash.get(IMAGES_KEY, None)
    if config.getoption("tt_native") and images is not None:
        from .native.controller import collect_only_items

        items[:] = collect_only_items(items, images)
    for item in items:  # JUnit <property name="tt_os">: what the CI summary reads
        callspec = getattr(item, "callspec", None)
        image = callspec.params.get("tt_image") if callspec is not None else None
        if image:
            item.user_properties.append(("tt_os", matrix.image_id(image, images or ())))


class _XdistHooks:
    """Registered only when pytest-xdist is installed (its hooks are unknown otherwise).

    Each live worker gets a VM slot of its own: worker k of the session's VMs of each
    image. A worker that went down frees its slot (xdist calls pytest_testnodedown before
    it starts a crashed worker's replacement), and a new worker takes the lowest free one,
    so no two live workers ever share a VM, replacements included."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}  # gateway id -> VM slot, for the live workers

    def pytest_configure_node(self, node: Any) -> None:
        """Send the session's ENV (a dict, or None) and the worker's VM slot."""
        taken = set(self.slots.values())
        slot = next(i for i in itertools.count() if i not in taken)
        self.slots[node.gateway.id] = slot
        env = node.config.stash.get(ENV_KEY, None)
        node.workerinput["tt_env"] = env.to_dict() if env else None
        node.workerinput["tt_slot"] = slot

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """The worker's VM slot is free again."""
        self.slots.pop(node.gateway.id, None)


@pytest.fixture(scope="session")
def tt_env(request: pytest.FixtureRequest) -> SessionEnv:
    """The session's ENV (name, server, images, VMs); skips when no --tt-os was given."""
    env = request.config.stash.get(ENV_KEY, None)
    if env is None:
        pytest.skip("ttstack: no --tt-os given")
    if env.error:
        pytest.fail(f"ttstack: the session ENV {env.name} failed:\n{env.error}", pytrace=False)
    return env


@pytest.fixture(scope="session")
def tt_image(request: pytest.FixtureRequest) -> str:
    """The current matrix OS: the full image name (`qemu:debian-12:x86_64`). Tests and
    fixtures that use it, `tt_vm` or `tt_fresh_vm` run once per requested image."""
    image = getattr(request, "param", None)
    if image is None:
        pytest.skip("ttstack: no --tt-os given")
    return str(image)


@pytest.fixture(scope="session")
def tt_vm(request: pytest.FixtureRequest, tt_env: SessionEnv, tt_image: str) -> VM:
    """A VM of the current matrix OS, used by this worker only. Session-scoped (its
    parametrization too), so fixtures of any scope can use it: a module fixture that
    sets each VM up runs once per module and OS; pytest groups the tests by OS."""
    return tt_env.vm_for(tt_image, _worker_index(request.config))


@pytest.fixture(scope="session")
def tt_host(tt_vm: VM) -> Any:
    """A pytest-testinfra Host for `tt_vm` (`tt_host.package("openssh-server")
    .is_installed`), its commands sent through ttstack's run API. UsageError-like
    failure when pytest-testinfra is not installed."""
    try:
        from .testinfra_backend import host_for
    except ImportError as exc:
        pytest.fail(f"ttstack: tt_host needs pytest-testinfra ({exc}); "
                    "pip install 'ttstack[testinfra]'", pytrace=False)
    return host_for(tt_vm)


@pytest.fixture
def tt_fresh_vm(tt_env: SessionEnv, tt_image: str) -> Iterator[VM]:
    """A VM of the current matrix OS made for this test alone and deleted after it (an
    ENV of its own, a warm clone where the server has the template: seconds). A VM per
    module: a module fixture doing `with tt_env.fresh_vm(tt_image) as vm: yield vm`."""
    with tt_env.fresh_vm(tt_image) as vm:
        yield vm


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo) -> Generator[None, pytest.TestReport,
                                                                  pytest.TestReport]:
    """Mark the session failed on a failed report, and add the VM's console tail (30 lines)
    to it when the test used `tt_vm`."""
    report = yield
    if report.failed:
        item.config.stash[FAILED_KEY] = True
        funcargs = getattr(item, "funcargs", {})
        vm = funcargs.get("tt_fresh_vm") or funcargs.get("tt_vm")
        if isinstance(vm, VM):
            try:
                tail = vm.console_tail(30)
            except Exception as exc:  # the report matters more than the tail
                tail = f"(console tail unavailable: {exc})"
            title = f"ttstack console tail of {vm.name} ({vm.image})"
            addsection = getattr(report.longrepr, "addsection", None)
            if addsection is not None:  # in the failure text: terminal and JUnit
                addsection(title, tail)
            else:  # a string longrepr: a report section (shown once, after it)
                report.sections.append((title, tail))
    return report


__all__ = ["TTSetupError", "VM"]
