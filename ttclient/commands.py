"""The `tt` commands: one `cmd_*` function per verb, each taking the parsed arguments and
returning the exit code (cli.py has the parser and the exit-code rules)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import __version__
from . import config as cfgmod
from .api import ApiError, Client, changed_vms
from .imagenames import split_prefixes


class CliError(Exception):
    """A usage or input error; main prints it as one `tt: error:` line and exits with 1."""
    pass


def _client(args: argparse.Namespace) -> Client:
    cfg = cfgmod.load()
    if getattr(args, "server", None):
        cfg.serv_addr, cfg.serv_port = cfgmod.parse_server(args.server)
    return Client(cfg.base_url, token=cfg.token or None)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _mib_text(mib: int) -> str:
    return f"{mib / 1024:.1f}G" if mib >= 1024 else f"{mib}M"


# --- config / status -----------------------------------------------------------------
def cmd_config(args: argparse.Namespace) -> int:
    """`tt config`: save the given address, port or token, or show the current ones; 0.
    CliError for a bad token or port."""
    cfg = cfgmod.load(apply_env=bool(not args.serv_addr and not args.serv_port
                                     and args.token is None))
    changed = False
    if args.token is not None:
        token = sys.stdin.readline().strip() if args.token == "-" else args.token.strip()
        if not token or any(c.isspace() for c in token):
            raise CliError("--token: give the token printed by 'ttserver token add' (or '-'"
                           " to read it from stdin)")
        cfg.token, changed = token, True
    if args.serv_addr:
        cfg.serv_addr, changed = args.serv_addr, True
    if args.serv_port:
        if not 0 < args.serv_port < 65536:
            raise CliError("--serv-port must be 1-65535")
        cfg.serv_port, changed = args.serv_port, True
    if changed:
        path = cfgmod.save(cfg)
        print(f"saved {cfg.serv_addr}:{cfg.serv_port}{' and the token' if cfg.token else ''}"
              f" to {path} (mode 0600)")
    else:
        token = "token set" if cfg.token else "no token"
        print(f"server: {cfg.serv_addr}:{cfg.serv_port}, {token} (config: "
              f"{cfgmod.config_path()})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """`tt status`: the client's version, its server and the ENVs it sees, or with --server
    the server's resources, images and warm templates; 0."""
    client = _client(args)
    if not args.server_info:
        envs = client.list_envs()
        info = {"client_version": __version__, "server": client.base_url,
                "envs": [{"name": e["name"], "state": e["state"], "vms": len(e["vms"])}
                         for e in envs]}
        if args.json:
            _print_json(info)
            return 0
        print(f"tt {__version__}  server {client.base_url}")
        print(f"ENVs: {len(envs)}" + "".join(f"\n  {e['name']:<20} {e['state']:<9} "
                                               f"{len(e['vms'])} VM(s)" for e in envs))
        return 0
    st = client.status()
    if args.json:
        _print_json(st)
        return 0
    rows = st.get("servers") or [st]
    for row in rows:
        label = row.get("address", client.base_url)
        state = row.get("health", "up")
        if state != "up":
            print(f"{label}  {state}: {row.get('error', '')}")
            continue
        print(f"{label}  accel={row['accel']}  CPU {row['cpu_used']}/{row['cpu_total']}  "
              f"mem {_mib_text(row['mem_used_mib'])}/{_mib_text(row['mem_total_mib'])}  "
              f"disk {_mib_text(row['disk_used_mib'])}/{_mib_text(row['disk_total_mib'])}  "
              f"ENVs {row['env_count']}")
    print("images: " + (", ".join(i["name"] for i in st["images"]) or "none"))
    templates = [t for row in rows for t in row.get("templates", [])]
    if templates:
        print("warm templates: " + ", ".join(f"{t['key']} ({t['state']})" for t in templates))
    return 0


# --- env -----------------------------------------------------------------------------
def _vm_line(vm: dict, since: float | None = None) -> str:
    took = f" in {vm['boot_seconds']:.1f}s" if vm.get("boot_seconds") else ""
    if took and vm.get("boot_mode") == "warm":
        took += " (warm)"
    if vm["state"] in ("pending", "booting") and since:
        took = f" ({time.time() - since:.0f}s)"
    ports = "".join(f" {g}->{h}" for g, h in vm.get("ports", {}).items())
    where = f"  on {vm['server']}" if vm.get("server") else ""  # through ttproxy
    return (f"  {vm['name']:<16} {vm['image']:<26} {vm['state']:<8}{took}  "
            f"ssh {vm['ssh_host']}:{vm['ssh_port']}{ports}{where}")


def _show_env(env: dict) -> None:
    left = env["expires_at"] - time.time()
    print(f"ENV {env['name']}: {env['state']}, {len(env['vms'])} VM(s), "
          f"expires in {max(0, left) / 60:.0f} min")
    for vm in env["vms"]:
        print(_vm_line(vm))
        if vm.get("error"):
            print("    " + vm["error"].replace("\n", "\n    "))
    if env.get("error") and not any(vm.get("error") for vm in env["vms"]):
        print("  error: " + env["error"])


