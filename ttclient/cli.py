"""`tt`: the client, with the original TTstack's verbs.

    tt config --serv-addr 127.0.0.1 --serv-port 20000
    tt status [--remote]          tt image list [--json]
    tt env add TEST --os-prefix=deb --vm-number 2
    tt env list | listall | show TEST | run TEST -- uname -a | del TEST
    tt env stop TEST | start TEST | update TEST --life-time 3600 --port 8080
    tt env push TEST --local F --remote /tmp/F | get TEST --remote /tmp/F --local DIR
    tt env ssh TEST [VM] [-- CMD...] | ssh-config TEST | console TEST VM [--follow]
    tt completion bash|zsh|tcsh

Exit codes: 0 ok; 1 an error (one line on stderr says what to fix); 2 bad usage;
`env run`: 0 when every VM's command exited 0, the VM's own status when one VM was
addressed (--vm), 124 when any timed out, else 1; `env ssh`: ssh's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import __version__
from .api import ApiError
from .commands import (
    CliError,
    cmd_config,
    cmd_env_add,
    cmd_env_del,
    cmd_env_get,
    cmd_env_kick,
    cmd_env_list,
    cmd_env_push,
    cmd_env_run,
    cmd_env_show,
    cmd_env_start,
    cmd_env_stop,
    cmd_env_update,
    cmd_image_list,
    cmd_status,
)
from .shell import ShellError, cmd_env_console, cmd_env_ssh, cmd_env_ssh_config
from .units import parse_mib

SHELLS = ("bash", "zsh", "tcsh")  # what shtab writes completion scripts for


def _mib(text: str) -> int:
    """argparse type: a size as MiB ('512', '1G'); ArgumentTypeError says what is wrong."""
    try:
        return parse_mib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _number_in(convert: Callable[[str], float], low: int, high: int,
               unit: str) -> Callable[[str], float]:
    """An argparse type: `convert(text)` within low..high `unit`s, or an
    ArgumentTypeError saying what is wrong."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low}-{high} {unit}")
        return value
    return parse


_run_seconds = _number_in(float, 1, 86400, "seconds")  # a run's timeout (the API's range)
_lines = _number_in(int, 1, 2000, "lines")  # console lines (what the server gives)


def _ports(text: str) -> list[int]:
    """argparse type: guest TCP ports, `8080` or `80,443` (`/tcp` allowed); UDP is refused
    with the reason."""
    ports = []
    for item in text.split(","):
        number, _, proto = item.strip().partition("/")
        if proto and proto.lower() != "tcp":
            raise argparse.ArgumentTypeError(
                f"{item}: only TCP ports are forwarded (QEMU's user network and the "
                f"bridge's port map carry TCP); drop /{proto}")
        try:
            ports.append(int(number))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a port number") from None
    return ports


