"""The one route table of the ttstack API, served by both daemons over an `EnvService`:
ttserver's `LocalService` (its own VMs) and ttproxy's `Proxy` (the VMs of many
ttservers). A route checks the shapes (`contract`), asks the service and answers;
who may do what and every other rule is the service's.

Needs FastAPI (the `[server]`/`[proxy]` extras); the `tt` client never imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Protocol

import anyio
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from . import __version__, jsonstream
from .audit import audit, denied, token_name
from .contract import (
    MAX_UPLOAD,
    Deleted,
    Download,
    EnvCreate,
    EnvInfo,
    EnvUpdate,
    Health,
    ImageInfo,
    PushAnswer,
    RunAnswer,
    RunRequest,
    ServiceError,
    Status,
    Upload,
    WhoAmI,
)
from .guard import Guard
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import DaemonMetrics


class EnvService(Protocol):
    """What the routes need from a daemon. `caller` is what `authenticate` returned for
    the request's Authorization header (a ttserver's Principal; None for ttproxy, whose
    servers check the token). Every method raises ServiceError (or ValueError, a 400)
    for an answer that is not a success; dict shapes are those of `contract`."""

    title: str
    description: str
    @property
    def metrics(self) -> DaemonMetrics:
        """What GET /metrics serves."""

    def may_scrape(self, caller: Any) -> None:
        """ServiceError (403) unless the caller may read /metrics: with tokens, an admin
        token's."""

    @property
    def authenticate(self) -> Callable[[str | None], Any] | None:
        """Guard's check of the Authorization header before any body byte is read: the
        caller, or an exception with `status`; None: the daemon checks no token."""

    def health(self) -> dict:
        """GET /health (no token): a `Health` dict."""

    def whoami(self, caller: Any) -> dict:
        """GET /whoami: a `WhoAmI` dict for the caller."""

    def status(self, caller: Any) -> dict:
        """GET /status: a `Status` dict (its `images` answer GET /images too)."""

    def list_envs(self, caller: Any, owner: str | None) -> list[dict]:
        """GET /envs: `EnvInfo` dicts the caller may see, `owner`'s only when given."""

    def create(self, caller: Any, body: EnvCreate) -> dict:
        """POST /envs: the new ENV's `EnvInfo` (state `creating`; the VMs boot after the
        answer). 404 for an OS prefix no image matches, 409 for a name in use or no room."""

    def get(self, caller: Any, name: str) -> dict:
        """GET /envs/{name}: its `EnvInfo`; 404 unknown, 403 another token's."""

    def update(self, caller: Any, name: str, body: EnvUpdate) -> dict:
        """PATCH /envs/{name}: new life time and ports; the `EnvInfo` after."""

    def stop(self, caller: Any, name: str) -> dict:
        """POST /envs/{name}/stop: power the VMs off (disks kept); the `EnvInfo` after."""

    def start(self, caller: Any, name: str) -> dict:
        """POST /envs/{name}/start: boot a stopped ENV again; the `EnvInfo` (starting)."""

    def delete(self, caller: Any, name: str) -> dict:
        """DELETE /envs/{name}: everything of the ENV gone when it returns; `Deleted`."""

    def kick(self, caller: Any, name: str, vms: list[str]) -> dict:
        """DELETE /envs/{name}/vms?vm=REF...: those VMs (name, id or index) removed from the
        ENV, the rest kept; the `EnvInfo` after. 404 for no such VM, 409 for all of them."""

    def run(self, caller: Any, name: str, body: RunRequest) -> list[dict]:
        """POST /envs/{name}/run: one `CommandResult` dict per selected running VM."""

    def may_push(self, caller: Any, name: str) -> None:
        """ServiceError unless the caller may write files into the ENV: asked before the
        upload's body is read."""

    def push(self, caller: Any, name: str, path: str, data: Upload, mode: int | None,
             vms: list[str] | None, use_ssh: bool) -> list[dict]:
        """PUT /envs/{name}/files: `data` to the absolute guest `path` (octal `mode`) of
        each selected VM; one `FileResult` dict per VM."""

    def pull(self, caller: Any, name: str, vm: str, path: str, use_ssh: bool) -> Download:
        """GET /envs/{name}/vms/{vm}/files: one VM's guest `path`, sent as it is read;
        every refusal is raised before the first piece."""

    def console(self, caller: Any, name: str, vm: str, lines: int) -> str:
        """GET /envs/{name}/vms/{vm}/console: the last `lines` lines of its serial
        console."""


