"""Booting one VM: its disk (qcow2 overlay or filesystem clone), its domain, the wait
for its guest agent, its identity; warm (from a memory template) when one fits, cold
otherwise. The state the API shows (booting, running, failed) is recorded here, once per
transition; the ENV-level outcome is the manager's (envs.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ttclient.arches import by_name

from .. import images, views
from ..config import ServerConfig
from ..containers.machines import Containers
from ..db import EnvRow, StateDB, VMRow
from ..failpoints import crash_point
from ..guest import agent, cloudseed, identity
from ..host import binfmt, storage
from ..metrics import ServerMetrics
from ..states import BOOTING, FAILED, PENDING, RUNNING
from ..warm.snapshots import Template, Templates
from . import domainxml
from .libvirt_domains import BootTimeout, Engine, console_tail
from .network import VMNetwork
from .spec import DomainRenderer

log = logging.getLogger(__name__)

# a warm clone's agent answers within a second; more means the clone is broken
WARM_AGENT_TIMEOUT = 30.0
# Boots at once, server-wide (decisions 69, 78); a VM waiting for a slot stays `pending`
# and its boot timeout starts when its boot does. Under TCG a boot is CPU-bound for its
# whole length: a cold one holds a cold slot (--cold-boots; by default one per host CPU)
# from its domain's start until it runs; more at once only stretch every boot (6 cold on
# 2 cores: 232 s all at once, each boot 188-228 s; 139 s two at a time, each 40-48 s;
# measured, decision 78). A warm clone is done within seconds: it holds one of 4 clone
# slots per host CPU (at least 8), which a cold boot never holds, so cold boots never
# queue the clones of other ENVs.
CLONES_PER_CPU = 4


def restricted(env: EnvRow, allow_outgoing: bool) -> bool:
    """Outgoing traffic is cut unless the operator allows it and the ENV does not deny it."""
    return not allow_outgoing or bool(env.spec.get("deny_outgoing"))


def host_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container or a cgroup
    cpuset limits it, os.cpu_count() does not see that)."""
    return len(os.sched_getaffinity(0)) or 1


class Slots:
    """A counting semaphore that serves its waiters in the order they came (a thread
    polling `threading.Semaphore.acquire(timeout=...)` goes to the back of the queue on
    each time-out, so a big ENV's many waiters would keep a small ENV's one waiting), and
    that a waiter leaves as soon as one of its stop events is set."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._free = count
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        """Threads waiting for a slot now."""
        with self._cond:
            return len(self._queue)

    @contextmanager
    def held(self, *stop: threading.Event) -> Iterator[bool]:
        """Hold a slot for the block; yields False (holding none) when a `stop` event is
        set before this waiter's turn (or already is: then it does not wait)."""
        me = object()
        got = False
        with self._cond:
            self._queue.append(me)
            try:
                while not any(event.is_set() for event in stop):  # checked first: a
                    if self._queue[0] is me and self._free:  # stop set by the holder
                        self._free -= 1                      # before its release counts
                        got = True
                        break
                    self._cond.wait(0.2)  # a stop event does not notify: poll for it
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
        if not got:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


