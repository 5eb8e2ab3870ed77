"""The API contract both daemons serve (ttserver and ttproxy): request bodies and answers
as pydantic models, validated the same way by both, and published in their OpenAPI
documents (`/openapi.json`), so a client or a fuzzer can check an answer's shape.

Needs pydantic, which the `[server]` and `[proxy]` extras bring (FastAPI depends on it);
the `tt` client does not import this module, so `pip install ttstack` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydantic import BaseModel, Field, field_validator

from ttclient.imagenames import split_prefixes
from ttclient.rules import MAX_CPUS, MAX_VMS_PER_ENV
from ttclient.units import parse_mib

# The largest file a push or a get carries (spooled to disk or streamed, never held whole).
MAX_UPLOAD = 1 << 30
# Characters of a run's command: longer ones reach the guest as a script file, not argv.
MAX_COMMAND = 1 << 20


@dataclass
class Download:
    """A file being sent: its size in bytes and its bytes, a piece at a time (the pieces
    come from the guest as the answer is written, so a file is never held whole)."""

    size: int
    chunks: Iterator[bytes]


@dataclass
class Upload:
    """A file that arrived: `size` bytes kept in `file` (a temporary file on disk, so an
    upload is never held whole in memory), read by position so that several VMs can be
    written from it at once."""

    file: BinaryIO
    size: int

    def pieces(self, length: int = 1 << 20) -> Iterator[bytes]:
        """The bytes from the start, `length` at a time."""
        fd = self.file.fileno()
        for at in range(0, self.size, length):
            yield os.pread(fd, min(length, self.size - at), at)

    def read(self) -> bytes:
        """All the bytes at once (ttproxy passes uploads on whole)."""
        return b"".join(self.pieces())


class ServiceError(Exception):
    """An answer for the client: a one-line message and the HTTP status (400 unless
    given); 401 answers also say `WWW-Authenticate: Bearer`."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        """The message, as given."""
        return str(self.args[0])


class EnvCreate(BaseModel):
    """Body of POST /envs; `mem_size` and `disk_size` come out as MiB ints, `os_prefix`
    split into single prefixes."""

    name: str = Field(description="ENV name: 1-40 of [A-Za-z0-9_-]")
    os_prefix: list[str] = Field(description="OS prefixes, e.g. ['deb', 'debian-12:aarch64']")
    vm_number: int = Field(1, ge=1, le=MAX_VMS_PER_ENV,
                           description=f"VMs per matched image; {MAX_VMS_PER_ENV} in all "
                                       "at most")
    cpu_num: int = Field(1, ge=1, le=MAX_CPUS)
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
    """Body of PATCH /envs/{name}: new life time (seconds), ports to add or remove, and for
    a stopped ENV new vCPUs and memory (MiB) per VM."""

    life_time: int | None = Field(None, ge=1, description="seconds from now until deletion")
    add_ports: list[int] = Field(default_factory=list, description="guest TCP ports to expose")
    remove_ports: list[int] = Field(default_factory=list,
                                    description="guest TCP ports to stop exposing")
    cpu_num: int | None = Field(None, ge=1, le=MAX_CPUS,
                                description="vCPUs per VM (a stopped ENV only; at start)")
    mem_size: int | str | None = Field(None, description="memory per VM, MiB or '1G' (a "
                                                         "stopped ENV only; at start)")

    @field_validator("mem_size")
    @classmethod
    def _size(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_mib(v)


class RunRequest(BaseModel):
    """Body of POST /envs/{name}/run: a command for each VM's /bin/sh, with a per-VM timeout
    in seconds."""

    cmd: str = Field(min_length=1, max_length=MAX_COMMAND,
                     description="shell command line, run by the guest's /bin/sh")
    use_ssh: bool = False
    binary: bool = Field(False, description="answer the exact output bytes in stdout_b64 "
                         "and stderr_b64 (base64) instead of text")
    timeout: float = Field(600, ge=1, le=86400, description="seconds per VM")
    vms: list[str] | None = Field(None, description="only these VMs (ids, names or indexes)")

    @field_validator("cmd")
    @classmethod
    def _no_nul(cls, cmd: str) -> str:
        # an argv string ends at a NUL: the agent ran only what came before it, in silence
        if "\x00" in cmd:
            raise ValueError("cmd holds a NUL character (\\0), which no shell command line "
                             "can carry; pass binary data through a file (push) instead")
        return cmd


# --- answers ---------------------------------------------------------------------------
# Fields a ttproxy adds (where a part lives) are optional; the routes leave out what an
# answer did not set, so a ttserver's answers carry no proxy fields. Keys a model does not
# declare are dropped (a newer server behind an older proxy still answers);
# tests/test_contract.py checks that the daemons' answers have no such keys.


class VMInfo(BaseModel):
    """A VM of an ENV (ttserver views.vm_view); sizes in MiB, `boot_seconds` from create
    to a usable guest."""

    id: str
    name: str = Field(description="hostname: ENV-IDX")
    idx: int
    image: str = Field(description="ENGINE:OS-VERSION:ARCH")
    os: str
    arch: str
    state: str = Field(description="creating, running, stopped, failed, deleting, ...")
    cpu: int
    mem_mib: int
    disk_mib: int
    ssh_host: str = Field(description="the address clients reach forwarded ports on")
    ssh_port: int | None
    address: str | None = Field(description="the VM's own address (bridge network)")
    ports: dict[str, int] = Field(description="guest port -> host port")
    error: str
    boot_seconds: float | None
    boot_mode: str | None = Field(description="warm or cold")
    server: str | None = Field(None, description="ttproxy: the server holding the VM")


class EnvInfo(BaseModel):
    """An ENV and its VMs in index order; times are Unix seconds."""

    name: str
    state: str
    owner: str
    created_at: float
    expires_at: float
    error: str
    server_id: str
    ports: list[int] = Field(description="guest ports forwarded on every VM")
    outgoing: str = Field(description="allowed or denied")
    vms: list[VMInfo]
    servers: list[str] | None = Field(None, description="ttproxy: servers holding parts")


class CommandResult(BaseModel):
    """One VM's outcome of POST /envs/{name}/run. `exit_code` is None when the command
    did not finish (timed out, or `error` says why it could not run), 128+n when signal
    n ended it; seconds wall time. Each output stream keeps at most the server's
    --run-output-cap bytes (`truncated` when a stream printed more)."""

    vm: str
    id: str
    image: str
    exit_code: int | None
    signal: int | None = Field(None, description="the signal that ended the command")
    stdout: str = Field(description="UTF-8 text; empty with `binary`")
    stderr: str
    escaped: bool = Field(False, description="bytes that are not UTF-8 are escaped as \\xNN "
                          "in stdout/stderr (ask for `binary` for the exact bytes)")
    stdout_b64: str | None = Field(None, description="with `binary`: the bytes, base64")
    stderr_b64: str | None = None
    stdout_bytes: int = Field(0, description="bytes the command printed on stdout, all")
    stderr_bytes: int = 0
    truncated: bool = Field(False, description="a stream printed more than was kept")
    timed_out: bool
    seconds: float
    error: str = Field(description="empty, or why the VM could not run it (console tail)")
    server: str | None = Field(None, description="ttproxy: the server holding the VM")


class FileResult(BaseModel):
    """One VM's outcome of PUT /envs/{name}/files: bytes written, seconds, error."""

    vm: str
    id: str
    image: str
    bytes: int
    seconds: float
    error: str
    server: str | None = Field(None, description="ttproxy: the server holding the VM")