def caller(request: Request, authorization: Annotated[str | None, Header(
        description="Bearer API token, when the server has a tokens file")] = None) -> Any:
    """The route's caller: what the Guard's `authenticate` returned before the body was
    read, or (open paths) what it returns now; None when the daemon checks no token."""
    state = request.scope.get("state") or {}
    if "principal" in state:
        return state["principal"]
    service: EnvService = request.app.state.service
    return service.authenticate(authorization) if service.authenticate else None


# module level: FastAPI resolves the routes' annotations in the module's namespace
Caller = Annotated[Any, Depends(caller)]

# Worker threads for the routes (Starlette runs sync routes in anyio's pool, 40 by
# default): one caller may hold at most IN_FLIGHT of them in the routes that can take long
# (run, files), so others, and /health (async, no thread), always get through.
THREADS = 64
# Where uploads wait while they are written into VMs: on disk (/tmp may be a tmpfs)
SPOOL_DIR = "/var/tmp"
IN_FLIGHT = 32


class InFlight:
    """Counts one caller's requests in progress; ServiceError 429 past `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    @staticmethod
    def key(request: Request) -> str:
        """The caller: its bearer token (hashed; never kept) or, without one, its
        address."""
        header = request.headers.get("authorization")
        if header:
            return "token:" + hashlib.sha256(header.encode()).hexdigest()
        return "host:" + (request.client.host if request.client else "")

    @contextlib.contextmanager
    def hold(self, request: Request) -> Iterator[None]:
        """One more request of this caller for the duration of the block."""
        key = self.key(request)
        with self._lock:
            if self._count.get(key, 0) >= self.limit:
                raise ServiceError(f"{self.limit} requests of this caller are in progress "
                                   "already; wait for some to finish", 429)
            self._count[key] = self._count.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._count[key] -= 1
                if not self._count[key]:
                    del self._count[key]


@contextlib.asynccontextmanager
async def _more_threads(_app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield


def audited(event: str, request: Request, who: Any, name: str, answer: dict,
            **more: Any) -> dict:
    """Log the audit line of a lifecycle `event` on ENV `name` (who, from where, its images
    and VM count when `answer` is its view) and return `answer`."""
    vms = answer.get("vms")
    request.app.state.service.metrics.env_events.labels(event).inc()
    audit(event, env=name, token=token_name(who),
          source=request.client.host if request.client else "",
          images=sorted({vm["image"] for vm in vms}) if vms else None,
          vms=len(vms) if vms is not None else None, **more)
    return answer


def create_app(service: EnvService, names: frozenset[str],
               upload_limit: int = MAX_UPLOAD,
               middleware: tuple[Callable[[Any], Any], ...] = ()) -> FastAPI:
    """The FastAPI app serving the API over `service`, answering the Host `names` only
    (ttclient/guard.py), with `middleware` (ASGI app factories) inside the Guard;
    ServiceError becomes its HTTP status, ValueError a 400."""
    app = FastAPI(title=service.title, version=__version__, description=service.description,
                  lifespan=_more_threads)
    app.state.service = service
    busy = InFlight(IN_FLIGHT)
    for factory in middleware:
        app.add_middleware(factory)
    app.add_middleware(Guard, names=names, upload_limit=upload_limit,
                       authenticate=service.authenticate)


    @app.exception_handler(ServiceError)
    async def _service_error(req: Request, exc: ServiceError) -> JSONResponse:
        if exc.status in (401, 403):
            denied(req.scope, exc.status, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(status_code=exc.status, content={"detail": exc.message},
                            headers=headers)

    @app.exception_handler(ValueError)
    async def _value_error(_req: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Any]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        service.metrics.observe_request(getattr(route, "path", "unmatched"), request.method,
                                        response.status_code, time.perf_counter() - started)
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics(who: Caller) -> Response:
        service.may_scrape(who)
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # answers leave out what they did not set (ttproxy fields on a ttserver)
    @app.get("/health", response_model=Health, response_model_exclude_unset=True)
    async def health() -> dict:  # in the event loop: no worker thread needed
        return service.health()

    @app.get("/whoami", response_model=WhoAmI, response_model_exclude_unset=True)
    def whoami(who: Caller) -> dict:
        return service.whoami(who)

    @app.get("/status", response_model=Status, response_model_exclude_unset=True)
    def status(who: Caller) -> dict:
        return service.status(who)

    @app.get("/images", response_model=list[ImageInfo], response_model_exclude_unset=True)
    def list_images(who: Caller) -> list[dict]:
        return service.status(who)["images"]

    @app.get("/envs", response_model=list[EnvInfo], response_model_exclude_unset=True)
    def list_envs(who: Caller, owner: Annotated[str | None, Query(
            description="only this owner's ENVs; all of them without it")] = None,
                  ) -> list[dict]:
        return service.list_envs(who, owner)

    @app.post("/envs", status_code=202, response_model=EnvInfo, response_model_exclude_unset=True)
    def create_env(body: EnvCreate, who: Caller, request: Request) -> dict:
        return audited("create", request, who, body.name, service.create(who, body))

    @app.get("/envs/{name}", response_model=EnvInfo, response_model_exclude_unset=True)
    def show_env(name: str, who: Caller) -> dict:
        return service.get(who, name)

    @app.patch("/envs/{name}", response_model=EnvInfo, response_model_exclude_unset=True)
    def update_env(name: str, body: EnvUpdate, who: Caller, request: Request) -> dict:
        return audited("update", request, who, name, service.update(who, name, body),
                       life_time=body.life_time, add_ports=body.add_ports or None,
                       remove_ports=body.remove_ports or None, cpu_num=body.cpu_num,
                       mem_size=body.mem_size)

    @app.post("/envs/{name}/stop", response_model=EnvInfo, response_model_exclude_unset=True)
    def stop_env(name: str, who: Caller, request: Request) -> dict:
        return audited("stop", request, who, name, service.stop(who, name))

    @app.post("/envs/{name}/start", status_code=202, response_model=EnvInfo,
              response_model_exclude_unset=True)
    def start_env(name: str, who: Caller, request: Request) -> dict:
        return audited("start", request, who, name, service.start(who, name))

    @app.delete("/envs/{name}", response_model=Deleted, response_model_exclude_unset=True)
    def delete_env(name: str, who: Caller, request: Request) -> dict:
        return audited("delete", request, who, name, service.delete(who, name))

    @app.delete("/envs/{name}/vms", response_model=EnvInfo, response_model_exclude_unset=True)
    def kick_vms(name: str, who: Caller,
                 vm: Annotated[list[str], Query(description="VM name, id or index")],
                 request: Request) -> dict:
        return audited("kick", request, who, name, service.kick(who, name, vm), kicked=vm)

    @app.post("/envs/{name}/run", response_model=RunAnswer, response_model_exclude_unset=True)
    def run(name: str, body: RunRequest, who: Caller, request: Request) -> Response:
        with busy.hold(request):
            results = service.run(who, name, body)
        # written a piece at a time: the output a run keeps is held once (jsonstream)
        return StreamingResponse(jsonstream.dumps_iter({"env": name, "results": results}),
                                 media_type="application/json")

    @app.put("/envs/{name}/files", response_model=PushAnswer, response_model_exclude_unset=True)
    async def push(name: str, request: Request, who: Caller,
                   path: Annotated[str, Query(description="absolute path in each VM")],
                   mode: Annotated[str | None, Query(pattern="^[0-7]{3,4}$")] = None,
                   vm: Annotated[list[str] | None, Query(description="only these VMs")] = None,
                   use_ssh: bool = False) -> dict:
        with busy.hold(request):
            await run_in_threadpool(service.may_push, who, name)  # before the body
            # the body goes to a temporary file as it arrives (the Guard caps its size)
            with tempfile.TemporaryFile(dir=SPOOL_DIR) as spool:
                async for piece in request.stream():
                    spool.write(piece)
                spool.flush()  # Upload reads the file by position, past Python's buffer
                upload = Upload(spool, spool.tell())
                results = await run_in_threadpool(service.push, who, name, path, upload,
                                                  int(mode, 8) if mode else None, vm, use_ssh)
        return {"env": name, "results": results}

    @app.get("/envs/{name}/vms/{vm}/files", response_class=Response, responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "the file's bytes"}})
    def pull(name: str, vm: str, who: Caller, request: Request,
             path: Annotated[str, Query(description="absolute path in the VM")],
             use_ssh: bool = False) -> Response:
        with busy.hold(request):
            download = service.pull(who, name, vm, path, use_ssh)
        return StreamingResponse(download.chunks, media_type="application/octet-stream",
                                 headers={"Content-Length": str(download.size)})

    @app.get("/envs/{name}/vms/{vm}/console", response_class=PlainTextResponse)
    def console(name: str, vm: str, who: Caller,
                lines: Annotated[int, Query(ge=1, le=2000)] = 50) -> str:
        return service.console(who, name, vm, lines)

    return app

