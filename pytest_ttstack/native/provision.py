"""Make every VM of the session ENV ready to host an xdist worker.

Per VM, in parallel: open the SSH master connection (while the host resolves and packs;
the guest's Python is probed only when its image's build, by the server's digest, is not
the one remembered from an earlier session), unpack one archive (project, guest plugin,
pins, wheels when needed, and the cached venv when there is one) into /root/ttnative,
make and fill the venv if it was not cached (the first VM of each guest Python then sends
it back to the host cache), install local projects (`.`: built in the guest, C extensions
included), and write the execnet wrapper. Progress goes through `say`; any failure is a
TTSetupError naming the VM, with the tool's output and the VM's console tail.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shlex
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ttclient.api import ApiError

from ..matrix import image_id
from ..session import SessionEnv, TTSetupError
from . import project, wheelhouse
from .project import GUEST_PROJECT, GUEST_ROOT, GUEST_VENV, GUEST_WHEELS, PathMap
from .ssh import SSHError, SSHTarget

# uv, from its wheel for the guest's platform (wheelhouse.guest_uv), installs whatever must
# be installed or built in the guest; pip is the fallback where uv has no wheel.
GUEST_UV_DIR = f"{GUEST_ROOT}/uv"
UV_INSTALL = (f"UV_PYTHON_DOWNLOADS=never {GUEST_UV_DIR}/bin/uv pip install --quiet "
              f"--python {GUEST_VENV}/bin/python --no-index --find-links {GUEST_WHEELS} "
              "--compile-bytecode")  # as pip does: the cached venv keeps its .pyc files
# pip runs from its wheel (pip documents `python pip.whl/pip`): the venv is made
# --without-pip, which spares the slowest step under TCG (ensurepip) and keeps pip out of
# the cached venv. The pins are installed with --no-deps: they are a whole resolution
# already, less the local projects (`.`), which one of them may need (a project that
# pytest depends on, tested natively) and which come after, from the shipped tree.
PIP = (f"{GUEST_VENV}/bin/python \"$(ls {GUEST_WHEELS}/pip-*.whl | tail -n 1)/pip\" install "
       f"--no-index --find-links {GUEST_WHEELS} --disable-pip-version-check "
       "--no-warn-script-location -q")
# Left out of the cached venv: the bytecode of Pygments' lexers (3.8 of the venv's 13.4 MB
# with pytest 9, which requires Pygments only to colour terminal output, something workers
# never do). Pygments imports a lexer module only by name, so a project that uses one
# compiles that one in the guest. Shipping the venv to a TCG guest: 1.3 s -> 1.0 s to
# unpack, 4.4 -> 3.0 MB to send (measured, debian-13).
VENV_SAVE_EXCLUDES = ("pygments/lexers/__pycache__",)


@dataclass(frozen=True)
class Worker:
    """One VM ready for a worker: its API view, OS id and execnet spec."""

    vm: dict
    os_id: str
    target: SSHTarget
    python: Path  # the wrapper execnet starts as "python"

    @property
    def python_spec(self) -> str:
        """The wrapper as execnet's `python=` value: shell-quoted, since execnet splits it
        with shlex (a path with spaces would be cut in two)."""
        return shlex.quote(str(self.python))

    @property
    def spec(self) -> str:
        """The execnet `--tx` spec that starts this VM's worker through its wrapper."""
        return f"popen//python={self.python_spec}"


@dataclass
class _Plan:
    """What one guest Python (all VMs of one image, usually) gets."""

    guest: wheelhouse.GuestPython
    resolution: wheelhouse.Resolution
    key: str  # wheelhouse.venv_key: names the cached venv and the wheels folder
    cached_venv: bytes | None  # the cached venv (a gzipped tar), if there is one
    bundle: bytes = b""  # gzipped tar
    scm: dict[str, str] = field(default_factory=dict)  # wheelhouse.scm_versions
    pure: dict[str, Path] = field(default_factory=dict)  # wheelhouse.pure_wheels
    uv: Path | None = None  # wheelhouse.guest_uv, when something is installed in the guest
    saved: bool = False

    @property
    def installer(self) -> str:
        """The guest's install command line, up to its arguments: uv's, else pip's."""
        return UV_INSTALL if self.uv is not None else PIP


