"""A VM's (or a warm-clone template build's) libvirt domain, from an image and a size:
the one place that turns them into a `domainxml.DomainSpec` and its XML.

Used by the ENV manager for VMs and by `templates.Templates` for template builds, so the
two never disagree on a domain's shape (a warm clone must match its template's).
"""

from __future__ import annotations

from pathlib import Path

from .. import images
from . import domainxml
from .accel import Accelerator


class DomainRenderer:
    """Domain XML for domains running as uid:gid, accelerated as `accel` decides, with
    `tb_cache_mib` MiB of TCG translation buffer (0: QEMU's default)."""

    def __init__(self, accel: Accelerator, uid: int, gid: int, tb_cache_mib: int = 0) -> None:
        self.accel = accel
        self.uid, self.gid = uid, gid
        self.tb_cache_mib = tb_cache_mib

    def render(self, name: str, image: images.Image, cpu: int, mem_mib: int, disk: Path,
               console: Path, incoming: bool, hostfwd: tuple[str, ...] = (),
               restrict: bool = True, title: str = "", user_net: bool = True,
               seed: str = "", memory_file: Path | None = None,
               memory_shared: bool = False, identity_channel: bool = False) -> str:
        """Domain XML named `name` booting `image` with `cpu` vCPUs, `mem_mib` MiB and the
        qcow2 `disk`; serial console to the file `console`. `incoming`: paused, waiting
        for a memory state (warm clones). `hostfwd`: QEMU user-network forwards
        ("tcp:ADDR:HOST-:GUEST"), `restrict`: no outgoing traffic; `user_net` False: no
        NIC (bridge mode plugs one). `seed`: a cloud-init seed image path or "".
        `memory_file`: the guest's RAM in that file, mapped shared (`memory_shared`: a
        warm template) or private (a warm clone). `identity_channel`: the guest has the port
        domainxml.IDENTITY_CHANNEL (warm templates and clones)."""
        forwards = "".join(f",hostfwd={f}" for f in hostfwd)
        netdev = f"user,id={domainxml.NETDEV_ID},restrict={'on' if restrict else 'off'}{forwards}"
        return domainxml.render(domainxml.DomainSpec(
            name=name, arch=image.name.arch, accel=self.accel.for_arch(image.name.arch),
            vcpus=cpu, mem_mib=mem_mib, disk=str(disk), kernel=str(image.kernel),
            initrd=str(image.initrd), cmdline=image.cmdline, console_log=str(console),
            netdev=netdev if user_net else "",
            uid=self.uid, gid=self.gid, title=title, incoming=incoming, seed=seed,
            memory_file=str(memory_file or ""), memory_shared=memory_shared,
            identity_channel=identity_channel, tb_cache_mib=self.tb_cache_mib))
