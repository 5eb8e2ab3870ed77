"""ENV lifecycle: admission, parallel boot, stop/start/update, deletion, expiry,
reconciliation. The rules of admission are in admission.py, one VM's boot in vm/boot.py,
guest access in guest/ops.py, response shapes in views.py.

The rules that keep a host clean:
- admission (name, images, resources, ports) happens in one SQLite transaction, and the
  rows are written before any VM exists, so every created thing has a record;
- a failed boot tears down every VM of its ENV at once and keeps only the record and the
  error (with the console tail) for `tt env show`;
- at start-up, cleanup.reconcile() removes whatever has no live record: domains with our
  prefix, VM directories, half-created and expired ENVs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ttclient.audit import audit
from ttclient.rules import name_taken_error

from . import admission, images, views
from .admission import EnvRequest
from .config import ServerConfig
from .containers.forwards import ForwardError
from .containers.machines import Containers, MachineEngine, is_container
from .db import EnvRow, StateDB, VMRow
from .errors import BadRequest, Conflict, NotFound, TTError
from .failpoints import crash_point
from .guest import sshexec
from .guest.ops import GuestOps
from .guest.transport import GuestError, GuestIO
from .host import access, storage
from .host.ports import PortPool
from .host.ports import reserve as reserve_ports
from .metrics import ServerMetrics
from .states import (
    CREATING,
    DELETING,
    ENV_FAILED,
    ENV_STOPPED,
    PENDING,
    READY,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
)
from .vm import accel as accel_mod
from .vm import network
from .vm.boot import VMBooter, restricted
from .vm.cleanup import Cleanup
from .vm.libvirt_domains import Engine, console_tail, qemu_user
from .vm.spec import DomainRenderer
from .warm.snapshots import Templates

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 30.0
BOOT_STOP_TIMEOUT = 60.0  # seconds a delete waits for a cancelled boot to stop


@dataclass
class _Boot:
    cancel: threading.Event
    thread: threading.Thread


class EnvManager:
    """Every ENV of this server: admission, boot, stop/start/update, deletion and expiry,
    over the state DB, libvirt and the host's storage and network."""

    def __init__(self, cfg: ServerConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.db = StateDB(cfg.db_file)
        self.server_id = self.db.server_id()
        # the lxc engine (--engines ...,lxc): containers named and placed like VMs, which
        # the engine destroys and lists with its libvirt domains
        self.containers: Containers | None = None
        kept = sorted({vm.env for vm in self.db.all_vms() if is_container(vm)})
        if kept and "lxc" not in cfg.engines:  # without the engine they would be lost
            raise RuntimeError(f"ENVs with lxc containers are on record ({', '.join(kept)})"
                               ": start ttserver with --engines qemu,lxc (and delete them "
                               "first if the engine is to go)")
        if "lxc" in cfg.engines:
            self.containers = Containers(self.server_id, cfg.vms_path, cfg.forward_addr)
            self.containers.setup()  # CgroupError: the host cannot have containers
        self.engine = engine or (MachineEngine(cfg.libvirt_uri, self.containers)
                                 if self.containers else Engine(cfg.libvirt_uri))
        self.ports = PortPool(cfg.forward_addr, cfg.port_first, cfg.port_last)
        why = reserve_ports(cfg.port_first, cfg.port_last)
        if why:
            log.warning("could not reserve the forward ports %d-%d from outgoing connections "
                        "(%s): a VM whose port an outgoing connection took fails to boot; "
                        "add them to net.ipv4.ip_local_reserved_ports", cfg.port_first,
                        cfg.port_last, why)
        self.uid, self.gid = qemu_user()
        access.check_reachable(cfg.cfgdb_path, self.uid, self.gid, "--cfgdb-path")
        self.ssh_pubkey = sshexec.ensure_key(cfg.ssh_key)
        self.io = GuestIO(self.engine, cfg, self.containers)
        self.network = network.choose(cfg, self.engine, self.io.monitor, self.server_id,
                                      self.uid)
        self.guest = GuestOps(self.db, self.io)  # run, push, pull, console
        self.storage = storage.choose(cfg.storage, cfg.image_path, cfg.cfgdb_path)
        # a filesystem clone per VM (btrfs snapshot, ZFS clone) instead of a qcow2 overlay
        self.clones: storage.CloneStore | None = (
            storage.Btrfs(cfg.cfgdb_path / "bases") if self.storage == "btrfs"
            else storage.Zfs(cfg.cfgdb_path, self.server_id) if self.storage == "zfs" else None)
        self.accel = accel_mod.Accelerator(cfg.accel, cfg.image_path,
                                           cfg.cfgdb_path / "accel.json")
        self.renderer = DomainRenderer(self.accel, self.uid, self.gid, cfg.tcg_tb_cache_mib)
        self.metrics = ServerMetrics(lambda: {"envs": self.db.list_envs(), "cfg": self.cfg,
                                              "used": self.db.used()})
        builds = self.metrics.template_events.labels("build")
        self.templates = Templates(cfg.cfgdb_path / "templates", self.engine, self.uid,
                                   self.gid, self.domain_prefix, cfg.boot_timeout,
                                   self.renderer, cfg.template_cache, on_build=builds.inc)
        self.booter = VMBooter(cfg, self.db, self.engine, self.renderer, self.templates,
                               self.clones, self.network, self.ssh_pubkey, self.uid,
                               self.gid, self.metrics, self.containers)
        self.cleanup = Cleanup(cfg, self.db, self.engine, self.booter, self.domain_prefix)
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
        """`tt-<server id>-`: the prefix of every libvirt domain this server creates."""
        return f"tt-{self.server_id}-"

    def start_background(self) -> None:
        """Clean up after a previous run (partial templates, unrecorded domains and
        directories, stale clones), set up the bridge, and start the accelerator probe and
        the expiry reaper threads. The local-address guard comes first: VMs of an earlier
        run may be running already."""
        self.network.contain()
        self.templates.clean_partial()
        self.cleanup.reconcile()
        self.network.setup([(vm, bool(env.spec.get("deny_outgoing")))
                            for env in self.db.list_envs() for vm in env.vms
                            if vm.state == RUNNING and not is_container(vm)])
        if self.containers is not None:  # containers ran on: forward their ports again
            for vm in self.db.all_vms():
                if vm.state == RUNNING and is_container(vm):
                    try:
                        self.containers.publish(vm)
                    except ForwardError as exc:
                        log.warning("container %s: %s", vm.id, exc)
        self.collect_templates()
        if self.clones:
            self.clones.collect({f"{i.disk.parent.name}@{i.digest()}"
                                 for i in images.scan(self.cfg.image_path)},
                                {Path(vm.dir).name for vm in self.db.all_vms()})
        accel_mod.end_leftover_probes()
        threading.Thread(target=self.accel.choice, name="accel-probe", daemon=True).start()
        self.keep_warm()
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        self._reaper.start()

    def stop_background(self) -> None:
        """Stop the reaper and the template builds, and close the bridge network (and the
        local-address guard, unless VMs of this server still run)."""
        self._stop.set()
        accel_mod.stop_probes()
        self.templates.stop()
        if self.containers is not None:
            self.containers.close()
        self.network.close(sum(self.engine.is_running(vm.domain)
                               for vm in self.db.all_vms()))

    def _env_lock(self, name: str) -> threading.Lock:
        """Serialises the transitions of one ENV (stop, start, update, delete)."""
        with self._env_locks_lock:
            return self._env_locks.setdefault(name, threading.Lock())

    # --- status ----------------------------------------------------------------------
    def status(self) -> dict:
        """The server's view for GET /status: resources (CPUs, MiB) total and used, ENV
        count, images, accelerator, warm templates, network and storage."""
        return views.status_view(self.server_id, self.cfg, self.db.used(), self.db.count_envs(),
                                 self.accel.known,
                                 images.scan(self.cfg.image_path, self.cfg.engines),
                                 self.templates.status(), self.storage,
                                 self.booter.cold_slots.count)

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
    def create(self, req: EnvRequest) -> dict:
        """Admit the ENV and start booting it in the background; returns the `creating` view."""
        chosen = admission.validate(req, self.cfg)
        if req.counts is not None:
            chosen = [i for i in chosen if req.counts.get(i.name.full, 0) > 0]
        life = req.life_time if req.life_time is not None else self.cfg.default_life_time
        now = time.time()
        vms = admission.plan_vms(req, chosen, self.server_id, self.cfg.vms_path)
        need = admission.needs(vms)
        with self._admit_lock, self.db.transaction() as c:
            if (taken := self.db.name_like(req.name)) is not None:
                raise Conflict(name_taken_error(req.name, taken))
            if req.limited:
                admission.check_token_limits(self.db.held_by(req.owner), self.cfg, vms,
                                             req.owner)
            admission.check_room(self.db.used(), self.cfg, need, f"for ENV {req.name!r}")
            ports = self.ports.take(len(vms) * (1 + len(req.ports)), self.db.used_ports())
            for vm in vms:
                vm.ssh_port = ports.pop()
                vm.forwards = {p: ports.pop() for p in req.ports}
            # containers are not on the VM network (their own loopback only)
            self.network.assign([vm for vm in vms if not is_container(vm)],
                                 {v.net_addr for v in self.db.all_vms() if v.net_addr})
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

        # one VM that fails fails the ENV: the VMs still waiting for a boot slot
        # (boot.CLONES_PER_CPU) never boot, the booting ones stop waiting for their agent
        failed: list[str] = []
        give_up = threading.Event()

        def boot(vm: VMRow) -> None:
            error = self.booter.boot(vm, by_name[vm.image], env, cancel, fresh, give_up)
            if error and error != "cancelled":
                failed.append(error)
                give_up.set()

        at_once = self.booter.clone_slots.count + self.booter.cold_slots.count
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(len(todo), at_once))) as pool:
                list(pool.map(boot, todo))
            if cancel.is_set():
                return
            if not failed:
                self.db.set_env(name, state=READY, error="")
            else:
                self._boot_failed(name, fresh, failed[0])
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
            self.cleanup.teardown_vms(self.db.vms_of(name), keep_rows=True)
            self.db.set_env(name, state=ENV_FAILED, error=error)
            return
        self.cleanup.settle_stopped(name, self.db.vms_of(name), f"start failed: {error}")

    # --- delete ----------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Cancel any boot in flight, tear down every VM of the ENV and drop its records;
        NotFound when there is no such ENV. TTError 503 when a VM's QEMU could not be
        ended, or the boot did not stop within BOOT_STOP_TIMEOUT: the ENV stays
        (`deleting`, with the error), and the reaper tries again (after the boot ended)."""
        env = self._env(name)
        self.db.set_env(name, state=DELETING)
        crash_point("delete.marked")
        with self._boots_lock:
            boot = self._boots.get(name)
        if boot:
            boot.cancel.set()
            boot.thread.join(timeout=BOOT_STOP_TIMEOUT)
            if boot.thread.is_alive():  # in a step that cannot be interrupted: tearing
                # down now would race it (a domain or disk made after the teardown)
                error = (f"its boot has not stopped after {BOOT_STOP_TIMEOUT:.0f}s (a step "
                         "that cannot be interrupted); the delete finishes once it has")
                self.db.set_env(name, state=DELETING, error=error)
                raise TTError(f"ENV {name!r} is not deleted yet: {error}", status=503)
        with self._env_lock(name):  # a stop or update in flight finishes first
            stuck = self.cleanup.teardown_vms(self.db.vms_of(env.name), keep_rows=False)
            if stuck:
                error = "; ".join(stuck)
                self.db.set_env(name, state=DELETING, error=error)
                raise TTError(f"ENV {name!r} is not deleted yet: {error}; the server tries "
                              "again every few seconds", status=503)
            crash_point("delete.torn_down")
            self.db.delete_env(name)
        with self._env_locks_lock:
            self._env_locks.pop(name, None)
        log.info("deleted ENV %s", name)

    def kick(self, name: str, refs: list[str]) -> dict:
        """Remove the VMs `refs` names (name, id or index) from a running or stopped ENV:
        their domains, disks, ports and records go, the rest stays; the ENV view.
        NotFound for a name that is no VM of it; Conflict for all of its VMs (delete the
        ENV instead) or an ENV in transition; TTError 503 for a QEMU that did not end."""
        with self._env_lock(name):
            env = self._env(name)
            if env.state not in (READY, ENV_STOPPED):
                raise Conflict(f"ENV {name!r} is {env.state}; remove VMs when it is running "
                               "or stopped")
            gone = [ref for ref in refs if not any(ref in views.vm_refs(vm) for vm in env.vms)]
            if gone:
                raise NotFound(f"ENV {name!r} has no VM {', '.join(map(repr, gone))} (its "
                               f"VMs: {', '.join(views.hostname(name, v.idx) for v in env.vms)})")
            kicked = [vm for vm in env.vms if views.vm_refs(vm) & set(refs)]
            if len(kicked) == len(env.vms):
                raise Conflict(f"that is every VM of ENV {name!r}: delete the ENV instead "
                               f"('tt env del {name}')")
            stuck = self.cleanup.teardown_vms(kicked, keep_rows=False)
            if stuck:
                raise TTError(f"not every VM was removed: {'; '.join(stuck)}", status=503)
        log.info("removed %s from ENV %s", ", ".join(vm.id for vm in kicked), name)
        return self.get(name)

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
            scanned = {i.name.full: i for i in images.scan(self.cfg.image_path,
                                                           self.cfg.engines)}
            todo = [vm for vm in env.vms if vm.state == STOPPED]
            gone = sorted({vm.image for vm in todo} - scanned.keys())
            if gone:
                raise Conflict(f"ENV {name!r} cannot start: image(s) {', '.join(gone)} are no"
                               " longer on this server")
            need = {"cpu": sum(v.cpu for v in todo), "mem_mib": sum(v.mem_mib for v in todo)}
            with self._admit_lock, self.db.transaction():
                admission.check_room(self.db.used(), self.cfg, need,
                                     f"to start ENV {name!r}")
                for vm in todo:
                    self.db.set_vm(vm.id, state=PENDING)
                self.db.set_env(name, state=STARTING, error="")
            self._spawn_boot(name, [scanned[i] for i in {vm.image for vm in todo}],
                             fresh=False)
        return self.get(name)

    def update(self, name: str, life_time: int | None = None,
               add_ports: list[int] | None = None,
               remove_ports: list[int] | None = None, cpu: int | None = None,
               mem_mib: int | None = None, limited: bool = False) -> dict:
        """New expiry (`life_time` seconds from now) and exposed ports; ports change live
        on running VMs (QEMU hostfwd) and are kept for stopped ones. `cpu`/`mem_mib`: new
        vCPUs and memory of every VM of a stopped ENV, used from its next start (Conflict
        otherwise); `limited`: the owner's token limits apply."""
        add_ports, remove_ports = add_ports or [], remove_ports or []
        if (life_time is None and not add_ports and not remove_ports and cpu is None
                and mem_mib is None):
            raise BadRequest("nothing to update: give life_time, add_ports, remove_ports, "
                             "cpu_num or mem_size")
        with self._env_lock(name):
            env = self._env(name)
            if env.state not in (READY, ENV_STOPPED):
                raise Conflict(f"ENV {name!r} is {env.state}; update it when it is running"
                               " or stopped")
            admission.check_update(env, self.cfg, life_time, add_ports, remove_ports,
                                   time.time())
            if cpu is not None or mem_mib is not None:
                self._resize(env, cpu, mem_mib, limited)
            if add_ports or remove_ports:
                self._change_ports(env, sorted(set(add_ports)), set(remove_ports))
            if life_time is not None:
                self.db.set_env(name, expires_at=time.time() + life_time)
        return self.get(name)

    def _resize(self, env: EnvRow, cpu: int | None, mem_mib: int | None,
                limited: bool) -> None:
        """New vCPUs/memory for the VMs of a stopped ENV (checked against the server's
        totals and the token's limits now, reserved at start)."""
        if env.state != ENV_STOPPED:
            raise Conflict(f"ENV {env.name!r} is {env.state}: CPU and memory change only "
                           f"while it is stopped ('tt env stop {env.name}' first)")
        if mem_mib is not None and mem_mib < 128:
            raise BadRequest("mem_size must be >= 128 MiB")
        resized = [dataclasses.replace(vm, cpu=cpu or vm.cpu, mem_mib=mem_mib or vm.mem_mib)
                   for vm in env.vms]
        with self._admit_lock, self.db.transaction():
            admission.check_room({"cpu": 0, "mem_mib": 0, "disk_mib": 0}, self.cfg,
                                 admission.needs(resized), f"for ENV {env.name!r}")
            if limited:
                held = self.db.held_by(env.owner)
                mine = sum(vm.mem_mib for vm in env.vms)
                admission.check_token_limits(
                    {"vms": held["vms"] - len(env.vms), "mem_mib": held["mem_mib"] - mine},
                    self.cfg, resized, env.owner)
            for vm in resized:
                self.db.set_vm(vm.id, cpu=vm.cpu, mem_mib=vm.mem_mib)

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
                    self._add_forward(vm, guest, host)
                    done.append((vm, host))
                for guest in remove:
                    self._remove_forward(vm, vm.forwards[guest])
        except GuestError as exc:  # undo what was added; nothing changes on record
            for vm, host in done:
                try:
                    self._remove_forward(vm, host)
                except GuestError:
                    log.exception("undo forward %s on %s", host, vm.id)
            raise Conflict(f"cannot change ports of ENV {env.name!r}: {exc}") from exc
        for vm in vms:
            forwards = {g: h for g, h in vm.forwards.items() if g not in remove}
            self.db.set_vm(vm.id, forwards={**forwards, **plans[vm.id]})
        spec = {**env.spec, "ports": sorted((set(env.spec.get("ports", [])) - remove)
                                            | set(add))}
        self.db.set_env(env.name, spec=spec)

    def _add_forward(self, vm: VMRow, guest: int, host: int) -> None:
        """Forward `host` to `guest` on a running VM (its network variant) or container;
        GuestError."""
        if self.containers is not None and is_container(vm):
            try:
                self.containers.add_forward(vm, guest, host)
            except ForwardError as exc:
                raise GuestError(str(exc)) from None
        else:
            self.network.add_forward(vm, guest, host)

    def _remove_forward(self, vm: VMRow, host: int) -> None:
        """Stop forwarding `host` to a VM or container; GuestError."""
        if self.containers is not None and is_container(vm):
            self.containers.remove_forward(vm, host)
        else:
            self.network.remove_forward(vm, host)

    # --- expiry and reconciliation -----------------------------------------------------
    def _reap_loop(self) -> None:
        rounds = 0
        while not self._stop.wait(self.cfg.reap_interval):
            rounds += 1
            try:
                self.reap_expired()
                self.notice_powered_off()
                if rounds % 15 == 0:
                    self.keep_warm()
                if rounds % 30 == 0:
                    self.collect_templates()
            except Exception:
                log.exception("reaper")

    def keep_warm(self) -> None:
        """With warm clones on (and user networking: bridge-mode VMs boot cold), have
        every VM image's default-shape template built (in the background;
        warm/snapshots.py); none on a server that offers no VMs (`--engines lxc`)."""
        if self.cfg.warm_clones and self.network.warm_clones and "qemu" in self.cfg.engines:
            self.templates.keep_warm(images.scan(self.cfg.image_path))

    def collect_templates(self) -> list[str]:
        """Remove retired warm-clone templates that no VM disk is a clone of any more."""
        return self.templates.collect([Path(vm.dir) for vm in self.db.all_vms()])

    def _booting(self, name: str) -> bool:
        """True while a boot thread of the ENV runs (a delete waits for it to end)."""
        with self._boots_lock:
            boot = self._boots.get(name)
        return boot is not None and boot.thread.is_alive()

    def notice_powered_off(self) -> list[str]:
        """VMs of running ENVs whose QEMU ended (the guest powered off, or QEMU died): each
        becomes `stopped` with the reason and its console tail, gives its CPU and memory
        back and keeps its disk and ports, as `stop` leaves a VM; an ENV with no running
        VM left becomes `stopped` (a start boots it again). ENVs being changed or booted
        are left to the next round. The VM ids."""
        active = set(self.engine.active_domains(self.domain_prefix))
        noticed: list[str] = []
        for env in self.db.list_envs():
            if env.state != READY or not any(vm.state == RUNNING and vm.domain not in active
                                             for vm in env.vms):
                continue
            lock = self._env_lock(env.name)
            if self._booting(env.name) or not lock.acquire(blocking=False):
                continue
            try:
                noticed += self._settle_powered_off(env.name)
            finally:
                lock.release()
        return noticed

    def _settle_powered_off(self, name: str) -> list[str]:
        env = self.db.get_env(name)  # again, under the ENV's lock
        if env is None or env.state != READY:
            return []
        noticed, reason = [], ""
        for vm in env.vms:
            if vm.state != RUNNING or self.engine.is_running(vm.domain):
                continue
            at = time.strftime('%H:%M:%S', time.gmtime())
            reason = (f"VM {views.hostname(vm.env, vm.idx)} powered off at {at} UTC "
                      + ("(its container ended: its init or nspawn died)" if is_container(vm)
                         else "(its QEMU ended: the guest shut down, or QEMU died)")
                      + f"; console tail:\n{console_tail(Path(vm.dir) / 'console.log', 10)}")
            log.warning("ENV %s: VM %s powered off", name, vm.id)
            self.engine.destroy(vm.domain)  # transient: normally gone already
            self.booter.unpublish(vm)
            self.db.set_vm(vm.id, state=STOPPED, error=reason)
            noticed.append(vm.id)
        if noticed:
            left = [vm for vm in env.vms if vm.state == RUNNING and vm.id not in noticed]
            self.db.set_env(name, state=READY if left else ENV_STOPPED,
                            error=reason.splitlines()[0])
        return noticed

    def reap_expired(self) -> list[str]:
        """Delete every ENV past its expiry, and retry deletes that could not end a VM;
        the names deleted."""
        now = time.time()
        gone = []
        for env in self.db.list_envs():
            stuck = env.state == DELETING and env.error and not self._env_lock(
                env.name).locked() and not self._booting(env.name)  # a delete that
            # could not end a VM or waited for its boot: try again
            if (env.expires_at <= now and env.state != DELETING) or stuck:
                log.info("ENV %s %s; deleting", env.name, "expired" if not stuck else
                         "still holds a VM")
                try:
                    self.delete(env.name)
                    gone.append(env.name)
                    if not stuck:
                        self.metrics.env_events.labels("expire").inc()
                        audit("expire", env=env.name, token=env.owner, source="reaper",
                              images=sorted({vm.image for vm in env.vms}),
                              vms=len(env.vms))
                except (NotFound, TTError) as exc:
                    if not isinstance(exc, NotFound):
                        log.warning("%s", exc)
        return gone
