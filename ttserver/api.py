"""The HTTP/JSON API (FastAPI). OpenAPI is served at /openapi.json; docs at /docs.

Handlers are thin: validation of shapes here (pydantic), rules in envs.EnvManager.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ttclient import __version__

from .envs import EnvManager, EnvRequest
from .errors import TTError
from .schema import MAX_UPLOAD, EnvCreate, EnvUpdate, RunRequest

log = logging.getLogger(__name__)


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
                         deny_outgoing=body.deny_outgoing, counts=body.counts,
                         first_index=body.first_index)
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
