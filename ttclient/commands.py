"""The `tt` commands: one `cmd_*` function per verb, each taking the parsed arguments and
returning the exit code (cli.py has the parser and the exit-code rules)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shlex
import sys
import tarfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import __version__
from . import config as cfgmod
from .api import ApiError, Client, EnvWaitTimeout, changed_vms, vm_refs
from .imagenames import split_prefixes
from .rules import KEY_TYPES


class CliError(Exception):
    """An input error; main prints it as one `tt: error:` line and exits with 1."""
    pass


class UsageError(CliError):
    """Options that do not fit together (or are missing); main prints the line and exits
    with 2, as argparse does for bad usage."""
    pass


def client_for(args: argparse.Namespace) -> Client:
    """The API client `tt` uses: --server, else the configured server (config.load),
    with retries of the calls that are safe to repeat (api.RETRY); its message for an
    unreachable server says where the address came from."""
    cfg = cfgmod.load()
    if getattr(args, "server", None):
        cfg.serv_addr, cfg.serv_port = cfgmod.parse_server(args.server)
        fix = "is it running? (the address came from --server)"
    elif os.environ.get("TT_SERVER"):
        fix = "is it running? (the address came from $TT_SERVER)"
    else:
        fix = ("is it running? (set the address with 'tt config --serv-addr HOST "
               "--serv-port PORT', or use --server HOST:PORT)")
    return Client(cfg.base_url, token=cfg.token or None, retry=True, fix=fix)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _mib_text(mib: int) -> str:
    return f"{mib / 1024:.1f}G" if mib >= 1024 else f"{mib}M"


# --- config / status -----------------------------------------------------------------
def cmd_config(args: argparse.Namespace) -> int:
    """`tt config`: save the given address, port or token (`--token ''` forgets it), or
    show the current ones; 0. CliError for a token with whitespace, or none on stdin."""
    cfg = cfgmod.load(apply_env=bool(not args.serv_addr and not args.serv_port
                                     and args.token is None))
    changed = False
    if args.token is not None:
        token = sys.stdin.readline().strip() if args.token == "-" else args.token.strip()
        if args.token == "-" and not token:
            raise CliError("--token -: stdin held no token (pipe in the one 'ttserver token "
                           "add' printed)")
        if any(c.isspace() for c in token):
            raise CliError("--token: a token has no spaces or line breaks; give the one "
                           "'ttserver token add' printed")
        cfg.token, changed = token, True
    if args.serv_addr:
        cfg.serv_addr, changed = args.serv_addr, True
    if args.serv_port:  # 1-65535 (cli checks it)
        cfg.serv_port, changed = args.serv_port, True
    if changed:
        path = cfgmod.save(cfg)
        print(f"saved {cfg.address}{' and the token' if cfg.token else ', no token'}"
              f" to {path} (mode 0600)")
    else:
        token = "token set" if cfg.token else "no token"
        print(f"server: {cfg.address}, {token} (config: {cfgmod.config_path()})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """`tt status`: the client's version, its server, config file and the ENVs it sees
    (the first line printed before the server is asked), or with --remote the server's
    resources, images and warm templates; 0."""
    client = client_for(args)
    if not args.server_info:
        if not args.json:  # the client's own part first: it holds even with the server down
            print(f"tt {__version__}  server {client.base_url}  config {cfgmod.config_path()}",
                  flush=True)
        envs = client.list_envs()
        info = {"client_version": __version__, "server": client.base_url,
                "envs": [{"name": e["name"], "state": e["state"], "vms": len(e["vms"])}
                         for e in envs]}
        if args.json:
            _print_json(info)
            return 0
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
              f"ENVs {row['env_count']}  network={row.get('network', '?')}  "
              f"storage={row.get('storage', '?')}")
        if row.get("accel_reason"):
            print(f"  accel: {row['accel_reason']}")
    print("images: " + (", ".join(i["name"] for i in st["images"]) or "none"))
    templates = [t for row in rows for t in row.get("templates", [])]
    if templates:
        print("warm templates: " + ", ".join(f"{t['key']} ({t['state']})" for t in templates))
    return 0


def image_rows(status: dict) -> list[dict]:
    """Images as `tt image list` shows them, from a /status answer: name, os, arch,
    engine, size_mib, and `template`: the state of its default-shape warm template
    (ready, building, failed) or "none"."""
    rows = status.get("servers") or [status]  # through ttproxy: a row per server
    templates: dict[str, str] = {}
    for row in rows:
        for t in row.get("templates", []):
            image = t["key"].rsplit("-", 2)[0]  # KEY is IMAGE-NCPU-MEMm
            if templates.get(image) != "ready":
                templates[image] = t["state"]
    return [{"name": i["name"], "os": i["os"], "arch": i["arch"], "engine": i["engine"],
             "size_mib": i["size_mib"], "template": templates.get(i["name"], "none")}
            for i in status.get("images", [])]


def cmd_image_list(args: argparse.Namespace) -> int:
    """`tt image list`: the server's images (see image_rows); 0."""
    rows = image_rows(client_for(args).status())
    if args.json:
        _print_json(rows)
        return 0
    for line in image_table(rows):
        print(line)
    return 0


