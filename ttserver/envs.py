"""ENV lifecycle: admission, parallel boot, commands, files, deletion, expiry, reconciliation.

The rules that keep a host clean:
- admission (name, images, resources, ports) happens in one SQLite transaction, and the
  rows are written before any VM exists, so every created thing has a record;
- a failed boot tears down every VM of its ENV at once and keeps only the record and the
  error (with the console tail) for `tt env show`;
- at start-up, reconcile() removes whatever has no live record: domains with our prefix,
  VM directories, half-created and expired ENVs.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import accel as accel_mod
from . import domainxml, images, sshexec, storage, views
from .bridgenet import BridgeNetwork
from .config import ServerConfig
from .db import EnvRow, StateDB, VMRow
from .engine import Engine, qemu_user
from .errors import BadRequest, Conflict, InsufficientResources, NotFound
from .failpoints import crash_point
from .guestio import GuestError, GuestIO
from .guestops import GuestOps
from .ports import PortPool
from .states import (
    CREATING,
    DELETING,
    ENV_FAILED,
    ENV_STOPPED,
    FAILED,
    PENDING,
    READY,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
)
from .templates import Templates, fingerprint
from .vmboot import VMBooter, host_ports, lease, restricted
from .vmspec import DomainRenderer

log = logging.getLogger(__name__)

ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
MAX_VMS_PER_ENV = 64
SHUTDOWN_TIMEOUT = 30.0


@dataclass
class EnvRequest:
    name: str
    os_prefix: list[str]
    vm_number: int = 1
    cpu_num: int = 1
    mem_size: int = 512
    disk_size: int | None = None
    life_time: int | None = None
    ports: list[int] = field(default_factory=list)
    ssh_keys: list[str] = field(default_factory=list)
    owner: str = ""
    deny_outgoing: bool = False
    # exact VMs per image (full names), overriding vm_number: how ttproxy places the part
    # of a spanning ENV that lives here; first_index keeps VM names unique across servers
    counts: dict[str, int] | None = None
    first_index: int = 0
    warm: bool | None = None  # None: the server's --warm-clones


@dataclass
class _Boot:
    cancel: threading.Event
    thread: threading.Thread


class EnvManager:
    def __init__(self, cfg: ServerConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.db = StateDB(cfg.db_file)
        self.server_id = self.db.server_id()
        self.engine = engine or Engine(cfg.libvirt_uri)
        self.ports = PortPool(cfg.forward_addr, cfg.port_first, cfg.port_last)
        self.uid, self.gid = qemu_user()
        self.ssh_pubkey = sshexec.ensure_key(cfg.ssh_key)
        self.bridge = (BridgeNetwork(cfg.cfgdb_path / "bridge", cfg.bridge_name,
                                     cfg.bridge_subnet, cfg.allow_outgoing)
                       if cfg.network == "bridge" else None)
        self.io = GuestIO(self.engine, cfg, self.bridge)
        self.guest = GuestOps(self.db, self.io)  # run, push, pull, console
        self.storage = storage.choose(cfg.storage, cfg.image_path, cfg.cfgdb_path)
        # a filesystem clone per VM (btrfs snapshot, ZFS clone) instead of a qcow2 overlay
        self.clones: storage.CloneStore | None = (
            storage.Btrfs(cfg.cfgdb_path / "bases") if self.storage == "btrfs"
            else storage.Zfs(cfg.cfgdb_path, self.server_id) if self.storage == "zfs" else None)
        self.accel = accel_mod.Accelerator(cfg.accel, cfg.image_path,
                                           cfg.cfgdb_path / "accel.json")
        self.renderer = DomainRenderer(self.accel, self.uid, self.gid)
        self.templates = Templates(cfg.cfgdb_path / "templates", self.engine, self.uid,
                                   self.gid, self.domain_prefix, cfg.boot_timeout,
                                   self.renderer)
        self.booter = VMBooter(cfg, self.db, self.engine, self.renderer, self.templates,
                               self.clones, self.bridge, self.ssh_pubkey, self.uid, self.gid)
        self._admit_lock = threading.Lock()
        self._env_locks: dict[str, threading.Lock] = {}
        self._env_locks_lock = threading.Lock()
        self._boots: dict[str, _Boot] = {}
        self._boots_lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # --- life of the manager ---------------------------------------------------------
    @property
    def domain_prefix(self) -> str:
        return f"tt-{self.server_id}-"

    def start_background(self) -> None:
        self.templates.clean_partial()
        self.reconcile()
        if self.bridge:
            self.bridge.setup({vm.id: (lease(vm), host_ports(vm),
                                       bool(env.spec.get("deny_outgoing")))
                               for env in self.db.list_envs() for vm in env.vms
                               if vm.state == RUNNING and vm.net_addr})
        self.collect_templates()
        if self.clones:
            self.clones.collect({f"{i.disk.parent.name}@{fingerprint(i)}"
                                 for i in images.scan(self.cfg.image_path)},
                                {Path(vm.dir).name for vm in self.db.all_vms()})
        threading.Thread(target=self.accel.choice, name="accel-probe", daemon=True).start()
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        self._reaper.start()

    def stop_background(self) -> None:
        self._stop.set()
        self.templates.stop()
        if self.bridge:
            self.bridge.close()

    def _env_lock(self, name: str) -> threading.Lock:
        """Serialises the transitions of one ENV (stop, start, update, delete)."""
        with self._env_locks_lock:
            return self._env_locks.setdefault(name, threading.Lock())

    # --- status ----------------------------------------------------------------------
    def status(self) -> dict:
        used = self.db.used()
        choice = self.accel.known
        return {
            "server_id": self.server_id,
            "accel": choice.accel if choice else "probing",
            "accel_reason": choice.reason if choice else "",
            "cpu_total": self.cfg.cpu_total, "cpu_used": used["cpu"],
            "mem_total_mib": self.cfg.mem_total_mib, "mem_used_mib": used["mem_mib"],
            "disk_total_mib": self.cfg.disk_total_mib, "disk_used_mib": used["disk_mib"],
            "env_count": self.db.count_envs(),
            "images": [i.to_dict() for i in images.scan(self.cfg.image_path)],
            "warm_clones": self.cfg.warm_clones, "templates": self.templates.status(),
            "network": self.cfg.network, "storage": self.storage,
        }

    # --- views -----------------------------------------------------------------------
    def _env_view(self, env: EnvRow) -> dict:
        return views.env_view(env, self.server_id, self.cfg.connect_addr,
                              restricted(env, self.cfg.allow_outgoing))

    def get(self, name: str) -> dict:
        """The ENV's view (views.env_view); NotFound when there is none."""
        return self._env_view(self._env(name))

    def list_envs(self, owner: str | None = None) -> list[dict]:
        """Every ENV's view (`tt env listall`), or one owner's (`tt env list`)."""
        return [self._env_view(e) for e in self.db.list_envs()
                if owner is None or e.owner == owner]

    def _env(self, name: str) -> EnvRow:
        env = self.db.get_env(name)
        if env is None:
            raise NotFound(f"ENV {name!r} does not exist")
        return env

    # --- create ----------------------------------------------------------------------
    def _validate(self, req: EnvRequest) -> list[images.Image]:
        if not ENV_NAME.match(req.name):
            raise BadRequest(f"ENV name {req.name!r}: use 1-40 letters, digits, '-' or '_',"
                             " starting with a letter or digit")
        if not 1 <= req.vm_number <= MAX_VMS_PER_ENV:
            raise BadRequest(f"vm_number must be 1..{MAX_VMS_PER_ENV}")
        if req.cpu_num < 1 or req.mem_size < 128:
            raise BadRequest("cpu_num must be >= 1 and mem_size >= 128 MiB")
        life = req.life_time if req.life_time is not None else self.cfg.default_life_time
        if not 1 <= life <= self.cfg.max_life_time:
            raise BadRequest(f"life_time must be 1..{self.cfg.max_life_time} seconds")
        self._check_ports(req.ports)
        for key in req.ssh_keys:
            if "\n" in key.strip() or not key.strip().startswith(("ssh-", "ecdsa-", "sk-")):
                raise BadRequest("ssh_keys entries must be single OpenSSH public key lines")
        chosen = images.select(self.cfg.image_path, req.os_prefix)
        unsupported = [i.name.full for i in chosen if i.name.arch not in domainxml.ARCHES]
        if unsupported:
            raise BadRequest(f"no engine support for {', '.join(unsupported)}")
        if req.counts is not None:
            extra = sorted(set(req.counts) - {i.name.full for i in chosen})
            if extra:
                raise BadRequest(f"counts name images the prefixes do not select: {extra}")
            if not 1 <= sum(req.counts.values()) <= MAX_VMS_PER_ENV or min(
                    req.counts.values()) < 0:
                raise BadRequest(f"counts must add up to 1..{MAX_VMS_PER_ENV} VMs")
        if not 0 <= req.first_index <= 100_000:
            raise BadRequest("first_index must be 0..100000")
        return chosen

    @staticmethod
    def _check_ports(ports: list[int]) -> None:
        for port in ports:
            if not 1 <= port <= 65535 or port == 22:
                raise BadRequest(f"port {port}: give a guest TCP port 1-65535 (22 is always"
                                 " forwarded)")

    def create(self, req: EnvRequest) -> dict:
        """Admit the ENV and start booting it in the background; returns the `creating` view."""
        chosen = self._validate(req)
        if req.counts is not None:
            chosen = [i for i in chosen if req.counts.get(i.name.full, 0) > 0]
        life = req.life_time if req.life_time is not None else self.cfg.default_life_time
        now = time.time()
        vms: list[VMRow] = []
        for image in chosen:
            count = (req.vm_number if req.counts is None
                     else req.counts.get(image.name.full, 0))
            for _ in range(count):
                disk = max(req.disk_size or 0, image.size_mib)
                vm_id = f"{self.server_id}-{secrets.token_hex(4)}"
                vms.append(VMRow(id=vm_id, env=req.name, idx=req.first_index + len(vms),
                                 image=image.name.full,
                                 cpu=req.cpu_num, mem_mib=req.mem_size, disk_mib=disk,
                                 state=PENDING, domain=f"tt-{vm_id}",
                                 dir=str(self.cfg.vms_path / vm_id), ssh_port=0, forwards={}))
        need = {"cpu": sum(v.cpu for v in vms), "mem_mib": sum(v.mem_mib for v in vms),
                "disk_mib": sum(v.disk_mib for v in vms)}
        with self._admit_lock, self.db.transaction() as c:
            if self.db.get_env(req.name) is not None:
                raise Conflict(f"ENV {req.name!r} already exists; delete it or pick another name")
            self._check_room(need, f"for ENV {req.name!r}")
            ports = self.ports.take(len(vms) * (1 + len(req.ports)), self.db.used_ports())
            for vm in vms:
                vm.ssh_port = ports.pop()
                vm.forwards = {p: ports.pop() for p in req.ports}
            if self.bridge:
                taken = {v.net_addr for v in self.db.all_vms() if v.net_addr}
                for vm in vms:
                    vm.net_addr = self.bridge.lease(vm.id, taken).addr
                    taken.add(vm.net_addr)
            spec = {"os_prefix": req.os_prefix, "vm_number": req.vm_number,
                    "cpu_num": req.cpu_num, "mem_size": req.mem_size,
                    "disk_size": req.disk_size, "life_time": life, "ports": req.ports,
                    "ssh_keys": req.ssh_keys, "deny_outgoing": req.deny_outgoing,
                    "warm": req.warm}
            env = EnvRow(name=req.name, owner=req.owner, state=CREATING, created_at=now,
                         expires_at=now + life, spec=spec)
            self.db.insert_env(c, env)
            for vm in vms:
                self.db.insert_vm(c, vm)
        crash_point("create.admitted")
        self._spawn_boot(req.name, chosen, fresh=True)
        return self.get(req.name)

    def _check_room(self, need: dict[str, int], what: str) -> None:
        """Raise InsufficientResources (with numbers) unless `need` fits beside what every
        VM on record holds. Call under the admission lock, inside the transaction."""
        used = self.db.used()
        totals = {"cpu": self.cfg.cpu_total, "mem_mib": self.cfg.mem_total_mib,
                  "disk_mib": self.cfg.disk_total_mib}
        short = [f"{k}: need {need[k]}, free {totals[k] - used[k]} of {totals[k]}"
                 for k in need if used[k] + need[k] > totals[k]]
        if short:
            raise InsufficientResources(f"not enough resources {what} ({'; '.join(short)})")

    def _spawn_boot(self, name: str, chosen: list[images.Image], fresh: bool) -> None:
        cancel = threading.Event()
        thread = threading.Thread(target=self._boot_env, args=(name, chosen, cancel, fresh),
                                  name=f"boot-{name}", daemon=True)
        with self._boots_lock:
            self._boots[name] = _Boot(cancel, thread)
        thread.start()

    def _boot_env(self, name: str, chosen: list[images.Image], cancel: threading.Event,
                  fresh: bool) -> None:
        """Boot every pending VM of the ENV in parallel. `fresh`: new clones (create);
        otherwise the VMs boot from the disks they kept when stopped (start)."""
        by_name = {i.name.full: i for i in chosen}
        env = self.db.get_env(name)
        if env is None:
            return
        todo = [vm for vm in env.vms if vm.state == PENDING]
        try:
            with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
                results = list(pool.map(
                    lambda vm: self.booter.boot(vm, by_name[vm.image], env, cancel, fresh), todo))
            errors = [r for r in results if r]
            if cancel.is_set():
                return
            if not errors:
                self.db.set_env(name, state=READY, error="")
            else:
                self._boot_failed(name, fresh, errors[0])
        except Exception as exc:  # never leave an ENV in `creating` behind a dead thread
            log.exception("boot of ENV %s failed", name)
            self._boot_failed(name, fresh, f"internal error: {exc}")
        finally:
            with self._boots_lock:
                self._boots.pop(name, None)

    def _boot_failed(self, name: str, fresh: bool, error: str) -> None:
        """Free everything first, then tell watchers. A failed start keeps the disks: the
        ENV goes back to `stopped` with the error, and the user's data is not lost."""
        if fresh:
            self._teardown_vms(self.db.vms_of(name), keep_rows=True)
            self.db.set_env(name, state=ENV_FAILED, error=error)
            return
        self._settle_stopped(name, self.db.vms_of(name), f"start failed: {error}")

    def _settle_stopped(self, name: str, vms: list[VMRow], error: str) -> None:
        """After a failed or interrupted start/stop: no domain runs, every VM that kept its
        disk is `stopped` (VMs that had failed before stay failed), the ENV is `stopped`."""
        for vm in vms:
            self.engine.destroy(vm.domain)
            if vm.state != FAILED or Path(vm.dir).is_dir():
                self.db.set_vm(vm.id, state=STOPPED)
        self.db.set_env(name, state=ENV_STOPPED, error=error)

    # --- delete ----------------------------------------------------------------------
    def delete(self, name: str) -> None:
        env = self._env(name)
        self.db.set_env(name, state=DELETING)
        crash_point("delete.marked")
        with self._boots_lock:
            boot = self._boots.get(name)
        if boot:
            boot.cancel.set()
            boot.thread.join(timeout=60)
        with self._env_lock(name):  # a stop or update in flight finishes first
            self._teardown_vms(self.db.vms_of(env.name), keep_rows=False)
            crash_point("delete.torn_down")
            self.db.delete_env(name)
        with self._env_locks_lock:
            self._env_locks.pop(name, None)
        log.info("deleted ENV %s", name)

    # --- stop, start, update -----------------------------------------------------------
    def stop(self, name: str) -> dict:
        """Shut every VM down cleanly (forced after SHUTDOWN_TIMEOUT), keep the disks and
        ports, and give the CPU and memory back."""
        with self._env_lock(name):
            env = self._env(name)
            if env.state != READY:
                raise Conflict(f"ENV {name!r} is {env.state}; only a running ENV can be stopped")
            self.db.set_env(name, state=STOPPING)
            crash_point("stop.marked")
            live = [vm for vm in env.vms if vm.state == RUNNING]

            def one(vm: VMRow) -> None:
                clean = self.io.shutdown(vm, SHUTDOWN_TIMEOUT)
                if not clean:
                    log.warning("VM %s did not power off in %.0fs; forced", vm.id,
                                SHUTDOWN_TIMEOUT)
                self.booter.unpublish(vm)
                self.db.set_vm(vm.id, state=STOPPED)

            with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
                list(pool.map(one, live))
            self.db.set_env(name, state=ENV_STOPPED, error="")
            log.info("stopped ENV %s", name)
        return self.get(name)

    def start(self, name: str) -> dict:
        """Boot a stopped ENV from the disks it kept; answers at once (`starting`), like
        create, and the client polls."""
        with self._env_lock(name):
            env = self._env(name)
            if env.state != ENV_STOPPED:
                raise Conflict(f"ENV {name!r} is {env.state}; only a stopped ENV can be started")
            scanned = {i.name.full: i for i in images.scan(self.cfg.image_path)}
            todo = [vm for vm in env.vms if vm.state == STOPPED]
            gone = sorted({vm.image for vm in todo} - scanned.keys())
            if gone:
                raise Conflict(f"ENV {name!r} cannot start: image(s) {', '.join(gone)} are no"
                               " longer on this server")
            need = {"cpu": sum(v.cpu for v in todo), "mem_mib": sum(v.mem_mib for v in todo)}
            with self._admit_lock, self.db.transaction():
                self._check_room(need, f"to start ENV {name!r}")
                for vm in todo:
                    self.db.set_vm(vm.id, state=PENDING)
                self.db.set_env(name, state=STARTING, error="")
            self._spawn_boot(name, [scanned[i] for i in {vm.image for vm in todo}],
                             fresh=False)
        return self.get(name)

    def update(self, name: str, life_time: int | None = None,
               add_ports: list[int] | None = None,
               remove_ports: list[int] | None = None) -> dict:
        """New expiry (`life_time` seconds from now) and exposed ports; ports change live
        on running VMs (QEMU hostfwd) and are kept for stopped ones."""
        add_ports, remove_ports = add_ports or [], remove_ports or []
        if life_time is None and not add_ports and not remove_ports:
            raise BadRequest("nothing to update: give life_time, add_ports or remove_ports")
        with self._env_lock(name):
            env = self._env(name)
            if env.state not in (READY, ENV_STOPPED):
                raise Conflict(f"ENV {name!r} is {env.state}; update it when it is running"
                               " or stopped")
            if life_time is not None and not 1 <= life_time <= self.cfg.max_life_time:
                raise BadRequest(f"life_time must be 1..{self.cfg.max_life_time} seconds")
            current = set(env.spec.get("ports", []))
            self._check_ports(add_ports)
            dup = sorted(current & set(add_ports))
            missing = sorted(set(remove_ports) - current)
            if dup:
                raise BadRequest(f"port(s) {dup} are already forwarded")
            if missing:
                raise BadRequest(f"port(s) {missing} are not forwarded by ENV {name!r}")
            if add_ports or remove_ports:
                self._change_ports(env, sorted(set(add_ports)), set(remove_ports))
            if life_time is not None:
                self.db.set_env(name, expires_at=time.time() + life_time)
        return self.get(name)

    def _change_ports(self, env: EnvRow, add: list[int], remove: set[int]) -> None:
        vms = [vm for vm in env.vms if vm.state in (RUNNING, STOPPED)]
        with self._admit_lock, self.db.transaction():
            fresh = self.ports.take(len(vms) * len(add), self.db.used_ports())
            plans = {vm.id: {g: fresh.pop() for g in add} for vm in vms}
        done: list[tuple[VMRow, int]] = []
        try:
            for vm in vms:
                if vm.state != RUNNING:
                    continue
                for guest, host in plans[vm.id].items():
                    self.io.add_forward(vm, guest, host)
                    done.append((vm, host))
                for guest in remove:
                    self.io.remove_forward(vm, vm.forwards[guest])
        except GuestError as exc:  # undo what was added; nothing changes on record
            for vm, host in done:
                try:
                    self.io.remove_forward(vm, host)
                except GuestError:
                    log.exception("undo forward %s on %s", host, vm.id)
            raise Conflict(f"cannot change ports of ENV {env.name!r}: {exc}") from exc
        for vm in vms:
            forwards = {g: h for g, h in vm.forwards.items() if g not in remove}
            self.db.set_vm(vm.id, forwards={**forwards, **plans[vm.id]})
        spec = {**env.spec, "ports": sorted((set(env.spec.get("ports", [])) - remove)
                                            | set(add))}
        self.db.set_env(env.name, spec=spec)

    def _teardown_vms(self, vms: list[VMRow], keep_rows: bool) -> None:
        for vm in vms:
            try:
                self.engine.destroy(vm.domain)
            except Exception:  # keep going: the disk and the rest must still go
                log.exception("destroying %s", vm.domain)
            self.booter.unpublish(vm)
            try:
                storage.remove_vm_dir(Path(vm.dir))
            except Exception:  # e.g. a busy subvolume: reconcile retries it at next start
                log.exception("removing %s", vm.dir)
            if keep_rows:
                # a failed VM holds nothing: zero its resources and ports in the record
                self.db.set_vm(vm.id, cpu=0, mem_mib=0, disk_mib=0, ssh_port=0, forwards={},
                               state=FAILED)

    # --- expiry and reconciliation -----------------------------------------------------
    def _reap_loop(self) -> None:
        rounds = 0
        while not self._stop.wait(self.cfg.reap_interval):
            rounds += 1
            try:
                self.reap_expired()
                if rounds % 30 == 0:
                    self.collect_templates()
            except Exception:
                log.exception("reaper")

    def collect_templates(self) -> list[str]:
        """Remove retired warm-clone templates that no VM disk is a clone of any more."""
        used = {b for vm in self.db.all_vms()
                if (Path(vm.dir) / "disk.qcow2").is_file()
                for b in [storage.backing_file(Path(vm.dir) / "disk.qcow2")] if b}
        return self.templates.collect(used)

    def reap_expired(self) -> list[str]:
        now = time.time()
        gone = []
        for env in self.db.list_envs():
            if env.expires_at <= now and env.state != DELETING:
                log.info("ENV %s expired; deleting", env.name)
                try:
                    self.delete(env.name)
                    gone.append(env.name)
                except NotFound:
                    pass
        return gone

    def reconcile(self) -> dict:
        """Make libvirt and the disk agree with SQLite after a (possibly unclean) restart."""
        report: dict[str, list[str]] = {"destroyed_domains": [], "removed_dirs": [],
                                        "cleaned_envs": [], "settled_envs": [],
                                        "lost_vms": []}
        for env in self.db.list_envs():
            if env.state in (CREATING, DELETING) or env.expires_at <= time.time():
                self._teardown_vms(env.vms, keep_rows=False)
                self.db.delete_env(env.name)
                report["cleaned_envs"].append(env.name)
            elif env.state in (STOPPING, STARTING):  # interrupted: settle on `stopped`
                self._settle_stopped(env.name, env.vms,
                                     f"{env.state} was interrupted by a server restart")
                report["settled_envs"].append(env.name)
        live = {vm.domain: vm for vm in self.db.all_vms() if vm.state == RUNNING}
        for name in self.engine.domains_with_prefix(self.domain_prefix):
            if name not in live:
                self.engine.destroy(name)
                report["destroyed_domains"].append(name)
        for vm in live.values():
            if not self.engine.is_running(vm.domain):  # its QEMU ended while we were away
                lost = f"VM {views.hostname(vm.env, vm.idx)} was gone after a server restart"
                self._teardown_vms([vm], keep_rows=True)  # it holds nothing any more
                self.db.set_vm(vm.id, error=lost)
                self.db.set_env(vm.env, error=lost)
                report["lost_vms"].append(vm.id)
        known = {Path(vm.dir).name for vm in self.db.all_vms()}
        if self.cfg.vms_path.is_dir():
            for d in self.cfg.vms_path.iterdir():
                if d.name not in known:
                    storage.remove_vm_dir(d)
                    report["removed_dirs"].append(d.name)
        if any(report.values()):
            log.info("reconciled: %s", report)
        return report
