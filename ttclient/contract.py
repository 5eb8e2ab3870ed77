"""The API contract both daemons serve (ttserver and ttproxy): request bodies as pydantic
models, validated the same way by both.

Needs pydantic, which the `[server]` and `[proxy]` extras bring (FastAPI depends on it);
the `tt` client does not import this module, so `pip install ttstack` stays light.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from ttclient.imagenames import split_prefixes
from ttclient.units import parse_mib

# Files pass through the server's memory (and the agent's base64), so uploads are bounded.
MAX_UPLOAD = 1 << 30


class EnvCreate(BaseModel):
    """Body of POST /envs; `mem_size` and `disk_size` come out as MiB ints, `os_prefix`
    split into single prefixes."""

    name: str = Field(description="ENV name: 1-40 of [A-Za-z0-9_-]")
    os_prefix: list[str] = Field(description="OS prefixes, e.g. ['deb', 'debian-12:aarch64']")
    vm_number: int = Field(1, ge=1, le=64, description="VMs per matched image")
    cpu_num: int = Field(1, ge=1, le=64)
    mem_size: int | str = Field(512, description="MiB, or a size like '1G'")
    disk_size: int | str | None = Field(None, description="MiB or '4G'; grows the clone")
    life_time: int | None = Field(None, ge=1, description="seconds until automatic deletion")
    ports: list[int] = Field(default_factory=list, description="guest TCP ports to forward")
    ssh_keys: list[str] = Field(default_factory=list, description="extra authorized keys")
    owner: str = Field("", max_length=200,
                       description="who asked (user@host); `tt env list` shows one owner's")
    deny_outgoing: bool = Field(False, description="cut the VMs off the outside network")
    warm: bool | None = Field(None, description="boot from the image's memory snapshot"
                              " (default: the server's --warm-clones)")
    counts: dict[str, int] | None = Field(
        None, description="exact VMs per image full name, instead of vm_number (ttproxy)")
    first_index: int = Field(0, ge=0, le=100_000,
                             description="index of the first VM (ttproxy: unique names)")

    @field_validator("os_prefix", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        # only strings are split; anything else is left for pydantic to refuse (422)
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return split_prefixes(v)
        return v

    @field_validator("mem_size", "disk_size")
    @classmethod
    def _size(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_mib(v)


class EnvUpdate(BaseModel):
    """Body of PATCH /envs/{name}: new life time (seconds) and ports to add or remove."""

    life_time: int | None = Field(None, ge=1, description="seconds from now until deletion")
    add_ports: list[int] = Field(default_factory=list, description="guest TCP ports to expose")
    remove_ports: list[int] = Field(default_factory=list,
                                    description="guest TCP ports to stop exposing")


class RunRequest(BaseModel):
    """Body of POST /envs/{name}/run: a command for each VM's /bin/sh, with a per-VM timeout
    in seconds."""

    cmd: str = Field(min_length=1, max_length=128 * 1024,
                     description="shell command line, run by the guest's /bin/sh")
    use_ssh: bool = False
    timeout: float = Field(600, ge=1, le=86400, description="seconds per VM")
    vms: list[str] | None = Field(None, description="only these VMs (ids, names or indexes)")
