"""`tt`: the client, with the original TTstack's verbs.

    tt config --serv-addr 127.0.0.1 --serv-port 20000
    tt status [--server]
    tt env add TEST --os-prefix=deb --vm-number 2
    tt env list | listall | show TEST | run TEST --cmd 'uname -a' | del TEST
    tt env stop TEST | start TEST | update TEST --life-time 3600 --port 8080
    tt env push TEST --local F --remote /tmp/F | get TEST --remote /tmp/F --local DIR

Exit codes: 0 ok; 1 an error (one line on stderr says what to fix); 2 bad usage;
with `env run`, 1 when any VM's command failed and 124 when any timed out.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .api import ApiError
from .commands import (
    CliError,
    cmd_config,
    cmd_env_add,
    cmd_env_del,
    cmd_env_get,
    cmd_env_list,
    cmd_env_push,
    cmd_env_run,
    cmd_env_show,
    cmd_env_start,
    cmd_env_stop,
    cmd_env_update,
    cmd_status,
)
from .units import parse_mib


def _mib(text: str) -> int:
    """argparse type: a size as MiB ('512', '1G'); ArgumentTypeError says what is wrong."""
    try:
        return parse_mib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _run_seconds(text: str) -> float:
    """argparse type: a run's timeout, 1-86400 seconds (the API's range)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is outside 1-86400 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `tt` argument parser; each command sets `func` to its cmd_* function."""
    p = argparse.ArgumentParser(prog="tt", description="ttstack client: ENVs of real VMs.")
    p.add_argument("--version", action="version", version=f"tt {__version__}")
    p.add_argument("--server", metavar="HOST:PORT", help="override the configured server")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("config", help="set or show the server address")
    c.add_argument("--serv-addr")
    c.add_argument("--serv-port", type=int)
    c.add_argument("--token", help="API token from the operator ('-': read it from stdin,"
                                   " keeping it out of shell history); or set $TT_TOKEN")
    c.set_defaults(func=cmd_config)

    s = sub.add_parser("status", help="client info, or server resources with --server")
    s.add_argument("--server", dest="server_info", action="store_true",
                   help="show server resources and images")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    env = sub.add_parser("env", help="manage ENVs").add_subparsers(dest="env_command",
                                                                   required=True)
    a = env.add_parser("add", help="create an ENV and wait until its VMs are up")
    a.add_argument("name")
    a.add_argument("--os-prefix", action="append", help="comma list, case-insensitive prefixes")
    a.add_argument("--image", action="append", help="an image name or prefix (repeatable)")
    a.add_argument("--vm-number", "--dup", type=int, default=1, help="VMs per matched image")
    a.add_argument("--cpu-num", type=int, default=1)
    a.add_argument("--mem-size", type=_mib, default=512, help="MiB or 1G (default 512M)")
    a.add_argument("--disk-size", type=_mib, default=None, help="grow each clone to this size")
    a.add_argument("--life-time", type=int, default=None, help="seconds (server default: 6 h)")
    a.add_argument("--port", type=int, action="append", help="guest TCP port to forward")
    a.add_argument("--ssh-key", action="append", help="public key file to authorize")
    a.add_argument("--deny-outgoing", action="store_true",
                   help="cut the VMs off the outside network (always so unless the server"
                        " runs with --allow-outgoing)")
    speed = a.add_mutually_exclusive_group()
    speed.add_argument("--warm", dest="warm", action="store_const", const=True, default=None,
                       help="start VMs from their image's memory snapshot (~1 s; the first"
                            " ENV of a shape boots cold while the snapshot is made)")
    speed.add_argument("--cold", dest="warm", action="store_const", const=False,
                       help="always boot (the server's default unless it runs --warm-clones)")
    a.add_argument("--no-wait", action="store_true", help="return once the server accepted it")
    a.add_argument("--wait-timeout", type=float, default=900.0)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_env_add)

    for verb, text in (("list", "list your ENVs ($TT_OWNER, else user@host)"),
                       ("listall", "list every ENV on the server (for operators)")):
        ls = env.add_parser(verb, help=text)
        ls.add_argument("--json", action="store_true")
        ls.set_defaults(func=cmd_env_list)

    sh = env.add_parser("show", help="show an ENV and its VMs")
    sh.add_argument("name")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_env_show)

    r = env.add_parser("run", help="run a shell command on every VM of an ENV")
    r.add_argument("name")
    r.add_argument("--cmd", required=True, help="command line for the guest's /bin/sh")
    r.add_argument("--use-ssh", action="store_true", help="go through SSH, not the agent")
    r.add_argument("--timeout", type=_run_seconds, default=600.0,
                   help="seconds per VM, 1-86400 (default 600)")
    r.add_argument("--binary", action="store_true",
                   help="write each VM's output as the exact bytes it printed (stdout to "
                        "stdout, stderr to stderr; the per-VM lines go to stderr)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_env_run)

    d = env.add_parser("del", help="delete ENVs and everything they hold")
    d.add_argument("names", nargs="+", metavar="NAME")
    d.set_defaults(func=cmd_env_del)

    st = env.add_parser("stop", help="power VMs off, keep their disks, free CPU and memory")
    st.add_argument("names", nargs="+", metavar="NAME")
    st.set_defaults(func=cmd_env_stop)

    sa = env.add_parser("start", help="boot a stopped ENV from its kept disks")
    sa.add_argument("name")
    sa.add_argument("--no-wait", action="store_true", help="return once the server accepted it")
    sa.add_argument("--wait-timeout", type=float, default=900.0)
    sa.add_argument("--json", action="store_true")
    sa.set_defaults(func=cmd_env_start)

    up = env.add_parser("update", help="change an ENV's life time or exposed ports")
    up.add_argument("name")
    up.add_argument("--life-time", type=int, help="seconds from now until deletion")
    up.add_argument("--port", type=int, action="append", help="guest TCP port to expose")
    up.add_argument("--no-port", type=int, action="append", help="guest port to stop exposing")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_env_update)

    pu = env.add_parser("push", help="copy a local file to every VM")
    pu.add_argument("name")
    pu.add_argument("--local", required=True)
    pu.add_argument("--remote", required=True, help="absolute path in the VMs")
    pu.add_argument("--mode", help="octal file mode, e.g. 0755")
    pu.add_argument("--use-ssh", action="store_true", help="copy over SSH, not the agent")
    pu.set_defaults(func=cmd_env_push)

    g = env.add_parser("get", help="copy a file from every VM into LOCAL/<vm>/")
    g.add_argument("name")
    g.add_argument("--remote", required=True)
    g.add_argument("--local", default=".")
    g.add_argument("--use-ssh", action="store_true", help="copy over SSH, not the agent")
    g.set_defaults(func=cmd_env_get)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `tt` with `argv` (default sys.argv[1:]): the command's exit code, 1 after
    printing an error line, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ApiError, CliError, ValueError) as exc:
        print(f"tt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
