"""The HTTP/JSON API (FastAPI). OpenAPI is served at /openapi.json; docs at /docs.

Handlers are thin: validation of shapes here (pydantic), who may do what in auth.py,
rules in envs.EnvManager.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ttclient import __version__
from ttclient.contract import MAX_UPLOAD, EnvCreate, EnvUpdate, RunRequest
from ttclient.guard import Guard, served_names

from .admission import EnvRequest
from .auth import AuthError, Principal, TokenStore
from .envs import EnvManager
from .errors import TTError

log = logging.getLogger(__name__)


def who(request: Request, authorization: Annotated[str | None, Header(
        description="Bearer API token, when the server has a tokens file")] = None,
        ) -> Principal:
    """The caller, as the Guard middleware authenticated it from its bearer token before
    the body was read (everyone is an admin without a tokens file)."""
    principal = getattr(request.state, "principal", None)
    return principal or request.app.state.tokens.principal(authorization)


# module level: FastAPI resolves these annotations in the module's namespace
Caller = Annotated[Principal, Depends(who)]


def create_app(manager: EnvManager, tokens: TokenStore | None = None,
               allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving the API over `manager`, authorising callers with `tokens`
    (default: no tokens file, an open API) before their bodies are read, answering Host
    names of this machine, its bind address and `allowed_hosts` (ttclient/guard.py);
    TTError and AuthError become their HTTP status, ValueError a 400."""
    app = FastAPI(title="ttserver", version=__version__,
                  description="ttstack host daemon: ENVs of real VMs for test suites")
    tokens = tokens or TokenStore(None)
    app.state.tokens = tokens
    app.add_middleware(Guard, names=served_names(manager.cfg.serv_addr, allowed_hosts),
                       upload_limit=MAX_UPLOAD, authenticate=tokens.principal)

    def owned(name: str, caller: Principal) -> None:
        """403 unless the caller's token created the ENV (or is an admin token)."""
        owner = manager.get(name)["owner"]
        if not caller.may_use(owner):
            raise TTError(f"ENV {name!r} belongs to another token", status=403)

    @app.exception_handler(AuthError)
    async def _auth_error(_req: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)},
                            headers=headers)

    @app.exception_handler(TTError)
    async def _tt_error(_req: Request, exc: TTError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    @app.exception_handler(ValueError)
    async def _value_error(_req: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "server_id": manager.server_id}

    @app.get("/whoami")
    def whoami(caller: Caller) -> dict:
        return {"name": caller.name, "admin": caller.admin, "auth": tokens.enabled}

    @app.get("/status")
    def status(_caller: Caller) -> dict:
        return manager.status()

    @app.get("/images")
    def list_images(_caller: Caller) -> list[dict]:
        return manager.status()["images"]

    @app.get("/envs")
    def list_envs(caller: Caller, owner: Annotated[str | None, Query(
            description="only this owner's ENVs; all of them without it")] = None,
                  ) -> list[dict]:
        if not caller.admin:  # a token sees only its own ENVs
            return [] if owner not in (None, caller.name) else manager.list_envs(caller.name)
        return manager.list_envs(owner)

    @app.post("/envs", status_code=202)
    def create_env(body: EnvCreate, caller: Caller) -> dict:
        req = EnvRequest(name=body.name, os_prefix=body.os_prefix, vm_number=body.vm_number,
                         cpu_num=body.cpu_num, mem_size=int(body.mem_size),
                         disk_size=None if body.disk_size is None else int(body.disk_size),
                         life_time=body.life_time,
                         ports=body.ports, ssh_keys=body.ssh_keys,
                         owner=caller.name if tokens.enabled else body.owner,
                         deny_outgoing=body.deny_outgoing, counts=body.counts, warm=body.warm,
                         first_index=body.first_index)
        return manager.create(req)

    @app.patch("/envs/{name}")
    def update_env(name: str, body: EnvUpdate, caller: Caller) -> dict:
        owned(name, caller)
        return manager.update(name, body.life_time, body.add_ports, body.remove_ports)

    @app.post("/envs/{name}/stop")
    def stop_env(name: str, caller: Caller) -> dict:
        owned(name, caller)
        return manager.stop(name)

    @app.post("/envs/{name}/start", status_code=202)
    def start_env(name: str, caller: Caller) -> dict:
        owned(name, caller)
        return manager.start(name)

    @app.get("/envs/{name}")
    def show_env(name: str, caller: Caller) -> dict:
        owned(name, caller)
        return manager.get(name)

    @app.delete("/envs/{name}")
    def delete_env(name: str, caller: Caller) -> dict:
        owned(name, caller)
        manager.delete(name)
        return {"deleted": name}

    @app.post("/envs/{name}/run")
    def run(name: str, body: RunRequest, caller: Caller) -> dict:
        owned(name, caller)
        results = manager.guest.run(name, body.cmd, body.use_ssh, body.timeout, body.vms)
        return {"env": name, "results": results}

    @app.put("/envs/{name}/files")
    async def push(name: str, request: Request, caller: Caller,
                   path: Annotated[str, Query(description="absolute path in each VM")],
                   mode: Annotated[str | None, Query(pattern="^[0-7]{3,4}$")] = None,
                   vm: Annotated[list[str] | None, Query(description="only these VMs")] = None,
                   use_ssh: bool = False) -> dict:
        await run_in_threadpool(owned, name, caller)  # before the body (Guard caps its size)
        data = await request.body()
        results = await run_in_threadpool(manager.guest.push, name, path, data,
                                          int(mode, 8) if mode else None, vm, use_ssh)
        return {"env": name, "results": results}

    @app.get("/envs/{name}/vms/{vm}/files")
    def pull(name: str, vm: str, caller: Caller,
             path: Annotated[str, Query(description="absolute path in the VM")],
             use_ssh: bool = False) -> Response:
        owned(name, caller)
        return Response(manager.guest.pull(name, vm, path, use_ssh),
                        media_type="application/octet-stream")

    @app.get("/envs/{name}/vms/{vm}/console", response_class=PlainTextResponse)
    def console(name: str, vm: str, caller: Caller,
                lines: Annotated[int, Query(ge=1, le=2000)] = 50) -> str:
        owned(name, caller)
        return manager.guest.console(name, vm, lines)

    return app
