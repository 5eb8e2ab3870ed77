"""The session's ENV: created once (by the xdist controller, or the only process), shared
with workers, deleted at the end — also after Ctrl-C or an internal error.

Design for xdist (documented in docs/plugin.md): the ENV holds one VM per image *per
worker*, and each live worker uses the VM of its slot (handed out by the controller,
plugin._XdistHooks). No two live workers ever share a VM, no locks are needed, and every
test still runs on every requested OS.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from ttclient import config as cfgmod
from ttclient.api import ApiError, Client, changed_vms
from ttclient.imagenames import ImageNameError, match_images, parse_image_name, split_prefixes

from .vm import VM


class TTSetupError(Exception):
    """The ENV could not be made; the message says why and what to change."""


@dataclass
class Settings:
    """What the session's ENV is made of, from the `--tt-*` options: OS prefixes, server
    HOST:PORT, life time (seconds), vCPUs and memory (MiB) per VM, boot timeout (seconds)
    and VMs per image (`workers`)."""

    os_prefixes: list[str]
    server: str
    keep: bool = False
    life_time: int = 3600
    cpu: int = 1
    mem: int = 512
    boot_timeout: float = 900.0
    workers: int = 1
    extra_ssh_keys: list[str] = field(default_factory=list)  # e.g. native mode's own key
    ports: list[int] = field(default_factory=list)  # guest TCP ports forwarded from the start
    images: list[str] | None = None  # full image names, when known: instead of os_prefixes


@dataclass
class SessionEnv:
    """What every process knows about the session's ENV (sent to xdist workers as a dict)."""

    server: str
    name: str
    images: list[str]
    workers: int
    vms: list[dict] = field(default_factory=list)
    error: str = ""
    cpu: int = 1  # vCPUs, MiB and lifetime (s) of each fresh VM (fresh_vm)
    mem: int = 512
    life_time: int = 3600
    fresh_prefix: str = ""  # fresh VMs' ENVs are named FRESH_PREFIX-XXXXXX (fresh_name)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what xdist's workerinput carries)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SessionEnv:
        """The SessionEnv that to_dict gave `data`."""
        return cls(**data)

    @cached_property
    def client(self) -> Client:
        """One HTTP session per process for every VM handle (not part of to_dict)."""
        return Client(f"http://{self.server}")

    def vm_for(self, image: str, worker: int) -> VM:
        """The VM of `image` for VM slot `worker` (modulo the VMs of that image);
        TTSetupError when the ENV has none of that image."""
        mine = [v for v in self.vms if v["image"] == image]
        if not mine:
            raise TTSetupError(f"the session ENV has no VM of {image}")
        return VM(self.client, self.name, mine[worker % len(mine)])


    @contextlib.contextmanager
    def fresh_vm(self, image: str, timeout: float = 900.0) -> Iterator[VM]:
        """A VM of `image` for the caller alone: an ENV of its own named after the
        session's, created, awaited, and deleted when the block ends (whatever ends it).
        TTSetupError (with the server's reason and console tail) when it does not come up."""
        name = fresh_name(self.fresh_prefix or self.name)
        client = self.client

        def create() -> None:
            client.create_env(name, [image], vm_number=1, cpu_num=self.cpu, mem_size=self.mem,
                              life_time=self.life_time, ssh_keys=user_ssh_keys())

        try:
            try:
                create()
            except ApiError:  # the room the last ones held may still be in use
                if not finish_deletes():
                    raise
                create()
        except ApiError as exc:
            raise TTSetupError(f"cannot create a fresh VM of {image}: {exc}") from exc
        try:
            view = client.wait_env(name, timeout=timeout, interval=0.2,  # a warm clone: ~2 s
                                   backoff=1.0)
            if view["state"] != "running":
                raise TTSetupError(f"the fresh VM of {image} ({name}) did not come up:\n"
                                   + (view.get("error") or view["state"]))
            yield VM(client, name, view["vms"][0])
        finally:  # deleted behind the next test's back; finish_deletes() waits for it
            _delete_later(client, name)


def fresh_name(prefix: str) -> str:
    """A fresh VM's ENV name: the session's prefix (at most 32 characters) and 6 hex
    digits; is_fresh_of() recognises it."""
    return f"{prefix[:32]}-{secrets.token_hex(3)}"


def is_fresh_of(name: str, prefix: str) -> bool:
    """Whether ENV `name` is a fresh VM's ENV fresh_name(prefix) made."""
    return re.fullmatch(re.escape(prefix[:32]) + r"-[0-9a-f]{6}", name) is not None


