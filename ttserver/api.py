"""The HTTP/JSON API (FastAPI). OpenAPI is served at /openapi.json; docs at /docs.

Handlers are thin: validation of shapes here (pydantic), rules in envs.EnvManager.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, field_validator

from ttclient import __version__
from ttclient.imagenames import split_prefixes
from ttclient.units import parse_mib

from .envs import EnvManager, EnvRequest
from .errors import TTError

log = logging.getLogger(__name__)

# Files pass through the server's memory (and the agent's base64), so uploads are bounded.
MAX_UPLOAD = 1 << 30


class EnvCreate(BaseModel):
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

    @field_validator("os_prefix", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return split_prefixes(v) if isinstance(v, str | list) else v

    @field_validator("mem_size", "disk_size")
    @classmethod
    def _size(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_mib(v)


class EnvUpdate(BaseModel):
    life_time: int | None = Field(None, ge=1, description="seconds from now until deletion")
    add_ports: list[int] = Field(default_factory=list, description="guest TCP ports to expose")
    remove_ports: list[int] = Field(default_factory=list,
                                    description="guest TCP ports to stop exposing")


class RunRequest(BaseModel):
    cmd: str = Field(min_length=1, max_length=128 * 1024,
                     description="shell command line, run by the guest's /bin/sh")
    use_ssh: bool = False
    timeout: float = Field(600, ge=1, le=86400, description="seconds per VM")
    vms: list[str] | None = Field(None, description="only these VMs (ids, names or indexes)")


def create_app(manager: EnvManager) -> FastAPI:
    app = FastAPI(title="ttserver", version=__version__,
                  description="ttstack host daemon: ENVs of real VMs for test suites")

    @app.exception_handler(TTError)
    async def _tt_error(_req: Request, exc: TTError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    @app.exception_handler(ValueError)
    async def _value_error(_req: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "server_id": manager.server_id}

    @app.get("/status")
    def status() -> dict:
        return manager.status()

    @app.get("/images")
    def list_images() -> list[dict]:
        return manager.status()["images"]

    @app.get("/envs")
    def list_envs(owner: Annotated[str | None, Query(
            description="only this owner's ENVs; all of them without it")] = None,
                  ) -> list[dict]:
        return manager.list(owner)

    @app.post("/envs", status_code=202)
    def create_env(body: EnvCreate) -> dict:
        req = EnvRequest(name=body.name, os_prefix=body.os_prefix, vm_number=body.vm_number,
                         cpu_num=body.cpu_num, mem_size=int(body.mem_size),
                         disk_size=body.disk_size, life_time=body.life_time,
                         ports=body.ports, ssh_keys=body.ssh_keys, owner=body.owner,
                         deny_outgoing=body.deny_outgoing)
        return manager.create(req)

    @app.patch("/envs/{name}")
    def update_env(name: str, body: EnvUpdate) -> dict:
        return manager.update(name, body.life_time, body.add_ports, body.remove_ports)

    @app.post("/envs/{name}/stop")
    def stop_env(name: str) -> dict:
        return manager.stop(name)

    @app.post("/envs/{name}/start", status_code=202)
    def start_env(name: str) -> dict:
        return manager.start(name)

    @app.get("/envs/{name}")
    def show_env(name: str) -> dict:
        return manager.get(name)

    @app.delete("/envs/{name}")
    def delete_env(name: str) -> dict:
        manager.delete(name)
        return {"deleted": name}

    @app.post("/envs/{name}/run")
    def run(name: str, body: RunRequest) -> dict:
        results = manager.run(name, body.cmd, body.use_ssh, body.timeout, body.vms)
        return {"env": name, "results": results}

    @app.put("/envs/{name}/files")
    async def push(name: str, request: Request,
                   path: Annotated[str, Query(description="absolute path in each VM")],
                   mode: Annotated[str | None, Query(pattern="^[0-7]{3,4}$")] = None,
                   vm: Annotated[list[str] | None, Query(description="only these VMs")] = None,
                   use_ssh: bool = False) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_UPLOAD:
            raise TTError(f"file of {size} bytes is over the {MAX_UPLOAD >> 20} MiB limit;"
                          " copy big data from inside the VM instead", status=413)
        data = await request.body()
        results = await run_in_threadpool(manager.push, name, path, data,
                                          int(mode, 8) if mode else None, vm, use_ssh)
        return {"env": name, "results": results}

    @app.get("/envs/{name}/vms/{vm}/files")
    def pull(name: str, vm: str,
             path: Annotated[str, Query(description="absolute path in the VM")],
             use_ssh: bool = False) -> Response:
        return Response(manager.pull(name, vm, path, use_ssh),
                        media_type="application/octet-stream")

    @app.get("/envs/{name}/vms/{vm}/console", response_class=PlainTextResponse)
    def console(name: str, vm: str, lines: Annotated[int, Query(ge=1, le=2000)] = 50) -> str:
        return manager.console(name, vm, lines)

    return app
