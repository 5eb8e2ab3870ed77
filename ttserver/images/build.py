"""Build bootable Debian images with mmdebstrap, without loop mounts or root filesystems on
the host: mmdebstrap makes a directory tree, `mkfs.ext4 -d` turns it into a disk, `qemu-img`
makes that a qcow2 base, and the kernel/initrd are kept beside it for direct kernel boot.

Image policy (documented in docs/images.md): root has no password; SSH accepts keys only;
ttserver injects the server key and the user's keys through the guest agent at boot. Host keys
and machine-id are created on each VM's first boot, so clones never share them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import IO, Any

from ttclient import arches
from ttclient.imagenames import ImageName, parse_image_name

from ..host import binfmt
from . import DEFAULT_CMDLINE, DISK, INITRD, KERNEL, install, lxc, read_meta

SUITES = {"debian-11": "bullseye", "debian-12": "bookworm", "debian-13": "trixie",
          "debian-sid": "sid"}
# python3-venv, python3-dev, gcc and libc6-dev: native mode makes a venv in the guest and
# builds sdists and C extensions there (the guest has no network; see pytest_ttstack).
PACKAGES = ["systemd-sysv", "udev", "openssh-server", "qemu-guest-agent", "python3",
            "python3-venv", "python3-dev", "gcc", "libc6-dev", "iproute2", "coreutils",
            "e2fsprogs"]  # resize2fs: --disk-size grows the root filesystem at first boot
# What a built image contains besides its suite and arch: a cached image whose meta.json
# names another recipe is rebuilt by `build`, so a changed package list reaches every host.
RECIPE = hashlib.sha256(json.dumps(PACKAGES).encode()).hexdigest()[:12]
# Docs and manuals are dead weight in a throwaway VM and slow every build.
DPKG_EXCLUDES = ["path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
                 "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/locale/*",
                 "path-include=/usr/share/locale/locale.alias"]
MASKED_UNITS = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "fstrim.timer", "man-db.timer", "systemd-networkd-wait-online.service"]

# A small initramfs with just the virtio and ext4 modules unpacks and runs in a fraction
# of the time of the default "most" set under TCG. Written before the kernel is installed.
# (virtio_ccw: s390x's virtio transport; a module a kernel lacks or has built in is skipped)
INITRAMFS_MODULES = ["virtio_pci", "virtio_mmio", "virtio_ccw", "virtio_blk", "virtio_net",
                     "virtio_console", "virtio_rng", "ext4"]
INITRAMFS_HOOK = ('mkdir -p "$1/etc/initramfs-tools/conf.d" && '
                  'echo MODULES=list > "$1/etc/initramfs-tools/conf.d/ttstack" && '
                  f'printf "%s\\n" {" ".join(INITRAMFS_MODULES)}'
                  ' >> "$1/etc/initramfs-tools/modules"')

HOSTKEYS_UNIT = """[Unit]
Description=Create this VM's own SSH host keys (clones must not share them)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=multi-user.target
"""

NETWORK_UNIT = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""


class BuildError(RuntimeError):
    """An image cannot be built or imported: a step failed (the message has the tail of its
    output), timed out or is missing its tool, or the OS is not buildable."""
    pass


def _say(msg: str, what: str = "") -> None:
    print(f"[image build{' ' + what if what else ''}] {msg}", file=sys.stderr, flush=True)


def host_mirror() -> str:
    """The Debian mirror this host already uses, so builds go where apt goes."""
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if src.is_file():
        m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", src.read_text(), re.M)
        if m:
            return m.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        m = re.search(r"^deb\s+(\S+/debian)/?\s", legacy.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def _enable(root: Path, unit: str, target: str, src_dir: str = "/lib/systemd/system") -> None:
    """`systemctl enable` by hand: works for foreign-arch trees without emulation."""
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if not link.exists():
        link.symlink_to(f"{src_dir}/{unit}")


def customize(root: Path, hostname: str = "tt") -> None:
    """Turn a plain Debian tree into a ttstack guest (see module docstring for policy)."""
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults,noatime 0 1\n")
    (root / "etc/hostname").write_text(hostname + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n")
    netdir = root / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    (netdir / "10-ttstack.network").write_text(NETWORK_UNIT)
    _enable(root, "systemd-networkd.service", "multi-user.target")
    _enable(root, "systemd-networkd.socket", "sockets.target")
    (root / "etc/systemd/system/ttstack-hostkeys.service").write_text(HOSTKEYS_UNIT)
    _enable(root, "ttstack-hostkeys.service", "multi-user.target", "/etc/systemd/system")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/dev/null")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")  # systemd makes a fresh one per VM
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    sshd_conf = root / "etc/ssh/sshd_config.d"
    sshd_conf.mkdir(parents=True, exist_ok=True)
    (sshd_conf / "ttstack.conf").write_text(
        # ed25519 only: RSA host key generation alone costs ~40 s of boot under TCG
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n")
    (root / "root/.ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["passwd", "--root", str(root), "--lock", "root"], check=False,
                   capture_output=True)


# process groups of the steps running now (several with `build --all-arches`), so an
# interrupted build kills every one of them, not just the main thread's
_RUNNING: set[int] = set()
_RUNNING_LOCK = threading.Lock()


def kill_running_steps() -> None:
    """Kill the process group of every build step still running (SIGKILL)."""
    with _RUNNING_LOCK:
        groups = list(_RUNNING)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


TICK = 30.0  # seconds between run_step's `tick` calls


ERROR_LINES_KEPT = 1000  # of a step's standard error (mmdebstrap --verbose writes much)


def run_step(cmd: list[str], timeout: float, what: str,
             progress: Callable[[str], None] | None = None,
             tick: Callable[[], None] | None = None) -> str:
    """Run an image build or import step in its own process group and return its standard
    output: on timeout the whole group goes (a hung mkinitramfs under qemu-user is a
    grandchild, which subprocess.run would leave). `progress` gets every line of either
    stream as it comes; `tick` is called every TICK seconds while it runs. BuildError
    (with the output's tail) when the step fails, times out or is not installed."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} is not installed ({what})") from exc
    with _RUNNING_LOCK:
        _RUNNING.add(proc.pid)
    out_lines: list[str] = []  # returned whole; of the errors only a tail is ever shown
    err_lines: collections.deque[str] = collections.deque(maxlen=ERROR_LINES_KEPT)

    def read(stream: IO[str], into: list[str] | collections.deque[str]) -> None:
        for line in stream:
            into.append(line)
            if progress is not None:
                progress(line.rstrip("\n"))

    assert proc.stdout is not None and proc.stderr is not None
    readers = [threading.Thread(target=read, args=(proc.stdout, out_lines), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, err_lines), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                proc.wait(timeout=max(0.0, min(TICK, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
                if tick is not None:
                    tick()
        for reader in readers:
            reader.join()
    except BaseException as exc:  # timeout, Ctrl-C, SIGTERM (see image_main)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for reader in readers:
            reader.join(timeout=10)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BuildError(f"{what} did not finish within {timeout:.0f}s") from exc
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc.pid)
    out, err = "".join(out_lines), "".join(err_lines)
    if proc.returncode != 0:
        tail = "\n".join((err or out).splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return out


def _release_mounts(work: Path) -> None:
    """Unmount whatever an interrupted mmdebstrap left mounted in the tree (/proc, /sys,
    /dev/pts, ...), deepest first, before anything deletes it: rmtree must never walk
    into a live /sys or /dev."""
    prefix = str(work.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)


def remove_tree(work: Path) -> None:
    """Unmount what is mounted under the build tree `work`, then delete it (errors ignored)."""
    _release_mounts(work)
    shutil.rmtree(work, ignore_errors=True)


def apt_cache_hooks(cache: Path) -> list[str]:
    """mmdebstrap options that keep the downloaded .debs in `cache` (one per suite and
    arch): a build run again after a timeout or Ctrl-C downloads nothing twice. The
    pattern of mmdebstrap(1)'s EXAMPLES."""
    cache.mkdir(parents=True, exist_ok=True)
    return ["--skip=download/empty", "--skip=essential/unlink",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
            f"--setup-hook=sync-in {cache} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {cache}"]


def _check_releases(names: tuple[str, ...] | list[str]) -> None:
    """BuildError naming every OS-VERSION of `names` that is no release of SUITES."""
    unknown = [o for o in names if o not in SUITES]
    if unknown:
        raise BuildError(f"cannot build {', '.join(unknown)}; buildable: "
                         f"{', '.join(SUITES)}")


def check_buildable(os_version: str, arch: str, kernels_from: tuple[str, ...] = ()) -> None:
    """BuildError unless `qemu:OS-VERSION:ARCH` can be built with those extra kernels: every
    release known (SUITES), each shipping a kernel for the arch, and the kernels' releases
    no newer than the image's (apt would take a newer release's version of every package
    of the root filesystem, since nothing pins them)."""
    profile = arches.by_name(arch)
    _check_releases((os_version, *kernels_from))
    for os_name in (os_version, *kernels_from):
        if SUITES[os_name] not in profile.suites:
            with_kernel = [os for os, s in SUITES.items() if s in profile.suites]
            raise BuildError(f"Debian {SUITES[os_name]} ships no {profile.name} kernel to "
                             f"boot; {profile.name} images: {', '.join(with_kernel)}")
    order = list(SUITES)  # oldest first
    newer = [k for k in kernels_from if order.index(k) > order.index(os_version)]
    if newer:
        raise BuildError(f"--kernels-from {', '.join(newer)}: only releases up to "
                         f"{os_version} can lend a {os_version} image their kernels (a "
                         f"newer release's packages would replace the image's own)")


def plan(oses: list[str], archs: list[str] | None, all_arches: bool,
         kernels_from: tuple[str, ...] = (), host: str | None = None,
         ) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """What `ttserver image build` builds: ([(OS-VERSION, arch)], kernels_from), names
    lower-cased and each pair (and release) once however often or spelled it is named.
    `archs` None: the host's arch (`host`, default platform.machine()); `all_arches`: every
    arch the release, and each release of `kernels_from`, has kernels for. BuildError
    (check_buildable's, or for a host arch ttstack does not know) before anything runs."""
    oses = list(dict.fromkeys(o.strip().lower() for o in oses))
    kernels = tuple(dict.fromkeys(k.strip().lower() for k in kernels_from if k.strip()))
    _check_releases((*oses, *kernels))
    if all_arches:
        pairs = [(o, p.name) for o in oses for p in arches.PROFILES
                 if all(SUITES[r] in p.suites for r in (o, *kernels))]
    else:
        host = host or platform.machine()
        if not archs:
            try:
                archs = [arches.by_name(host).name]
            except KeyError:
                raise BuildError(f"this host's arch {host!r} is not a guest arch ttstack "
                                 "knows; name one with --arch") from None
        pairs = list(dict.fromkeys((o, arches.by_name(a).name) for o in oses for a in archs))
    for os_version, arch in pairs:
        check_buildable(os_version, arch, kernels)
    return pairs, kernels


def build(os_version: str, arch: str, image_path: Path, *, disk_mib: int = 2048,
          mirror: str | None = None, timeout: float = 1800, force: bool = False,
          kernels_from: tuple[str, ...] = (), engine: str = "qemu") -> Path:
    """Build `qemu:OS-VERSION:ARCH` into image_path; return its directory. With `engine`
    "lxc", the container image `lxc:OS-VERSION:ARCH` from that VM image (built first
    unless it exists; `force` then makes only the container image again: images/lxc.py).

    `kernels_from` (OS-VERSIONs, e.g. ("debian-12",)): also install each one's kernel into
    the same root filesystem and publish it as one more image per kernel,
    `qemu:OS-VERSION-linuxMAJOR.MINOR:ARCH` (kernel_variant_name), sharing the disk.

    Skipped when the image exists (images are cached; pass force=True to rebuild). Every
    step has a timeout (`timeout` seconds for mmdebstrap, 600 for the others), because
    mmdebstrap under qemu-user has been seen to hang. BuildError when the OS or arch
    cannot be built (the message says which can) or a step fails.
    """
    if engine == "lxc":
        vm_dir = build(os_version, arch, image_path, disk_mib=disk_mib, mirror=mirror,
                       timeout=timeout, kernels_from=kernels_from)
        try:
            return lxc.derive(vm_dir, image_path, force,
                              lambda msg: _say(msg, f"lxc:{os_version}:{arch}"))
        except lxc.ContainerImageError as exc:
            raise BuildError(str(exc)) from None
    name: ImageName = parse_image_name(f"qemu:{os_version}:{arch}")
    profile = arches.by_name(name.arch)

    def say(msg: str) -> None:
        _say(msg, f"{name.os}:{name.arch}")

    check_buildable(name.os, name.arch, kernels_from)
    suite = SUITES[name.os]
    extra_suites = [SUITES[o] for o in kernels_from if SUITES[o] != suite]
    target = image_path / name.full
    if (target / DISK).is_file() and not force:
        meta = read_meta(target)
        built_with = meta.get("recipe")
        if built_with == RECIPE and set(meta.get("kernels_from", [])) >= set(extra_suites):
            say(f"exists at {target}; skipping (use --force to rebuild)")
            return target
        if built_with == RECIPE:
            say(f"the image at {target} lacks the kernels of "
                f"{', '.join(sorted(set(extra_suites) - set(meta.get('kernels_from', []))))}"
                ": rebuilding")
        else:
            say(f"the image at {target} was built from another recipe "
                f"({built_with or 'none recorded'}, now {RECIPE}): rebuilding")
    emulated = binfmt.needs_emulation(profile)
    if emulated:
        binfmt.ensure(profile.qemu_user)
    source = mirror or host_mirror()
    image_path.mkdir(parents=True, exist_ok=True)
    work = image_path / f".build-{name.os}-{name.arch}-{os.getpid()}"
    remove_tree(work)
    work.mkdir(parents=True)
    started = time.monotonic()

    configured: list[str] = []  # dpkg's "Setting up PACKAGE (VERSION) ..." lines

    def progress(line: str) -> None:  # mmdebstrap's own lines ("I: ...") at once
        if line.startswith("I: "):
            say(f"mmdebstrap: {line[3:]} ({time.monotonic() - started:.0f}s)")
        elif line.startswith("Setting up "):
            configured.append(line.split()[2])

    def tick() -> None:  # the long silent part: dpkg configuring under emulation
        if configured:
            say(f"mmdebstrap: {len(configured)} packages set up, the last {configured[-1]} "
                f"({time.monotonic() - started:.0f}s)")
        else:
            say(f"mmdebstrap: working ({time.monotonic() - started:.0f}s)")

    try:
        root = work / "rootfs"
        cmd = ["mmdebstrap", "--variant=apt", "--mode=root", "--verbose",
               f"--architectures={profile.debian}",
               "--include=" + ",".join([profile.kernel_package, *PACKAGES])]
        cmd += [f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES]
        cmd += [f"--essential-hook={INITRAMFS_HOOK}"]
        # other releases' kernels: their packages on offer beside the suite's (whose
        # versions are higher, so nothing else changes), each kernel metapackage
        # installed from its release; /boot before that tells the suite's own kernel
        own_boot = work / "own-boot.txt"
        cmd += [f'--customize-hook=ls "$1/boot" > {own_boot}']
        cmd += [f'--customize-hook=chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get '
                f'install -y -q --allow-downgrades --no-install-recommends '
                f'{profile.kernel_package}/{extra}'
                for extra in extra_suites]
        cmd += apt_cache_hooks(image_path / ".cache" / "apt" / f"{suite}-{profile.debian}")
        cmd += [suite, str(root)]
        cmd += [f"deb {source} {s} main" for s in [suite, *extra_suites]]
        say(f"debootstrapping {suite}/{profile.debian}"
            + (" under qemu-user (several minutes)" if emulated else " (about a minute)"))
        try:
            run_step(cmd, timeout, "mmdebstrap", progress, tick)
        except BuildError as exc:
            if "404  Not Found" in str(exc):  # apt's words for a file the mirror lacks
                raise BuildError(f"{exc}\n(the mirror {source} lists "
                                 f"{profile.debian} packages it does not serve: pass "
                                 f"--mirror with one that carries {profile.debian})") from None
            raise
        customize(root)
        # vmlinux: ppc64el's kernel is an ELF image, booted as it is
        own = own_boot.read_text().split()
        kernels = sorted(k for k in (root / "boot").glob("vmlinu[xz]-*") if k.name in own)
        initrds = sorted(i for i in (root / "boot").glob("initrd.img-*") if i.name in own)
        if not kernels or not initrds:
            raise BuildError("the image has no /boot/vmlinu[xz]-* or /boot/initrd.img-*")
        variants = kernel_variants(root / "boot", own)
        if len(variants) < len(extra_suites):
            raise BuildError(f"installing the kernels of {', '.join(extra_suites)} left "
                             f"{len(variants)} more kernel(s) in /boot")
        say("making the disk (mkfs.ext4 -d, no loop mount)")
        raw = work / "disk.raw"
        run_step(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw),
              f"{disk_mib}M"], 600, "mkfs.ext4")
        out = work / "image"
        out.mkdir()
        run_step(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / DISK)], 600,
             "qemu-img convert")
        shutil.copyfile(kernels[-1], out / KERNEL)
        shutil.copyfile(initrds[-1], out / INITRD)
        meta = {"name": name.full, "suite": suite, "arch": name.arch,
                "virtual_size_mib": disk_mib, "cmdline": DEFAULT_CMDLINE,
                "kernel": kernels[-1].name, "built_at": int(time.time()), "recipe": RECIPE,
                "build_seconds": round(time.monotonic() - started),
                "kernels_from": extra_suites}
        for kernel, initrd in variants:
            variant = ImageName(name.engine, kernel_variant_name(name.os, kernel.name),
                                name.arch)
            staged = work / variant.full
            staged.mkdir()
            os.link(out / DISK, staged / DISK)  # one root filesystem, several kernels
            shutil.copyfile(kernel, staged / KERNEL)
            shutil.copyfile(initrd, staged / INITRD)
            install(staged, {**meta, "name": variant.full, "kernel": kernel.name,
                             "kernels_from": []}, image_path / variant.full)
            say(f"and {variant.full} (the same disk, kernel {kernel.name})")
        install(out, meta, target)
    finally:
        remove_tree(work)
    say(f"built in {time.monotonic() - started:.0f}s at {target}")
    return target


def kernel_variant_name(os_version: str, kernel_file: str) -> str:
    """The OS-VERSION of an image booting `kernel_file` (`vmlinuz-6.1.0-28-cloud-amd64`)
    on the root filesystem of `os_version`: `debian-13-linux6.1`. An OS prefix of the
    plain name (`debian-13`) selects both; the full one only the variant. ValueError
    for a file name without a version."""
    match = re.match(r"vmlinu[xz]-(\d+)\.(\d+)", kernel_file)
    if not match:
        raise ValueError(f"no kernel version in {kernel_file!r}")
    return f"{os_version}-linux{match.group(1)}.{match.group(2)}"


def kernel_variants(boot: Path, own: list[str]) -> list[tuple[Path, Path]]:
    """The (kernel, initrd) pairs in `boot` not named in `own` (the suite's own files),
    matched by their version suffix."""
    out = []
    for kernel in sorted(boot.glob("vmlinu[xz]-*")):
        initrd = boot / f"initrd.img-{kernel.name.split('-', 1)[1]}"
        if kernel.name not in own and initrd.is_file():
            out.append((kernel, initrd))
    return out


def build_many(pairs: list[tuple[str, str]], image_path: Path, *, jobs: int,
               **options: Any) -> dict[str, str]:
    """Build every (OS-VERSION, arch) pair (build()'s `options` for each), up to `jobs` at
    once; each build's timeout is its own. Returns image name -> "" (built or cached) or
    why it failed; the others go on when one fails, and images finished stay (a rerun
    builds only what is missing). Ctrl-C or SIGTERM kills every running step."""
    results: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        engine = options.get("engine", "qemu")
        futures = {pool.submit(build, os_version, arch, image_path, **options):
                   parse_image_name(f"{engine}:{os_version}:{arch}").full
                   for os_version, arch in pairs}
        try:
            for future in as_completed(futures):
                exc = future.exception()
                results[futures[future]] = "" if exc is None else str(exc)
        except BaseException:
            for future in futures:
                future.cancel()
            kill_running_steps()
            raise
    return {name: results[name] for name in futures.values()}
