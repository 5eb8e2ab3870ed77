"""ttserver's side of the API: `LocalService`, the routes' EnvService over this server's
EnvManager (ttclient/routes.py has the one route table; OpenAPI at /openapi.json, docs
at /docs).

Here: who may do what (a token sees and touches only the ENVs it created; admin tokens
everything — auth.py checks the tokens). Rules about ENVs and VMs: envs.EnvManager.
"""

from __future__ import annotations

from fastapi import FastAPI

from ttclient.contract import Download, EnvCreate, EnvUpdate, RunRequest, Upload
from ttclient.guard import served_names
from ttclient.routes import create_app as create_routes

from .admission import EnvRequest
from .auth import Principal, TokenStore
from .envs import EnvManager
from .errors import TTError


class LocalService:
    """The API over `manager`'s ENVs; callers are the Principals `tokens` knows."""

    title = "ttserver"
    description = "ttstack host daemon: ENVs of real VMs for test suites"

    def __init__(self, manager: EnvManager, tokens: TokenStore) -> None:
        self.manager = manager
        self.tokens = tokens
        self.authenticate = tokens.principal
        self.metrics = manager.metrics

    def may_scrape(self, caller: Principal) -> None:
        if self.tokens.enabled and not caller.admin:
            raise TTError("/metrics needs an admin token", status=403)

    def _count_errors(self, results: list[dict], use_ssh: bool) -> list[dict]:
        """`results`, after counting those whose VM could not be reached."""
        failed = sum(1 for r in results if r.get("error"))
        if failed:
            self.metrics.guest_errors.labels("ssh" if use_ssh else "agent").inc(failed)
        return results

    def _owned(self, caller: Principal, name: str) -> None:
        """TTError 403 unless the caller's token created the ENV (or is an admin token);
        NotFound for an unknown ENV."""
        if not caller.may_use(self.manager.get(name)["owner"]):
            raise TTError(f"ENV {name!r} belongs to another token", status=403)

    def health(self) -> dict:
        return {"ok": True, "server_id": self.manager.server_id}

    def whoami(self, caller: Principal) -> dict:
        return {"name": caller.name, "admin": caller.admin, "auth": self.tokens.enabled}

    def status(self, caller: Principal) -> dict:
        return self.manager.status()

    def list_envs(self, caller: Principal, owner: str | None) -> list[dict]:
        if not caller.admin:  # a token sees only its own ENVs
            return [] if owner not in (None, caller.name) else self.manager.list_envs(
                caller.name)
        return self.manager.list_envs(owner)

    def create(self, caller: Principal, body: EnvCreate) -> dict:
        req = EnvRequest(name=body.name, os_prefix=body.os_prefix, vm_number=body.vm_number,
                         cpu_num=body.cpu_num, mem_size=int(body.mem_size),
                         disk_size=None if body.disk_size is None else int(body.disk_size),
                         life_time=body.life_time, ports=body.ports, ssh_keys=body.ssh_keys,
                         owner=caller.name if self.tokens.enabled else body.owner,
                         deny_outgoing=body.deny_outgoing, counts=body.counts,
                         warm=body.warm, first_index=body.first_index,
                         limited=self.tokens.enabled and not caller.admin)
        return self.manager.create(req)

    def get(self, caller: Principal, name: str) -> dict:
        self._owned(caller, name)
        return self.manager.get(name)

    def update(self, caller: Principal, name: str, body: EnvUpdate) -> dict:
        self._owned(caller, name)
        return self.manager.update(name, body.life_time, body.add_ports, body.remove_ports,
                                   body.cpu_num, None if body.mem_size is None
                                   else int(body.mem_size),
                                   limited=self.tokens.enabled and not caller.admin)

    def stop(self, caller: Principal, name: str) -> dict:
        self._owned(caller, name)
        return self.manager.stop(name)

    def start(self, caller: Principal, name: str) -> dict:
        self._owned(caller, name)
        return self.manager.start(name)

    def delete(self, caller: Principal, name: str) -> dict:
        self._owned(caller, name)
        self.manager.delete(name)
        return {"deleted": name}

    def kick(self, caller: Principal, name: str, vms: list[str]) -> dict:
        self._owned(caller, name)
        return self.manager.kick(name, vms)

    def run(self, caller: Principal, name: str, body: RunRequest) -> list[dict]:
        self._owned(caller, name)
        return self._count_errors(self.manager.guest.run(
            name, body.cmd, body.use_ssh, body.timeout, body.vms, body.binary), body.use_ssh)

    def may_push(self, caller: Principal, name: str) -> None:
        self._owned(caller, name)

    def push(self, caller: Principal, name: str, path: str, data: Upload, mode: int | None,
             vms: list[str] | None, use_ssh: bool) -> list[dict]:
        self._owned(caller, name)
        return self._count_errors(self.manager.guest.push(name, path, data, mode, vms,
                                                          use_ssh), use_ssh)

    def pull(self, caller: Principal, name: str, vm: str, path: str, use_ssh: bool) -> Download:
        self._owned(caller, name)
        return self.manager.guest.pull(name, vm, path, use_ssh)

    def console(self, caller: Principal, name: str, vm: str, lines: int) -> str:
        self._owned(caller, name)
        return self.manager.guest.console(name, vm, lines)


def create_app(manager: EnvManager, tokens: TokenStore | None = None,
               allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving the API over `manager`, authorising callers with `tokens`
    (default: no tokens file, an open API) before their bodies are read, answering Host
    names of this machine, its bind address and `allowed_hosts` (ttclient/guard.py)."""
    service = LocalService(manager, tokens or TokenStore(None))
    return create_routes(service, served_names(manager.cfg.serv_addr, allowed_hosts))