def cmd_env_add(args: argparse.Namespace) -> int:
    """`tt env add`: create an ENV and, unless --no-wait, follow its boot; 0 once running.
    CliError without prefixes, for an unreadable key file or a failed ENV."""
    prefixes = split_prefixes((args.os_prefix or []) + (args.image or []))
    if not prefixes:
        raise CliError("give --os-prefix (e.g. --os-prefix=debian-12) or --image")
    keys = []
    for key_file in args.ssh_key or []:
        try:
            keys.append(Path(key_file).read_text().strip())
        except OSError as exc:
            raise CliError(f"--ssh-key {key_file}: {exc.strerror}") from exc
    client = _client(args)
    env = client.create_env(args.name, prefixes, vm_number=args.vm_number,
                            cpu_num=args.cpu_num, mem_size=args.mem_size,
                            disk_size=args.disk_size, life_time=args.life_time,
                            ports=args.port or [], ssh_keys=keys,
                            deny_outgoing=args.deny_outgoing or None, warm=args.warm)
    if args.no_wait:
        if args.json:
            _print_json(env)
        else:
            print(f"ENV {args.name} is being created; follow it with 'tt env show {args.name}'")
        return 0
    print(f"creating ENV {args.name} ({len(env['vms'])} VM(s)); VMs boot in parallel",
          file=sys.stderr)
    return _follow_boot(args, client, env["created_at"])


def _follow_boot(args: argparse.Namespace, client: Client, since: float) -> int:
    """Show per-VM progress until the ENV is up (or failed); Ctrl-C leaves it booting."""
    progress = sys.stderr
    seen: dict[str, str] = {}

    def on_change(view: dict) -> None:
        for vm in changed_vms(view, seen):
            print(_vm_line(vm, since), file=progress, flush=True)

    try:
        env = client.wait_env(args.name, timeout=args.wait_timeout, on_change=on_change)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the ENV keeps booting on the server: 'tt env show {args.name}'"
              f" to follow it, 'tt env del {args.name}' to drop it", file=sys.stderr)
        return 130
    if args.json:
        _print_json(env)
    else:
        _show_env(env)
    if env["state"] != "running":
        first = env.get("error", "").splitlines()[:1] or ["unknown error"]
        raise CliError(f"ENV {args.name} failed: {first[0]} (details: tt env show {args.name})")
    return 0


def cmd_env_list(args: argparse.Namespace) -> int:
    """`tt env list` (own ENVs) and `listall` (everyone's); 0."""
    everyone = args.env_command == "listall"
    envs = _client(args).list_envs(None if everyone else cfgmod.owner())
    if args.json:
        _print_json(envs)
        return 0
    if not envs:
        print("no ENVs")
    for env in envs:
        images = sorted({vm["image"] for vm in env["vms"]})
        owner = f"  [{env.get('owner') or '?'}]" if everyone else ""
        print(f"{env['name']:<20} {env['state']:<9} {len(env['vms'])} VM(s)  "
              f"{', '.join(images)}{owner}")
    return 0


def cmd_env_show(args: argparse.Namespace) -> int:
    """`tt env show`: one ENV and its VMs; 0."""
    env = _client(args).get_env(args.name)
    if args.json:
        _print_json(env)
    else:
        _show_env(env)
    return 0


