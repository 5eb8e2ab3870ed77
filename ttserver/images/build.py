"""Build bootable Debian images with mmdebstrap, without loop mounts or root filesystems on
the host: mmdebstrap makes a directory tree, `mkfs.ext4 -d` turns it into a disk, `qemu-img`
makes that a qcow2 base, and the kernel/initrd are kept beside it for direct kernel boot.

Image policy (documented in docs/images.md): root has no password; SSH accepts keys only;
ttserver injects the server key and the user's keys through the guest agent at boot. Host keys
and machine-id are created on each VM's first boot, so clones never share them.
"""

from __future__ import annotations

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
import time
from pathlib import Path

from ttclient.imagenames import ImageName, parse_image_name

from ..host import binfmt
from . import DEFAULT_CMDLINE, DISK, INITRD, KERNEL, install, read_meta

SUITES = {"debian-11": "bullseye", "debian-12": "bookworm", "debian-13": "trixie",
          "debian-sid": "sid"}
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64"}
KERNEL_PKG = {"x86_64": "linux-image-cloud-amd64", "aarch64": "linux-image-cloud-arm64",
              "riscv64": "linux-image-riscv64"}
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
INITRAMFS_MODULES = ["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console",
                     "virtio_rng", "ext4"]
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


def _say(msg: str) -> None:
    print(f"[image build] {msg}", file=sys.stderr, flush=True)


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


def run_step(cmd: list[str], timeout: float, what: str) -> str:
    """Run an image build or import step in its own process group and return its output:
    on timeout the whole group goes (a hung mkinitramfs under qemu-user is a grandchild,
    which subprocess.run would leave)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} is not installed ({what})") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # timeout, Ctrl-C, SIGTERM (see image_main)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BuildError(f"{what} did not finish within {timeout:.0f}s") from exc
        raise
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


def build(os_version: str, arch: str, image_path: Path, *, disk_mib: int = 2048,
          mirror: str | None = None, timeout: float = 1800, force: bool = False) -> Path:
    """Build `qemu:OS-VERSION:ARCH` into image_path; return its directory.

    Skipped when the image exists (images are cached; pass force=True to rebuild). Every
    step has a timeout, because mmdebstrap under qemu-user has been seen to hang.
    """
    name: ImageName = parse_image_name(f"qemu:{os_version}:{arch}")
    if name.os not in SUITES:
        raise BuildError(f"cannot build {name.os!r}; buildable: {', '.join(SUITES)}")
    target = image_path / name.full
    if (target / DISK).is_file() and not force:
        built_with = read_meta(target).get("recipe")
        if built_with == RECIPE:
            _say(f"{name.full} exists at {target}; skipping (use --force to rebuild)")
            return target
        _say(f"{name.full} at {target} was built from another recipe "
             f"({built_with or 'none recorded'}, now {RECIPE}): rebuilding")
    if name.arch != platform.machine():
        binfmt.ensure(name.arch)
    image_path.mkdir(parents=True, exist_ok=True)
    work = image_path / f".build-{name.os}-{name.arch}-{os.getpid()}"
    remove_tree(work)
    work.mkdir(parents=True)
    started = time.monotonic()
    try:
        root = work / "rootfs"
        cmd = ["mmdebstrap", "--variant=apt", "--mode=root",
               f"--architectures={DEBIAN_ARCH[name.arch]}",
               "--include=" + ",".join([KERNEL_PKG[name.arch], *PACKAGES])]
        cmd += [f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES]
        cmd += [f"--essential-hook={INITRAMFS_HOOK}"]
        cmd += [SUITES[name.os], str(root), mirror or host_mirror()]
        _say(f"debootstrapping {SUITES[name.os]}/{DEBIAN_ARCH[name.arch]} (about a minute)")
        run_step(cmd, timeout, "mmdebstrap")
        customize(root)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise BuildError("the image has no /boot/vmlinuz-* or /boot/initrd.img-*")
        _say("making the disk (mkfs.ext4 -d, no loop mount)")
        raw = work / "disk.raw"
        run_step(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw),
              f"{disk_mib}M"], 600, "mkfs.ext4")
        out = work / "image"
        out.mkdir()
        run_step(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / DISK)], 600,
             "qemu-img convert")
        shutil.copyfile(kernels[-1], out / KERNEL)
        shutil.copyfile(initrds[-1], out / INITRD)
        meta = {"name": name.full, "suite": SUITES[name.os], "arch": name.arch,
                "virtual_size_mib": disk_mib, "cmdline": DEFAULT_CMDLINE,
                "kernel": kernels[-1].name, "built_at": int(time.time()), "recipe": RECIPE}
        install(out, meta, target)
    finally:
        remove_tree(work)
    _say(f"built {name.full} in {time.monotonic() - started:.0f}s at {target}")
    return target
