"""Where the client finds its server: `tt config` writes it, everything else reads it.

Order: explicit arguments, then $TT_SERVER (HOST:PORT), then the config file in the user's
config dir ($TT_CONFIG overrides its path), then 127.0.0.1:20000. The API token likewise:
$TT_TOKEN, then the file (which is written 0600 because it may hold the token).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from platformdirs import user_config_dir

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 20000


@dataclass
class ClientConfig:
    """Where the server is (address, TCP port) and the API token ("" for none)."""

    serv_addr: str = DEFAULT_ADDR
    serv_port: int = DEFAULT_PORT
    token: str = ""

    @property
    def address(self) -> str:
        """`HOST:PORT` of the server, an IPv6 address in brackets (what parse_server reads)."""
        return join_server(self.serv_addr, self.serv_port)

    @property
    def base_url(self) -> str:
        """`http://HOST:PORT` of the server, an IPv6 address in brackets."""
        return f"http://{self.address}"


def config_path() -> Path:
    """The config file: $TT_CONFIG, else config.json in the user's ttstack config dir."""
    env = os.environ.get("TT_CONFIG")
    return Path(env) if env else Path(user_config_dir("ttstack")) / "config.json"


def parse_server(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`, or either as an `http://` URL with no path) ->
    (host, port); ValueError says what is wrong."""
    bare = text.strip()
    if bare.lower().startswith("http://"):
        bare = bare[len("http://"):].rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def join_server(host: str, port: int) -> str:
    """`HOST:PORT`, an IPv6 address in brackets: the inverse of parse_server."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def owner() -> str:
    """Who this client is, for `tt env list` (own ENVs) vs `listall`: $TT_OWNER, else
    user@host. Not authentication: it only keeps teams' listings apart."""
    return os.environ.get("TT_OWNER") or f"{getpass.getuser()}@{socket.gethostname()}"


def load(apply_env: bool = True) -> ClientConfig:
    """The saved config, overridden by $TT_SERVER unless `apply_env` is False (what
    `tt config` saves must be the file's values, not a one-off override)."""
    cfg = ClientConfig()
    path = config_path()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            cfg = ClientConfig(str(data.get("serv_addr", DEFAULT_ADDR)),
                               int(data.get("serv_port", DEFAULT_PORT)),
                               str(data.get("token", "")))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"config file {path} is unreadable ({exc}); rewrite it with "
                             "'tt config --serv-addr ADDR --serv-port PORT'") from exc
    if apply_env and os.environ.get("TT_SERVER"):
        cfg.serv_addr, cfg.serv_port = parse_server(os.environ["TT_SERVER"])
    if apply_env and os.environ.get("TT_TOKEN"):
        cfg.token = os.environ["TT_TOKEN"].strip()
    return cfg


def save(cfg: ClientConfig) -> Path:
    """Write `cfg` to config_path() (mode 0600, replaced atomically); returns that path.
    OSError when it cannot be written."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when a stale tmp file had other permissions
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(cfg), f, indent=2)
    tmp.replace(path)
    return path