def cmd_env_run(args: argparse.Namespace) -> int:
    """`tt env run`: print each VM's output; 124 when any VM timed out, 1 when any command
    failed, else 0. CliError when no VM is running."""
    binary = getattr(args, "binary", False)
    reply = _client(args).run(args.name, args.cmd, use_ssh=args.use_ssh, timeout=args.timeout,
                              binary=binary)
    results = reply["results"]
    if args.json:
        _print_json(reply)
    else:
        for r in results:
            status = ("TIMED OUT" if r["timed_out"] else
                      f"exit {r['exit_code']}" if not r.get("error") else "ERROR")
            if r.get("signal"):
                status += f" (signal {r['signal']})"
            header = f"== {r['vm']} ({r['image']}): {status}, {r['seconds']:.2f}s"
            if r.get("truncated"):
                header += (f" [output cut at the server's cap; printed: stdout "
                           f"{r['stdout_bytes']} bytes, stderr {r['stderr_bytes']} bytes]")
            if binary:
                print(header, file=sys.stderr)
                sys.stdout.buffer.write(base64.b64decode(r.get("stdout_b64") or ""))
                sys.stdout.buffer.flush()
                sys.stderr.buffer.write(base64.b64decode(r.get("stderr_b64") or ""))
                sys.stderr.buffer.flush()
                if r.get("error"):
                    print("[error] " + r["error"], file=sys.stderr)
                continue
            print(header)
            if r["stdout"]:
                sys.stdout.write(r["stdout"] if r["stdout"].endswith("\n") else r["stdout"] + "\n")
            if r["stderr"]:
                sys.stdout.write("[stderr] " + r["stderr"].rstrip("\n") + "\n")
            if r.get("error"):
                sys.stdout.write("[error] " + r["error"] + "\n")
    if not results:
        raise CliError(f"ENV {args.name} has no running VMs")
    timed_out = [r["vm"] for r in results if r["timed_out"]]
    failed = [r["vm"] for r in results if r["exit_code"] != 0 and not r["timed_out"]]
    if timed_out:
        print(f"tt: command timed out after {args.timeout:.0f}s on {', '.join(timed_out)}"
              " (raise --timeout)", file=sys.stderr)
        return 124
    if failed:
        print(f"tt: command failed on {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_env_del(args: argparse.Namespace) -> int:
    """`tt env del`: delete each named ENV in turn; 0."""
    client = _client(args)
    for name in args.names:
        client.delete_env(name)
        print(f"deleted ENV {name}")
    return 0


def cmd_env_stop(args: argparse.Namespace) -> int:
    """`tt env stop`: stop each named ENV in turn; 0."""
    client = _client(args)
    for name in args.names:
        env = client.stop_env(name)
        print(f"stopped ENV {name}: {len(env['vms'])} VM(s) powered off, disks kept "
              f"('tt env start {name}' boots them again)")
    return 0


def cmd_env_start(args: argparse.Namespace) -> int:
    """`tt env start`: boot a stopped ENV and, unless --no-wait, follow it; 0 once running."""
    client = _client(args)
    env = client.start_env(args.name)
    if args.no_wait:
        print(f"ENV {args.name} is starting; follow it with 'tt env show {args.name}'")
        return 0
    print(f"starting ENV {args.name} ({len(env['vms'])} VM(s)) from its kept disks",
          file=sys.stderr)
    return _follow_boot(args, client, time.time())


def cmd_env_update(args: argparse.Namespace) -> int:
    """`tt env update`: change life time or ports and show the ENV; 0. CliError when nothing
    to change is given."""
    if args.life_time is None and not args.port and not args.no_port:
        raise CliError("give --life-time SECS, --port PORT or --no-port PORT")
    env = _client(args).update_env(args.name, args.life_time, args.port, args.no_port)
    if args.json:
        _print_json(env)
    else:
        _show_env(env)
    return 0


def cmd_env_push(args: argparse.Namespace) -> int:
    """`tt env push`: copy a local file to every running VM; 1 when any VM failed, else 0.
    CliError for an unreadable file or no running VM."""
    try:
        data = Path(args.local).read_bytes()
    except OSError as exc:
        raise CliError(f"--local {args.local}: {exc.strerror}") from exc
    mode = int(args.mode, 8) if args.mode else None
    reply = _client(args).push(args.name, args.remote, data, mode=mode, use_ssh=args.use_ssh)
    bad = [r for r in reply["results"] if r["error"]]
    for r in reply["results"]:
        took = f" in {r['seconds']:.1f}s" if "seconds" in r else ""
        print(f"{r['vm']}: " + (f"ERROR {r['error']}" if r["error"]
                                else f"{r['bytes']} bytes -> {args.remote}{took}"))
    if not reply["results"]:
        raise CliError(f"ENV {args.name} has no running VMs")
    return 1 if bad else 0


def _plain_file_name(name: str) -> bool:
    """True for a name usable as one directory entry: not empty, '.', '..', and without
    '/', NUL or control characters."""
    return (name not in ("", ".", "..") and "/" not in name
            and not any(ord(c) < 32 for c in name))


def cmd_env_get(args: argparse.Namespace) -> int:
    """`tt env get`: copy a guest file from every running VM to LOCAL/<vm>/; 1 when any copy
    failed, else 0. CliError when no VM is running."""
    client = _client(args)
    env = client.get_env(args.name)
    vms = [vm for vm in env["vms"] if vm["state"] == "running"]
    if not vms:
        raise CliError(f"ENV {args.name} has no running VMs (it is {env['state']})")
    out = Path(args.local)

    def fetch(vm: dict) -> str:
        name = str(vm.get("name", ""))
        if not _plain_file_name(name):  # the server's word: never a path out of LOCAL
            return f"{name!r}: ERROR refusing a VM name that is not a plain file name"
        try:
            data = client.pull(args.name, vm["id"], args.remote, use_ssh=args.use_ssh)
        except ApiError as exc:
            return f"{vm['name']}: ERROR {exc}"
        dest = out / name / (Path(args.remote).name or "root")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return f"{vm['name']}: {len(data)} bytes -> {dest}"

    # a few at a time, like the server's own copy limit
    with ThreadPoolExecutor(max_workers=min(4, len(vms))) as pool:
        lines = list(pool.map(fetch, vms))
    print("\n".join(lines))
    return 1 if any(": ERROR " in line for line in lines) else 0
