"""Native mode on the controller: a plugin object registered by `pytest_ttstack.plugin`
when `--tt-native` is given (as xdist registers its DSession).

Sequence: `configure` turns xdist's distribution on (the `--tx` list is a placeholder
until the VMs exist); the plugin's `pytest_sessionstart` creates the ENV and calls
`start`, which provisions every VM and puts one `popen//python=WRAPPER` spec per VM into
`--tx` before xdist's DSession (trylast) starts the workers. The hooks below then hand
each worker its VM's OS and command line, send `remote.py` instead of `xdist.remote`,
schedule per OS, and turn a crashed worker into a report that names the test, its phase,
the OS and the VM's console tail. `--collect-only` collects on the host and lists each
item once per OS, with the ids a run reports.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ttclient.api import ApiError

from ..matrix import image_id
from ..session import SessionEnv, TTSetupError
from . import events, gateways, ids, remote, wheelhouse, workdir
from .events import ledger_path, phase_after, unbatching
from .project import GUEST_SITE, PathMap
from .provision import Provisioner, Worker
from .ssh import make_key

# pytest options whose value is a file or folder, rewritten to the shipped copy
PATH_OPTIONS = {"--rootdir", "-c", "--config-file", "--confcutdir", "--ignore",
                "--ignore-glob", "--inifile"}


def check_usable(config: pytest.Config) -> None:
    """UsageError unless native mode can run with these options."""
    if not config.pluginmanager.hasplugin("xdist"):
        raise pytest.UsageError("--tt-native needs pytest-xdist: pip install 'ttstack[pytest]'")
    if config.getvalue("dist") == "each":
        raise pytest.UsageError("--tt-native runs every test once per OS already; "
                                "use --dist load, loadscope, loadfile, loadgroup or worksteal")
    if config.getoption("usepdb", False):
        raise pytest.UsageError("--tt-native: --pdb cannot reach into a VM; use --tt-keep "
                                "and ssh to the VM ('tt env show NAME' gives its address)")
    missing = host_only_plugins(list(config.invocation_params.args), install_specs(config),
                                config.rootpath)
    if missing:
        raise pytest.UsageError(
            f"--tt-native: -p {', '.join(missing)} is installed on this host only; the VMs "
            f"get it with --tt-native-install=DIST (or drop -p for native runs)")


def install_specs(config: pytest.Config) -> list[str]:
    """The extra requirement specs for the guests' venvs: --tt-native-install values,
    else the ini setting's; [] when neither is set."""
    specs = config.getoption("tt_native_install") or []
    return list(specs) or list(config.getini("tt_native_install") or [])


def _requirement_name(line: str) -> str | None:
    """The canonical distribution name of a requirement line, None if it is not one."""
    try:
        return canonicalize_name(Requirement(line).name)
    except InvalidRequirement:
        return None


def _with_dependencies(names: set[str]) -> set[str]:
    """`names` and, as installed on this host, what they depend on (canonical names)."""
    seen: set[str] = set()
    todo: list[str] = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            dep = _requirement_name(line) if "extra ==" not in line else None
            if dep:
                todo.append(dep)
    return seen


def _plugin_distribution(name: str) -> str | None:
    """The distribution a `-p NAME` plugin comes from on this host (an entry-point name
    or a module), or None when it is not from an installed distribution."""
    for ep in metadata.entry_points(group="pytest11"):
        if ep.name == name and ep.dist is not None:
            return ep.dist.name
    dists = metadata.packages_distributions().get(name.split(".")[0])
    return dists[0] if dists else None


def host_only_plugins(args: list[str], specs: list[str], rootdir: Path) -> list[str]:
    """`-p NAME` plugins of `args` that the VMs' venvs will not have: those from an
    installed distribution that neither the worker set (pytest, pytest-xdist, execnet)
    nor the `--tt-native-install` specs (nor their dependencies, as installed here)
    bring, as "NAME (DIST)". Empty when a spec is local or a file (`.`, `-r`): what those
    bring is only known after resolving, and the worker will say it then."""
    if any(spec.strip().startswith((".", "/", "-")) or "file:" in spec for spec in specs):
        return []
    names = {n for n in map(_requirement_name, specs) if n}
    allowed = _with_dependencies({*names, *wheelhouse.BASE_DISTRIBUTIONS, "ttstack"})
    found = []
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "-p" and i + 1 < len(args) else (
            arg[2:] if arg.startswith("-p") and len(arg) > 2 and arg[2] != "-" else None)
        if not value or value.startswith("no:"):
            continue
        try:
            spec = importlib.util.find_spec(value)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None) or ""
        if origin and Path(origin).resolve().is_relative_to(rootdir):
            continue  # shipped with the project
        dist = _plugin_distribution(value)
        if dist and canonicalize_name(dist) not in allowed:
            found.append(f"{value} ({dist})")
    return found


