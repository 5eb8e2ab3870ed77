"""ttproxy's HTTP API: the same paths and bodies as ttserver (docs/api.md), so `tt`, the
pytest plugin and CI talk to a proxy unchanged. Handlers are thin; rules live in proxy.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ttclient import __version__
from ttclient.contract import MAX_UPLOAD, EnvCreate, EnvUpdate, RunRequest
from ttclient.guard import Guard, served_names

from .proxy import CALLER_TOKEN, Proxy, ProxyError


class CallerToken:
    """ASGI middleware: the caller's bearer token, for the duration of the request, in a
    context variable the proxy passes on to the servers (they do the authorising)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        reset = CALLER_TOKEN.set(token.strip() if scheme.lower() == "bearer" else None)
        try:
            await self.app(scope, receive, send)
        finally:
            CALLER_TOKEN.reset(reset)


def create_app(proxy: Proxy, bind: str = "127.0.0.1",
               allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving the ttserver API through `proxy`, answering Host names of
    this machine, `bind` and `allowed_hosts`, with the same body limits as a ttserver
    (ttclient/guard.py); a ProxyError becomes its HTTP status, a ValueError a 400."""
    app = FastAPI(title="ttproxy", version=__version__,
                  description="one address for many ttservers; the ttserver API")
    app.add_middleware(CallerToken)
    app.add_middleware(Guard, names=served_names(bind, allowed_hosts),
                       upload_limit=MAX_UPLOAD)  # tokens: the servers check them

    @app.exception_handler(ProxyError)
    async def _proxy_error(_req: Request, exc: ProxyError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(ValueError)
    async def _value_error(_req: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.get("/health")
    def health() -> dict:
        up = proxy.servers.up()
        return {"ok": True, "server_id": "ttproxy", "servers_up": len(up),
                "servers": len(proxy.servers.members)}

    @app.get("/whoami")
    def whoami() -> dict:
        return proxy.whoami()

    @app.get("/status")
    def status() -> dict:
        return proxy.status()

    @app.get("/images")
    def list_images() -> list[dict]:
        return proxy.status()["images"]

    @app.get("/envs")
    def list_envs(owner: Annotated[str | None, Query()] = None) -> list[dict]:
        return proxy.list_envs(owner)

    @app.post("/envs", status_code=202)
    def create_env(body: EnvCreate) -> dict:
        return proxy.create(body.model_dump(exclude={"counts", "first_index"}))

    @app.get("/envs/{name}")
    def show_env(name: str) -> dict:
        return proxy.get(name)

    @app.delete("/envs/{name}")
    def delete_env(name: str) -> dict:
        return proxy.delete(name)

    @app.patch("/envs/{name}")
    def update_env(name: str, body: EnvUpdate) -> dict:
        return proxy.update(name, body.model_dump())

    @app.post("/envs/{name}/stop")
    def stop_env(name: str) -> dict:
        return proxy.stop(name)

    @app.post("/envs/{name}/start", status_code=202)
    def start_env(name: str) -> dict:
        return proxy.start(name)

    @app.post("/envs/{name}/run")
    def run(name: str, body: RunRequest) -> dict:
        return {"env": name, "results": proxy.run(name, body.model_dump())}

    @app.put("/envs/{name}/files")
    async def push(name: str, request: Request, path: Annotated[str, Query()],
                   mode: Annotated[str | None, Query(pattern="^[0-7]{3,4}$")] = None,
                   vm: Annotated[list[str] | None, Query()] = None,
                   use_ssh: bool = False) -> dict:
        # the ENV's servers check the caller's token and ownership before the body is read
        await run_in_threadpool(proxy.get, name)
        data = await request.body()
        results = await run_in_threadpool(proxy.push, name, path, data,
                                          int(mode, 8) if mode else None, vm, use_ssh)
        return {"env": name, "results": results}

    @app.get("/envs/{name}/vms/{vm}/files")
    def pull(name: str, vm: str, path: Annotated[str, Query()],
             use_ssh: bool = False) -> Response:
        return Response(proxy.pull(name, vm, path, use_ssh),
                        media_type="application/octet-stream")

    @app.get("/envs/{name}/vms/{vm}/console", response_class=PlainTextResponse)
    def console(name: str, vm: str, lines: Annotated[int, Query(ge=1, le=2000)] = 50) -> str:
        return proxy.console(name, vm, lines)

    return app
