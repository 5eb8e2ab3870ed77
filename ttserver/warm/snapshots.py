"""Warm-clone templates: one booted-and-saved VM per (image, vCPUs, memory).

A template is a qcow2 overlay on the image ("frozen" once saved: read-only from then on)
plus the VM's memory and device state, written by QEMU's migration stream once the guest
finished booting and went quiet (`settle`). A warm clone is a new overlay on the frozen
disk and a QEMU started from that state: the guest is up in about a second instead of
30–50 under TCG. The clone then gets its own identity (hostname, machine-id, SSH host
key, clock; guest/identity.py).

The template of each image's default shape (DEFAULT_SHAPE: what an ENV gets when it asks
for no size) is built in the background when the server starts and whenever an image
appears or changes, one build at a time, its QEMU at a low CPU priority (nice 19, and an
eighth of a VM's CPU weight) so that it never slows a create down much; other shapes
are built the first time an ENV asks for one (those first VMs boot cold). Templates are
rebuilt when the image's files change, and retired — with a logged reason, the VM booting
cold instead — when a clone from one fails.

Imported cloud images get templates too: the template boots with a NoCloud seed of its
own and is saved only once cloud-init finished (`cloud-init status --wait`), so clones do
not repeat its first-boot work; each clone has a seed disk of its own at the same place
(its own instance-id: should it ever boot again, cloud-init sees a new instance) and
takes its identity from the helper like any clone.

A template cache (`--template-cache DIR`) shares builds between servers on one host (and
between the short-lived servers of a test suite): a finished build is published there as
hard links, and a server that has no template of a shape imports one by hard-linking it
into its own directory. Each server's clones name only its own links, so removing a cache
entry (stale, retired, superseded) never takes a disk from under a VM.

Every build gets its own directory (`KEY@BUILD`) that is never renamed or reused: clones'
overlays name its disk as their backing file, so a retired template stays on disk until
no VM (running or stopped) is a clone of it any more.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt

from ttclient.arches import by_name

from .. import images
from ..guest import agent, cloudseed, identity
from ..host import storage
from ..vm.libvirt_domains import Engine
from ..vm.spec import DomainRenderer

log = logging.getLogger(__name__)
MAX_PARALLEL_BUILDS = 1  # a build is a full boot; under TCG one at a time is plenty
# (vCPUs, MiB): the size of a VM whose ENV asks for none (EnvRequest's defaults)
DEFAULT_SHAPE = (1, 512)
# template builds yield the CPU to everything else: nice orders the QEMU's threads, the
# CPU weight the domain's cgroup against every other VM's (1024 each on cgroup v1): an
# eighth, not the least (2): the build's waits count wall time, and a starved build
# failing is not retried until its image changes
BUILD_NICE = 19
BUILD_CPU_SHARES = 128
# what a finished build is, linked into or out of the cache; meta.json last: its presence
# marks a build complete
BUILD_FILES = ("disk.qcow2", "memory.ram", "memory.bin", "meta.json")
# how a build keeps the guest's memory; builds of another layout are rebuilt.
# 5: as 4, the identity request comes on a virtio-serial port (guest/identity.py
# CHANNEL), not in a fw_cfg file; 4: as 3, saved once the boot was over and the guest
# idle (settle); 3: as 2, and the guest has the identity fw_cfg entry, which its clones'
# command lines must repeat; 2: RAM in memory.ram (mapped by clones), device state in
# memory.bin; 1 (no key): both in memory.bin's migration stream
LAYOUT = 5


@dataclass(frozen=True)
class Template:
    """One saved template build: its directory and whether the saved guest runs identity's
    helper."""

    dir: Path
    helper: bool = False  # the saved guest runs identity's helper (see guest/identity.py)

    @property
    def disk(self) -> Path:
        """The template's frozen qcow2 overlay, the backing file of its clones."""
        return self.dir / "disk.qcow2"

    @property
    def state(self) -> Path:
        """The saved device state clones start from."""
        return self.dir / "memory.bin"

    @property
    def ram(self) -> Path:
        """The guest's RAM as the template left it: clones map it privately
        (copy-on-write), so they start without reading it and share every page they
        have not written."""
        return self.dir / "memory.ram"


