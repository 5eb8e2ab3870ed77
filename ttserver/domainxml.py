"""Libvirt domain XML for one ttstack VM.

Why the odd parts:
- networking is passed as raw QEMU arguments: libvirt 9.0 can only forward ports for user
  networking through passt, which it lacks, so `-netdev user,restrict=on,hostfwd=...` is
  given through `<qemu:commandline>` (the domain is marked "tainted"; harmless);
- `seclabel relabel='no'` with a fixed uid: libvirt otherwise chowns every file in the
  backing chain, and the base image is shared by all clones; ttserver chowns what it owns;
- direct kernel boot: no firmware or bootloader to emulate, which is seconds under TCG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict
from xml.sax.saxutils import quoteattr


class Arch(TypedDict):
    """What the domain XML needs to know about a guest architecture."""

    machine: str  # QEMU machine type
    console: str  # the guest kernel's serial console device
    nic_slot: dict[str, str]  # the NIC's PCI address (bus, addr)
    genid: str  # libvirt <genid/> element or ""
    features: str  # libvirt <features> element or ""


ARCHES: dict[str, Arch] = {
    # genid: a VM generation ID device (ACPI, so x86 only here). Each domain gets a new ID;
    # a guest restored from a warm-clone template sees it change and reseeds its RNG,
    # instead of every clone drawing the same "random" numbers from the saved state.
    "x86_64": {"machine": "pc", "console": "ttyS0",
               "nic_slot": {"bus": "pci.0", "addr": "0x10"}, "genid": "<genid/>",
               "features": "<features><acpi/></features>"},
    # no <acpi/>: on aarch64 libvirt ties ACPI to UEFI firmware; with direct kernel boot
    # the guest reads QEMU's device tree instead
    # (and a fixed NIC slot: libvirt fills pcie.0's first slots with its root ports)
    "aarch64": {"machine": "virt", "console": "ttyAMA0",
                "nic_slot": {"bus": "pcie.0", "addr": "0x10"}, "genid": "", "features": ""},
}


@dataclass(frozen=True)
class DomainSpec:
    """Everything one VM's domain XML is made from (memory in MiB, paths as strings)."""

    name: str
    arch: str
    accel: str  # kvm | tcg
    vcpus: int
    mem_mib: int
    disk: str
    kernel: str
    initrd: str
    cmdline: str
    console_log: str
    # the value of -netdev, e.g. "user,id=ttnet0,restrict=on,hostfwd=...", or "" for
    # none: bridge mode plugs its NIC over QMP while the domain is paused (bridgenet.py)
    netdev: str
    uid: int
    gid: int
    title: str = ""
    incoming: bool = False  # start paused, waiting for a saved memory state (warm clone)
    seed: str = ""  # a cloud-init NoCloud seed image, attached read-only as vdb


def _arg(value: str) -> str:
    return f"<qemu:arg value={quoteattr(value)}/>"


def render(spec: DomainSpec) -> str:
    """The libvirt domain XML of `spec`, as a string; KeyError for an arch not in ARCHES."""
    arch = ARCHES[spec.arch]
    dom_type = "kvm" if spec.accel == "kvm" else "qemu"
    # TCG: QEMU's default CPU model per machine (aarch64 gets `-cpu max` below)
    cpu = "<cpu mode='host-passthrough'/>" if spec.accel == "kvm" else ""
    cmdline = spec.cmdline.replace("console=ttyS0", f"console={arch['console']}")
    # the NIC's PCI slot: the same whether given here or plugged over QMP (bridge mode)
    slot = "".join(f",{k}={v}" for k, v in arch["nic_slot"].items())
    qemu_args = [_arg("-netdev"), _arg(spec.netdev), _arg("-device"),
                 _arg(f"virtio-net-pci,netdev=ttnet0{slot}")] if spec.netdev else []
    if spec.arch == "aarch64" and spec.accel == "tcg":
        # pauth-impdef: the architected QARMA pointer auth is ~3x slower to emulate
        qemu_args += [_arg("-cpu"), _arg("max,pauth-impdef=on")]
    if spec.incoming:
        qemu_args += [_arg("-incoming"), _arg("defer")]
    args = "\n    ".join(qemu_args)
    seed = (f"""<disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(spec.seed)}/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>""" if spec.seed else "")
    return f"""<domain type='{dom_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{spec.name}</name>
  <title>{spec.title}</title>
  {arch["genid"]}
  <memory unit='MiB'>{spec.mem_mib}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  <os>
    <type arch='{spec.arch}' machine='{arch["machine"]}'>hvm</type>
    <kernel>{spec.kernel}</kernel>
    <initrd>{spec.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  {arch["features"]}
  {cpu}
  <clock offset='utc'/>
  <seclabel type='static' model='dac' relabel='no'><label>+{spec.uid}:+{spec.gid}</label></seclabel>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe' discard='unmap'/>
      <source file={quoteattr(spec.disk)}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {seed}
    <serial type='file'>
      <source path={quoteattr(spec.console_log)}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(spec.console_log)}/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <qemu:commandline>
    {args}
  </qemu:commandline>
</domain>
"""
