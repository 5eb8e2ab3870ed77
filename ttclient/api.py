"""A small typed wrapper over the ttserver/ttproxy HTTP API, used by `tt`, the plugin and
the proxy. Every call has a timeout; every failure becomes an ApiError with the server's
own message, so callers can print one clear line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from . import config as cfgmod
from .config import owner
from .rules import path_segment
from .waiting import WaitTimeout, wait_for

FROM_CONFIG = object()  # Client(token=...) default: $TT_TOKEN or the config file
DEFAULT_TIMEOUT = 30.0
# ENV states that end by themselves; wait_env polls through them
TRANSIENT_STATES = ("creating", "starting")
# how wait_env polls an ENV (decision 80): first after 0.2 s, each wait 10 % longer than
# the one before, at most a second apart
ENV_POLL_FIRST, ENV_POLL_BACKOFF, ENV_POLL_MAX = 0.2, 1.1, 1.0

# seconds a run's answer may take beyond its own timeout: the server waits up to 120 s
# for the agent of a rebooting guest and up to 60 s for sshd in a fresh one
RUN_SLACK = 240

class ReportingRetry(Retry):
    """urllib3's Retry that says on stderr why it waits before each new try, so a user
    watching `tt` sees a restarting server instead of a silent pause."""

    def sleep(self, response: Any = None) -> None:
        last = self.history[-1] if self.history else None
        why = (f"answered HTTP {last.status}" if last and last.status
               else "could not be reached")
        print(f"tt: the server {why}; trying again in {self.get_backoff_time():.1f}s",
              file=sys.stderr, flush=True)
        super().sleep(response)


# What `Client(retry=True)` repeats: calls that are safe to repeat (GET, HEAD, DELETE)
# when the server could not be reached or answered 502/503/504, as while it restarts for
# an upgrade; never one whose answer was lost on the way (read=0: it may have acted).
# Tries again at once, then after 1, 2 and 4 s (urllib3: no wait after the first error,
# then backoff_factor * 2**(n-1)); an unreachable server is reported after 7 s.
RETRY = ReportingRetry(total=4, connect=4, read=0, status=4, backoff_factor=0.5,
                       status_forcelist=(502, 503, 504),
                       allowed_methods=("GET", "HEAD", "DELETE"), raise_on_status=False)


class ApiError(RuntimeError):
    """A failed API call: the server's message (or why it could not be reached), and
    `status`, the HTTP status code (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EnvWaitTimeout(ApiError):
    """wait_env's ENV was still creating or starting when its time was up."""


def _detail(resp: requests.Response) -> str:
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        return resp.text.strip() or resp.reason
    if isinstance(detail, list):  # pydantic validation errors
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}"
                         for d in detail)
    return str(detail)


def _segment(text: str) -> str:
    """`text` quoted as one URL path segment (rules.path_segment); ApiError for "", "."
    or "..", which no ENV or VM is called."""
    try:
        return path_segment(text)
    except ValueError as exc:
        raise ApiError(str(exc), 400) from None


def vm_refs(vm: dict) -> set[str]:
    """Every way a client may name a VM of an ENV view (as ttserver accepts): its id,
    name or index."""
    return {vm["id"], vm["name"], str(vm.get("idx"))}


def changed_vms(view: dict, seen: dict[str, str]) -> list[dict]:
    """VMs of an ENV view whose state differs from `seen` (updated): progress lines show
    each VM once per state, whoever polls (the CLI or the pytest plugin)."""
    changed = [vm for vm in view["vms"] if seen.get(vm["id"]) != vm["state"]]
    seen.update((vm["id"], vm["state"]) for vm in changed)
    return changed


