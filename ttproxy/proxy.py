"""The proxy's rules: which servers hold an ENV, how a create is placed and rolled back,
and how requests fan out and merge.

State: none of its own. Where ENVs live is learnt from the servers (`GET /envs` on each)
at start, whenever a server comes back up, and when a name is not known — so a proxy
restart loses nothing, and a server's ENVs reappear when it does. An ENV that spans
servers is one ENV of the same name on each, with disjoint VM indexes.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from ttclient.api import ApiError, Client, vm_refs
from ttclient.contract import ServiceError
from ttclient.imagenames import (
    ImageNameError,
    NoMatchingImage,
    match_images,
    parse_image_name,
)
from ttclient.rules import env_size_error, name_taken_error

from .directory import EnvDirectory
from .merge import Part, may_see, merge_env, merge_results, merge_status
from .metrics import ProxyMetrics
from .placement import Capacity, PlacementError, place
from .servers import Member, ServerSet, is_unreachable

log = logging.getLogger(__name__)
T = TypeVar("T")

# The caller's API token, passed through to the servers: they decide who may do what.
CALLER_TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller_token",
                                                                          default=None)
PRINCIPAL_TTL = 30.0
UNKNOWN_REFRESH = 1.0  # seconds between re-learning all servers for an unknown name


class ProxyError(ServiceError):
    """An answer for the client: HTTP status and one line."""


class Proxy:
    """The ttserver API over the servers of `servers`: places new ENVs, fans requests out to
    the servers holding an ENV and merges their answers. Every method raises ProxyError
    (with the HTTP status to answer) on failure."""

    def __init__(self, servers: ServerSet) -> None:
        self.servers = servers
        self.metrics = ProxyMetrics(servers)
        self.directory = EnvDirectory()
        self._lock = threading.RLock()
        self._create_lock = threading.Lock()
        self._clients: dict[tuple[str, str | None], Client] = {}
        self._principals: dict[str | None, tuple[float, dict]] = {}
        self._refresh_lock = threading.Lock()
        self._refreshed_at = -UNKNOWN_REFRESH
        servers.on_up = self._learn_from

    def _post_part(self, m: Member, part: dict) -> dict:
        return self._c(m).post_env(part)

    def _c(self, m: Member) -> Client:
        """A client for `m` that carries the caller's token (one per token, kept alive)."""
        token = CALLER_TOKEN.get()
        key = (m.address, token)
        with self._lock:
            if key not in self._clients:
                if len(self._clients) > 1000:
                    self._clients.clear()
                self._clients[key] = Client(f"http://{m.address}", timeout=m.client.timeout,
                                            token=token)
            return self._clients[key]

    def whoami(self, strict: bool = False) -> dict:
        """Who the caller is ({name, admin}), asked of a server and cached briefly; used to
        filter what the proxy shows from its own cache (parts on servers that are down).
        `strict`: ProxyError 401 when a server refuses the caller's token (missing or
        wrong) instead of going on to the next; anonymous when no server answers."""
        token = CALLER_TOKEN.get()
        hit = self._principals.get(token)
        if hit and time.monotonic() - hit[0] < PRINCIPAL_TTL:
            return hit[1]
        for m in self.servers.up():
            try:
                who = self._c(m).whoami()
            except ApiError as exc:
                if strict and exc.status == 401:
                    raise ProxyError(str(exc), 401) from exc
                continue
            self._principals[token] = (time.monotonic(), who)
            return who
        return {"name": "", "admin": False}

    # --- calls to servers ---------------------------------------------------------------
    def _call(self, m: Member, fn: Callable[[Member], T]) -> T:
        """Call one server; a transport failure marks it down and becomes a 503."""
        try:
            return fn(m)
        except ApiError as exc:
            if is_unreachable(exc):
                self.servers.mark_down(m.address, str(exc))
                raise ProxyError(f"server {m.address} is down: {exc}", 503) from exc
            raise ProxyError(str(exc), exc.status or 502) from exc

    def _fan(self, members: list[Member], fn: Callable[[Member], T]
             ) -> list[tuple[Member, T | ProxyError]]:
        """Call several servers in parallel; each result or its ProxyError. A server's 401
        is raised: the caller's token is missing or wrong, which no other server's answer
        makes right (it is not that server's health)."""
        token = CALLER_TOKEN.get()  # worker threads do not inherit the request's context

        def one(m: Member) -> tuple[Member, T | ProxyError]:
            CALLER_TOKEN.set(token)
            try:
                return m, self._call(m, fn)
            except ProxyError as exc:
                return m, exc

        if len(members) <= 1:  # the common case: no thread pool to spin up
            results = [one(m) for m in members]
        else:
            with ThreadPoolExecutor(max_workers=len(members)) as pool:
                results = list(pool.map(one, members))
        for _, reply in results:
            if isinstance(reply, ProxyError) and reply.status == 401:
                raise reply
        return results

    # --- where ENVs are -----------------------------------------------------------------
    def _learn_from(self, address: str) -> None:
        try:
            envs = self.servers.get(address).client.list_envs()
        except ApiError as exc:
            log.warning("cannot list ENVs on %s: %s", address, exc)
            return
        for env in envs:
            self.directory.remember(env["name"], address, env)

    def refresh(self) -> None:
        """Re-learn which ENVs live on each server that is up (`GET /envs`); a server that
        cannot list them is skipped."""
        for m in self.servers.up():
            self._learn_from(m.address)

    def _refresh_unknown(self) -> None:
        """refresh() for a name nobody knows, at most once per UNKNOWN_REFRESH seconds
        (callers meanwhile wait for the one in flight): each is a `GET /envs` with the
        proxy's own token on every server, and asking for made-up names must not turn
        one request into one per server."""
        with self._refresh_lock:
            if time.monotonic() - self._refreshed_at < UNKNOWN_REFRESH:
                return
            self.refresh()
            self._refreshed_at = time.monotonic()

    def _holders(self, name: str) -> list[str]:
        holders = self.directory.holders(name)
        if not holders:  # made directly on a server, or we have not looked yet
            self._refresh_unknown()
            holders = self.directory.holders(name)
        if not holders:
            # as a ttserver, refuse a caller who may not ask at all (401) before saying
            # that no server holds the name
            self.whoami(strict=True)
            raise ProxyError(f"ENV {name!r} does not exist", 404)
        return holders

    # --- views --------------------------------------------------------------------------
    def _parts(self, name: str, fn: Callable[[Member], dict]) -> list[Part]:
        """Ask every server holding `name` (that is up) with fn; down ones give last views."""
        holders = self._holders(name)
        members = [self.servers.get(a) for a in holders]
        up = [m for m in members if m.up]
        answers = dict((m.address, r) for m, r in self._fan(up, fn))
        parts = []
        for m in members:
            got = answers.get(m.address)
            if isinstance(got, dict):
                self.directory.remember(name, m.address, got)
                parts.append(Part(m.address, got))
            elif isinstance(got, ProxyError) and got.status == 404:
                self.directory.forget(name, m.address)  # deleted there (expired, by hand)
            elif isinstance(got, ProxyError) and got.status != 503:
                raise got  # the server's answer (403, ...), not a dead server
            else:
                err = str(got) if got is not None else m.error
                parts.append(Part(m.address, self.directory.last(name, m.address),
                                  err or "not answering"))
        if not parts:
            self.directory.forget(name)
            raise ProxyError(f"ENV {name!r} does not exist", 404)
        if all(p.view is None for p in parts) or not self._may_see_cached(parts):
            raise ProxyError(f"ENV {name!r}: every server holding it is down: "
                             + "; ".join(f"{p.address}: {p.down_error}" for p in parts), 503)
        return parts

    def _may_see_cached(self, parts: list[Part]) -> bool:
        """Whether the caller may see an ENV of which no live server answered (only
        last-seen views): a live holder's answer authorised the caller already; without
        one, a server that is up must vouch for the caller (whoami) as its owner or an
        admin. No server up: nobody can, and a cached view is nobody's to see."""
        if any(not p.down_error for p in parts):
            return True
        who = self.whoami()
        return any(p.view is not None and may_see(p.view, who) for p in parts)

    def get(self, name: str) -> dict:
        """The merged ENV view (merge.merge_env: a ttserver's shape plus `servers`);
        ProxyError 404 when no server has it, 503 when every server holding it is down."""
        return merge_env(self._parts(name, lambda m: self._c(m).get_env(name)))

    def list_envs(self, owner: str | None = None) -> list[dict]:
        """The merged views of every ENV (only `owner`'s when given), oldest first; parts on
        servers that are down show their last views, if the caller may see them."""
        answers = self._fan(self.servers.up(), lambda m: self._c(m).list_envs(owner))
        seen: dict[str, list[Part]] = {}
        for m, reply in answers:
            if isinstance(reply, ProxyError):
                continue
            for env in reply:
                self.directory.remember(env["name"], m.address, env)
                seen.setdefault(env["name"], []).append(Part(m.address, env))
        down = [m for m in self.servers if not m.up]
        who = self.whoami() if down else {"admin": True}
        for name, address, view in self.directory.parts():  # parts on servers that are
            member = self.servers.get(address)              # down: their last views, if
            if not member.up and view is not None and (     # the caller may see them
                    owner is None or view.get("owner") == owner) and may_see(view, who):
                seen.setdefault(name, []).append(
                    Part(address, view, member.error or "not answering"))
        envs = [merge_env(parts) for parts in seen.values()]
        return sorted(envs, key=lambda e: e["created_at"])

    def status(self) -> dict:
        """Summed resources of the servers that are up, `servers` (a row per member:
        address, health and its /status or error), `servers_up` and the images of all."""
        answers = dict((m.address, r) for m, r in self._fan(self.servers.up(),
                                                             lambda m: self._c(m).status()))
        members = []
        for m in self.servers:
            st = answers.get(m.address)
            members.append((m.address, st) if isinstance(st, dict) else
                           (m.address, str(st) if st else m.error))
        return merge_status(members, len(self.directory))

    # --- create and delete --------------------------------------------------------------
    def create(self, body: dict) -> dict:
        """Place the ENV's VMs over the servers, create each part, roll back on failure."""
        name = body["name"]
        with self._create_lock:  # two creates must not both see the same free resources
            self.refresh()
            if (taken := self.directory.name_like(name)) is not None:
                raise ProxyError(name_taken_error(name, taken), 409)
            up = self.servers.up()
            if not up:
                raise ProxyError("no ttserver is up behind this proxy: "
                                 + "; ".join(f"{m.address}: {m.error}" for m in self.servers),
                                 503)
            statuses = [(m, st) for m, st in self._fan(up, lambda m: m.client.status())
                        if isinstance(st, dict)]
            caps = [Capacity.from_status(m.address, st, order=i)
                    for i, (m, st) in enumerate(statuses)]
            available = sorted({parse_image_name(n) for c in caps for n in c.images})
            try:
                chosen = [i.full for i in match_images(body["os_prefix"], available)]
            except NoMatchingImage as exc:
                raise ProxyError(str(exc), 404) from exc
            except ImageNameError as exc:
                raise ProxyError(str(exc), 400) from exc
            if error := env_size_error(body.get("vm_number", 1), len(chosen)):
                raise ProxyError(error, 400)  # each server's part is smaller: say it here
            try:
                plan = place(chosen, body.get("vm_number", 1), body.get("cpu_num", 1),
                             int(body["mem_size"]), body.get("disk_size"), caps)
            except PlacementError as exc:
                self.metrics.refused.inc()
                raise ProxyError(f"ENV {name!r} cannot be placed: {exc}", 409) from exc
            for address, counts in plan.parts.items():
                self.metrics.placed.labels(address).inc(sum(counts.values()))
            created: list[str] = []
            firsts = plan.first_indexes()
            try:
                for address, counts in plan.parts.items():
                    part = {**body, "os_prefix": list(counts), "counts": counts,
                            "first_index": firsts[address]}
                    m = self.servers.get(address)
                    view = self._call(m, partial(self._post_part, part=part))
                    created.append(address)
                    self.directory.remember(name, address, view)
            except ProxyError as exc:
                # a server that did not answer (a timeout) may have made its part anyway
                unsure = [address] if exc.status == 503 else []
                left = self._rollback(name, created + unsure)
                where = f" (on {address})" if len(plan.parts) > 1 else ""
                if left:
                    raise ProxyError(
                        f"{exc}{where}; a part of ENV {name!r} may be left on "
                        f"{', '.join(left)}: run 'tt env del {name}' when it answers again "
                        "(it also goes when its life time ends)", exc.status) from exc
                raise ProxyError(f"{exc}{where}; nothing was left on any server",
                                 exc.status) from exc
            log.info("ENV %s placed: %s", name, plan.parts)
        return self.get(name)

    def _rollback(self, name: str, created: list[str]) -> list[str]:
        """Delete the ENV's parts on `created`; the addresses where that failed (a part
        not found is gone: fine). Their own reapers delete them at expiry at the latest."""
        left = []
        for address in created:
            try:
                self._c(self.servers.get(address)).delete_env(name)
            except ApiError as exc:
                if exc.status != 404:
                    log.error("rollback of ENV %s on %s failed: %s", name, address, exc)
                    left.append(address)
        self.directory.forget(name)
        return left

    def delete(self, name: str) -> dict:
        """Delete the ENV on every server holding it: {"deleted": name}. ProxyError 404 for
        an unknown ENV, 503 when a holder is down (the rest is deleted)."""
        holders = self._holders(name)
        members = [self.servers.get(a) for a in holders]
        results = self._fan([m for m in members if m.up],
                            lambda m: self._c(m).delete_env(name))
        refused = [r for _, r in results
                   if isinstance(r, ProxyError) and r.status not in (404, 503)]
        if refused:  # the server's answer (403: another token's ENV), not a dead server
            raise refused[0]
        deleted = [m.address for m, r in results
                   if not isinstance(r, ProxyError) or r.status == 404]
        for address in deleted:
            self.directory.forget(name, address)
        left = [a for a in holders if a not in deleted]
        if left:
            raise ProxyError(
                f"ENV {name!r} deleted on {', '.join(deleted) or 'no server'}; not on "
                f"{', '.join(left)} (down): run 'tt env del {name}' again when it is back"
                " (its VMs also go when the ENV expires)", 503)
        return {"deleted": name}

    # --- the rest fans out over the servers holding the ENV ------------------------------
    def _each_part(self, name: str, fn: Callable[[Member], dict]) -> list[dict]:
        """fn on every server holding the ENV; all must be up (a state change on part of
        an ENV would leave it half stopped)."""
        members = [self.servers.get(a) for a in self._holders(name)]
        down = [m.address for m in members if not m.up]
        if down:
            raise ProxyError(f"ENV {name!r} has VMs on {', '.join(down)}, which is down; "
                             "try again when it is back", 503)
        results = self._fan(members, fn)
        answers = []
        for _, r in results:
            if isinstance(r, ProxyError):
                raise r
            answers.append(r)
        return answers

    def stop(self, name: str) -> dict:
        """Stop the ENV on every server holding it; the merged view. ProxyError 503 when a
        holder is down."""
        self._each_part(name, lambda m: self._c(m).stop_env(name))
        return self.get(name)

    def start(self, name: str) -> dict:
        """Start the stopped ENV on every server holding it; the merged view. ProxyError 503
        when a holder is down."""
        self._each_part(name, lambda m: self._c(m).start_env(name))
        return self.get(name)

    def update(self, name: str, body: dict) -> dict:
        """Apply an EnvUpdate body (dict) on every server holding the ENV; the merged view.
        ProxyError 503 when a holder is down."""
        self._each_part(name, lambda m: self._c(m).update_env(
            name, body.get("life_time"), body.get("add_ports"), body.get("remove_ports"),
            body.get("cpu_num"), body.get("mem_size")))
        return self.get(name)

    def kick(self, name: str, refs: list[str]) -> dict:
        """Remove the VMs `refs` names from the ENV on the servers holding them (a server
        whose whole part goes deletes its part); the merged view. ProxyError 409 for every
        VM of the ENV, 404 for a name that is no VM of it, 503 when a holder is down."""
        by_server = self._selected_vms(name, refs)
        parts = {a: len(vms) for a, vms in self._selected_vms(name, None).items()}
        if {a: len(vms) for a, vms in by_server.items()} == parts:
            raise ProxyError(f"that is every VM of ENV {name!r}: delete the ENV instead "
                             f"('tt env del {name}')", 409)
        for address, vms in by_server.items():
            m = self.servers.get(address)
            if not m.up:
                raise ProxyError(f"ENV {name!r} has VMs on {address}, which is down; try "
                                 "again when it is back", 503)
            ids = [vm["id"] for vm in vms]
            if len(vms) == parts.get(address):
                self._call(m, lambda m: self._c(m).delete_env(name))
                self.directory.forget(name, address)
            else:
                self._call(m, partial(self._kick_part, name=name, ids=ids))
        return self.get(name)

    def _kick_part(self, m: Member, name: str, ids: list[str]) -> dict:
        return self._c(m).kick_vms(name, ids)

    def _selected_vms(self, name: str, only: list[str] | None) -> dict[str, list[dict]]:
        """The ENV's VMs (all, or those `only` names), grouped by the server holding them."""
        vms = self.get(name)["vms"]
        if only:
            unknown = set(only).difference(*map(vm_refs, vms))
            if unknown:
                raise ProxyError(f"ENV {name!r} has no VM {', '.join(sorted(unknown))}", 404)
            vms = [vm for vm in vms if set(only) & vm_refs(vm)]
        by_server: dict[str, list[dict]] = {}
        for vm in vms:
            by_server.setdefault(vm["server"], []).append(vm)
        return by_server

    def _fan_vms(self, name: str, only: list[str] | None, kind: str,
                 fn: Callable[[Member, list[str] | None], dict]) -> list[dict]:
        """fn(server, VM ids or None for all) on each up server holding selected VMs; the
        VMs on servers that are (or turn out to be) down get error results."""
        by_server = self._selected_vms(name, only)
        up = [self.servers.get(a) for a in by_server if self.servers.get(a).up]
        down = {a: vms for a, vms in by_server.items() if not self.servers.get(a).up}
        results = self._fan(up, lambda m: fn(
            m, [vm["id"] for vm in by_server[m.address]] if only else None))
        replies = []
        for m, reply in results:
            if isinstance(reply, ProxyError):
                if reply.status != 503:
                    raise reply
                down[m.address] = by_server[m.address]
                continue
            replies.append((m.address, reply))
        return merge_results(replies, down, kind)

    def run(self, name: str, body: dict) -> list[dict]:
        """Run a RunRequest body (dict) on the selected VMs: list of per-VM result dicts,
        sorted by VM index, with `server`; VMs on down servers get error results."""
        return self._fan_vms(name, body.get("vms"), "run", lambda m, vms: self._c(m).run(
            name, body["cmd"], body.get("use_ssh", False), body.get("timeout", 600), vms,
            body.get("binary", False)))

    def push(self, name: str, path: str, data: bytes, mode: int | None,
             only: list[str] | None, use_ssh: bool) -> list[dict]:
        """Write `data` to the guest `path` on the selected VMs (all when `only` is empty):
        list of per-VM result dicts, as run gives."""
        return self._fan_vms(name, only, "push", lambda m, vms: self._c(m).push(
            name, path, data, mode=mode, vms=vms, use_ssh=use_ssh))

    def _vm_server(self, name: str, vm_ref: str) -> Member:
        for vm in self.get(name)["vms"]:
            if vm_ref in vm_refs(vm):
                m = self.servers.get(vm["server"])
                if not m.up:
                    raise ProxyError(f"VM {vm_ref} is on {m.address}, which is down", 503)
                return m
        raise ProxyError(f"ENV {name!r} has no VM {vm_ref!r}", 404)

    def pull(self, name: str, vm_ref: str, path: str, use_ssh: bool) -> bytes:
        """The bytes of the guest `path` in one VM, from the server holding it; ProxyError
        404 for an unknown VM, 503 when its server is down."""
        m = self._vm_server(name, vm_ref)
        return self._call(m, lambda m: self._c(m).pull(name, vm_ref, path, use_ssh))

    def console(self, name: str, vm_ref: str, lines: int) -> str:
        """The last `lines` lines of one VM's serial console, as text; ProxyError 404 for an
        unknown VM, 503 when its server is down."""
        m = self._vm_server(name, vm_ref)
        return self._call(m, lambda m: self._c(m).console(name, vm_ref, lines))
