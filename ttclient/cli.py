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
import ipaddress
import os
import signal
import sys
from collections.abc import Callable

from . import __version__
from .api import ApiError
from .argtypes import mib, number_in
from .commands import (
    CliError,
    UsageError,
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
from .config import parse_server
from .rules import (
    MAX_CPUS,
    MAX_LIFE_TIME,
    MAX_PORTS,
    MAX_VMS_PER_ENV,
    env_name_error,
    vm_ref_error,
)
from .shell import ShellError, cmd_env_console, cmd_env_ssh, cmd_env_ssh_config

SHELLS = ("bash", "zsh", "tcsh")  # what shtab writes completion scripts for


_run_seconds = number_in(float, 1, 86400, "seconds")  # a run's timeout (the API's range)
_wait_seconds = number_in(float, 1, 7 * 86400, "seconds")  # how long `tt` follows a boot
_lines = number_in(int, 1, 2000, "lines")  # console lines (what the server gives)
_vm_count = number_in(int, 1, MAX_VMS_PER_ENV, "VMs")
_cpus = number_in(int, 1, MAX_CPUS, "vCPUs")
_life_seconds = number_in(int, 1, MAX_LIFE_TIME, "seconds")  # 7 days


def _checked(error_of: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type: the text itself when `error_of(text)` is "", else that error."""
    def check(text: str) -> str:
        if error := error_of(text):
            raise argparse.ArgumentTypeError(error)
        return text
    return check


_env_name = _checked(env_name_error)
_vm_ref = _checked(vm_ref_error)
_path = _checked(lambda text: "" if text.strip() else "give a path (it is empty)")
_absolute = _checked(lambda text: "" if text.startswith("/") else
                     f"{text!r}: give an absolute path in the guest (e.g. /tmp/x)")


def _server(text: str) -> str:
    """argparse type for --server: HOST:PORT as config.parse_server reads it."""
    try:
        parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. 127.0.0.1:20000)") from None
    return text


def _host(text: str) -> str:
    """argparse type for --serv-addr: a host name or IP address, no scheme, port or path
    (an IPv6 address may come in brackets, which are dropped)."""
    host = text.strip().strip("[]") if text.strip().startswith("[") else text.strip()
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not host or any(c in host for c in ":/@ ") or not host.isprintable():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a host name or address: give the host alone (e.g. 10.0.0.5)"
            " and the port with --serv-port")
    return host


def _mode(text: str) -> int:
    """argparse type: an octal file mode 0-7777 ('0755', '644')."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode (e.g. 0644, "
                                         "0755)")
    return mode


def _ports(text: str) -> list[int]:
    """argparse type: guest TCP ports, `8080` or `80,443` (`/tcp` allowed); UDP is refused
    with the reason."""
    ports: list[int] = []
    items = text.split(",")
    if len(items) > MAX_PORTS:
        raise argparse.ArgumentTypeError(f"{len(items)} ports: an ENV forwards at most "
                                         f"{MAX_PORTS} (besides SSH)")
    for item in items:
        number, _, proto = item.strip().partition("/")
        if proto and proto.lower() != "tcp":
            raise argparse.ArgumentTypeError(
                f"{item}: only TCP ports are forwarded (QEMU's user network and the "
                f"bridge's port map carry TCP); drop /{proto}")
        try:
            port = int(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a port number") from None
        if port == 22:
            raise argparse.ArgumentTypeError("22 is always forwarded (see the VM's ssh "
                                             "port, or tt env ssh); drop it")
        if not 0 < port < 65536:
            raise argparse.ArgumentTypeError(f"{item}: a port is 1-65535")
        ports.append(port)
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
    p.add_argument("--server", metavar="HOST:PORT", type=_server,
                   help="the server to use this once (else $TT_SERVER, else tt config's)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("config", help="set or show the server address")
    c.add_argument("--serv-addr", type=_host, metavar="HOST",
                   help="the server's host name or address")
    c.add_argument("--serv-port", type=number_in(int, 1, 65535, "a TCP port"), metavar="PORT",
                   help="its TCP port (default 20000)")
    c.add_argument("--token", help="API token from the operator ('-': read it from stdin,"
                                   " keeping it out of shell history; '': forget the saved "
                                   "one); or set $TT_TOKEN")
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
        dest="image_command", required=True, metavar="list")
    il = image.add_parser("list", help="images: OS, version, arch, size, warm template")
    il.add_argument("--json", action="store_true")
    il.set_defaults(func=cmd_image_list)

    env = sub.add_parser("env", help="manage ENVs").add_subparsers(
        dest="env_command", required=True, metavar="VERB")
    a = env.add_parser("add", help="create an ENV and wait until its VMs are up")
    a.add_argument("name", type=_env_name)
    a.add_argument("--os-prefix", action="append", help="comma list, case-insensitive prefixes")
    a.add_argument("--image", action="append", help="an image name or prefix (repeatable)")
    a.add_argument("-n", "--vm-number", "--dup", type=_vm_count, default=1,
                   help=f"VMs per matched image (1-{MAX_VMS_PER_ENV} in all)")
    a.add_argument("-c", "--cpu-num", type=_cpus, default=1, help="vCPUs per VM (default 1)")
    a.add_argument("-m", "--mem-size", type=mib, default=512, help="MiB or 1G (default 512M)")
    a.add_argument("--disk-size", type=mib, default=None, help="grow each clone to this size")
    a.add_argument("-l", "--life-time", type=_life_seconds, default=None,
                   help="seconds (server default: 6 h)")
    a.add_argument("-p", "--port", type=_ports, action="extend",
                   help="guest TCP port(s) to forward: 8080 or 80,443 (repeatable)")
    a.add_argument("--ssh-key", action="append", type=_path, metavar="FILE",
                   help="an OpenSSH public key file (e.g. ~/.ssh/id_ed25519.pub) to "
                        "authorize in the VMs (repeatable)")
    a.add_argument("--deny-outgoing", action="store_true",
                   help="cut the VMs off the outside network (always so unless the server"
                        " runs with --allow-outgoing)")
    speed = a.add_mutually_exclusive_group()
    speed.add_argument("--warm", dest="warm", action="store_const", const=True, default=None,
                       help="start VMs from their image's memory snapshot (~1 s; the first"
                            " ENV of a shape boots cold while the snapshot is made)")
    speed.add_argument("--cold", dest="warm", action="store_const", const=False,
                       help="always boot (default: the server's choice, warm unless it "
                            "runs --no-warm-clones)")
    a.add_argument("--no-wait", action="store_true", help="return once the server accepted it")
    a.add_argument("--wait-timeout", type=_wait_seconds, default=900.0,
                   help="seconds to follow the boot (default 900)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_env_add)

    for verb, text in (("list", "list your ENVs ($TT_OWNER, else user@host)"),
                       ("listall", "list every ENV on the server (for operators)")):
        ls = env.add_parser(verb, help=text)
        ls.add_argument("--json", action="store_true")
        ls.set_defaults(func=cmd_env_list)

    sh = env.add_parser("show", help="show ENVs and their VMs")
    sh.add_argument("names", nargs="+", metavar="NAME", type=_env_name)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_env_show)

    r = env.add_parser("run", help="run a command on the VMs of an ENV",
                       usage="tt env run NAME [--vm REF]... [options] "
                             "(--cmd CMD | -f SCRIPT | -- ARGV...)")
    r.add_argument("name", type=_env_name)
    r.add_argument("--cmd", help="a command line for the guest's /bin/sh")
    r.add_argument("-f", "--script", metavar="FILE", type=_path,
                   help="run this local script in each VM (its #! line, else /bin/sh)")
    r.add_argument("--vm", action="append", metavar="REF", type=_vm_ref,
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
    d.add_argument("names", nargs="+", metavar="NAME", type=_env_name)
    d.set_defaults(func=cmd_env_del)

    st = env.add_parser("stop", help="power VMs off, keep their disks, free CPU and memory")
    st.add_argument("names", nargs="+", metavar="NAME", type=_env_name)
    st.set_defaults(func=cmd_env_stop)

    sa = env.add_parser("start", help="boot stopped ENVs from their kept disks")
    sa.add_argument("names", nargs="+", metavar="NAME", type=_env_name)
    sa.add_argument("--no-wait", action="store_true", help="return once the server accepted it")
    sa.add_argument("--wait-timeout", type=_wait_seconds, default=900.0,
                    help="seconds to follow the boot (default 900)")
    sa.add_argument("--json", action="store_true")
    sa.set_defaults(func=cmd_env_start)

    up = env.add_parser("update", help="change ENVs' life time or exposed ports, or a "
                                       "stopped ENV's vCPUs and memory")
    up.add_argument("names", nargs="+", metavar="NAME", type=_env_name)
    up.add_argument("-l", "--life-time", type=_life_seconds,
                    help="seconds from now until deletion")
    up.add_argument("-p", "--port", type=_ports, action="extend",
                    help="guest TCP port(s) to expose: 8080 or 80,443")
    up.add_argument("--no-port", type=_ports, action="extend",
                    help="guest port(s) to stop exposing")
    up.add_argument("-c", "--cpu-num", type=_cpus, help="vCPUs per VM (a stopped ENV)")
    up.add_argument("-m", "--mem-size", type=mib, help="memory per VM, MiB or 1G (a stopped "
                                                        "ENV)")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_env_update)

    ss = env.add_parser("ssh", help="an SSH session (or one command) on a VM",
                        usage="tt env ssh NAME [VM] [-i KEY] [-- CMD...]")
    ss.add_argument("name", type=_env_name)
    ss.add_argument("vm", nargs="?", type=_vm_ref,
                    help="name, id or index (default: the first VM)")
    ss.add_argument("-i", "--identity", metavar="KEY", type=_path,
                    help="private key file (default: ssh's own; the ENV must hold its "
                         "public key: tt env add --ssh-key)")
    ss.set_defaults(func=cmd_env_ssh)

    sc = env.add_parser("ssh-config", help="OpenSSH config blocks for the ENV's VMs")
    sc.add_argument("name", type=_env_name)
    sc.add_argument("-i", "--identity", metavar="KEY", type=_path,
                    help="IdentityFile for every block")
    sc.set_defaults(func=cmd_env_ssh_config)

    cs = env.add_parser("console", help="a VM's serial console")
    cs.add_argument("name", type=_env_name)
    cs.add_argument("vm", type=_vm_ref, help="name, id or index")
    cs.add_argument("--lines", type=_lines, default=50,
                    help="last lines shown (1-2000, default 50)")
    cs.add_argument("-f", "--follow", action="store_true",
                    help="keep printing new console output until Ctrl-C")
    cs.set_defaults(func=cmd_env_console)

    k = env.add_parser("kick", help="remove VMs from an ENV (the rest stays)")
    k.add_argument("name", type=_env_name)
    k.add_argument("vms", nargs="+", metavar="VM", type=_vm_ref, help="name, id or index")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_env_kick)

    pu = env.add_parser("push", help="copy a local file (or -r a directory) to every VM")
    pu.add_argument("name", type=_env_name)
    pu.add_argument("--local", required=True, type=_path, help="the file (or -r directory)")
    pu.add_argument("--remote", type=_absolute,
                    help="absolute path in the VMs (default /tmp/<basename>)")
    pu.add_argument("-r", "--recursive", action="store_true",
                    help="copy a directory tree (as a tar stream)")
    pu.add_argument("--vm", action="append", metavar="REF", type=_vm_ref,
                    help="only this VM (repeatable)")
    pu.add_argument("--mode", type=_mode, help="octal file mode, e.g. 0755 (default: a"
                    " replaced file keeps its mode, a new one gets 0644; not with -r, whose"
                    " files keep their modes from here)")
    pu.add_argument("--use-ssh", action="store_true", help="copy over SSH, not the agent")
    pu.set_defaults(func=cmd_env_push)

    g = env.add_parser("get", help="copy a file (or -r a directory) from every VM into "
                                   "LOCAL/<vm>/")
    g.add_argument("name", type=_env_name)
    g.add_argument("--remote", required=True, type=_absolute,
                   help="absolute path in the VMs")
    g.add_argument("--local", default=".", type=_path,
                   help="directory to write LOCAL/<vm>/ into (default .)")
    g.add_argument("-r", "--recursive", action="store_true",
                   help="copy a directory tree (as a tar stream)")
    g.add_argument("--vm", action="append", metavar="REF", type=_vm_ref,
                   help="only this VM (repeatable)")
    g.add_argument("--use-ssh", action="store_true", help="copy over SSH, not the agent")
    g.set_defaults(func=cmd_env_get)
    return p


def _command_of(words: list[str]) -> list[str]:
    """The first two words naming the command (`env run`), past `tt`'s own options."""
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] == "--server" else 1
    return words[i:i + 2]


