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
import platform
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import accel as accel_mod
from . import agent, domainxml, images, sshexec, storage
from .config import ServerConfig
from .db import EnvRow, StateDB, VMRow
from .engine import BootTimeout, Engine, console_tail, qemu_user
from .errors import BadRequest, Conflict, InsufficientResources, NotFound, TTError
from .ports import PortPool

log = logging.getLogger(__name__)

ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
GUEST_PATH = re.compile(r"^/[^\0]{0,4095}$")
MAX_VMS_PER_ENV = 64
MAX_PARALLEL_RUNS = 16

# VM states
PENDING, BOOTING, RUNNING, FAILED = "pending", "booting", "running", "failed"
# ENV states
CREATING, READY, ENV_FAILED, DELETING = "creating", "running", "failed", "deleting"


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


@dataclass
class _Boot:
    cancel: threading.Event
    thread: threading.Thread


def _hostname(env: str, idx: int) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"{env.lower()}-{idx}")[:63]


def _vm_refs(vm: VMRow) -> set[str]:
    """Every way a client may name a VM: its id, its hostname or its index in the ENV."""
    return {vm.id, _hostname(vm.env, vm.idx), str(vm.idx)}


class EnvManager:
    def __init__(self, cfg: ServerConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.db = StateDB(cfg.db_file)
        self.server_id = self.db.server_id()
        self.engine = engine or Engine(cfg.libvirt_uri)
        self.ports = PortPool(cfg.forward_addr, cfg.port_first, cfg.port_last)
        self.uid, self.gid = qemu_user()
        self.ssh_pubkey = sshexec.ensure_key(cfg.ssh_key)
        self._admit_lock = threading.Lock()
        self._boots: dict[str, _Boot] = {}
        self._boots_lock = threading.Lock()
        self._accel: accel_mod.AccelChoice | None = None
        self._accel_lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # --- life of the manager ---------------------------------------------------------
    @property
    def domain_prefix(self) -> str:
        return f"tt-{self.server_id}-"

    def start_background(self) -> None:
        self.reconcile()
        threading.Thread(target=self.accel, name="accel-probe", daemon=True).start()
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        self._reaper.start()

    def stop_background(self) -> None:
        self._stop.set()

    def accel(self) -> accel_mod.AccelChoice:
        """The accelerator for host-arch guests, probed once (see accel.py)."""
        with self._accel_lock:
            if self._accel is None:
                native = [i for i in images.scan(self.cfg.image_path)
                          if i.name.arch == platform.machine()]
                kernel = native[0].kernel if native else None
                initrd = native[0].initrd if native else None
                choice = accel_mod.choose(self.cfg.accel, kernel, initrd,
                                          self.cfg.cfgdb_path / "accel.json")
                if kernel is None and self.cfg.accel == "auto":
                    return choice  # decide again once an image exists
                self._accel = choice
            return self._accel

    def _accel_for(self, arch: str) -> str:
        return self.accel().accel if arch == platform.machine() else "tcg"

    # --- status ----------------------------------------------------------------------
    def status(self) -> dict:
        used = self.db.used()
        choice = self._accel
        return {
            "server_id": self.server_id,
            "accel": choice.accel if choice else "probing",
            "accel_reason": choice.reason if choice else "",
            "cpu_total": self.cfg.cpu_total, "cpu_used": used["cpu"],
            "mem_total_mib": self.cfg.mem_total_mib, "mem_used_mib": used["mem_mib"],
            "disk_total_mib": self.cfg.disk_total_mib, "disk_used_mib": used["disk_mib"],
            "env_count": self.db.count_envs(),
            "images": [i.to_dict() for i in images.scan(self.cfg.image_path)],
        }

    # --- views -----------------------------------------------------------------------
    def _vm_view(self, vm: VMRow) -> dict:
        name = images.parse_image_name(vm.image) if vm.image.count(":") == 2 else None
        return {
            "id": vm.id, "name": _hostname(vm.env, vm.idx), "image": vm.image,
            "os": name.os if name else "", "arch": name.arch if name else "",
            "state": vm.state, "cpu": vm.cpu, "mem_mib": vm.mem_mib, "disk_mib": vm.disk_mib,
            "ssh_host": self.cfg.connect_addr, "ssh_port": vm.ssh_port,
            "ports": {str(k): v for k, v in vm.forwards.items()},
            "error": vm.error, "boot_seconds": vm.boot_seconds,
        }

    def _env_view(self, env: EnvRow) -> dict:
        return {"name": env.name, "state": env.state, "owner": env.owner,
                "created_at": env.created_at, "expires_at": env.expires_at,
                "error": env.error, "server_id": self.server_id,
                "vms": [self._vm_view(v) for v in env.vms]}

    def get(self, name: str) -> dict:
        return self._env_view(self._env(name))

    def list(self) -> list[dict]:
        return [self._env_view(e) for e in self.db.list_envs()]

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
        for port in req.ports:
            if not 1 <= port <= 65535 or port == 22:
                raise BadRequest(f"port {port}: give a guest TCP port 1-65535 (22 is always"
                                 " forwarded)")
        for key in req.ssh_keys:
            if "\n" in key.strip() or not key.strip().startswith(("ssh-", "ecdsa-", "sk-")):
                raise BadRequest("ssh_keys entries must be single OpenSSH public key lines")
        chosen = images.select(self.cfg.image_path, req.os_prefix)
        unsupported = [i.name.full for i in chosen if i.name.arch not in domainxml.ARCHES]
        if unsupported:
            raise BadRequest(f"no engine support for {', '.join(unsupported)}")
        return chosen

    def create(self, req: EnvRequest) -> dict:
        """Admit the ENV and start booting it in the background; returns the `creating` view."""
        chosen = self._validate(req)
        life = req.life_time if req.life_time is not None else self.cfg.default_life_time
        now = time.time()
        vms: list[VMRow] = []
        for image in chosen:
            for _ in range(req.vm_number):
                disk = max(req.disk_size or 0, image.size_mib)
                vm_id = f"{self.server_id}-{secrets.token_hex(4)}"
                vms.append(VMRow(id=vm_id, env=req.name, idx=len(vms), image=image.name.full,
                                 cpu=req.cpu_num, mem_mib=req.mem_size, disk_mib=disk,
                                 state=PENDING, domain=f"tt-{vm_id}",
                                 dir=str(self.cfg.vms_path / vm_id), ssh_port=0, forwards={}))
        need = {"cpu": sum(v.cpu for v in vms), "mem_mib": sum(v.mem_mib for v in vms),
                "disk_mib": sum(v.disk_mib for v in vms)}
        with self._admit_lock, self.db.transaction() as c:
            if self.db.get_env(req.name) is not None:
                raise Conflict(f"ENV {req.name!r} already exists; delete it or pick another name")
            used = self.db.used()
            totals = {"cpu": self.cfg.cpu_total, "mem_mib": self.cfg.mem_total_mib,
                      "disk_mib": self.cfg.disk_total_mib}
            short = [f"{k}: need {need[k]}, free {totals[k] - used[k]} of {totals[k]}"
                     for k in need if used[k] + need[k] > totals[k]]
            if short:
                raise InsufficientResources("not enough resources for ENV "
                                            f"{req.name!r} ({'; '.join(short)})")
            ports = self.ports.take(len(vms) * (1 + len(req.ports)), self.db.used_ports())
            for vm in vms:
                vm.ssh_port = ports.pop()
                vm.forwards = {p: ports.pop() for p in req.ports}
            spec = {"os_prefix": req.os_prefix, "vm_number": req.vm_number,
                    "cpu_num": req.cpu_num, "mem_size": req.mem_size,
                    "disk_size": req.disk_size, "life_time": life, "ports": req.ports,
                    "ssh_keys": req.ssh_keys}
            env = EnvRow(name=req.name, owner=req.owner, state=CREATING, created_at=now,
                         expires_at=now + life, spec=spec)
            self.db.insert_env(c, env)
            for vm in vms:
                self.db.insert_vm(c, vm)
        cancel = threading.Event()
        thread = threading.Thread(target=self._boot_env, args=(req.name, chosen, cancel),
                                  name=f"boot-{req.name}", daemon=True)
        with self._boots_lock:
            self._boots[req.name] = _Boot(cancel, thread)
        thread.start()
        return self.get(req.name)

    def _boot_env(self, name: str, chosen: list[images.Image], cancel: threading.Event) -> None:
        by_name = {i.name.full: i for i in chosen}
        env = self.db.get_env(name)
        if env is None:
            return
        try:
            with ThreadPoolExecutor(max_workers=len(env.vms)) as pool:
                results = list(pool.map(
                    lambda vm: self._boot_vm(vm, by_name[vm.image], env, cancel), env.vms))
            errors = [r for r in results if r]
            if cancel.is_set():
                return
            if errors:  # free everything first, then tell watchers it failed
                self._teardown_vms(self.db.vms_of(name), keep_rows=True)
                self.db.set_env(name, state=ENV_FAILED, error=errors[0])
            else:
                self.db.set_env(name, state=READY)
        except Exception as exc:  # never leave an ENV in `creating` behind a dead thread
            log.exception("boot of ENV %s failed", name)
            self._teardown_vms(self.db.vms_of(name), keep_rows=True)
            self.db.set_env(name, state=ENV_FAILED, error=f"internal error: {exc}")
        finally:
            with self._boots_lock:
                self._boots.pop(name, None)

    def _boot_vm(self, vm: VMRow, image: images.Image, env: EnvRow,
                 cancel: threading.Event) -> str:
        """Boot one VM; return "" or the error (which includes the console tail)."""
        vm_dir = Path(vm.dir)
        console = vm_dir / "console.log"
        try:
            if cancel.is_set():
                return "cancelled"
            storage.make_vm_dir(vm_dir, self.uid, self.gid)
            overlay = vm_dir / "disk.qcow2"
            grow = vm.disk_mib if vm.disk_mib > image.size_mib else None
            storage.create_overlay(image.disk, overlay, grow, self.uid, self.gid)
            hostfwd = [f"hostfwd=tcp:{self.cfg.forward_addr}:{vm.ssh_port}-:22"]
            hostfwd += [f"hostfwd=tcp:{self.cfg.forward_addr}:{h}-:{g}"
                        for g, h in vm.forwards.items()]
            spec = domainxml.DomainSpec(
                name=vm.domain, arch=image.name.arch, accel=self._accel_for(image.name.arch),
                vcpus=vm.cpu, mem_mib=vm.mem_mib, disk=str(overlay), kernel=str(image.kernel),
                initrd=str(image.initrd), cmdline=image.cmdline, console_log=str(console),
                netdev="user,id=ttnet0,restrict=on," + ",".join(hostfwd),
                uid=self.uid, gid=self.gid, title=f"ttstack {env.name}/{vm.idx}")
            if cancel.is_set():
                return "cancelled"
            self.db.set_vm(vm.id, state=BOOTING)
            self.engine.start(domainxml.render(spec))
            waited = self.engine.wait_agent(vm.domain, self.cfg.boot_timeout, console,
                                            cancel.is_set)
            self._personalize(vm, env)
            self.db.set_vm(vm.id, state=RUNNING, boot_seconds=round(waited, 2))
            return ""
        except (BootTimeout, agent.AgentError, RuntimeError, OSError) as exc:
            msg = str(exc)
            if "console tail" not in msg:
                msg += f"\nconsole tail:\n{console_tail(console)}"
            self.db.set_vm(vm.id, state=FAILED, error=msg)
            return f"VM {_hostname(env.name, vm.idx)} ({vm.image}): {msg}"
        except Exception as exc:  # libvirtError and friends
            msg = f"{type(exc).__name__}: {exc}\nconsole tail:\n{console_tail(console)}"
            self.db.set_vm(vm.id, state=FAILED, error=msg)
            return f"VM {_hostname(env.name, vm.idx)} ({vm.image}): {msg}"

    def _personalize(self, vm: VMRow, env: EnvRow) -> None:
        """Give the clone its hostname and authorized keys (server key + the user's)."""
        dom = self.engine.lookup(vm.domain)
        keys = "\n".join([self.ssh_pubkey, *env.spec.get("ssh_keys", [])]) + "\n"
        script = ('hostname "$1"; echo "$1" > /etc/hostname; '
                  'sed -i "s/^127.0.1.1 .*/127.0.1.1 $1/" /etc/hosts; '
                  'umask 077; mkdir -p /root/.ssh; cat > /root/.ssh/authorized_keys')
        res = agent.exec_argv(dom, ["/bin/sh", "-c", script, "sh", _hostname(env.name, vm.idx)],
                              timeout=30, stdin=keys.encode())
        if res.exit_code != 0:
            raise RuntimeError(f"guest set-up failed ({res.exit_code}): {res.stderr.strip()}")

    # --- delete ----------------------------------------------------------------------
    def delete(self, name: str) -> None:
        env = self._env(name)
        self.db.set_env(name, state=DELETING)
        with self._boots_lock:
            boot = self._boots.get(name)
        if boot:
            boot.cancel.set()
            boot.thread.join(timeout=60)
        self._teardown_vms(self.db.vms_of(env.name), keep_rows=False)
        self.db.delete_env(name)
        log.info("deleted ENV %s", name)

    def _teardown_vms(self, vms: list[VMRow], keep_rows: bool) -> None:
        for vm in vms:
            try:
                self.engine.destroy(vm.domain)
            except Exception:  # keep going: the disk and the rest must still go
                log.exception("destroying %s", vm.domain)
            storage.remove_vm_dir(Path(vm.dir))
            if keep_rows:
                # a failed VM holds nothing: zero its resources and ports in the record
                self.db.set_vm(vm.id, cpu=0, mem_mib=0, disk_mib=0, ssh_port=0, forwards={},
                               state=FAILED)

    # --- expiry and reconciliation -----------------------------------------------------
    def _reap_loop(self) -> None:
        while not self._stop.wait(self.cfg.reap_interval):
            try:
                self.reap_expired()
            except Exception:
                log.exception("reaper")

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
        report = {"destroyed_domains": [], "removed_dirs": [], "cleaned_envs": []}
        for env in self.db.list_envs():
            if env.state in (CREATING, DELETING) or env.expires_at <= time.time():
                self._teardown_vms(env.vms, keep_rows=False)
                self.db.delete_env(env.name)
                report["cleaned_envs"].append(env.name)
        live = {vm.domain: vm for vm in self.db.all_vms() if vm.state == RUNNING}
        for name in self.engine.domains_with_prefix(self.domain_prefix):
            if name not in live:
                self.engine.destroy(name)
                report["destroyed_domains"].append(name)
        for vm in live.values():
            if not self.engine.is_running(vm.domain):
                self.db.set_vm(vm.id, state=FAILED, error="VM was gone after a server restart")
        known = {Path(vm.dir).name for vm in self.db.all_vms()}
        if self.cfg.vms_path.is_dir():
            for d in self.cfg.vms_path.iterdir():
                if d.name not in known:
                    storage.remove_vm_dir(d)
                    report["removed_dirs"].append(d.name)
        if any(report.values()):
            log.info("reconciled: %s", report)
        return report

    # --- commands and files ----------------------------------------------------------
    def _running_vms(self, name: str, only: list[str] | None = None) -> list[VMRow]:
        """The ENV's running VMs, optionally narrowed to VM ids, names or indexes."""
        env = self._env(name)
        if env.state != READY:
            raise Conflict(f"ENV {name!r} is {env.state}, not running"
                           + (f": {env.error.splitlines()[0]}" if env.error else ""))
        vms = [vm for vm in env.vms if vm.state == RUNNING]
        if only:
            refs = set(only)
            picked = [vm for vm in vms if refs & _vm_refs(vm)]
            unknown = sorted(refs.difference(*map(_vm_refs, picked)))
            if unknown:
                raise NotFound(f"ENV {name!r} has no running VM {', '.join(unknown)}")
            vms = picked
        return vms

    def console(self, name: str, vm_ref: str, lines: int) -> str:
        env = self._env(name)
        for vm in env.vms:
            if vm_ref in _vm_refs(vm):
                return console_tail(Path(vm.dir) / "console.log", max(1, min(lines, 2000)))
        raise NotFound(f"ENV {name!r} has no VM {vm_ref!r}")

    def _fan_out(self, vms: list[VMRow], fn: Callable[[VMRow], dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_RUNS, max(1, len(vms)))) as pool:
            return list(pool.map(fn, vms))

    def run(self, name: str, cmd: str, use_ssh: bool, timeout: float,
            only: list[str] | None = None) -> list[dict]:
        if not cmd.strip():
            raise BadRequest("cmd is empty")
        if not 1 <= timeout <= 24 * 3600:
            raise BadRequest("timeout must be 1..86400 seconds")
        vms = self._running_vms(name, only)

        def one(vm: VMRow) -> dict:
            base = {"vm": _hostname(vm.env, vm.idx), "id": vm.id, "image": vm.image}
            try:
                if use_ssh:
                    res = sshexec.run(self.cfg.ssh_key, self.cfg.connect_addr, vm.ssh_port,
                                      cmd, timeout)
                else:
                    dom = self.engine.lookup(vm.domain)
                    if dom is None:
                        raise agent.AgentError("VM is not running")
                    res = agent.run_shell(dom, cmd, timeout)
                out = {**base, **res.to_dict(), "error": ""}
            except (agent.AgentError, OSError) as exc:
                out = {**base, "exit_code": None, "stdout": "", "stderr": "", "timed_out": False,
                       "seconds": 0.0, "error": f"{exc}\nconsole tail:\n"
                       f"{console_tail(Path(vm.dir) / 'console.log')}"}
            return out

        return self._fan_out(vms, one)

    def push(self, name: str, path: str, data: bytes, mode: int | None,
             only: list[str] | None = None) -> list[dict]:
        self._check_guest_path(path)
        vms = self._running_vms(name, only)

        def one(vm: VMRow) -> dict:
            base = {"vm": _hostname(vm.env, vm.idx), "id": vm.id}
            try:
                dom = self.engine.lookup(vm.domain)
                agent.write_file(dom, path, data)
                if mode is not None:
                    agent.exec_argv(dom, ["chmod", f"{mode:o}", path], timeout=30)
                return {**base, "bytes": len(data), "error": ""}
            except agent.AgentError as exc:
                return {**base, "bytes": 0, "error": str(exc)}

        return self._fan_out(vms, one)

    def pull(self, name: str, vm_ref: str, path: str) -> bytes:
        self._check_guest_path(path)
        vm = self._running_vms(name, [vm_ref])[0]
        try:
            return agent.read_file(self.engine.lookup(vm.domain), path)
        except agent.AgentError as exc:
            raise TTError(f"cannot read {path} from {vm_ref}: {exc}", status=404) from exc

    @staticmethod
    def _check_guest_path(path: str) -> None:
        if not GUEST_PATH.match(path):
            raise BadRequest(f"guest path {path!r} must be absolute")

