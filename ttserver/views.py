"""The JSON shapes the API answers with for ENVs, VMs and the server's status (pure
functions of DB rows and settings)."""

from __future__ import annotations

import re

from . import images
from .config import ServerConfig
from .db import EnvRow, VMRow
from .vm.accel import AccelChoice


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


def status_view(server_id: str, cfg: ServerConfig, used: dict[str, int], env_count: int,
                accel: AccelChoice | None, scanned: list[images.Image], templates: list[dict],
                storage: str, cold_boots: int) -> dict:
    """The server's `Status` for GET /status: resources total and `used` (CPUs, MiB; from
    StateDB.used), ENV count, images, the accelerator (`probing` while `accel` is None),
    warm templates, cold boots at once, network and storage."""
    return {
        "server_id": server_id,
        "accel": accel.accel if accel else "probing",
        "accel_reason": accel.reason if accel else "",
        "cpu_total": cfg.cpu_total, "cpu_used": used["cpu"],
        "mem_total_mib": cfg.mem_total_mib, "mem_used_mib": used["mem_mib"],
        "disk_total_mib": cfg.disk_total_mib, "disk_used_mib": used["disk_mib"],
        "env_count": env_count,
        "images": [i.to_dict() for i in scanned],
        "warm_clones": cfg.warm_clones, "cold_boots": cold_boots, "templates": templates,
        "network": cfg.network, "storage": storage,
    }