def _completion(parser: argparse.ArgumentParser, shell: str) -> int:
    """Print shtab's completion script for `shell`; 0."""
    import shtab  # only this command needs it

    print(shtab.complete(parser, shell=shell))
    return 0


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

    s = sub.add_parser("status", help="client info, or server resources with --remote")
    s.add_argument("--remote", dest="server_info", action="store_true",
                   help="show the server's resources, images and warm templates")
    # the old spelling, hidden: `tt --server H:P` says where to connect
    s.add_argument("--server", dest="server_info", action="store_true",
                   help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    co = sub.add_parser("completion", help="print a shell completion script")
    co.add_argument("shell", choices=SHELLS)
    co.set_defaults(func=lambda args: _completion(p, args.shell))

    image = sub.add_parser("image", help="images on the server").add_subparsers(
        dest="image_command", required=True)
    il = image.add_parser("list", help="images: OS, version, arch, size, warm template")
    il.add_argument("--json", action="store_true")
    il.set_defaults(func=cmd_image_list)

    env = sub.add_parser("env", help="manage ENVs").add_subparsers(dest="env_command",
                                                                   required=True)
    a = env.add_parser("add", help="create an ENV and wait until its VMs are up")
    a.add_argument("name")
    a.add_argument("--os-prefix", action="append", help="comma list, case-insensitive prefixes")
    a.add_argument("--image", action="append", help="an image name or prefix (repeatable)")
    a.add_argument("-n", "--vm-number", "--dup", type=int, default=1,
                   help="VMs per matched image")
    a.add_argument("-c", "--cpu-num", type=int, default=1)
    a.add_argument("-m", "--mem-size", type=_mib, default=512, help="MiB or 1G (default 512M)")
    a.add_argument("--disk-size", type=_mib, default=None, help="grow each clone to this size")
    a.add_argument("-l", "--life-time", type=int, default=None,
                   help="seconds (server default: 6 h)")
    a.add_argument("-p", "--port", type=_ports, action="extend",
                   help="guest TCP port(s) to forward: 8080 or 80,443 (repeatable)")
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

    sh = env.add_parser("show", help="show ENVs and their VMs")
    sh.add_argument("names", nargs="+", metavar="NAME")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_env_show)

    r = env.add_parser("run", help="run a command on the VMs of an ENV",
                       usage="tt env run NAME [--vm REF]... [options] "
                             "(--cmd CMD | -f SCRIPT | -- ARGV...)")
    r.add_argument("name")
    r.add_argument("--cmd", help="a command line for the guest's /bin/sh")
    r.add_argument("-f", "--script", metavar="FILE",
                   help="run this local script in each VM (its #! line, else /bin/sh)")
    r.add_argument("--vm", action="append", metavar="REF",
                   help="only this VM (name, id or index; repeatable)")
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

    sa = env.add_parser("start", help="boot stopped ENVs from their kept disks")
    sa.add_argument("names", nargs="+", metavar="NAME")
    sa.add_argument("--no-wait", action="store_true", help="return once the server accepted it")
    sa.add_argument("--wait-timeout", type=float, default=900.0)
    sa.add_argument("--json", action="store_true")
    sa.set_defaults(func=cmd_env_start)

    up = env.add_parser("update", help="change ENVs' life time or exposed ports")
    up.add_argument("names", nargs="+", metavar="NAME")
    up.add_argument("-l", "--life-time", type=int, help="seconds from now until deletion")
    up.add_argument("-p", "--port", type=_ports, action="extend",
                    help="guest TCP port(s) to expose: 8080 or 80,443")
    up.add_argument("--no-port", type=_ports, action="extend",
                    help="guest port(s) to stop exposing")
    up.add_argument("-c", "--cpu-num", type=int, help="vCPUs per VM (a stopped ENV)")
    up.add_argument("-m", "--mem-size", type=_mib, help="memory per VM, MiB or 1G (a stopped "
                                                        "ENV)")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_env_update)

    ss = env.add_parser("ssh", help="an SSH session (or one command) on a VM",
                        usage="tt env ssh NAME [VM] [-i KEY] [-- CMD...]")
    ss.add_argument("name")
    ss.add_argument("vm", nargs="?", help="name, id or index (default: the first VM)")
    ss.add_argument("-i", "--identity", metavar="KEY",
                    help="private key file (default: ssh's own; the ENV must hold its "
                         "public key: tt env add --ssh-key)")
    ss.set_defaults(func=cmd_env_ssh)

    sc = env.add_parser("ssh-config", help="OpenSSH config blocks for the ENV's VMs")
    sc.add_argument("name")
    sc.add_argument("-i", "--identity", metavar="KEY", help="IdentityFile for every block")
    sc.set_defaults(func=cmd_env_ssh_config)

    cs = env.add_parser("console", help="a VM's serial console")
    cs.add_argument("name")
    cs.add_argument("vm", help="name, id or index")
    cs.add_argument("--lines", type=_lines, default=50, help="last lines shown (1-2000)")
    cs.add_argument("-f", "--follow", action="store_true",
                    help="keep printing new console output until Ctrl-C")
    cs.set_defaults(func=cmd_env_console)

    k = env.add_parser("kick", help="remove VMs from an ENV (the rest stays)")
    k.add_argument("name")
    k.add_argument("vms", nargs="+", metavar="VM", help="name, id or index")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_env_kick)

    pu = env.add_parser("push", help="copy a local file (or -r a directory) to every VM")
    pu.add_argument("name")
    pu.add_argument("--local", required=True)
    pu.add_argument("--remote", help="absolute path in the VMs (default /tmp/<basename>)")
    pu.add_argument("-r", "--recursive", action="store_true",
                    help="copy a directory tree (as a tar stream)")
    pu.add_argument("--vm", action="append", metavar="REF", help="only this VM (repeatable)")
    pu.add_argument("--mode", help="octal file mode, e.g. 0755")
    pu.add_argument("--use-ssh", action="store_true", help="copy over SSH, not the agent")
    pu.set_defaults(func=cmd_env_push)

    g = env.add_parser("get", help="copy a file (or -r a directory) from every VM into "
                                   "LOCAL/<vm>/")
    g.add_argument("name")
    g.add_argument("--remote", required=True)
    g.add_argument("--local", default=".")
    g.add_argument("-r", "--recursive", action="store_true",
                   help="copy a directory tree (as a tar stream)")
    g.add_argument("--vm", action="append", metavar="REF", help="only this VM (repeatable)")
    g.add_argument("--use-ssh", action="store_true", help="copy over SSH, not the agent")
    g.set_defaults(func=cmd_env_get)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `tt` with `argv` (default sys.argv[1:]): the command's exit code, 1 after
    printing an error line, 130 on Ctrl-C."""
    words = sys.argv[1:] if argv is None else list(argv)
    # `env run` and `env ssh` take a command after `--`, as words passed on unparsed
    # (argparse would give them to the optional positionals before them)
    after = words[words.index("--") + 1:] if "--" in words else None
    args = build_parser().parse_args(words[:words.index("--")] if after is not None
                                     else words)
    if after is not None and args.func not in (cmd_env_run, cmd_env_ssh):
        build_parser().error("'--' (a command as words) is for 'env run' and 'env ssh'")
    args.argv = after or []
    try:
        return args.func(args)
    except (ApiError, CliError, ShellError, ValueError) as exc:
        print(f"tt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