_DELETES: list[Future] = []
_DELETER: ThreadPoolExecutor | None = None


def _delete_later(client: Client, name: str) -> None:
    """Delete the ENV `name` in a background thread (a 404 or a failure is ignored: its
    lifetime ends it anyway)."""
    global _DELETER
    if _DELETER is None:
        _DELETER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ttstack-delete")
        atexit.register(finish_deletes)

    def delete() -> None:
        with contextlib.suppress(ApiError):
            client.delete_env(name)

    _DELETES.append(_DELETER.submit(delete))


def finish_deletes() -> bool:
    """Wait for the fresh VMs' deletions still under way; whether there were any."""
    pending = [f for f in _DELETES if not f.done()]
    for future in _DELETES:
        future.result()
    _DELETES.clear()
    return bool(pending)


def default_server() -> str:
    """HOST:PORT of the configured server ($TT_SERVER, else the `tt config` file, else the
    default); ValueError for an unreadable config file."""
    return cfgmod.load().address


def user_ssh_keys() -> list[str]:
    """The user's own public keys, so a kept ENV (--tt-keep) can be reached with plain ssh."""
    keys = []
    for name in ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"):
        path = Path.home() / ".ssh" / name
        if path.is_file():
            keys.append(path.read_text().strip())
    return keys


def env_name() -> str:
    """A fresh ENV name from this host and process: `pytest-HOST-PID-XXXX`, at most 40
    characters."""
    host = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower())[:12]
    return f"pytest-{host}-{os.getpid()}-{secrets.token_hex(2)}"[:40]


def resolve_images(client: Client, prefixes: list[str]) -> list[str]:
    """The full names of the server's images the prefixes select, in prefix order;
    TTSetupError for a bad prefix, no matching image or an API failure."""
    try:
        available = [parse_image_name(i["name"]) for i in client.images()]
        return [i.full for i in match_images(split_prefixes(prefixes), available)]
    except ImageNameError as exc:
        raise TTSetupError(f"--tt-os: {exc}") from exc
    except ApiError as exc:
        raise TTSetupError(f"--tt-server {client.base_url}: {exc}") from exc