class Client:
    """The API of one ttserver or ttproxy at `base_url`; `token` (default: $TT_TOKEN or the
    config file) is sent as a bearer token; `retry`: repeat what RETRY says; `fix`: what
    the message about an unreachable server advises. Every call raises ApiError on
    failure."""

    def __init__(self, base_url: str, timeout: float = DEFAULT_TIMEOUT,
                 token: str | None | object = FROM_CONFIG, retry: bool = False,
                 fix: str = "is it running?") -> None:
        self.base_url = base_url.rstrip("/")
        self.fix = fix
        self.timeout = timeout
        self.session = requests.Session()
        if retry:  # `tt`: a server restart during an upgrade must not end a waiting run
            for scheme in ("http://", "https://"):
                self.session.mount(scheme, HTTPAdapter(max_retries=RETRY))
        if token is FROM_CONFIG:
            try:
                token = cfgmod.load().token
            except ValueError:
                token = None
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, *, timeout: float | None = None,
              **kwargs: Any) -> requests.Response:
        url = self.base_url + path
        try:
            resp = self.session.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except requests.ConnectionError as exc:
            raise ApiError(f"cannot reach the server at {self.base_url}: {self.fix}") from exc
        except requests.Timeout as exc:
            raise ApiError(f"{self.base_url} did not answer {method} {path} within "
                           f"{timeout or self.timeout:.0f}s") from exc
        except requests.RequestException as exc:  # e.g. an answer that ended early
            raise ApiError(f"{self.base_url}: {method} {path}: the answer was cut short "
                           f"({type(exc).__name__}: {exc})") from exc
        if resp.status_code >= 400:
            raise ApiError(_detail(resp), resp.status_code)
        return resp

    # --- server ---
    def status(self) -> dict:
        """The server's resources, images and warm templates: a dict as EnvManager.status
        makes (through ttproxy: summed totals and `servers`, a row per member)."""
        return self._call("GET", "/status").json()

    def whoami(self) -> dict:
        """{name, admin, auth}: which token this client presents."""
        return self._call("GET", "/whoami").json()

    def images(self) -> list[dict]:
        """The images the server has: a list of dicts as images.Image.to_dict makes."""
        return self._call("GET", "/images").json()

    # --- ENVs ---
    def create_env(self, name: str, os_prefix: list[str], **options: object) -> dict:
        """Ask for an ENV of the images `os_prefix` selects, owned by config.owner();
        options left None are not sent. The `creating` ENV view (dict)."""
        body = {"name": name, "os_prefix": os_prefix, "owner": owner(),
                **{k: v for k, v in options.items() if v is not None}}
        return self.post_env(body)

    def post_env(self, body: dict) -> dict:
        """Create from a complete request body (what ttproxy passes on to a server)."""
        return self._call("POST", "/envs", json=body).json()

    def list_envs(self, owner: str | None = None) -> list[dict]:
        """The ENV views (list of dicts), only `owner`'s when given."""
        return self._call("GET", "/envs", params={"owner": owner} if owner else None).json()

    def get_env(self, name: str) -> dict:
        """The ENV's view: a dict as views.env_view makes; ApiError (404) when there is no
        such ENV."""
        return self._call("GET", f"/envs/{_segment(name)}").json()

    def delete_env(self, name: str) -> dict:
        """Delete the ENV and its VMs (waits up to 120 s); {"deleted": name}."""
        return self._call("DELETE", f"/envs/{_segment(name)}", timeout=120).json()

    def kick_vms(self, name: str, vms: list[str]) -> dict:
        """Remove the VMs `vms` (names, ids or indexes) from the ENV; the ENV view after."""
        return self._call("DELETE", f"/envs/{_segment(name)}/vms", params={"vm": vms},
                          timeout=120).json()

    def stop_env(self, name: str) -> dict:
        """Power the ENV's VMs off, keeping their disks (waits up to 180 s); the `stopped`
        ENV view."""
        # the server powers VMs off cleanly, forcing them after 30 s
        return self._call("POST", f"/envs/{_segment(name)}/stop", timeout=180).json()

    def start_env(self, name: str) -> dict:
        """Boot a stopped ENV from its kept disks; the `starting` ENV view, at once
        (wait_env follows it)."""
        return self._call("POST", f"/envs/{_segment(name)}/start").json()

    def update_env(self, name: str, life_time: int | None = None,
                   add_ports: list[int] | None = None,
                   remove_ports: list[int] | None = None, cpu_num: int | None = None,
                   mem_size: int | None = None) -> dict:
        """Set the ENV's expiry to `life_time` seconds from now, add or remove forwarded
        guest ports, and (a stopped ENV) set vCPUs and memory (MiB) per VM; the updated
        ENV view."""
        body = {"life_time": life_time, "add_ports": add_ports or [],
                "remove_ports": remove_ports or [], "cpu_num": cpu_num, "mem_size": mem_size}
        return self._call("PATCH", f"/envs/{_segment(name)}", json=body).json()

    def wait_env(self, name: str, timeout: float = 900.0,
                 on_change: Callable[[dict], None] | None = None,
                 interval: float = ENV_POLL_FIRST, backoff: float = ENV_POLL_BACKOFF) -> dict:
        """Poll until the ENV leaves `creating`/`starting`; on_change sees every new view.

        Polls after `interval` seconds, each wait `backoff` times the one before, at most
        a second apart (or `interval`, if longer): a warm clone is running ~1.5-2 s after
        its POST under TCG (decision 81), and a fixed 1 s poll added ~0.5 s to that on
        average; a cold boot's minutes cost one GET a second, as before (decision 80)."""
        seen: dict[str, Any] = {"key": None, "env": None}

        def settled() -> dict | None:
            env = seen["env"] = self.get_env(name)
            key = [(v["state"], v.get("error", "")) for v in env["vms"]] + [env["state"]]
            if key != seen["key"] and on_change:
                on_change(env)
            seen["key"] = key
            return env if env["state"] not in TRANSIENT_STATES else None

        try:
            return wait_for(settled, timeout, interval=interval, backoff=backoff,
                            max_interval=max(interval, ENV_POLL_MAX), what=f"ENV {name!r}")
        except WaitTimeout:
            raise EnvWaitTimeout(f"ENV {name!r} was still {seen['env']['state']} after "
                           f"{timeout:.0f}s") from None

    def run(self, name: str, cmd: str, use_ssh: bool = False, timeout: float = 600,
            vms: list[str] | None = None, binary: bool = False) -> dict:
        """`cmd` in the ENV's VMs (all, or those named in `vms`), `timeout` seconds per VM:
        {"env", "results": list of per-VM result dicts} (`binary`: output in base64)."""
        body: dict = {"cmd": cmd, "use_ssh": use_ssh, "timeout": timeout, "vms": vms}
        if binary:
            body["binary"] = True
        return self._call("POST", f"/envs/{_segment(name)}/run", json=body,
                          timeout=timeout + RUN_SLACK).json()

    def push(self, name: str, remote: str, data: bytes, mode: int | None = None,
             vms: list[str] | None = None, use_ssh: bool = False) -> dict:
        """Write `data` to the absolute guest path `remote` in the ENV's VMs, with file mode
        `mode` when given: {"env", "results": list of per-VM result dicts}."""
        params: dict = {"path": remote, "use_ssh": use_ssh}
        if mode is not None:
            params["mode"] = f"{mode:04o}"  # the API takes 3 or 4 octal digits: 0044, not 44
        if vms:
            params["vm"] = vms
        return self._call("PUT", f"/envs/{_segment(name)}/files", params=params, data=data,
                          timeout=900).json()

    def console(self, name: str, vm: str, lines: int = 50) -> str:
        """The last `lines` lines of the VM's serial console, as text."""
        return self._call("GET", f"/envs/{_segment(name)}/vms/{_segment(vm)}/console",
                          params={"lines": lines}).text

    def pull(self, name: str, vm: str, remote: str, use_ssh: bool = False) -> bytes:
        """The bytes of the absolute guest path `remote` in one VM; ApiError when it cannot
        be read."""
        return self._call("GET", f"/envs/{_segment(name)}/vms/{_segment(vm)}/files",
                          params={"path": remote, "use_ssh": use_ssh}, timeout=900).content
