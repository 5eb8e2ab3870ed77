"""ttproxy's side of the API: `ProxyService`, the routes' EnvService over a Proxy
(ttclient/routes.py has the one route table, the same as a ttserver's, so `tt`, the
pytest plugin and CI talk to a proxy unchanged). Rules live in proxy.py; the servers
check the caller's token (passed on by `CallerToken`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ttclient.contract import Download, EnvCreate, EnvUpdate, RunRequest, ServiceError, Upload
from ttclient.guard import served_names
from ttclient.routes import create_app as create_routes

from .proxy import CALLER_TOKEN, Proxy


class CallerToken:
    """ASGI middleware: the caller's bearer token, for the duration of the request, in a
    context variable the proxy passes on to the servers (they do the authorising)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
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


class ProxyService:
    """The API over `proxy`; the caller is None (its token travels in CALLER_TOKEN)."""

    title = "ttproxy"
    description = "one address for many ttservers; the ttserver API"
    authenticate = None  # the servers check tokens

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.metrics = proxy.metrics

    def may_scrape(self, caller: None) -> None:
        """The servers judge the token: with tokens, only an admin's may scrape; when no
        server can be asked, nobody may (the failed scrape shows the outage)."""
        who = self.proxy.whoami()
        if "auth" not in who:
            raise ServiceError("no ttserver is up to check the token for /metrics", 503)
        if who["auth"] and not who["admin"]:
            raise ServiceError("/metrics needs an admin token", 403)

    def health(self) -> dict:
        return {"ok": True, "server_id": "ttproxy", "servers_up": len(self.proxy.servers.up()),
                "servers": len(self.proxy.servers.members)}

    def whoami(self, caller: None) -> dict:
        return self.proxy.whoami()

    def status(self, caller: None) -> dict:
        return self.proxy.status()

    def list_envs(self, caller: None, owner: str | None) -> list[dict]:
        return self.proxy.list_envs(owner)

    def create(self, caller: None, body: EnvCreate) -> dict:
        return self.proxy.create(body.model_dump(exclude={"counts", "first_index"}))

    def get(self, caller: None, name: str) -> dict:
        return self.proxy.get(name)

    def update(self, caller: None, name: str, body: EnvUpdate) -> dict:
        return self.proxy.update(name, body.model_dump())

    def stop(self, caller: None, name: str) -> dict:
        return self.proxy.stop(name)

    def start(self, caller: None, name: str) -> dict:
        return self.proxy.start(name)

    def delete(self, caller: None, name: str) -> dict:
        return self.proxy.delete(name)

    def kick(self, caller: None, name: str, vms: list[str]) -> dict:
        return self.proxy.kick(name, vms)

    def run(self, caller: None, name: str, body: RunRequest) -> list[dict]:
        return self.proxy.run(name, body.model_dump())

    def may_push(self, caller: None, name: str) -> None:
        self.proxy.get(name)  # the ENV's servers check the token and the owner

    def push(self, caller: None, name: str, path: str, data: Upload, mode: int | None,
             vms: list[str] | None, use_ssh: bool) -> list[dict]:
        return self.proxy.push(name, path, data.read(), mode, vms, use_ssh)

    def pull(self, caller: None, name: str, vm: str, path: str, use_ssh: bool) -> Download:
        data = self.proxy.pull(name, vm, path, use_ssh)
        return Download(len(data), iter([data]))

    def console(self, caller: None, name: str, vm: str, lines: int) -> str:
        return self.proxy.console(name, vm, lines)


def create_app(proxy: Proxy, bind: str = "127.0.0.1",
               allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving the ttserver API through `proxy`, answering Host names of
    this machine, `bind` and `allowed_hosts`, with the same body limits as a ttserver
    (ttclient/guard.py)."""
    return create_routes(ProxyService(proxy), served_names(bind, allowed_hosts),
                         middleware=(CallerToken,))