class EnvOwner:
    """Creates and deletes the ENV; lives only in the controlling process."""

    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.client = self.client_for(settings.server)
        self.name: str | None = None
        self.deleted = False
        self.fresh_prefix = ""  # the session's fresh VMs' name prefix, once known
        self._stop_renewing = threading.Event()

    @staticmethod
    def client_for(server: str) -> Client:
        """A client for the server at `server` (HOST:PORT)."""
        return Client(f"http://{server}")

    def create(self) -> SessionEnv:
        """Create the session's ENV (one VM per image per worker), report its boot through
        `say` and wait for it; the SessionEnv, with `error` set when it did not come up.
        TTSetupError when it cannot be created or waited for."""
        s = self.settings
        images = s.images or resolve_images(self.client, s.os_prefixes)
        name = env_name()
        try:
            self.client.create_env(name, images, vm_number=s.workers, cpu_num=s.cpu,
                                   mem_size=s.mem, life_time=s.life_time,
                                   ssh_keys=user_ssh_keys() + s.extra_ssh_keys,
                                   ports=s.ports or None)
        except ApiError as exc:
            raise TTSetupError(f"cannot create the test ENV on {s.server}: {exc}") from exc
        self.name = self.fresh_prefix = name
        atexit.register(self.delete)  # last resort if the session dies without finishing
        self._renew(name)
        self.say(f"ttstack: ENV {name} on {s.server}: {len(images)} OS x {s.workers} "
                 f"worker VM(s), booting in parallel")
        seen: dict[str, str] = {}

        def progress(view: dict) -> None:
            for vm in changed_vms(view, seen):
                took = f" in {vm['boot_seconds']:.1f}s" if vm.get("boot_seconds") else ""
                self.say(f"ttstack:   {vm['name']:<28} {vm['image']:<24} {vm['state']}{took}")

        try:
            view = self.client.wait_env(name, timeout=s.boot_timeout, on_change=progress)
        except ApiError as exc:
            raise TTSetupError(f"ENV {name}: {exc}") from exc
        env = SessionEnv(server=s.server, name=name, images=images, workers=s.workers,
                         vms=view["vms"], cpu=s.cpu, mem=s.mem, life_time=s.life_time,
                         fresh_prefix=name)
        if view["state"] != "running":
            env.error = view.get("error") or f"ENV ended in state {view['state']}"
        return env

    def attach(self, name: str) -> SessionEnv:
        """The running ENV `name`, used as it is and never deleted (`self.name` stays
        None): its images (narrowed by the settings' OS prefixes, when any) and VMs.
        TTSetupError when it does not exist, is not running, or has fewer VMs of an image
        than the session has workers (two workers would share a VM)."""
        s = self.settings
        try:
            view = self.client.get_env(name)
        except ApiError as exc:
            raise TTSetupError(f"--tt-env {name}: {exc}") from exc
        if view["state"] != "running":
            raise TTSetupError(f"--tt-env {name}: the ENV is {view['state']}, not running "
                               f"('tt env start {name}' starts a stopped one)")
        images = list(dict.fromkeys(v["image"] for v in view["vms"]))
        if s.os_prefixes:
            try:
                chosen = match_images(split_prefixes(s.os_prefixes),
                                      [parse_image_name(i) for i in images])
            except ImageNameError as exc:
                raise TTSetupError(f"--tt-os with --tt-env {name}: {exc}") from exc
            images = [i.full for i in chosen]
        for image in images:
            have = sum(v["image"] == image for v in view["vms"])
            if have < s.workers:
                raise TTSetupError(f"--tt-env {name}: it has {have} VM(s) of {image} and "
                                   f"the session starts {s.workers} xdist workers; each "
                                   f"needs a VM of its own (fewer workers, or an ENV made "
                                   f"with 'tt env add ... --vm-number {s.workers}')")
        missing = [p for p in s.ports if any(str(p) not in v.get("ports", {})
                                             for v in view["vms"])]
        if missing:  # --tt-port: forwarded on the ENV, which keeps them
            try:
                view = self.client.update_env(name, add_ports=missing)
            except ApiError as exc:
                raise TTSetupError(f"--tt-port with --tt-env {name}: {exc}") from exc
        self.say(f"ttstack: using ENV {name} on {s.server} (--tt-env; it is kept)")
        self.fresh_prefix = env_name()  # this session's own: its fresh VMs are its to reap
        return SessionEnv(server=s.server, name=name, images=images, workers=s.workers,
                          vms=[v for v in view["vms"] if v["image"] in images], cpu=s.cpu,
                          mem=s.mem, life_time=s.life_time, fresh_prefix=self.fresh_prefix)

    def _renew(self, name: str) -> None:
        """Renew the ENV's lifetime every third of it while the session runs (a thread,
        ended by delete()): --tt-life-time bounds how long VMs outlive a session that
        died, not how long a live session may run. A failed renewal is retried at the
        next turn; the server stops renewals at its maximum lifetime."""
        life = self.settings.life_time
        client = self.client_for(self.settings.server)  # requests' Session per thread

        def renew() -> None:
            while not self._stop_renewing.wait(min(max(life / 3, 1.0), 600.0)):
                with contextlib.suppress(ApiError):
                    client.update_env(name, life_time=life)

        threading.Thread(target=renew, name="ttstack-renew", daemon=True).start()

    def _reap_fresh(self) -> None:
        """Delete the fresh VMs' ENVs of this session still there: a worker that died
        in a test (killed, crashed) never deleted its own."""
        if not self.fresh_prefix:
            return
        try:
            names = [e["name"] for e in self.client.list_envs()]
        except ApiError:
            return
        for name in names:
            if is_fresh_of(name, self.fresh_prefix):
                with contextlib.suppress(ApiError):
                    self.client.delete_env(name)
                    self.say(f"ttstack: deleted ENV {name} (a fresh VM its test left)")

    def delete(self, keep: bool = False) -> None:
        """Delete the ENV once (a 404 counts as deleted; other failures are printed, not
        raised); with `keep`, leave it and say how to reach and delete it. Fresh VMs'
        ENVs that their tests left (a worker died) are deleted either way."""
        self._stop_renewing.set()
        self._reap_fresh()
        self.fresh_prefix = ""
        if not self.name or self.deleted:
            return
        if keep:
            self.deleted = True
            self.say(f"ttstack: kept ENV {self.name} for debugging (--tt-keep): "
                     f"'tt --server {self.settings.server} env show {self.name}'; "
                     f"delete it with 'tt --server {self.settings.server} env del {self.name}'")
            return
        try:
            self.client.delete_env(self.name)
            self.deleted = True
            self.say(f"ttstack: deleted ENV {self.name}")
        except ApiError as exc:
            if exc.status == 404:
                self.deleted = True
                return
            print(f"ttstack: could not delete ENV {self.name}: {exc}", file=sys.stderr)
