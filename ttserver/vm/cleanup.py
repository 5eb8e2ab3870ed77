"""What keeps the host clean: tearing VMs down (domain, published ports, disk),
settling interrupted stop/start transitions, and reconciling libvirt and the disk with
the state DB after a (possibly unclean) restart. Uses no manager state, only the DB, the
engine and the booter's bridge publishing.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import views
from ..config import ServerConfig
from ..db import StateDB, VMRow
from ..failpoints import fail_point
from ..host import storage
from ..states import (
    CREATING,
    DELETING,
    ENV_STOPPED,
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
)
from .boot import VMBooter
from .libvirt_domains import Engine

log = logging.getLogger(__name__)

DESTROY_AT_ONCE = 8  # domains destroyed in parallel by one teardown


class Cleanup:
    """Tear-down and reconciliation for the VMs recorded in `db`."""

    def __init__(self, cfg: ServerConfig, db: StateDB, engine: Engine, booter: VMBooter,
                 domain_prefix: str) -> None:
        self.cfg = cfg
        self.db = db
        self.engine = engine
        self.booter = booter
        self.domain_prefix = domain_prefix

    def settle_stopped(self, name: str, vms: list[VMRow], error: str) -> None:
        """After a failed or interrupted start/stop: no domain runs, every VM that kept its
        disk is `stopped` (VMs that had failed before stay failed), the ENV is `stopped`."""
        for vm in vms:
            self.engine.destroy(vm.domain)
            if vm.state != FAILED or Path(vm.dir).is_dir():
                self.db.set_vm(vm.id, state=STOPPED)
        self.db.set_env(name, state=ENV_STOPPED, error=error)


    def teardown_vms(self, vms: list[VMRow], keep_rows: bool) -> list[str]:
        """Destroy each VM's domain, unpublish its ports, remove its directory (errors
        are logged, the rest goes on); `keep_rows`: keep the rows as `failed`, holding
        nothing (no resources, no ports). Returns why, for each VM whose QEMU could not
        be ended: such a VM keeps its row, disk and ports (a QEMU nobody accounts for
        must not exist), and the caller keeps its ENV to try again.

        The domains are destroyed in parallel (up to DESTROY_AT_ONCE): ending one QEMU
        takes libvirt and the kernel ~1.2-2 s here (measured: `virsh destroy` of a warm
        clone 1.23 s), so one after the other an ENV of N VMs took N times that."""
        stuck = []
        errors = dict(zip([vm.id for vm in vms], self._destroy_all(vms), strict=True))
        for vm in vms:
            exc = errors[vm.id]
            if exc is not None and self.engine.is_running(vm.domain):
                stuck.append(f"VM {views.hostname(vm.env, vm.idx)} could not be "
                             f"stopped: {exc}")
                continue
            self.booter.unpublish(vm)
            try:
                storage.remove_vm_dir(Path(vm.dir))
            except Exception:  # e.g. a busy subvolume: reconcile retries it at next start
                log.exception("removing %s", vm.dir)
            if keep_rows:
                # a failed VM holds nothing: zero its resources and ports in the record
                self.db.set_vm(vm.id, cpu=0, mem_mib=0, disk_mib=0, ssh_port=0, forwards={},
                               state=FAILED)
            else:
                self.db.delete_vm(vm.id)
        return stuck

    def _destroy_all(self, vms: list[VMRow]) -> list[Exception | None]:
        """engine.destroy for each VM's domain, at once; each VM's exception (logged) or
        None, in `vms` order."""
        def destroy(vm: VMRow) -> Exception | None:
            try:
                fail_point("teardown.destroy")
                self.engine.destroy(vm.domain)
                return None
            except Exception as exc:  # the other VMs still go
                log.exception("destroying %s", vm.domain)
                return exc

        if len(vms) <= 1:
            return [destroy(vm) for vm in vms]
        with ThreadPoolExecutor(max_workers=min(DESTROY_AT_ONCE, len(vms)),
                                thread_name_prefix="destroy") as pool:
            return list(pool.map(destroy, vms))

    def reconcile(self) -> dict:
        """Make libvirt and the disk agree with SQLite after a (possibly unclean) restart."""
        report: dict[str, list[str]] = {"destroyed_domains": [], "removed_dirs": [],
                                        "cleaned_envs": [], "settled_envs": [],
                                        "lost_vms": []}
        for env in self.db.list_envs():
            if env.state in (CREATING, DELETING) or env.expires_at <= time.time():
                stuck = self.teardown_vms(env.vms, keep_rows=False)
                if stuck:  # kept as `deleting`: the reaper tries again
                    self.db.set_env(env.name, state=DELETING, error="; ".join(stuck))
                    continue
                self.db.delete_env(env.name)
                report["cleaned_envs"].append(env.name)
            elif env.state in (STOPPING, STARTING):  # interrupted: settle on `stopped`
                self.settle_stopped(env.name, env.vms,
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
                self.teardown_vms([vm], keep_rows=True)  # it holds nothing any more
                self.db.set_vm(vm.id, error=lost)
                self.db.set_env(vm.env, error=lost)
                report["lost_vms"].append(vm.id)
        known = {Path(vm.dir).name for vm in self.db.all_vms()}
        if self.cfg.vms_path.is_dir():
            for d in self.cfg.vms_path.iterdir():
                if d.name not in known:
                    self.engine.destroy(f"tt-{d.name}")  # a container's: unmounted first
                    storage.remove_vm_dir(d)
                    report["removed_dirs"].append(d.name)
        if any(report.values()):
            log.info("reconciled: %s", report)
        return report
