"""The JSON shapes the API answers with for ENVs and VMs (pure functions of DB rows)."""

from __future__ import annotations

import re

from . import images
from .db import EnvRow, VMRow


def hostname(env: str, idx: int) -> str:
    """The VM's name: `ENV-IDX`, lowercased and cut to a valid hostname (63 chars)."""
    return re.sub(r"[^a-z0-9-]", "-", f"{env.lower()}-{idx}")[:63]


def vm_refs(vm: VMRow) -> set[str]:
    """Every way a client may name a VM: its id, its hostname or its index in the ENV."""
    return {vm.id, hostname(vm.env, vm.idx), str(vm.idx)}


def vm_ref(vm: VMRow) -> dict:
    """How a per-VM result names its VM: `vm` (hostname), `id`, `image`."""
    return {"vm": hostname(vm.env, vm.idx), "id": vm.id, "image": vm.image}


def vm_view(vm: VMRow, connect_addr: str) -> dict:
    """A VM as the API shows it; `ssh_host` is the address clients reach forwards on."""
    name = images.parse_image_name(vm.image) if vm.image.count(":") == 2 else None
    return {
        "id": vm.id, "name": hostname(vm.env, vm.idx), "idx": vm.idx, "image": vm.image,
        "os": name.os if name else "", "arch": name.arch if name else "",
        "state": vm.state, "cpu": vm.cpu, "mem_mib": vm.mem_mib, "disk_mib": vm.disk_mib,
        "ssh_host": connect_addr, "ssh_port": vm.ssh_port,
        "address": vm.net_addr,
        "ports": {str(k): v for k, v in vm.forwards.items()},
        "error": vm.error, "boot_seconds": vm.boot_seconds, "boot_mode": vm.boot_mode,
    }


def env_view(env: EnvRow, server_id: str, connect_addr: str, restricted: bool) -> dict:
    """An ENV as the API shows it, its VMs in index order; `restricted`: outgoing denied."""
    return {"name": env.name, "state": env.state, "owner": env.owner,
            "created_at": env.created_at, "expires_at": env.expires_at,
            "error": env.error, "server_id": server_id,
            "ports": env.spec.get("ports", []),
            "outgoing": "denied" if restricted else "allowed",
            "vms": [vm_view(v, connect_addr) for v in env.vms]}