class RunAnswer(BaseModel):
    """POST /envs/{name}/run: one result per selected VM."""

    env: str
    results: list[CommandResult]


class PushAnswer(BaseModel):
    """PUT /envs/{name}/files: one result per selected VM."""

    env: str
    results: list[FileResult]


class Deleted(BaseModel):
    """DELETE /envs/{name}."""

    deleted: str


class Health(BaseModel):
    """GET /health (no token needed): the daemon answers. ttproxy adds how many of its
    servers are up."""

    ok: bool
    server_id: str
    servers_up: int | None = None
    servers: int | None = None


class WhoAmI(BaseModel):
    """GET /whoami: the caller's token name ("" on an open API) and whether it is an
    admin token; `auth`: whether the server checks tokens."""

    name: str
    admin: bool
    auth: bool | None = None


class ImageInfo(BaseModel):
    """An image the server (or, behind ttproxy, some server) can boot; `servers`: which."""

    name: str = Field(description="ENGINE:OS-VERSION:ARCH")
    os: str
    arch: str
    engine: str
    size_mib: int
    warnings: list[str]
    digest: str | None = Field(None, description="changes whenever the image's files "
                               "change; behind ttproxy, absent when its servers' differ")
    servers: list[str] | None = None


class Status(BaseModel):
    """GET /status: resources (CPUs; memory and disk in MiB) total and used, ENVs and
    images. A ttserver adds its accelerator, warm templates, network and storage; a
    ttproxy sums its servers and lists them (`servers`, each row a server's status plus
    `address` and `health`)."""

    cpu_total: int
    cpu_used: int
    mem_total_mib: int
    mem_used_mib: int
    disk_total_mib: int
    disk_used_mib: int
    env_count: int
    images: list[ImageInfo]
    server_id: str | None = None
    accel: str | None = None
    accel_reason: str | None = None
    warm_clones: bool | None = None
    cold_boots: int | None = Field(None, description="cold boots a ttserver runs at once"
                                   " (--cold-boots; more VMs wait `pending`)")
    templates: list[dict[str, Any]] | None = None
    network: str | None = None
    storage: str | None = None
    proxy: bool | None = None
    servers: list[dict[str, Any]] | None = None
    servers_up: int | None = None