def _link_build(src: Path, dst: Path) -> None:
    """Hard-link a finished build's files from `src` into the directory `dst`."""
    for name in BUILD_FILES:
        os.link(src / name, dst / name)


def cloud_init_done(dom: libvirt.virDomain, timeout: float) -> None:
    """Wait until cloud-init finished its first boot in a template of a cloud image
    (`cloud-init status --wait`: 0 done, 2 done with recoverable errors); RuntimeError
    with its report otherwise."""
    res = agent.exec_argv(dom, ["cloud-init", "status", "--wait", "--long"], timeout=timeout)
    if res.exit_code not in (0, 2):
        raise RuntimeError(f"cloud-init did not finish in the template ({res.exit_code}): "
                           f"{(res.stdout + res.stderr).strip()[-500:]}")


# Runs in a template before it is saved, as root through the guest agent, within $1
# seconds: the boot's job queue empty (`systemctl is-system-running --wait`: "running", or
# "degraded" when a unit failed; at most half of $1, so that a unit stuck starting cannot
# fail the build), udev's coldplug events handled (`udevadm settle`, a quarter), then
# 0.5 s windows of /proc/stat (USER_HZ ticks: user nice system idle iowait irq softirq
# steal) until one is at least 90% idle (for at most a quarter), in one perl process
# (perl-base is in every Debian; a shell loop's head/sleep execs kept a TCG guest 40% busy
# by themselves). Prints one line: "idle after N windows" or "busy: P% idle" (saved
# anyway: each clone then finishes that work).
SETTLE = r"""
timeout $(($1 / 2)) systemctl is-system-running --wait >/dev/null 2>&1
udevadm settle --timeout=$(($1 / 4)) >/dev/null 2>&1
exec perl -e '
sub ticks {
    open(my $f, "<", "/proc/stat") or die "/proc/stat: $!";
    my (undef, @t) = split(" ", scalar <$f>);
    my $all = 0;
    $all += $_ for @t[0 .. 7];
    return ($all, $t[3]);
}
my ($total, $idle) = ticks();
my $share = 0;
for my $n (1 .. $ARGV[0]) {
    select(undef, undef, undef, 0.5);
    my ($t, $i) = ticks();
    $share = int(($i - $idle) * 100 / ($t - $total)) if $t > $total;
    ($total, $idle) = ($t, $i);
    if ($share >= 90) { print "idle after $n windows\n"; exit 0 }
}
print "busy: $share% idle\n";
' $(($1 / 2))
"""


def settle(dom: libvirt.virDomain, timeout: float) -> str:
    """Wait until a booting guest is done and idle (script SETTLE, through the guest
    agent), at most `timeout` s; the script's one-line report. A template saved before
    this (layout 3: as soon as its agent answered) was still starting units and loading
    modules: each of its clones spent about 4 s of a CPU on the rest of that boot after
    its restore (TCG, debian-12, 2026-12-01: the guest's /proc/stat 100% busy for 5 s,
    its vCPU thread ~4.2 CPU-s). An agent failure or timeout is reported, not raised."""
    budget = int(max(4, min(240, timeout - 20)))  # the script ends before the agent waits
    try:  # saving a busy guest only costs its clones time: never a reason to fail
        res = agent.exec_argv(dom, ["/bin/sh", "-c", SETTLE, "sh", str(budget)],
                              timeout=timeout)
    except agent.AgentError as exc:
        return f"not settled: {exc}"[:200]
    if res.timed_out:
        return f"not settled in {timeout:.0f}s"
    return (res.stdout.strip() or res.stderr.strip() or f"exit {res.exit_code}")[-200:]


