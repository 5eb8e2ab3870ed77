"""Guest architectures: everything ttstack needs to know about one, stated once.

One row per architecture ttstack builds and boots. The image builder reads the Debian
names, kernel package and qemu-user entry; the domain XML the QEMU machine, CPU, console,
NIC and ACPI facts; the name parser the aliases; tests the `uname -m` a guest reports.
Lives in the client package because image names (and so arch aliases) are parsed by the
server, the proxy and the pytest plugin alike.

Sources: Debian's arch names and kernel flavours are the archive's (`linux-image-*`
metapackages of bookworm/trixie, checked against deb.debian.org's Packages files); QEMU
machines, consoles and devices are QEMU's documentation for each target (docs/system/
target-*.rst); libvirt's arch names are its `virArch` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchProfile:
    """One guest architecture.

    `name` is how images name it (`qemu:debian-13:NAME`); `machine` is what `uname -m`
    and Python's `platform.machine()` say inside the guest."""

    name: str
    debian: str  # dpkg's name: mmdebstrap --architectures
    machine: str  # uname -m in the guest
    aliases: tuple[str, ...]  # other spellings users write (Debian's, the kernel's, ...)
    kernel_package: str  # the Debian metapackage of the kernel flavour booted directly
    libvirt_arch: str  # <os><type arch=...>
    qemu_system: str  # the emulator binary libvirt runs
    qemu_package: str  # the Debian (bookworm) package that has it
    qemu_user: str  # the binfmt_misc entry (qemu-user-static) foreign builds need
    qemu_machine: str  # QEMU machine type
    console: str  # the guest kernel's serial console device (console=...)
    nic_device: str  # QEMU device of the guest NIC
    nic_address: dict[str, str] = field(default_factory=dict)  # its fixed bus address
    tcg_cpu: str = ""  # -cpu under TCG ("" = the machine's default model)
    acpi: bool = False  # <features><acpi/>: x86 only (arm needs UEFI for it)
    genid: bool = False  # a VM generation ID device (ACPI, so x86 only)
    # VMs of this arch may start from warm-clone templates; pseries and s390-ccw-virtio
    # always boot cold: their clones' identity came through fw_cfg, which they lack, and
    # since it comes on a virtio-serial port (layout 5) no clone of theirs was tried
    warm_templates: bool = True
    settimeofday: int = 0  # the syscall's number (the warm identity helper calls it)
    suites: tuple[str, ...] = ("bullseye", "bookworm", "trixie", "sid")  # with a kernel


_PCI = {"bus": "pci.0", "addr": "0x10"}
# libvirt fills the first slots of pcie.0 with its root ports; 0x10 stays free
_PCIE = {"bus": "pcie.0", "addr": "0x10"}

PROFILES: tuple[ArchProfile, ...] = (
    ArchProfile("x86_64", "amd64", "x86_64", ("amd64", "x64", "x86-64"),
                "linux-image-cloud-amd64", "x86_64", "qemu-system-x86_64",
                "qemu-system-x86", "", "pc", "ttyS0", "virtio-net-pci", _PCI,
                acpi=True, genid=True, settimeofday=164),
    # trixie has no i386 kernel (i386 is a userspace-only arch since Debian 13)
    ArchProfile("i386", "i386", "i686", ("i686", "i586", "x86", "ia32"),
                "linux-image-686-pae", "i686", "qemu-system-i386",
                "qemu-system-x86", "", "pc", "ttyS0", "virtio-net-pci", _PCI,
                acpi=True, genid=True, settimeofday=79,
                suites=("bullseye", "bookworm")),
    # pauth-impdef: the architected QARMA pointer auth is ~3x slower to emulate
    ArchProfile("aarch64", "arm64", "aarch64", ("arm64",),
                "linux-image-cloud-arm64", "aarch64", "qemu-system-aarch64",
                "qemu-system-arm", "qemu-aarch64", "virt", "ttyAMA0", "virtio-net-pci",
                _PCIE, tcg_cpu="max,pauth-impdef=on", settimeofday=170),
    # the LPAE flavour: QEMU's virt machine puts PCIe config space above 4 GiB
    ArchProfile("armhf", "armhf", "armv7l", ("armv7l", "armv7", "arm", "armv7hl"),
                "linux-image-armmp-lpae", "armv7l", "qemu-system-arm",
                "qemu-system-arm", "qemu-arm", "virt", "ttyAMA0", "virtio-net-pci", _PCIE,
                tcg_cpu="max", settimeofday=79),
    ArchProfile("ppc64le", "ppc64el", "ppc64le", ("ppc64el", "powerpc64le"),
                "linux-image-powerpc64le", "ppc64le", "qemu-system-ppc64",
                "qemu-system-ppc", "qemu-ppc64le", "pseries", "hvc0", "virtio-net-pci", _PCI,
                warm_templates=False, settimeofday=79),
    # no PCI: the NIC is a channel-subsystem device (devno 0xfe.0.0010, above libvirt's)
    ArchProfile("s390x", "s390x", "s390x", (),
                "linux-image-s390x", "s390x", "qemu-system-s390x",
                "qemu-system-misc", "qemu-s390x", "s390-ccw-virtio", "ttysclp0",
                "virtio-net-ccw", {"devno": "fe.0.0010"}, tcg_cpu="max",
                warm_templates=False, settimeofday=79),
    ArchProfile("riscv64", "riscv64", "riscv64", ("rv64", "riscv"),
                "linux-image-riscv64", "riscv64", "qemu-system-riscv64",
                "qemu-system-misc", "qemu-riscv64", "virt", "ttyS0", "virtio-net-pci",
                _PCIE, settimeofday=170, suites=("trixie", "sid")),
)

_BY_SPELLING = {s: p for p in PROFILES for s in (p.name, *p.aliases)}


def by_name(spelling: str) -> ArchProfile:
    """The profile that `spelling` (a name or alias, any case) names; KeyError (listing
    the known names) for anything else."""
    try:
        return _BY_SPELLING[spelling.lower()]
    except KeyError:
        raise KeyError(f"unknown arch {spelling!r} (known: "
                       f"{', '.join(p.name for p in PROFILES)})") from None


def spellings() -> dict[str, str]:
    """Every accepted spelling (names and aliases, lower case) -> the canonical name."""
    return {s: p.name for s, p in _BY_SPELLING.items()}