def workers_per_os(config: pytest.Config) -> int:
    """`-n N` means N VMs (workers) per OS; without -n, one."""
    n = getattr(config.option, "numprocesses", None)
    n = n if isinstance(n, int) and n > 0 else 1
    cap = getattr(config.option, "maxprocesses", None)
    return min(n, cap) if cap else n


class NativeSession:
    """The controller side of native mode (see module docstring)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.work = workdir.create()
        try:
            self.key, self.public_key = make_key(self.work)
        except (OSError, subprocess.CalledProcessError) as exc:
            shutil.rmtree(self.work, ignore_errors=True)
            raise pytest.UsageError(f"--tt-native needs the OpenSSH client (ssh, ssh-keygen): "
                                    f"{exc}") from None
        self.workers: dict[str, Worker] = {}  # by the spec's python (the quoted wrapper)
        self.os_ids: list[str] = []
        self.paths = PathMap(config.rootpath, config.invocation_params.dir)
        self.dead_vms: dict[str, str] = {}  # VM id -> console tail, for VMs that died
        self._crashed: dict[str, str] = {}  # gateway id -> the item its worker died in
        self._ledgers: dict[str, tuple[str, list] | None] = {}  # gateway id -> its ledger
        self._said_count = False
        self.env: SessionEnv | None = None
        self.session: pytest.Session | None = None
        self.provisioner: Provisioner | None = None
        self._undo_gateways: Any = None

    def configure(self, os_prefixes: int) -> None:
        """Turn xdist's distributed session on (before xdist's trylast pytest_configure):
        `--tx` is a placeholder until start(); crashed workers are replaced at most 4
        times per expected worker (xdist's own default under -n; without -n it has none)."""
        opt = self.config.option
        if opt.dist in (None, "no"):
            opt.dist = "load"
        opt.tx = ["popen"]
        if opt.maxworkerrestart is None:
            opt.maxworkerrestart = str(4 * workers_per_os(self.config) * max(1, os_prefixes))

    def start(self, env: SessionEnv, say: Any) -> None:
        """Provision the VMs (TTSetupError says what failed) and set `--tx`."""
        self.env = env
        self.provisioner = Provisioner(
            env, self.paths, install_specs(self.config), self.work, self.key, say,
            self.config.getoption("tt_native_setup_timeout"), self._cache_files())
        try:
            workers = self.provisioner.run()
        except (OSError, ApiError, ValueError) as exc:  # one line, not a traceback
            raise TTSetupError(f"native mode: preparing the VMs failed: {exc}") from exc
        self.workers = {w.python_spec: w for w in workers}
        self.os_ids = sorted({w.os_id for w in workers})
        self.config.option.tx = [w.spec for w in workers]

    def _cache_files(self) -> list[str]:
        """pytest's lastfailed/nodeids files, so `--lf`/`--ff`/`--nf` in the workers see
        the previous run (pytest keeps them in a .gitignore'd folder, never shipped)."""
        cache = getattr(self.config, "cache", None)
        found = []
        for name in ("lastfailed", "nodeids"):
            path = Path(getattr(cache, "_cachedir", "/nonexistent")) / "v" / "cache" / name
            if path.is_file() and self.paths.guest(path) is not None:
                found.append(str(path.resolve().relative_to(self.paths.rootdir)))
        return found

    def cleanup(self) -> None:
        """End the SSH master connections and remove the session's key and wrappers."""
        if self._undo_gateways is not None:
            self._undo_gateways()
            self._undo_gateways = None
        if self.provisioner is not None:
            self.provisioner.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def worker_of(self, node: Any) -> Worker:
        """The provisioned Worker behind an xdist node (found by its gateway's python, the
        quoted wrapper path); KeyError for an unknown node."""
        return self.workers[str(node.gateway.spec.python)]

    # -- the worker's command line ---------------------------------------------------

    def no_failures_on(self, os_id: str) -> bool:
        """`--lf` with failures on record, all of other OSes: this OS runs nothing (pytest
        in its workers would find none of its items among them, and run them all)."""
        cache = getattr(self.config, "cache", None)
        if not getattr(self.config.option, "lf", False) or cache is None:
            return False
        failed = cache.get("cache/lastfailed", {})
        tags = {ids.untag(nodeid, self.os_ids)[0] for nodeid in failed}
        return bool(failed) and None not in tags and os_id not in tags

    def worker_args(self, os_id: str) -> tuple[list[str], bool]:
        """(this OS's worker argv, whether it must run nothing).

        Positional arguments and the values of options that name files (`PATH_OPTIONS`)
        become guest paths; everything else (`-k`, `-m`, `--deselect`, which match
        rootdir-relative ids) is passed as given. Ids tagged with an OS go, untagged, to
        that OS's workers only; a worker left with no positional argument although some
        were given runs nothing."""
        positional = [str(a) for a in (self.config.option.file_or_dir or [])]
        raw = [str(a) for a in self.config.invocation_params.args]
        args: list[str] = []
        given = kept = 0
        path_value = False
        for word in raw:
            if path_value:
                args.append(self.paths.arg(word))
                path_value = False
            elif word.startswith("-"):
                opt, eq, value = word.partition("=")
                if opt in PATH_OPTIONS and eq:
                    args.append(f"{opt}={self.paths.arg(value)}")
                else:
                    args.append(word)
                    path_value = opt in PATH_OPTIONS and not eq
            elif word in positional:
                given += 1
                tagged, untagged = ids.untag(word, self.os_ids)
                if tagged is None or tagged == os_id:
                    kept += 1
                    args.append(self.paths.arg(untagged))
            else:
                args.append(word)
        return ["-p", "pytest_ttstack.native.guest", *args], bool(given and not kept)

    # -- xdist hooks -----------------------------------------------------------------

    def pytest_configure_node(self, node: Any) -> None:
        """Hand the worker its VM's OS id, VM name, command line and guest site folder."""
        worker = self.worker_of(node)
        args, run_nothing = self.worker_args(worker.os_id)
        run_nothing = run_nothing or self.no_failures_on(worker.os_id)
        node.workerinput.update(tt_os_id=worker.os_id, tt_vm=worker.vm["name"],
                                tt_args=args, tt_run_nothing=run_nothing, tt_site=GUEST_SITE,
                                tt_ledger=ledger_path(node.gateway.id),
                                tt_ledger_sizes=(events.NOTE_SIZE, events.UNSENT_SIZE))
        node.process_from_remote = unbatching(node.process_from_remote,
                                              lambda: self._unsent(worker, node.gateway.id))

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_getremotemodule(self) -> ModuleType:
        """Run native mode's remote.py in the workers instead of xdist.remote."""
        return remote

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """Schedule per OS: an OSMatrixScheduling sized by the workers of each OS."""
        from .scheduler import OSMatrixScheduling

        counts: dict[str, int] = {}
        for w in self.workers.values():
            counts[w.os_id] = counts.get(w.os_id, 0) + 1
        return OSMatrixScheduling(config, log, counts, lambda n: self.worker_of(n).os_id,
                                  self._count)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Keep the session, to correct its collected-items count, have xdist start the
        workers' gateways at once (gateways.py), and stand between xdist and the
        replacement of crashed workers (see _replace_worker)."""
        self.session = session
        self._undo_gateways = gateways.install()
        dsession = self.config.pluginmanager.getplugin("dsession")
        if dsession is not None:
            clone = dsession._clone_node
            dsession._clone_node = lambda node: self._replace_worker(dsession, clone, node)

    def _replace_worker(self, dsession: Any, clone: Any, node: Any) -> Any:
        """xdist replaces a crashed worker with a new one on the same spec; when the VM
        itself died, starting one fails inside xdist (INTERNALERROR, the whole run lost).
        Then its OS is abandoned instead: the items it did not run are reported failed
        with the VM's console tail, and the other OSes go on."""
        worker = self.worker_of(node)
        if worker.vm["id"] not in self.dead_vms:
            return clone(node)
        alive = [w for w in self.workers.values() if w.os_id == worker.os_id
                 and w.vm["id"] not in self.dead_vms]
        if alive:
            return None  # its OS's other workers take over its items
        for nodeid in dsession.sched.abandon(worker.os_id, self._crashed.get(node.gateway.id)):
            self._report_not_run(nodeid, worker)
        return None

    def _report_not_run(self, nodeid: str, worker: Worker) -> None:
        """A failed report for an item its VM's death kept from running."""
        path, _, name = nodeid.partition("::")
        report = pytest.TestReport(
            nodeid, (path, None, name), {}, "failed",
            f"{nodeid}: not run: its VM {worker.vm['name']} ({worker.os_id}) died earlier "
            f"in the session\n---- console tail of {worker.vm['name']} ----\n"
            f"{self.dead_vms[worker.vm['id']]}", "call")
        hook = self.config.hook
        hook.pytest_runtest_logstart(nodeid=nodeid, location=report.location)
        hook.pytest_runtest_logreport(report=report)
        hook.pytest_runtest_logfinish(nodeid=nodeid, location=report.location)

    def _read_ledger(self, worker: Worker, gateway_id: str) -> tuple[str, list] | None:
        """The worker's ledger (see remote.py, events.parse_ledger): its last event's
        "sha1(nodeid)\twhen" note and its finished tests not sent yet; None when its VM no
        longer runs commands (it died). Read once per worker, when it ended."""
        if gateway_id in self._ledgers:
            return self._ledgers[gateway_id]
        assert self.env is not None
        found = None
        try:
            reply = self.env.client.run(self.env.name, events.read_command(gateway_id),
                                        vms=[worker.vm["id"]], timeout=20)
            result = reply["results"][0]
            if not result.get("error") and result.get("exit_code") in (0, 1):  # 1: none yet
                found = events.parse_ledger(str(result.get("stdout", "")))
        except (ApiError, KeyError, IndexError):
            pass
        self._ledgers[gateway_id] = found
        return found

    def _unsent(self, worker: Worker, gateway_id: str) -> list:
        """The finished tests whose events a worker that ended without finishing had not
        sent (for events.unbatching); [] when its VM is gone."""
        ledger = self._read_ledger(worker, gateway_id)
        return ledger[1] if ledger else []

    def _count(self, counts: dict[str, int]) -> None:
        """The items of each OS collected so far (OS -> count). xdist sets
        `testscollected` to the last worker's count; one OS's is not the run's: the
        progress would pass 100%. Once every OS has collected, say how many each has
        (xdist's status line shows the first worker's count as everybody's)."""
        if self.session is not None:
            self.session.testscollected = sum(counts.values())
        if set(counts) != set(self.os_ids) or self._said_count:
            return
        self._said_count = True
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"ttstack: native: {sum(counts.values())} items: "
                                + ", ".join(f"{counts[o]} on {o}" for o in self.os_ids))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Each report gets the user property `tt_os`, as `tt_vm` tests have it: junitxml
        writes it into the testcase, the per-OS summary (tally.py) counts by it. Added
        here, not in the worker, where any user property takes a report off the JSON
        batch path (remote.py)."""
        os_id = ids.untag(report.nodeid, self.os_ids)[0]
        if os_id and ("tt_os", os_id) not in report.user_properties:
            report.user_properties = [*report.user_properties, ("tt_os", os_id)]

    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport,
                               sched: Any) -> None:
        """Turn a dead worker's report into one naming the test, its phase (from the
        worker's ledger in the VM), the OS, the VM and the VM's console tail."""
        node = report.node
        worker = self.worker_of(node)
        self._crashed[node.gateway.id] = crashitem
        tail = "(console tail unavailable)"
        with contextlib.suppress(Exception):
            assert self.env is not None
            tail = self.env.client.console(self.env.name, worker.vm["id"], 30)
        ledger = self._read_ledger(worker, node.gateway.id)
        if ledger is None:
            self.dead_vms[worker.vm["id"]] = tail
            phase = "call"
            died = "died while it ran (in which phase is not known: the VM is gone)"
            what = (f"the VM {worker.vm['name']} ({worker.os_id}) died (it no longer runs "
                    "commands): the test powered it off, or its kernel crashed; the items "
                    "it had not run yet are reported failed. Results travel in batches "
                    f"(at most {remote.KEEP_AT_MOST} s of tests): in a fast suite the test "
                    "that did it may be one that ran shortly after this one")
        else:
            phase = phase_after(crashitem, ledger[0])
            died = f"died during its {phase}"
            what = (f"the test's worker process died on {worker.vm['name']} "
                    f"({worker.os_id}) — the test killed its process, or the VM ran out of "
                    "memory; xdist starts a new worker on the same VM for the rest of the "
                    "suite")
        report.when = phase  # type: ignore[assignment]
        report.location = (crashitem.split("::")[0], None, crashitem.split("::", 1)[-1])
        report.longrepr = (f"{crashitem}: {died}: {what}\n"
                           f"---- console tail of {worker.vm['name']} ----\n{tail}")


def collect_only_items(items: list[pytest.Item], images: list[str]) -> list[pytest.Item]:
    """For `--collect-only`: each host-collected item once per OS, with the run's ids."""
    out = []
    for item in items:
        for os_id in (image_id(i, images) for i in images):
            clone = copy.copy(item)
            clone._nodeid = ids.tag(item.nodeid, os_id)
            clone.name = ids.tag(item.name, os_id)
            clone.extra_keyword_matches = {*item.extra_keyword_matches, os_id}
            out.append(clone)
    return out