@dataclass
class VMBooter:
    """Boots VMs recorded in `db` (see the module docstring), as uid:gid."""

    cfg: ServerConfig
    db: StateDB
    engine: Engine
    renderer: DomainRenderer
    templates: Templates
    clones: storage.CloneStore | None
    network: VMNetwork
    ssh_pubkey: str
    uid: int
    gid: int
    metrics: ServerMetrics
    containers: Containers | None = None  # the lxc engine's, when the server offers it
    cold_slots: Slots = field(init=False)  # ServerConfig.cold_boots, or the host's CPUs
    clone_slots: Slots = field(init=False)

    def __post_init__(self) -> None:
        self.cold_slots = Slots(self.cfg.cold_boots or host_cpus())
        self.clone_slots = Slots(max(8, CLONES_PER_CPU * host_cpus()))

    def vm_xml(self, vm: VMRow, image: images.Image, env: EnvRow, disk: Path,
               template: Template | None = None) -> str:
        """The VM's domain XML: its forwards, network, title and seed (vmspec); for a
        clone of `template`, waiting for its saved state, its RAM the template's and its
        identity port (guest/identity.py)."""
        return self.renderer.render(
            vm.domain, image, vm.cpu, vm.mem_mib, disk, Path(vm.dir) / "console.log",
            template is not None, self.network.hostfwd(vm, self.cfg.forward_addr),
            restricted(env, self.cfg.allow_outgoing),
            f"ttstack {env.name}/{vm.idx}", user_net=self.network.name == "user",
            seed=str(Path(vm.dir) / cloudseed.SEED) if image.cloud_init else "",
            memory_file=template.ram if template is not None else None,
            identity_channel=template is not None)

    def unpublish(self, vm: VMRow) -> None:
        """Drop what the network publishes for the VM (errors are logged)."""
        self.network.unpublish(vm)

    def _wants_warm(self, env: EnvRow) -> bool:
        """Whether the ENV's new VMs start from templates: never with --no-warm-clones
        (an ENV's `warm: true` must not make a server keep templates its operator turned
        off) or a network variant that cannot clone; else as the ENV asks, by default
        yes."""
        if not self.network.warm_clones or not self.cfg.warm_clones:
            return False
        return env.spec.get("warm") is not False

    def boot(self, vm: VMRow, image: images.Image, env: EnvRow,
             cancel: threading.Event, fresh: bool, give_up: threading.Event) -> str:
        """Boot one VM (warm when a template fits, else cold), recording its state
        (booting, then running or failed) in the DB; "" or the error, which includes the
        console tail. `fresh`: a new VM (its disk is made); otherwise it restarts from the
        disk it kept when stopped. `cancel` set: give up ("cancelled"). Waits for a
        clone or cold slot (see CLONES_PER_CPU) as `pending`, and stops waiting
        ("cancelled", still `pending`) when `give_up` is set (another VM of the ENV
        failed). A boot that fails ends its domain."""
        vm_dir = Path(vm.dir)
        console = vm_dir / "console.log"

        def stopped() -> bool:
            return cancel.is_set() or give_up.is_set()

        try:
            if cancel.is_set():
                return "cancelled"
            if image.container:
                self._start_container(vm, image, env, fresh)
                return ""
            overlay = vm_dir / "disk.qcow2"
            if fresh:
                storage.make_vm_dir(vm_dir, self.uid, self.gid)
                if image.cloud_init:  # a clone has one too: its template's device, and
                    # cloud-init's per-instance run if the clone ever boots again
                    cloudseed.make_seed(vm_dir, vm.id, views.hostname(env.name, vm.idx),
                                        [self.ssh_pubkey, *env.spec.get("ssh_keys", [])],
                                        self.uid, self.gid)
                if self._wants_warm(env):
                    with self.clone_slots.held(cancel, give_up) as held:
                        if held and self._boot_warm(vm, image, env, cancel):
                            return ""
                if stopped():  # no cold boot after a warm clone given up for it
                    return "cancelled"
                grow = vm.disk_mib if vm.disk_mib > image.size_mib else None
                if self.clones:
                    base = self.clones.base_for(image.disk, image.digest())
                    self.clones.clone(base, vm_dir, grow, self.uid, self.gid)
                else:
                    storage.create_overlay(image.disk, overlay, grow, self.uid, self.gid)
                crash_point("boot.overlay_created")
            elif not overlay.is_file():
                raise RuntimeError(f"the VM's disk {overlay} is gone")
            with self.cold_slots.held(cancel, give_up) as held:
                if not held:
                    return "cancelled"
                try:
                    self._boot_cold(vm, image, env, overlay, cancel, stopped,
                                    (grow is not None) if fresh else None)
                    return ""
                except BaseException:  # the ENV fails: end the domain and tell the VMs
                    self._end_domain(vm)  # waiting for this slot before it is theirs
                    give_up.set()
                    raise
        except (BootTimeout, agent.AgentError, RuntimeError, OSError) as exc:
            self._end_domain(vm)
            msg = str(exc)
            if "console tail" not in msg:
                msg += f"\nconsole tail:\n{console_tail(console)}"
            self.db.set_vm(vm.id, state=FAILED, error=msg)
            return f"VM {views.hostname(env.name, vm.idx)} ({vm.image}): {msg}"
        except Exception as exc:  # libvirtError and friends
            self._end_domain(vm)
            msg = f"{type(exc).__name__}: {exc}\nconsole tail:\n{console_tail(console)}"
            self.db.set_vm(vm.id, state=FAILED, error=msg)
            return f"VM {views.hostname(env.name, vm.idx)} ({vm.image}): {msg}"

    def _start_container(self, vm: VMRow, image: images.Image, env: EnvRow,
                         fresh: bool) -> None:
        """Start the VM row's container (the lxc engine: ttserver/containers), new
        (`fresh`) or again on the files it kept when stopped, forward its ports and record
        it running; ContainerError or ForwardError (RuntimeErrors) when it cannot start."""
        if self.containers is None:  # the operator turned the engine off since
            raise RuntimeError(f"{image.name.full}: this server does not offer containers "
                               "(--engines)")
        if not fresh and not self.containers.spec(vm).disk.is_file():
            raise RuntimeError(f"the container's files ({vm.dir}) are gone")
        started = time.monotonic()
        self.db.set_vm(vm.id, state=BOOTING)
        profile = by_name(image.name.arch)
        if binfmt.needs_emulation(profile):  # its programs run through qemu-user
            binfmt.ensure(profile.qemu_user)
        self.containers.start(vm, image.rootfs, views.hostname(env.name, vm.idx),
                              self._keys(env), fresh)
        crash_point("boot.domain_started")
        self.containers.publish(vm)
        took = time.monotonic() - started
        self.db.set_vm(vm.id, state=RUNNING, error="", boot_mode="container",
                       boot_seconds=round(took, 2))
        self.metrics.boot_seconds.labels("container").observe(took)
        crash_point("boot.vm_running")

    def _boot_warm(self, vm: VMRow, image: images.Image, env: EnvRow,
                   cancel: threading.Event) -> bool:
        """Start the VM from its image's template; False (and a cold boot) when there is
        none yet (one gets built in the background), the disk must grow, or it fails."""
        if vm.disk_mib > image.size_mib:  # the saved guest knows its disk's size;
            return False                    # growing needs a boot
        if not self.templates.supports(image):  # no channel for the clone's identity
            return False
        template = self.templates.ready(image, vm.cpu, vm.mem_mib)
        self.metrics.template_events.labels("miss" if template is None else "hit").inc()
        if template is None:
            self.templates.request(image, vm.cpu, vm.mem_mib)
            return False
        overlay = Path(vm.dir) / "disk.qcow2"
        started = time.monotonic()
        new = identity.NewIdentity.make(views.hostname(env.name, vm.idx), self._keys(env))
        channel: identity.Channel | None = None
        try:  # a failure here is the template's: retire it
            storage.create_overlay(template.disk, overlay, None, self.uid, self.gid)
            crash_point("boot.overlay_created")
            if cancel.is_set():
                raise RuntimeError("cancelled")
            self.db.set_vm(vm.id, state=BOOTING)
            dom = self.network.start_clone(vm, self.vm_xml(vm, image, env, overlay, template),
                                           template.state,
                                           domainxml.nic_device(by_name(image.name.arch)),
                                           bool(env.spec.get("deny_outgoing")))
            crash_point("boot.domain_started")
            # the helper (resumed waiting on its port) starts on the request at once, in
            # parallel with the agent wait; the clock it sets is the time of this write
            channel = identity.Channel(self.engine.channel_path(dom, identity.CHANNEL)
                                       ) if template.helper else None
            if channel is not None:
                channel.offer(new)
            restored = time.monotonic()
            self.engine.wait_agent(vm.domain, WARM_AGENT_TIMEOUT,
                                   Path(vm.dir) / "console.log", cancel.is_set, interval=0.05)
        except Exception as exc:  # noqa: BLE001 - any failure: cold boot instead
            self._abandon_warm(vm, overlay, channel)
            if not cancel.is_set():
                self.templates.discard(template, f"clone {vm.id} failed: {exc}")
            log.warning("warm clone of %s failed, booting cold: %s", vm.id, exc)
            return False
        answered = time.monotonic()
        try:  # a failure here is the guest's or the host's load, not the template's
            self._personalize(vm, env, warm=(new, channel))
            self.network.wait_ready(vm, self.cfg.boot_timeout, Path(vm.dir) / "console.log",
                                    cancel)
        except Exception as exc:  # noqa: BLE001
            self._abandon_warm(vm, overlay, channel)
            log.warning("warm clone of %s could not take its identity, booting cold: %s",
                        vm.id, exc)
            return False
        if channel is not None:
            channel.close()
        log.info("warm clone %s: restore %.2fs, agent %.2fs, identity %.2fs", vm.id,
                 restored - started, answered - restored, time.monotonic() - answered)
        took = time.monotonic() - started
        self.db.set_vm(vm.id, state=RUNNING, error="", boot_mode="warm",
                       boot_seconds=round(took, 2))
        self.metrics.boot_seconds.labels("warm").observe(took)
        crash_point("boot.vm_running")
        return True

    def _boot_cold(self, vm: VMRow, image: images.Image, env: EnvRow, overlay: Path,
                   cancel: threading.Event, stopped: Callable[[], bool],
                   grow: bool | None) -> None:
        """Start the VM's domain on `overlay` and wait until it runs; BootTimeout when
        its agent has not answered once `stopped()` (the ENV failed or was deleted), and
        when `cancel` is set before its network is ready (the short wait after). `grow`
        is None for a VM that boots again from its kept disk, else whether its disk was
        grown (a new VM, which then gets its identity)."""
        console = Path(vm.dir) / "console.log"
        self.db.set_vm(vm.id, state=BOOTING)
        self.network.start_domain(vm, self.vm_xml(vm, image, env, overlay),
                                  domainxml.nic_device(by_name(image.name.arch)),
                                  bool(env.spec.get("deny_outgoing")))
        crash_point("boot.domain_started")
        waited = self.engine.wait_agent(vm.domain, self.cfg.boot_timeout, console, stopped)
        self.network.wait_ready(vm, self.cfg.boot_timeout - waited, console, cancel)
        if grow is not None:
            self._personalize(vm, env, grow=grow)
        self.db.set_vm(vm.id, state=RUNNING, boot_seconds=round(waited, 2), error="",
                       boot_mode="cold")
        self.metrics.boot_seconds.labels("cold").observe(waited)
        crash_point("boot.vm_running")

    def _end_domain(self, vm: VMRow) -> None:
        """After a failed boot: a domain started late (deleted meanwhile) must not stay,
        nor one that failed to boot keep a CPU busy until the ENV's teardown (which
        tries again when this fails)."""
        try:
            self.engine.destroy(vm.domain)
        except Exception as exc:  # noqa: BLE001 - logged; the teardown retries
            log.warning("could not end the domain of failed VM %s: %s", vm.id, exc)

    def _abandon_warm(self, vm: VMRow, overlay: Path,
                      channel: identity.Channel | None) -> None:
        if channel is not None:
            channel.close()
        self.db.set_vm(vm.id, state=PENDING)  # it waits for a cold slot now
        self.engine.destroy(vm.domain)
        self.network.unpublish(vm)  # the cold boot publishes again
        overlay.unlink(missing_ok=True)

    def _keys(self, env: EnvRow) -> str:
        """The VM's authorized_keys: the server's key and the ENV's."""
        return "\n".join([self.ssh_pubkey, *env.spec.get("ssh_keys", [])]) + "\n"

    def _personalize(self, vm: VMRow, env: EnvRow,
                     warm: tuple[identity.NewIdentity, identity.Channel | None] | None = None,
                     grow: bool = False) -> None:
        """Give the VM its hostname and authorized keys (server key + the user's), and with
        `grow` its root filesystem the grown disk; a warm clone (`warm`: its new identity,
        and the channel it was offered on when its template has the helper) also its own
        machine-id, SSH host key, clock and RNG (see guest/identity.py)."""
        dom = self.engine.lookup(vm.domain)
        if warm is None:
            identity.personalize(dom, views.hostname(env.name, vm.idx), self._keys(env),
                                 grow)
        else:  # many clones at once share the host's CPUs: the boot timeout applies
            new, channel = warm
            identity.take_new(dom, new, channel, timeout=self.cfg.boot_timeout)
            self.network.adopt(vm, dom, restricted(env, self.cfg.allow_outgoing),
                               timeout=self.cfg.boot_timeout)