class Templates:
    """Builds, finds and discards templates under `root` (cfgdb/templates)."""

    def __init__(self, root: Path, engine: Engine, uid: int, gid: int,
                 domain_prefix: str, boot_timeout: float,
                 renderer: DomainRenderer, cache: Path | None = None,
                 on_build: Callable[[], None] = lambda: None) -> None:
        self.root = root
        self.on_build = on_build  # called as a build starts (a metric counts them)
        self.cache = cache
        self.engine = engine
        self.uid, self.gid = uid, gid
        self.domain_prefix = domain_prefix
        self.boot_timeout = boot_timeout
        self.renderer = renderer
        self._lock = threading.Lock()
        self._building: dict[str, str] = {}  # key -> domain name
        self._errors: dict[str, str] = {}
        self._failed_prints: dict[str, str] = {}  # key -> image fingerprint its build failed on
        self._import_lock = threading.Lock()
        self._slots = threading.Semaphore(MAX_PARALLEL_BUILDS)
        self._stopping = threading.Event()

    @staticmethod
    def key(image: images.Image, cpu: int, mem_mib: int) -> str:
        """The template key of a shape: `IMAGE-<cpu>cpu-<mem_mib>m`."""
        return f"{image.name.full}-{cpu}cpu-{mem_mib}m"

    @staticmethod
    def _complete(d: Path) -> bool:
        return (d / "meta.json").is_file()

    @staticmethod
    def _retired(d: Path) -> bool:
        return (d / "retired").exists()

    def clean_partial(self) -> None:
        """At start-up (no build runs yet): remove builds that were interrupted, and
        cache publications abandoned more than an hour ago."""
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and not self._complete(d):
                    shutil.rmtree(d, ignore_errors=True)
        if self.cache is not None and self.cache.is_dir():
            for d in self.cache.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if time.time() - d.stat().st_mtime > 3600:
                        shutil.rmtree(d, ignore_errors=True)

    def _unusable(self, d: Path, image: images.Image) -> tuple[str, dict]:
        """Why the complete build `d` cannot serve clones of `image` ("" if it can), and
        its meta.json."""
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            return f"its meta.json is unreadable ({exc})", {}
        if meta.get("fingerprint") != image.digest():
            return "its image changed", meta
        if meta.get("layout", 1) != LAYOUT:
            return "it was saved in another layout (RAM, identity channel)", meta
        if meta.get("helper") not in ("", identity.HELPER_ID):
            return "it was saved with another identity helper", meta
        accel = self.renderer.accel.for_arch(image.name.arch)
        if meta.get("accel", accel) != accel:
            return f"it was saved under {meta['accel']}, VMs now run under {accel}", meta
        return "", meta

    def ready(self, image: images.Image, cpu: int, mem_mib: int) -> Template | None:
        """The newest usable template of this shape, if any: this server's own, else one
        imported from the template cache."""
        key = self.key(image, cpu, mem_mib)
        if self.root.is_dir():
            builds = sorted((d for d in self.root.glob(f"{key}@*")
                             if self._complete(d) and not self._retired(d)), reverse=True)
            for d in builds:
                reason, meta = self._unusable(d, image)
                if reason:
                    self.discard(Template(d), reason)
                    continue
                return Template(d, helper=bool(meta["helper"]))
        return self._import(image, key) if self.cache else None

    def _import(self, image: images.Image, key: str) -> Template | None:
        """Hard-link the newest usable cached build of `key` into this server's directory;
        stale cache entries are removed (they are links: no VM depends on them)."""
        assert self.cache is not None
        with self._import_lock:
            for d in sorted(self.cache.glob(f"{key}@*"), reverse=True):
                if not self._complete(d):
                    continue
                reason, meta = self._unusable(d, image)
                if reason:
                    log.info("dropping cached template %s: %s", d.name, reason)
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                mine = self.root / d.name
                if mine.exists():  # imported before and retired here since: not again
                    continue
                try:
                    storage.make_vm_dir(mine, self.uid, self.gid)
                    _link_build(d, mine)
                except OSError as exc:
                    log.warning("cannot import cached template %s (%s); building one",
                                d.name, exc)
                    shutil.rmtree(mine, ignore_errors=True)
                    return None
                log.info("template %s imported from the cache %s", d.name, self.cache)
                return Template(mine, helper=bool(meta["helper"]))
        return None

    def _publish(self, tpl: Template, key: str) -> None:
        """Put a finished build in the template cache (hard links, renamed into place:
        readers never see half of it) and drop the cache's older builds of its key."""
        if self.cache is None:
            return
        staging = self.cache / f".{tpl.dir.name}.{os.getpid()}.tmp"
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            _link_build(tpl.dir, staging)
            staging.rename(self.cache / tpl.dir.name)
        except OSError as exc:
            log.warning("cannot publish template %s to the cache %s: %s", tpl.dir.name,
                        self.cache, exc)
            shutil.rmtree(staging, ignore_errors=True)
            return
        for old in self.cache.glob(f"{key}@*"):
            if old.name < tpl.dir.name:
                shutil.rmtree(old, ignore_errors=True)

    def keep_warm(self, imgs: list[images.Image]) -> None:
        """Build, in the background, the default-shape template of every image in `imgs`
        that has none; an image whose build failed is tried again once its files change."""
        cpu, mem_mib = DEFAULT_SHAPE
        for image in imgs:
            key = self.key(image, cpu, mem_mib)
            with self._lock:
                if key in self._building or self._failed_prints.get(key) == image.digest():
                    continue
            if self.ready(image, cpu, mem_mib) is None:
                self.request(image, cpu, mem_mib)

    def discard(self, template: Template, reason: str) -> None:
        """Stop using a template. Its frozen disk may still back VMs (running or stopped),
        so it is only marked retired; collect() removes it once nothing uses it."""
        log.warning("retiring template %s: %s", template.dir.name, reason)
        with self._lock:
            self._errors[template.dir.name.split("@")[0]] = reason
        with contextlib.suppress(OSError):
            (template.dir / "retired").write_text(reason + "\n")
        if self.cache is not None:  # other servers must not import it either
            shutil.rmtree(self.cache / template.dir.name, ignore_errors=True)

    def collect(self, vm_dirs: list[Path]) -> list[str]:
        """Delete retired templates whose disk backs no VM overlay any more (`vm_dirs`:
        the directories of every VM on record); returns their folder names."""
        used_backings = {b for d in vm_dirs if (d / "disk.qcow2").is_file()
                         for b in [storage.backing_file(d / "disk.qcow2")] if b}
        gone = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith(".") and d.name.endswith(".gone"):  # a crash mid-way
                    shutil.rmtree(d, ignore_errors=True)
                elif (d.is_dir() and self._retired(d)
                        and str(Template(d).disk) not in used_backings):
                    # renamed first: a template is never seen (nor left by a crash) half
                    # removed, without its `retired` mark
                    doomed = d.with_name(f".{d.name}.gone")
                    try:
                        d.rename(doomed)
                    except OSError:
                        continue
                    shutil.rmtree(doomed, ignore_errors=True)
                    gone.append(d.name)
        return gone

    @staticmethod
    def supports(image: images.Image) -> bool:
        """Whether the image can have templates (ArchProfile.warm_templates: not on
        pseries and s390-ccw-virtio)."""
        return by_name(image.name.arch).warm_templates

    def request(self, image: images.Image, cpu: int, mem_mib: int) -> None:
        """Build the template in the background unless it exists or is being built, or
        the image cannot have one (supports())."""
        if not self.supports(image):
            return
        key = self.key(image, cpu, mem_mib)
        with self._lock:
            if key in self._building or self._stopping.is_set():
                return
            self._building[key] = f"{self.domain_prefix}tpl-" + hashlib.sha256(
                key.encode()).hexdigest()[:8]
        self.on_build()
        threading.Thread(target=self._build, args=(image, cpu, mem_mib, key),
                         name=f"template-{key}", daemon=True).start()

    def _build(self, image: images.Image, cpu: int, mem_mib: int, key: str) -> None:
        domain = self._building[key]
        work = self.root / f"{key}@{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}"
        started = time.monotonic()
        try:
            with self._slots:
                if self._stopping.is_set() or self.ready(image, cpu, mem_mib):
                    return
                shutil.rmtree(work, ignore_errors=True)
                storage.make_vm_dir(work, self.uid, self.gid)
                tpl = Template(work)
                storage.create_overlay(image.disk, tpl.disk, None, self.uid, self.gid)
                console = work / "console.log"
                seed = (cloudseed.make_seed(work, f"tt-template-{key}", "tt-template", [],
                                            self.uid, self.gid) if image.cloud_init else None)
                self.engine.start(self.renderer.render(domain, image, cpu, mem_mib, tpl.disk,
                                                       console, False, memory_file=tpl.ram,
                                                       memory_shared=True,
                                                       identity_channel=True,
                                                       seed=str(seed or "")))
                self.engine.lower_priority(domain, BUILD_NICE, BUILD_CPU_SHARES)
                self.engine.wait_agent(domain, self.boot_timeout, console,
                                       self._stopping.is_set)
                dom = self.engine.lookup(domain)
                if image.cloud_init:  # its first boot's work done, not left to each clone
                    cloud_init_done(dom, self.boot_timeout)
                settled = settle(dom, self.boot_timeout)
                helper = identity.HELPER_ID if identity.start_helper(
                    dom, image.name.arch) else ""
                agent.exec_argv(dom, ["/bin/sync"], timeout=60)
                self.engine.save_memory(dom, tpl.state)
                self.engine.destroy(domain)
                storage.set_owner(tpl.disk, mode=0o444)  # frozen: clones' overlays read it
                storage.set_owner(tpl.state, mode=0o444)
                # QEMU 7.2 opens a privately mapped file read-write (`rom=off` with a
                # read-only file needs 8.2): QEMU's user alone may open it
                storage.set_owner(tpl.ram, self.uid, self.gid, mode=0o600)
                meta = json.dumps({
                    "layout": LAYOUT,
                    "image": image.name.full, "cpu": cpu, "mem_mib": mem_mib,
                    "fingerprint": image.digest(), "created_at": time.time(), "helper": helper,
                    "accel": self.renderer.accel.for_arch(image.name.arch),
                    "build_seconds": round(time.monotonic() - started, 1)})
                (work / "meta.tmp").write_text(meta)
                (work / "meta.tmp").rename(work / "meta.json")  # complete from here on
                log.info("template %s ready in %.0fs (guest %s)", key,
                         time.monotonic() - started, settled)
                self._publish(tpl, key)
                with self._lock:
                    self._errors.pop(key, None)
                    self._failed_prints.pop(key, None)
        except Exception as exc:  # a template is an optimisation: log it, boot cold
            log.warning("template %s could not be built: %s", key, exc)
            with self._lock:
                self._errors[key] = str(exc).splitlines()[0] if str(exc) else repr(exc)
                self._failed_prints[key] = image.digest()
            self.engine.destroy(domain)
            shutil.rmtree(work, ignore_errors=True)
        finally:
            with self._lock:
                self._building.pop(key, None)

    def stop(self) -> None:
        """Server shutdown: abandon builds in flight (their domains go now)."""
        self._stopping.set()
        with self._lock:
            domains = list(self._building.values())
        for domain in domains:
            try:
                self.engine.destroy(domain)
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("destroying template build %s", domain)

    def status(self) -> list[dict]:
        """Templates for GET /status: a dict per ready build (key, build, state "ready" and
        its meta.json), per build in progress and per failed key (with `error`)."""
        out = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if not self._complete(d) or self._retired(d):
                    continue
                try:
                    meta = json.loads((d / "meta.json").read_text())
                except (OSError, ValueError):
                    continue
                out.append({"key": d.name.split("@")[0], "build": d.name, "state": "ready",
                            **meta})
        with self._lock:
            out += [{"key": k, "state": "building"} for k in self._building]
            out += [{"key": k, "state": "failed", "error": e} for k, e in self._errors.items()
                    if k not in self._building]
        return out