class Provisioner:
    """Runs the steps in the module docstring for one session."""

    def __init__(self, env: SessionEnv, paths: PathMap, specs: list[str], work: Path,
                 key: Path, say: Callable[[str], None], timeout: float,
                 extra_files: list[str] | None = None) -> None:
        self.env = env
        self.extra_files = extra_files or []  # e.g. pytest's lastfailed, for --lf
        self.paths = paths
        self.specs = specs
        self.work = work
        self.key = key
        self.say = say
        self.timeout = timeout
        self.known_hosts = work / "known_hosts"
        self.venvs = wheelhouse.cache_dir() / "native-venvs"
        self._lock = threading.Lock()
        self.masters: list[subprocess.Popen] = []  # one SSH master per VM; close() ends them
        # local lines -> (scm env, pure wheels): the same for every guest Python
        self._local: dict[tuple[str, ...], tuple[dict[str, str], dict[str, Path]]] = {}
        self._uv: dict[tuple[str, str], Path | None] = {}  # (machine, libc) -> uv's wheel
        self._local_lock = threading.Lock()  # plans are made in parallel
        self.closed = threading.Event()  # set by close(): masters still opening give up

    def close(self) -> None:
        """End the SSH master connections (the workers' sessions go with them); one that
        opens later ends at once."""
        with self._lock:
            self.closed.set()
        for master in self.masters:
            master.terminate()
        for master in self.masters:
            try:
                master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()

    def target(self, vm: dict) -> SSHTarget:
        """The SSH target of a VM view (ssh_host, ssh_port), with the session's key and
        known_hosts file."""
        return SSHTarget(vm["ssh_host"], int(vm["ssh_port"]), self.key, self.known_hosts)

    def local_args(self, line: str) -> list[str]:
        """pip arguments in the guest for a local project as uv printed it (`.`, `-e .`,
        `./sub[x]`, `name @ file:///abs`): its shipped copy. TTSetupError when it lies
        outside the project, which is not shipped."""
        editable = line.startswith("-e ")
        spec = line.removeprefix("-e ").strip()
        if " @ file://" in spec:
            spec = urllib.parse.unquote(spec.split(" @ file://", 1)[1])
        path, bracket, extras = spec.partition("[")
        guest = self.paths.guest(self.paths.rootdir / path)
        if guest is None:
            raise TTSetupError(f"native mode: --tt-native-install: {path} is outside the "
                               f"project ({self.paths.rootdir}), which is all that is "
                               f"shipped to the VMs")
        return (["-e"] if editable else []) + [guest + bracket + extras]

    @staticmethod
    def pure_wheel_arg(line: str, wheel: Path) -> str:
        """pip argument in the guest for a local project built here into a pure wheel:
        the shipped wheel, with the line's extras (`./sub[x]`)."""
        _, bracket, extras = line.partition("[")
        return f"{GUEST_WHEELS}/{wheel.name}" + (bracket + extras.split("]")[0] + "]"
                                                  if bracket else "")

    def _fail(self, vm: dict, message: str) -> TTSetupError:
        tail = ""
        with contextlib.suppress(Exception):
            tail = self.env.client.console(self.env.name, vm["id"], 30)
        return TTSetupError(f"native mode: {vm['name']} ({vm['image']}): {message}"
                            + (f"\n---- console tail of {vm['name']} ----\n{tail}" if tail else ""))

    def probe(self) -> dict[str, wheelhouse.GuestPython]:
        """The guest Python of every VM (by VM id), through the guest agent."""
        reply = self.env.client.run(self.env.name, wheelhouse.PROBE, timeout=120)
        found = {}
        by_id = {v["id"]: v for v in self.env.vms}
        for r in reply["results"]:
            vm = by_id[r["id"]]
            if r.get("error"):
                raise self._fail(vm, r["error"])
            if r["exit_code"] == 127:
                raise TTSetupError(f"native mode needs Python 3 in the guest: image "
                                   f"{vm['image']} has no python3 ({r['stderr'].strip()}); "
                                   f"use an image with python3, or drop it from --tt-os")
            if r["exit_code"] != 0:
                raise self._fail(vm, f"probing python3 failed: {r['stderr'].strip()}")
            found[vm["id"]] = wheelhouse.GuestPython.from_probe(r["stdout"].strip())
        return found

    def _digests(self) -> dict[str, str]:
        """Image name -> the server's digest of that build ({} when it cannot say: a
        server without digests, or a proxy whose servers hold different builds)."""
        try:
            return {i["name"]: str(i.get("digest") or "") for i in self.env.client.images()}
        except (ApiError, KeyError, TypeError):
            return {}

    def _plan(self, guest: wheelhouse.GuestPython, files: list[str]) -> _Plan:
        res = wheelhouse.resolve(self.specs, guest, self.paths.rootdir, self.work)
        key = wheelhouse.venv_key(guest, res)
        cached = self.venvs / f"{key}.tar.gz"
        plan = _Plan(guest, res, key, cached.read_bytes() if cached.is_file() else None)
        wheels = self.work / f"wheels-{key}"
        if plan.cached_venv is None or res.local:
            self.say(f"ttstack: native: gathering wheels for Python {guest.version} "
                     f"({guest.machine}): {len(res.pins)} pinned"
                     + (", cached venv found" if plan.cached_venv else ""))
            local = tuple(res.local)
            with self._local_lock:
                if local not in self._local:
                    scm = wheelhouse.scm_versions(res, self.paths.rootdir)
                    pure = wheelhouse.pure_wheels(res, self.paths.rootdir,
                                                  self.work / "local-wheels", files, scm)
                    self._local[local] = scm, pure
                    if pure:
                        self.say("ttstack: native: pure-Python wheels built here for "
                                 + ", ".join(pure) + " (no build in the guests)")
            plan.scm, plan.pure = self._local[local]
            built_in_guest = [ln for ln in res.local if ln not in plan.pure]
            wheelhouse.gather(res, guest, self.paths.rootdir, wheels, self.work,
                              deps=plan.cached_venv is None, built_in_guest=built_in_guest)
            if plan.cached_venv is None or built_in_guest:
                platform = (guest.machine, guest.libc)  # uv's wheel is not per Python
                with self._local_lock:
                    if platform not in self._uv:
                        self._uv[platform] = wheelhouse.guest_uv(
                            guest, self.work / f"uv-{guest.machine}-{guest.libc}",
                            self.paths.rootdir)
                plan.uv = self._uv[platform]

        def build(tar: tarfile.TarFile) -> None:
            project.add_files(tar, self.paths.rootdir, files, "project")
            project.guest_site_tar(tar)
            pins = "\n".join(res.pins).encode() + b"\n"
            info = tarfile.TarInfo("pins.txt")
            info.size = len(pins)
            tar.addfile(info, io.BytesIO(pins))
            if wheels.is_dir():
                project.add_files(tar, wheels, sorted(p.name for p in wheels.iterdir()),
                                  "wheels")
            for wheel in plan.pure.values():
                tar.add(wheel, f"wheels/{wheel.name}")
            if plan.uv is not None:
                tar.add(plan.uv, "uv/uv.whl")

        # gzipped: SSH to a TCG guest carries ~4 MB/s and gunzip there is cheaper than the
        # bytes it saves (a 13.7 MB venv: 7.0 s plain, 4.2 s gzipped, measured)
        plan.bundle = gzip.compress(project.tar_bytes(build), compresslevel=1)
        return plan

    def _connect(self, vm: dict) -> None:
        """Open the VM's SSH master connection (an SSH handshake takes seconds under TCG:
        this runs while the host resolves and packs)."""
        try:
            master = self.target(vm).open_master(self.timeout, stop=self.closed)
        except SSHError as exc:
            raise self._fail(vm, str(exc)) from None
        with self._lock:
            self.masters.append(master)
            if not self.closed.is_set():
                return
        master.terminate()  # the session failed meanwhile
        master.wait()

    def _ship(self, vm: dict, plan: _Plan, connected: Future) -> None:
        connected.result()
        target = self.target(vm)
        try:
            data = plan.bundle
            if plan.cached_venv is not None:  # a second gzip member holding a second
                data += plan.cached_venv      # archive: gzip -d joins, tar -i reads both
            target.run(f"rm -rf {GUEST_ROOT} && mkdir -p {GUEST_ROOT} && "
                       f"gzip -dc | tar -xif - -C {GUEST_ROOT}", "unpacking the project",
                       input=data, timeout=self.timeout)
            if plan.uv is not None:  # the wheel's scripts are uv's binaries
                target.run(f"python3 -m zipfile -e {GUEST_UV_DIR}/uv.whl {GUEST_UV_DIR}/w && "
                           f"mkdir -p {GUEST_UV_DIR}/bin && mv {GUEST_UV_DIR}/w/*.data/"
                           f"scripts/uv {GUEST_UV_DIR}/bin/uv && chmod +x {GUEST_UV_DIR}/bin/uv"
                           f" && rm -rf {GUEST_UV_DIR}/w {GUEST_UV_DIR}/uv.whl",
                           "unpacking uv", timeout=self.timeout)
            if plan.cached_venv is None:
                target.run(f"python3 -m venv --without-pip {GUEST_VENV} && "
                           f"{plan.installer} --no-deps -r {GUEST_ROOT}/pins.txt",
                           f"installing {len(plan.resolution.pins)} distributions into the "
                           f"venv", timeout=self.timeout)
                self._save_venv(target, plan)
            if plan.resolution.local:
                words = [w for line in plan.resolution.local
                         for w in ([self.pure_wheel_arg(line, plan.pure[line])]
                                   if line in plan.pure else self.local_args(line))]
                scm = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.scm.items())
                target.run(f"cd {GUEST_PROJECT} && {scm} {plan.installer} -c {GUEST_ROOT}/pins.txt "
                           f"{shlex.join(words)}",
                           f"installing {' '.join(plan.resolution.local)}",
                           timeout=self.timeout)
        except SSHError as exc:
            raise self._fail(vm, str(exc)) from None

    def _save_venv(self, target: SSHTarget, plan: _Plan) -> None:
        with self._lock:
            if plan.saved:
                return
            plan.saved = True
        self.venvs.mkdir(parents=True, exist_ok=True)
        dest = self.venvs / f"{plan.key}.tar.gz"
        unique = f"{os.getpid()}-{threading.get_ident()}"
        partial, packed = (dest.with_name(f"{dest.name}.{kind}-{unique}")
                           for kind in ("part", "tmp"))
        try:
            excludes = " ".join(f"--exclude={shlex.quote(x)}" for x in VENV_SAVE_EXCLUDES)
            target.fetch(f"tar -cf - {excludes} -C {GUEST_ROOT} venv", partial,
                         "saving the venv")
            packed.write_bytes(gzip.compress(partial.read_bytes(), 6))
            packed.rename(dest)  # atomic: another session sees all of it or nothing
        except (OSError, SSHError) as exc:  # the run goes on; the next one installs again
            self.say(f"ttstack: native: could not cache the venv ({exc})")
        finally:
            partial.unlink(missing_ok=True)
            packed.unlink(missing_ok=True)

    def run(self) -> list[Worker]:
        """Provision every VM; returns one Worker per VM, in the ENV's VM order."""
        started = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=max(1, 2 * len(self.env.vms)))
        try:
            connected = {vm["id"]: pool.submit(self._connect, vm) for vm in self.env.vms}
            try:
                files_of_project = project.project_files(self.paths.rootdir)
                files = sorted({*files_of_project, *self.extra_files})
            except project.ShipError as exc:
                raise TTSetupError(f"native mode: {exc}") from None
            # one plan per guest Python, in parallel (each is a uv resolution and pip
            # download on the host: ~9 s each, measured). Plans for the Pythons these
            # images held last time start before the probe answers (a Python start on a
            # fresh clone under TCG takes seconds); a plan the probe proves wrong is
            # dropped and made again.
            remembered = wheelhouse.remembered_guests()
            planned = {guest: pool.submit(self._plan, guest, files) for guest in
                       dict.fromkeys(remembered[vm["image"]][0] for vm in self.env.vms
                                     if vm["image"] in remembered)}
            digests = self._digests()
            known = {vm["id"]: remembered[vm["image"]][0] for vm in self.env.vms
                     if digests.get(vm["image"]) and vm["image"] in remembered
                     and remembered[vm["image"]][1] == digests[vm["image"]]}
            if len(known) == len(self.env.vms):  # the same builds as last time
                guests = known
            else:
                guests = self.probe()
                wheelhouse.remember_guests({vm["image"]: (guests[vm["id"]],
                                                          digests.get(vm["image"], ""))
                                            for vm in self.env.vms})
            planned = {guest: planned.get(guest) or pool.submit(self._plan, guest, files)
                       for guest in dict.fromkeys(guests.values())}
            plans: dict[wheelhouse.GuestPython, _Plan] = {}
            for guest, made in planned.items():
                try:
                    plans[guest] = made.result()
                except wheelhouse.InstallError as exc:
                    raise TTSetupError(f"native mode: --tt-native-install: {exc}") from None
            fresh = sum(p.cached_venv is None for p in plans.values())
            cached = len(set(self.extra_files) - set(files_of_project))
            self.say(f"ttstack: native: shipping {len(files) - cached} project files"
                     + (f" and {cached} of pytest's cache (--lf, --nf)" if cached else "")
                     + f" to {len(self.env.vms)} VM(s)"
                     + (f"; making {fresh} venv(s) in the guests (cached for next time)"
                        if fresh else "; venvs from the cache"))
            futures = [pool.submit(self._ship, vm, plans[guests[vm["id"]]],
                                   connected[vm["id"]]) for vm in self.env.vms]
            for f in futures:
                f.result()
        finally:  # on failure the caller's close() ends masters, also ones still opening
            pool.shutdown(wait=False, cancel_futures=True)
        self.say(f"ttstack: native: {len(self.env.vms)} VM(s) ready in "
                 f"{time.monotonic() - started:.1f}s; starting one pytest-xdist worker per VM")
        workers = []
        for vm in self.env.vms:
            target = self.target(vm)
            wrapper = target.write_python_wrapper(
                self.work / f"python-{vm['id']}", f"{GUEST_VENV}/bin/python",
                self.paths.guest_cwd)
            workers.append(Worker(vm, image_id(vm["image"], self.env.images), target,
                                  wrapper))
        return workers
