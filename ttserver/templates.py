"""Warm-clone templates: one booted-and-saved VM per (image, vCPUs, memory).

A template is a qcow2 overlay on the image ("frozen" once saved: read-only from then on)
plus the VM's memory and device state, written by QEMU's migration stream once the guest
agent answered. A warm clone is a new overlay on the frozen disk and a QEMU started from
that state: the guest is up in about a second instead of 30–50 under TCG. The clone then
gets its own identity (hostname, machine-id, SSH host key, clock) through the agent.

Templates are built in the background the first time an ENV asks for a warm VM of that
shape (those first VMs boot cold), rebuilt when the image's files change, and retired
— with a logged reason, the VM booting cold instead — when a clone from one fails.

Every build gets its own directory (`KEY@BUILD`) that is never renamed or reused: clones'
overlays name its disk as their backing file, so a retired template stays on disk until
no VM (running or stopped) is a clone of it any more.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import agent, identity, images, storage
from .engine import Engine
from .vmspec import DomainRenderer

log = logging.getLogger(__name__)
MAX_PARALLEL_BUILDS = 1  # a build is a full boot; under TCG one at a time is plenty


@dataclass(frozen=True)
class Template:
    """One saved template build: its directory and whether the saved guest runs identity's
    helper."""

    dir: Path
    helper: bool = False  # the saved guest runs identity's helper (see identity.py)

    @property
    def disk(self) -> Path:
        """The template's frozen qcow2 overlay, the backing file of its clones."""
        return self.dir / "disk.qcow2"

    @property
    def state(self) -> Path:
        """The saved memory and device state clones start from."""
        return self.dir / "memory.bin"


def fingerprint(image: images.Image) -> str:
    """Changes whenever the image's disk, kernel or initrd is replaced or touched."""
    parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
             for p in (image.disk, image.kernel, image.initrd)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class Templates:
    """Builds, finds and discards templates under `root` (cfgdb/templates)."""

    def __init__(self, root: Path, engine: Engine, uid: int, gid: int,
                 domain_prefix: str, boot_timeout: float,
                 renderer: DomainRenderer) -> None:
        self.root = root
        self.engine = engine
        self.uid, self.gid = uid, gid
        self.domain_prefix = domain_prefix
        self.boot_timeout = boot_timeout
        self.renderer = renderer
        self._lock = threading.Lock()
        self._building: dict[str, str] = {}  # key -> domain name
        self._errors: dict[str, str] = {}
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
        """At start-up (no build runs yet): remove builds that were interrupted."""
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and not self._complete(d):
                    shutil.rmtree(d, ignore_errors=True)

    def ready(self, image: images.Image, cpu: int, mem_mib: int) -> Template | None:
        """The newest usable template of this shape, if any."""
        if not self.root.is_dir():
            return None
        key = self.key(image, cpu, mem_mib)
        builds = sorted((d for d in self.root.glob(f"{key}@*")
                         if self._complete(d) and not self._retired(d)), reverse=True)
        for d in builds:
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("fingerprint") != fingerprint(image):
                self.discard(Template(d), "its image changed")
                continue
            if meta.get("helper") not in ("", identity.HELPER_ID):
                self.discard(Template(d), "it was saved with another identity helper")
                continue
            return Template(d, helper=bool(meta["helper"]))
        return None

    def discard(self, template: Template, reason: str) -> None:
        """Stop using a template. Its frozen disk may still back VMs (running or stopped),
        so it is only marked retired; collect() removes it once nothing uses it."""
        log.warning("retiring template %s: %s", template.dir.name, reason)
        with self._lock:
            self._errors[template.dir.name.split("@")[0]] = reason
        with contextlib.suppress(OSError):
            (template.dir / "retired").write_text(reason + "\n")

    def collect(self, vm_dirs: list[Path]) -> list[str]:
        """Delete retired templates whose disk backs no VM overlay any more (`vm_dirs`:
        the directories of every VM on record); returns their folder names."""
        used_backings = {b for d in vm_dirs if (d / "disk.qcow2").is_file()
                         for b in [storage.backing_file(d / "disk.qcow2")] if b}
        gone = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if (d.is_dir() and self._retired(d)
                        and str(Template(d).disk) not in used_backings):
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d.name)
        return gone

    def request(self, image: images.Image, cpu: int, mem_mib: int) -> None:
        """Build the template in the background unless it exists or is being built."""
        key = self.key(image, cpu, mem_mib)
        with self._lock:
            if key in self._building or self._stopping.is_set():
                return
            self._building[key] = f"{self.domain_prefix}tpl-" + hashlib.sha256(
                key.encode()).hexdigest()[:8]
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
                self.engine.start(self.renderer.render(domain, image, cpu, mem_mib, tpl.disk,
                                                       console, False))
                self.engine.wait_agent(domain, self.boot_timeout, console,
                                       self._stopping.is_set)
                dom = self.engine.lookup(domain)
                helper = identity.HELPER_ID if identity.start_helper(
                    dom, image.name.arch) else ""
                agent.exec_argv(dom, ["/bin/sync"], timeout=60)
                self.engine.save_memory(dom, tpl.state)
                self.engine.destroy(domain)
                tpl.disk.chmod(0o444)  # frozen: every clone's overlay reads it
                meta = json.dumps({
                    "image": image.name.full, "cpu": cpu, "mem_mib": mem_mib,
                    "fingerprint": fingerprint(image), "created_at": time.time(), "helper": helper,
                    "build_seconds": round(time.monotonic() - started, 1)})
                (work / "meta.tmp").write_text(meta)
                (work / "meta.tmp").rename(work / "meta.json")  # complete from here on
                log.info("template %s ready in %.0fs", key, time.monotonic() - started)
                with self._lock:
                    self._errors.pop(key, None)
        except Exception as exc:  # a template is an optimisation: log it, boot cold
            log.warning("template %s could not be built: %s", key, exc)
            with self._lock:
                self._errors[key] = str(exc).splitlines()[0] if str(exc) else repr(exc)
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