def image_table(rows: list[dict]) -> list[str]:
    """`tt image list`'s lines for image_rows(): columns as wide as their longest entry
    (`debian-13-linux6.1`), or "no images"."""
    if not rows:
        return ["no images"]
    widths = [max(len(r[k]) for r in rows) for k in ("name", "os", "arch")]
    return [f"{r['name']:<{widths[0]}}  {r['os']:<{widths[1]}}  {r['arch']:<{widths[2]}}  "
            f"{_mib_text(r['size_mib']):>6}  warm template: {r['template']}" for r in rows]


# --- env -----------------------------------------------------------------------------
def _vm_line(vm: dict, since: float | None = None) -> str:
    took = (f" in {vm['boot_seconds']:.1f}s" if vm.get("boot_seconds")
            and vm["state"] == "running" else "")  # a stopped VM's last boot is history
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
        raise UsageError("give --os-prefix (e.g. --os-prefix=debian-12) or --image")
    keys = [key for key_file in args.ssh_key or [] for key in public_keys(key_file)]
    client = client_for(args)
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


def public_keys(key_file: str) -> list[str]:
    """The OpenSSH public keys in `key_file` (one per line, as in a .pub file or an
    authorized_keys file without options; blank and # lines skipped). CliError for an
    unreadable file, a private key (never sent: it names the .pub file to give instead)
    or any other line."""
    try:
        text = Path(key_file).read_text()
    except OSError as exc:
        raise CliError(f"--ssh-key {key_file}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise CliError(f"--ssh-key {key_file}: not a text file (give a .pub file)") from None
    if "PRIVATE KEY" in text:
        raise CliError(f"--ssh-key {key_file} is a private key, which stays with you: give "
                       f"its public half, {key_file}.pub")
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys or not all(key.startswith(KEY_TYPES) and len(key.split()) >= 2
                           for key in keys):
        raise CliError(f"--ssh-key {key_file}: not an OpenSSH public key file (lines like "
                       "'ssh-ed25519 AAAA... comment', as in ~/.ssh/id_ed25519.pub)")
    return keys


def _follow_boot(args: argparse.Namespace, client: Client, since: float) -> int:
    """Show per-VM progress until the ENV is up (or failed); Ctrl-C leaves it booting."""
    progress = sys.stderr
    seen: dict[str, str] = {}

    def on_change(view: dict) -> None:
        for vm in changed_vms(view, seen):
            print(_vm_line(vm, since), file=progress, flush=True)

    try:
        env = client.wait_env(args.name, timeout=args.wait_timeout, on_change=on_change)
    except EnvWaitTimeout as exc:
        raise CliError(f"{exc}; it keeps booting on the server: 'tt env show {args.name}' "
                       f"to follow it, 'tt env del {args.name}' to drop it") from None
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
    envs = client_for(args).list_envs(None if everyone else cfgmod.owner())
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
    """`tt env show NAME...`: each ENV and its VMs (--json: one object, or a list for
    several names); 0."""
    client = client_for(args)
    envs, errors = [], []
    for name in args.names:  # the ones that exist are shown, the others named after
        try:
            envs.append(client.get_env(name))
        except ApiError as exc:
            if exc.status != 404:
                raise
            errors.append(str(exc))
    if args.json:
        if envs:
            _print_json(envs[0] if len(args.names) == 1 else envs)
    else:
        for env in envs:
            _show_env(env)
    if errors:
        raise CliError("; ".join(errors))
    return 0


def run_command_line(args: argparse.Namespace) -> str:
    """The guest shell command of `tt env run`: --cmd as given, the words after `--`
    quoted for the guest's /bin/sh, or --script's file written to a temporary file in the
    guest and executed there (by its #! line; without one, by sh); CliError unless
    exactly one of them is given, or for an unreadable script."""
    argv = list(getattr(args, "argv", None) or [])
    script = getattr(args, "script", None)
    if sum(map(bool, (args.cmd, argv, script))) != 1:
        raise UsageError("give the command one way: --cmd 'LINE', --script FILE, or words "
                         "after -- (tt env run NAME -- uname -a)")
    if not script:
        return args.cmd or shlex.join(argv)
    try:
        text = Path(script).read_text()
    except OSError as exc:
        raise CliError(f"--script {script}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise CliError(f"--script {script}: not a UTF-8 text file (for a program, 'tt env "
                       "push' it with --mode 0755 and run it)") from None
    end = f"TT_SCRIPT_{uuid.uuid4().hex}"  # a here-document no script line can close
    return (f"f=$(mktemp) && cat > \"$f\" <<'{end}'\n{text}\n{end}\n"
            'chmod +x "$f" && "$f"; s=$?; rm -f "$f"; exit $s')


def cmd_env_run(args: argparse.Namespace) -> int:
    """`tt env run`: print each VM's output; 124 when any VM timed out; with one VM
    addressed (--vm), its exit status; else 1 when any command failed, 0 when none did.
    CliError when no VM is running."""
    binary = getattr(args, "binary", False)
    vms = list(dict.fromkeys(args.vm)) if args.vm else None  # `--vm 0 --vm 0` is one VM
    reply = client_for(args).run(args.name, run_command_line(args), use_ssh=args.use_ssh,
                                 timeout=args.timeout, binary=binary, vms=vms)
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
        if args.vm and len(results) == 1:  # one VM addressed (by one or more refs)
            code = results[0]["exit_code"]
            return code if isinstance(code, int) and 0 < code < 256 else 1
        return 1
    return 0


def cmd_env_del(args: argparse.Namespace) -> int:
    """`tt env del`: delete each named ENV in turn; 0."""
    client = client_for(args)
    for name in args.names:
        client.delete_env(name)
        print(f"deleted ENV {name}")
    return 0


def cmd_env_stop(args: argparse.Namespace) -> int:
    """`tt env stop`: stop each named ENV in turn; 0."""
    client = client_for(args)
    for name in args.names:
        env = client.stop_env(name)
        print(f"stopped ENV {name}: {len(env['vms'])} VM(s) powered off, disks kept "
              f"('tt env start {name}' boots them again)")
    return 0


def cmd_env_start(args: argparse.Namespace) -> int:
    """`tt env start NAME...`: boot each stopped ENV (all asked first, so they boot
    together) and, unless --no-wait, follow each; 0 once all are running."""
    client = client_for(args)
    started = time.time()
    for name in args.names:
        env = client.start_env(name)
        if args.no_wait:
            print(f"ENV {name} is starting; follow it with 'tt env show {name}'")
        else:
            print(f"starting ENV {name} ({len(env['vms'])} VM(s)) from its kept disks",
                  file=sys.stderr)
    if args.no_wait:
        return 0
    for name in args.names:
        code = _follow_boot(argparse.Namespace(**{**vars(args), "name": name}), client,
                            started)
        if code:
            return code
    return 0


def cmd_env_update(args: argparse.Namespace) -> int:
    """`tt env update NAME...`: change each ENV's life time or ports and show it; 0.
    CliError when nothing to change is given."""
    if (args.life_time is None and not args.port and not args.no_port
            and args.cpu_num is None and args.mem_size is None):
        raise UsageError("give --life-time SECS, --port PORT, --no-port PORT, or for a "
                         "stopped ENV --cpu-num N / --mem-size SIZE")
    client = client_for(args)
    for name in args.names:  # every name must exist before any ENV changes
        client.get_env(name)
    envs = [client.update_env(name, args.life_time, args.port, args.no_port,
                              args.cpu_num, args.mem_size) for name in args.names]
    if args.json:
        _print_json(envs[0] if len(envs) == 1 else envs)
    else:
        for env in envs:
            _show_env(env)
    return 0


def cmd_env_kick(args: argparse.Namespace) -> int:
    """`tt env kick NAME VM...`: remove those VMs from the ENV and show what is left; 0."""
    env = client_for(args).kick_vms(args.name, args.vms)
    if args.json:
        _print_json(env)
    else:
        _show_env(env)
    return 0


def cmd_env_push(args: argparse.Namespace) -> int:
    """`tt env push`: copy a local file (or with -r a directory, as a tar stream unpacked
    in the guest) to every running VM, or the --vm ones; without --remote to
    /tmp/<basename>. 1 when any VM failed, else 0. CliError for an unreadable file or
    no running VM."""
    local = Path(args.local)
    remote = args.remote or f"/tmp/{local.resolve().name}"
    client = client_for(args)
    if args.recursive:
        if args.mode is not None:
            raise UsageError("--mode is for one file; with -r each file keeps the mode it"
                             " has here (chmod it before pushing)")
        if not local.is_dir():
            raise CliError(f"--local {args.local}: not a directory (drop -r for a file)")
        return _push_tree(args, client, local, remote)
    try:
        data = local.read_bytes()
    except OSError as exc:
        raise CliError(f"--local {args.local}: {exc.strerror or exc}") from exc
    mode = args.mode  # an int (cli._mode) or None
    reply = client.push(args.name, remote, data, mode=mode, use_ssh=args.use_ssh,
                        vms=args.vm)
    bad = [r for r in reply["results"] if r["error"]]
    for r in reply["results"]:
        took = f" in {r['seconds']:.1f}s" if "seconds" in r else ""
        print(f"{r['vm']}: " + (f"ERROR {r['error']}" if r["error"]
                                else f"{r['bytes']} bytes -> {remote}{took}"))
    if not reply["results"]:
        raise CliError(f"ENV {args.name} has no running VMs")
    return 1 if bad else 0


def _tar_of(directory: Path) -> bytes:
    """A tar of `directory`'s contents (members relative to it; symlinks as links)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return buf.getvalue()


def _push_tree(args: argparse.Namespace, client: Client, local: Path, remote: str) -> int:
    staged = f"/tmp/.tt-push-{uuid.uuid4().hex[:12]}.tar"
    data = _tar_of(local)
    reply = client.push(args.name, staged, data, use_ssh=args.use_ssh, vms=args.vm)
    if not reply["results"]:
        raise CliError(f"ENV {args.name} has no running VMs")
    pushed = [r["vm"] for r in reply["results"] if not r["error"]]
    lines = {r["vm"]: f"{r['vm']}: ERROR {r['error']}" for r in reply["results"] if r["error"]}
    if pushed:
        q = shlex.quote
        unpack = client.run(args.name, f"mkdir -p {q(remote)} && tar -xf {staged} -C "
                                       f"{q(remote)}; s=$?; rm -f {staged}; exit $s",
                            use_ssh=args.use_ssh, vms=pushed)
        for r in unpack["results"]:
            lines[r["vm"]] = (f"{r['vm']}: {len(data)} bytes of tar -> {remote}/"
                              if r["exit_code"] == 0 else
                              f"{r['vm']}: ERROR unpacking: {(r['stderr'] or r['error']).strip()}")
    print("\n".join(lines[vm] for vm in sorted(lines)))
    return 1 if any(": ERROR " in line for line in lines.values()) else 0


def _plain_file_name(name: str) -> bool:
    """True for a name usable as one directory entry: not empty, '.', '..', and without
    '/', NUL or control characters."""
    return (name not in ("", ".", "..") and "/" not in name
            and not any(ord(c) < 32 for c in name))


def _extract_tree(data: bytes, dest: Path) -> list[str]:
    """Unpack the tar `data` into `dest` through tarfile's `data` filter (no absolute
    names, no "..", no links out of the tree, no devices), skipping each member it refuses
    instead of stopping half-way; what was skipped, as "NAME: why" lines."""
    skipped: list[str] = []

    def keep_safe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        try:
            return tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            skipped.append(f"{member.name}: {exc}")
            return None

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter=keep_safe)
    return skipped


def cmd_env_get(args: argparse.Namespace) -> int:
    """`tt env get`: copy a guest file (or with -r a directory, as a tar stream) from every
    running VM, or the --vm ones, to LOCAL/<vm>/<basename>; 1 when any copy failed,
    else 0. CliError when no VM is running."""
    client = client_for(args)
    env = client.get_env(args.name)
    vms = [vm for vm in env["vms"] if vm["state"] == "running"
           and (not args.vm or vm_refs(vm) & set(args.vm))]
    if not vms:
        raise CliError(f"ENV {args.name} has no running VMs (it is {env['state']})"
                       if not args.vm else f"ENV {args.name}: no running VM is one of "
                       f"{', '.join(args.vm)}")
    out = Path(args.local)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--local {args.local} is a file: give a directory (each VM's copy "
                         "goes into DIR/<vm>/)")
    staged = f"/tmp/.tt-get-{uuid.uuid4().hex[:12]}.tar"
    if args.recursive:  # each VM packs the tree first
        packed = client.run(args.name, f"tar -cf {staged} -C {shlex.quote(args.remote)} .",
                            use_ssh=args.use_ssh, vms=[vm["id"] for vm in vms])
        failed = {r["id"]: (r["stderr"] or r["error"]).strip() for r in packed["results"]
                  if r["exit_code"] != 0}
    else:
        failed = {}

    def fetch(vm: dict) -> str:
        name = str(vm.get("name", ""))
        if not _plain_file_name(name):  # the server's word: never a path out of LOCAL
            return f"{name!r}: ERROR refusing a VM name that is not a plain file name"
        if vm["id"] in failed:
            return f"{name}: ERROR packing {args.remote}: {failed[vm['id']]}"
        try:
            data = client.pull(args.name, vm["id"], staged if args.recursive else args.remote,
                               use_ssh=args.use_ssh)
        except ApiError as exc:
            return f"{vm['name']}: ERROR {exc}"
        dest = out / name / (Path(args.remote).name or "root")
        try:
            if not args.recursive:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                return f"{vm['name']}: {len(data)} bytes -> {dest}"
            dest.mkdir(parents=True, exist_ok=True)
            skipped = _extract_tree(data, dest)
        except (tarfile.TarError, OSError) as exc:
            return f"{vm['name']}: ERROR writing here: {exc}"
        note = (f" (skipped {len(skipped)} the data filter refuses: "
                f"{'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})"
                if skipped else "")
        return f"{vm['name']}: {len(data)} bytes of tar -> {dest}/{note}"

    # a few at a time, like the server's own copy limit
    with ThreadPoolExecutor(max_workers=min(4, len(vms))) as pool:
        lines = list(pool.map(fetch, vms))
    if args.recursive:
        with contextlib.suppress(ApiError):
            client.run(args.name, f"rm -f {staged}", use_ssh=args.use_ssh,
                       vms=[vm["id"] for vm in vms])
    print("\n".join(lines))
    return 1 if any(": ERROR " in line for line in lines) else 0
