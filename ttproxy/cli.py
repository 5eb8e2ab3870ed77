"""`ttproxy`: one address for many ttservers.

    ttproxy --proxy-addr 127.0.0.1:20002 --server-set 127.0.0.1:20000,127.0.0.1:20001
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ttclient import configfile
from ttclient.argtypes import number_in
from ttclient.audit import add_log_options, configure_logging
from ttclient.config import parse_server
from ttclient.configfile import add_config_option
from ttclient.guard import add_allowed_host_option
from ttclient.serving import add_http_timeout_options


def _server_set(text: str) -> list[str]:
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            host, port = parse_server(item)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        out.append(f"{host}:{port}")
    if not out:
        raise argparse.ArgumentTypeError("give at least one HOST:PORT")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError("a server is listed twice")
    return out


def _addr(text: str) -> tuple[str, int]:
    try:
        return parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The `ttproxy` argument parser."""
    p = argparse.ArgumentParser(prog="ttproxy", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--proxy-addr", type=_addr, default=("127.0.0.1", 20002),
                   metavar="HOST:PORT", help="where the proxy listens (127.0.0.1:20002)")
    p.add_argument("--server-set", type=_server_set, required=True, metavar="H:P,H:P",
                   help="the ttservers behind this proxy, comma-separated")
    p.add_argument("--health-interval", type=number_in(float, 0.1, 60, "seconds"), default=1.0,
                   help="seconds between health checks; a server is down after 2 misses")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the proxy's own (admin) token, for servers that require"
                        " tokens; clients' tokens are passed through (or $TTPROXY_TOKEN)")
    add_allowed_host_option(p, "proxy")
    add_http_timeout_options(p)
    add_log_options(p)
    add_config_option(p, "/etc/ttstack/ttproxy.toml")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `ttproxy` with `argv` (default sys.argv[1:]) until stopped: 0, or 2 for a
    --health-interval outside 0.1..60, a missing dependency or an unreadable --token-file."""
    args = configfile.parse_args(build_parser(), sys.argv[1:] if argv is None else argv)
    configure_logging(args.log_level, args.log_format)
    try:
        import uvicorn  # noqa: F401 - fail here, with the install hint

        from ttclient.serving import serve

        from .proxy import Proxy
        from .proxy_service import create_app
        from .servers import ServerSet
    except ImportError as exc:
        print(f"ttproxy: missing dependency ({exc.name}); install with: "
              "pip install 'ttstack[proxy]'", file=sys.stderr)
        return 2
    token = os.environ.get("TTPROXY_TOKEN") or None
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            print(f"ttproxy: --token-file: {exc.strerror}", file=sys.stderr)
            return 2
    servers = ServerSet(args.server_set, interval=args.health_interval, token=token)
    proxy = Proxy(servers)
    servers.start()  # first round is synchronous: known ENVs are learnt before serving
    host, port = args.proxy_addr
    serve(create_app(proxy, host, tuple(args.allowed_host)), host, port,
          on_stop=servers.stop, header_timeout=args.http_header_timeout,
          body_timeout=args.http_body_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