# the commands that take a command as words after `--`, passed on unparsed (argparse
# would give them to the optional positionals before them)
ARGV_COMMANDS = (["env", "run"], ["env", "ssh"])


def main(argv: list[str] | None = None) -> int:
    """Run `tt` with `argv` (default sys.argv[1:]): the command's exit code; 1 after
    printing an error line, 2 for bad usage, 130 on Ctrl-C, 141 when the output's reader
    went away."""
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    after = None
    if "--" in words and _command_of(words[:words.index("--")]) in ARGV_COMMANDS:
        cut = words.index("--")
        words, after = words[:cut], words[cut + 1:]
    args, extra = parser.parse_known_args(words)
    if extra:
        hint = ""
        if args.func in (cmd_env_run, cmd_env_ssh):
            verb = "run" if args.func is cmd_env_run else "ssh"
            hint = (f"; a command goes after '--': tt env {verb} {args.name} -- "
                    f"{' '.join(extra)}")
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    args.argv = after or []
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except UsageError as exc:
        print(f"tt: error: {exc}", file=sys.stderr)
        return 2
    except (ApiError, CliError, ShellError, ValueError) as exc:
        print(f"tt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`tt env list | head -1`): end quietly, with the status of a
        # program SIGPIPE ended; later flushes go nowhere (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
