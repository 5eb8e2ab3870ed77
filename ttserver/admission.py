"""Admission rules of an ENV request, as pure functions of the request, the settings and
what the state DB holds: validation (name, counts, sizes, lifetime, ports, keys, images),
the VM rows an ENV gets, and whether they fit beside every VM on record.

envs.EnvManager applies them under its admission lock, inside one SQLite transaction.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ttclient import arches
from ttclient.imagenames import ImageNameError, parse_image_name, parse_os_prefix
from ttclient.rules import (
    KEY_TYPES,
    MAX_PORTS,
    MAX_VMS_PER_ENV,
    env_name_error,
    env_size_error,
)

from . import images
from .config import ServerConfig
from .db import EnvRow, VMRow
from .errors import BadRequest, InsufficientResources, TTError
from .host import binfmt
from .states import PENDING

# authorized_keys of a VM: what fits beside a warm clone's identity in its helper's
# request (guest/identity.py MAX_REQUEST, 64 KiB) with room to spare; ~40 RSA-4096 keys
MAX_SSH_KEYS_BYTES = 32 << 10


def canonical_counts(counts: dict[str, int]) -> dict[str, int]:
    """`counts` keyed by canonical image names (`qemu:debian-13:arm64` is
    `qemu:debian-13:aarch64`, case folded); BadRequest for a key that is no image name or
    names an image another key already does."""
    out: dict[str, int] = {}
    for key, number in counts.items():
        try:
            full = parse_image_name(key.strip()).full
        except ImageNameError as exc:
            raise BadRequest(f"counts: {exc}") from None
        if full in out:
            raise BadRequest(f"counts names {full} twice")
        out[full] = number
    return out


@dataclass
class EnvRequest:
    """A validated-shape ENV request (the API's body after parsing; sizes in MiB,
    life_time in seconds)."""

    name: str
    os_prefix: list[str]
    vm_number: int = 1
    cpu_num: int = 1
    mem_size: int = 512
    disk_size: int | None = None
    life_time: int | None = None
    ports: list[int] = field(default_factory=list)
    ssh_keys: list[str] = field(default_factory=list)
    owner: str = ""
    deny_outgoing: bool = False
    # exact VMs per image (full names), overriding vm_number: how ttproxy places the part
    # of a spanning ENV that lives here; first_index keeps VM names unique across servers
    counts: dict[str, int] | None = None
    first_index: int = 0
    warm: bool | None = None  # None: the server's --warm-clones
    # the owner's --token-max-* limits apply (a non-admin token's request)
    limited: bool = False


def validate(req: EnvRequest, cfg: ServerConfig) -> list[images.Image]:
    """The images the request's prefixes select; BadRequest (a message saying what to
    change) for any rule broken, NotFound for a prefix that matches no image."""
    if error := env_name_error(req.name):
        raise BadRequest(error)
    if not 1 <= req.vm_number <= MAX_VMS_PER_ENV:
        raise BadRequest(f"vm_number must be 1..{MAX_VMS_PER_ENV}")
    if req.cpu_num < 1:
        raise BadRequest(f"cpu_num must be >= 1, not {req.cpu_num}")
    if req.mem_size < 128:
        raise BadRequest(f"mem_size must be >= 128 (MiB), not {req.mem_size}")
    life = req.life_time if req.life_time is not None else cfg.default_life_time
    if not 1 <= life <= cfg.max_life_time:
        raise BadRequest(f"life_time must be 1..{cfg.max_life_time} seconds")
    check_ports(req.ports)
    for key in req.ssh_keys:
        if "\n" in key.strip() or not key.strip().startswith(KEY_TYPES):
            raise BadRequest("ssh_keys entries must be single OpenSSH public key lines")
    if sum(len(k.encode()) + 1 for k in req.ssh_keys) > MAX_SSH_KEYS_BYTES:
        raise BadRequest(f"ssh_keys: at most {MAX_SSH_KEYS_BYTES // 1024} KiB in all")
    for prefix in req.os_prefix:
        try:
            engine = parse_os_prefix(prefix).engine
        except ImageNameError:
            continue  # images.select says what is wrong with it
        if engine == "lxc" and "lxc" not in cfg.engines:
            raise BadRequest(f"{prefix!r}: containers (the lxc engine) are not offered by "
                             "this server; its operator turns them on with --engines "
                             "qemu,lxc")
    chosen = images.select(cfg.image_path, req.os_prefix, cfg.engines)
    for image in chosen:  # a container's binaries run on this kernel, maybe via qemu-user
        if error := (binfmt.missing(image.name.arch) if image.container
                     else emulator_missing(image.name.arch)):
            raise BadRequest(f"{image.name.full}: {error}")
    if req.counts is None and (error := env_size_error(req.vm_number, len(chosen))):
        raise BadRequest(error)
    if req.counts is not None:
        req.counts = canonical_counts(req.counts)
        extra = sorted(set(req.counts) - {i.name.full for i in chosen})
        if extra:
            raise BadRequest(f"counts name images the prefixes do not select: {extra}")
        if not 1 <= sum(req.counts.values()) <= MAX_VMS_PER_ENV or min(
                req.counts.values()) < 0:
            raise BadRequest(f"counts must add up to 1..{MAX_VMS_PER_ENV} VMs")
    if not 0 <= req.first_index <= 100_000:
        raise BadRequest("first_index must be 0..100000")
    return chosen


def check_ports(ports: list[int], already: int = 0) -> None:
    """BadRequest unless every port is a guest TCP port other than 22 (always forwarded)
    and the ENV forwards at most MAX_PORTS with the `already` forwarded ones (one VM must
    not take the server's whole port range)."""
    if len(set(ports)) + already > MAX_PORTS:
        raise BadRequest(f"at most {MAX_PORTS} forwarded ports per ENV (besides SSH);"
                         f" asked for {len(set(ports)) + already}")
    for port in ports:
        if not 1 <= port <= 65535 or port == 22:
            raise BadRequest(f"port {port}: give a guest TCP port 1-65535 (22 is always"
                             " forwarded)")


def check_update(env: EnvRow, cfg: ServerConfig, life_time: int | None,
                 add_ports: list[int], remove_ports: list[int], now: float) -> None:
    """BadRequest unless the update may apply to `env` at `now` (epoch seconds): a new
    `life_time` (seconds from now) within 1..max_life_time and not past the ENV's
    creation + max_life_time; ports to add valid (check_ports), not forwarded yet, and
    ports to remove forwarded."""
    if life_time is not None and not 1 <= life_time <= cfg.max_life_time:
        raise BadRequest(f"life_time must be 1..{cfg.max_life_time} seconds")
    ceiling = env.created_at + cfg.max_life_time
    if life_time is not None and now + life_time > ceiling:
        raise BadRequest(f"ENV {env.name!r} may live {cfg.max_life_time} s from its"
                         f" creation at most: life_time <= {max(0, int(ceiling - now))} now")
    current = set(env.spec.get("ports", []))
    check_ports(add_ports, already=len(current - set(remove_ports)))
    dup = sorted(current & set(add_ports))
    missing = sorted(set(remove_ports) - current)
    if dup:
        raise BadRequest(f"port(s) {dup} are already forwarded")
    if missing:
        raise BadRequest(f"port(s) {missing} are not forwarded by ENV {env.name!r}")


def plan_vms(req: EnvRequest, chosen: list[images.Image], server_id: str,
             vms_path: Path) -> list[VMRow]:
    """The `pending` VM rows of the ENV, in index order (ports not assigned yet): per
    image `vm_number` VMs (or `counts[image]`), disks at least the image's size."""
    vms: list[VMRow] = []
    for image in chosen:
        count = req.vm_number if req.counts is None else req.counts.get(image.name.full, 0)
        for _ in range(count):
            disk = max(req.disk_size or 0, image.size_mib)
            vm_id = f"{server_id}-{secrets.token_hex(4)}"
            vms.append(VMRow(id=vm_id, env=req.name, idx=req.first_index + len(vms),
                             image=image.name.full,
                             cpu=req.cpu_num, mem_mib=req.mem_size, disk_mib=disk,
                             state=PENDING, domain=f"tt-{vm_id}",
                             dir=str(vms_path / vm_id), ssh_port=0, forwards={}))
    return vms


def needs(vms: list[VMRow]) -> dict[str, int]:
    """What the VMs reserve: {"cpu": vCPUs, "mem_mib": MiB, "disk_mib": MiB}."""
    return {"cpu": sum(v.cpu for v in vms), "mem_mib": sum(v.mem_mib for v in vms),
            "disk_mib": sum(v.disk_mib for v in vms)}


def check_token_limits(held: dict[str, int], cfg: ServerConfig, vms: list[VMRow],
                       owner: str) -> None:
    """TTError 403 (with numbers) unless `owner`'s token may add `vms` to what it `held`
    (StateDB.held_by: {"vms", "mem_mib"}) within --token-max-vms and --token-max-mem."""
    over = []
    if cfg.token_max_vms is not None and held["vms"] + len(vms) > cfg.token_max_vms:
        over.append(f"{held['vms']} VM(s) on record + {len(vms)} > --token-max-vms "
                    f"{cfg.token_max_vms}")
    mem = sum(v.mem_mib for v in vms)
    if cfg.token_max_mem_mib is not None and held["mem_mib"] + mem > cfg.token_max_mem_mib:
        over.append(f"{held['mem_mib']} MiB on record + {mem} MiB > --token-max-mem "
                    f"{cfg.token_max_mem_mib} MiB")
    if over:
        raise TTError(f"token {owner!r} is over its limit ({'; '.join(over)}): delete an ENV"
                      " first, or ask the operator", status=403)


def check_room(used: dict[str, int], cfg: ServerConfig, need: dict[str, int],
               what: str) -> None:
    """InsufficientResources (with numbers) unless `need` fits beside `used` (what every
    VM on record holds, StateDB.used()) within --cpu-total/--mem-total/--disk-total.
    Call under the admission lock, inside the transaction that writes the rows."""
    totals = {"cpu": cfg.cpu_total, "mem_mib": cfg.mem_total_mib,
              "disk_mib": cfg.disk_total_mib}
    short = [f"{k}: need {need[k]}, free {totals[k] - used[k]} of {totals[k]}"
             for k in need if used[k] + need[k] > totals[k]]
    if short:
        raise InsufficientResources(f"not enough resources {what} ({'; '.join(short)})")


def emulator_missing(arch: str) -> str:
    """Why this host cannot boot guests of `arch` (its QEMU system emulator is not
    installed: the operator installs only the emulators wanted, see docs/images.md), or
    "" when it can."""
    profile = arches.by_name(arch)
    if shutil.which(profile.qemu_system):
        return ""
    return (f"this host cannot run {profile.name} guests: {profile.qemu_system} is not "
            f"installed (apt-get install {profile.qemu_package})")
