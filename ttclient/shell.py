"""The `tt` verbs that hand a VM to the user's own tools: `env ssh` (an OpenSSH session),
`env ssh-config` (OpenSSH config blocks for ssh, scp, rsync, VS Code, Ansible) and
`env console` (the serial console, optionally followed).

SSH options follow Vagrant's `vagrant ssh-config`: the VMs are throwaway machines whose
host keys change with every ENV, so nothing is written to `~/.ssh/known_hosts`
(`UserKnownHostsFile /dev/null`) and nobody is asked to confirm a key
(`StrictHostKeyChecking no`); root logs in with a key only (`PasswordAuthentication no`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time

from .api import vm_refs
from .commands import client_for
from .rules import KEY_TYPES

SSH_OPTIONS = {
    "User": "root",
    "UserKnownHostsFile": "/dev/null",
    "StrictHostKeyChecking": "no",
    "PasswordAuthentication": "no",
    "LogLevel": "ERROR",  # not "Warning: Permanently added ... to the list of known hosts"
}
FOLLOW_INTERVAL = 0.5  # seconds between console polls of `console --follow`


class ShellError(Exception):
    """What the user must fix (no such VM, no ssh); the CLI prints it as one line."""
    pass


def pick_vm(env: dict, ref: str | None, running: bool = True) -> dict:
    """The VM of `env` named by `ref` (its name, id or index; None: the first VM), which
    must be running when `running`; ShellError saying which VMs there are otherwise."""
    vms = env["vms"]
    chosen = vms[:1] if ref is None else [vm for vm in vms if ref in vm_refs(vm)]
    if not chosen:
        names = ", ".join(vm["name"] for vm in vms) or "none"
        raise ShellError(f"ENV {env['name']} has no VM {ref!r} (its VMs: {names})")
    vm = chosen[0]
    if running and vm["state"] != "running":
        raise ShellError(f"VM {vm['name']} is {vm['state']}, not running")
    return vm


def ssh_argv(vm: dict, identity: str | None, command: list[str], tty: bool) -> list[str]:
    """The `ssh` command line for a VM view (ssh_host, ssh_port): its options, `identity`
    (a private key file) if given, `-t` when `tty`, then the remote `command` (its words
    quoted for the guest's shell; none: a login shell)."""
    argv = ["ssh", "-p", str(vm["ssh_port"])]
    for key, value in SSH_OPTIONS.items():
        argv += ["-o", f"{key}={value}"]
    if identity:
        argv += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    if tty:
        argv.append("-t")
    argv.append(vm["ssh_host"])
    if command:
        argv += ["--", shlex.join(command)]
    return argv


def config_block(vm: dict, identity: str | None) -> str:
    """One OpenSSH config `Host` block for a VM view, named after the VM."""
    lines = [f"Host {vm['name']}", f"  HostName {vm['ssh_host']}", f"  Port {vm['ssh_port']}"]
    lines += [f"  {key} {value}" for key, value in SSH_OPTIONS.items()]
    if identity:
        lines += [f"  IdentityFile {os.path.abspath(os.path.expanduser(identity))}",
                  "  IdentitiesOnly yes"]
    return "\n".join(lines) + "\n"


def check_identity(path: str) -> None:
    """ShellError unless `path` is a readable private key file (not its .pub half)."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise ShellError(f"-i {path}: {exc.strerror or exc}") from exc
    if head.decode(errors="replace").startswith(KEY_TYPES):
        base = path[:-4] if path.endswith(".pub") else "the file without .pub"
        raise ShellError(f"-i {path} is a public key: give the private key ({base})")


def cmd_env_ssh(args: argparse.Namespace) -> int:
    """`tt env ssh NAME [VM] [-- CMD...]`: replaces this process with `ssh` (its exit
    status is the command's); ShellError without an `ssh` program or a running VM."""
    if shutil.which("ssh") is None:
        raise ShellError("no 'ssh' program found: install the OpenSSH client")
    if args.identity:
        check_identity(args.identity)
    vm = pick_vm(client_for(args).get_env(args.name), args.vm)
    command = list(getattr(args, "argv", None) or [])  # the words after `--` (cli.main)
    argv = ssh_argv(vm, args.identity, command,
                    tty=bool(command) and sys.stdin.isatty() and sys.stdout.isatty())
    sys.stdout.flush()
    os.execvp("ssh", argv)
    return 0  # not reached


def cmd_env_ssh_config(args: argparse.Namespace) -> int:
    """`tt env ssh-config NAME`: a config block per running VM on stdout; 0."""
    env = client_for(args).get_env(args.name)
    running = [vm for vm in env["vms"] if vm["state"] == "running"]
    if not running:
        raise ShellError(f"ENV {args.name} has no running VMs (it is {env['state']})")
    print("\n".join(config_block(vm, args.identity) for vm in running), end="")
    return 0


def new_console_text(old: str, new: str) -> str:
    """What `new` (the console's latest tail) adds to `old` (the previous tail): the part
    after the longest end of `old` that `new` starts with (a tail window moves on)."""
    if not old:
        return new
    # the window moves by whole lines (a last line may grow): try line starts, longest first
    starts = [0] + [i + 1 for i, c in enumerate(old) if c == "\n" and i + 1 < len(old)]
    for start in starts:
        if new.startswith(old[start:]):
            return new[len(old) - start:]
    return new


def last_lines(text: str, n: int) -> str:
    """The last `n` lines of `text` (a last line without a newline counts)."""
    return "".join(text.splitlines(keepends=True)[-n:])


def cmd_env_console(args: argparse.Namespace) -> int:
    """`tt env console NAME VM [--lines N] [--follow]`: the console's last lines, then
    with --follow new ones as they come until Ctrl-C (exit 130); 0."""
    client = client_for(args)
    vm = pick_vm(client.get_env(args.name), args.vm, running=False)  # a booting one too
    # following, every poll asks for the same window, so consecutive ones overlap
    window = max(args.lines, 200) if args.follow else args.lines
    text = client.console(args.name, vm["id"], window)
    sys.stdout.write(last_lines(text, args.lines))
    sys.stdout.flush()
    if not args.follow:
        return 0
    try:
        while True:
            time.sleep(FOLLOW_INTERVAL)
            latest = client.console(args.name, vm["id"], window)
            added = new_console_text(text, latest)
            if added:
                sys.stdout.write(added)
                sys.stdout.flush()
            text = latest
    except KeyboardInterrupt:
        return 130
