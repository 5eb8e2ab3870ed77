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

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ttclient.arches import ArchProfile, by_name

# the guest NIC's netdev id: in -netdev (user networking), in QMP netdev_add (bridge mode's
# TAP) and in HMP hostfwd_add/remove on a running VM
NETDEV_ID = "ttnet0"
SLIRP_STUB_ID = "ttslirp"


def nic_device(arch: ArchProfile) -> dict[str, str]:
    """The guest NIC's QEMU device properties for `arch` (driver and fixed bus address),
    the same whether given on the command line or plugged over QMP (bridge mode)."""
    return {"driver": arch.nic_device, **arch.nic_address}


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
    # none: bridge mode plugs its NIC over QMP while the domain is paused (host/bridge.py)
    netdev: str
    uid: int
    gid: int
    title: str = ""
    incoming: bool = False  # start paused, waiting for a saved memory state (warm clone)
    seed: str = ""  # a cloud-init NoCloud seed image, attached read-only as vdb
    # the guest's RAM in this file instead of anonymous memory (warm clones, see
    # warm/snapshots.py): mapped shared (a template writes it) or private (a clone's
    # writes stay its own, copy-on-write)
    memory_file: str = ""
    memory_shared: bool = False
    # the virtio-serial port IDENTITY_CHANNEL, its host end a UNIX socket libvirt makes
    # (warm templates and clones: guest/identity.py)
    identity_channel: bool = False
    # MiB of TCG translation buffer (QEMU's tb-size), 0: QEMU's default (an eighth of
    # the host's RAM, at most 1 GiB); ignored under KVM
    tb_cache_mib: int = 0


IDENTITY_CHANNEL = "org.ttstack.identity"  # a channel's target name (guest/identity.py)
RAM_BACKEND = "tt.ram"  # the id of the RAM backend of a memory_file (the RAM block's name)
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def render(spec: DomainSpec) -> str:
    """The libvirt domain XML of `spec`, as a string (built with ElementTree, so every
    value is escaped); KeyError for an arch not in ttclient.arches."""
    arch = by_name(spec.arch)
    dom = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(dom, "name", spec.name)
    _sub(dom, "title", spec.title)
    if arch.genid:
        # a VM generation ID device: each domain gets a new ID; a guest restored from a
        # warm-clone template sees it change and reseeds its RNG, instead of every clone
        # drawing the same "random" numbers from the saved state
        _sub(dom, "genid")
    _sub(dom, "memory", str(spec.mem_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch=arch.libvirt_arch, machine=arch.qemu_machine)
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", spec.cmdline.replace("console=ttyS0", f"console={arch.console}"))
    features = ET.Element("features")  # in the domain only when it has any
    if arch.acpi:  # elsewhere the guest reads QEMU's device tree: with direct kernel
        _sub(features, "acpi")  # boot libvirt ties ACPI on arm to UEFI
    if spec.accel == "tcg" and spec.tb_cache_mib:
        # -accel tcg,tb-size=N (libvirt >= 8.0): a clone's translated code is most of
        # its own memory once idle (docs/decisions.md, 76)
        _sub(_sub(features, "tcg"), "tb-cache", str(spec.tb_cache_mib), unit="MiB")
    if len(features):
        dom.append(features)
    if spec.accel == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    # TCG: the arch profile's CPU model (below), else QEMU's default for the machine
    _sub(dom, "clock", offset="utc")
    _sub(_sub(dom, "seclabel", type="static", model="dac", relabel="no"), "label",
         f"+{spec.uid}:+{spec.gid}")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
    _sub(disk, "source", file=spec.disk)
    _sub(disk, "target", dev="vda", bus="virtio")
    if spec.seed:
        seed = _sub(devices, "disk", type="file", device="disk")
        _sub(seed, "driver", name="qemu", type="raw")
        _sub(seed, "source", file=spec.seed)
        _sub(seed, "target", dev="vdb", bus="virtio")
        _sub(seed, "readonly")
    # the console goes to its log through virtlogd, which rotates it (virtlogd.conf's
    # max_size and max_backups: 2 MiB and 3 by default); a file chardev grew without limit
    serial = _sub(devices, "serial", type="null")
    _sub(serial, "log", file=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="null")
    _sub(console, "log", file=spec.console_log, append="off")
    _sub(console, "target", type="serial", port="0")
    _sub(_sub(devices, "channel", type="unix"), "target", type="virtio",
         name="org.qemu.guest_agent.0")
    if spec.identity_channel:  # after the agent's: the same port number in every clone
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "source", mode="bind")  # libvirt picks the socket's path
        _sub(channel, "target", type="virtio", name=IDENTITY_CHANNEL)
    _sub(devices, "memballoon", model="none")
    _sub(_sub(devices, "rng", model="virtio"), "backend", "/dev/urandom", model="random")
    nic = nic_device(arch)
    device = ",".join([nic.pop("driver"), f"netdev={NETDEV_ID}",
                       *(f"{k}={v}" for k, v in nic.items())])
    qemu_args = ["-netdev", spec.netdev, "-device", device] if spec.netdev else []
    if not spec.netdev and spec.incoming:
        # a clone whose NIC is plugged later (bridge mode) of a template made on user
        # networking: the saved state has a section for QEMU's user-network stack
        # ("slirp"), which must exist to load it; this one has no device and no use
        qemu_args += ["-netdev", f"user,id={SLIRP_STUB_ID},restrict=on"]
    if arch.tcg_cpu and spec.accel == "tcg":
        qemu_args += ["-cpu", arch.tcg_cpu]
    if spec.memory_file:
        # libvirt cannot name the file of a memory backend (only a directory for all of
        # them, qemu.conf memory_backing_dir), so the RAM is a backend of ours, and the
        # machine's `memory-backend` (a later -machine overrides libvirt's key) names it
        path = spec.memory_file.replace(",", ",,")  # QEMU's option syntax
        qemu_args += ["-object", f"memory-backend-file,id={RAM_BACKEND},size={spec.mem_mib}M,"
                                 f"mem-path={path},share={'on' if spec.memory_shared else 'off'}",
                      "-machine", f"memory-backend={RAM_BACKEND}"]
    if spec.incoming:
        qemu_args += ["-incoming", "defer"]
    commandline = _sub(dom, f"{{{QEMU_NS}}}commandline")
    for value in qemu_args:
        _sub(commandline, f"{{{QEMU_NS}}}arg", value=value)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"
