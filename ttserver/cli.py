"""`ttserver`: run the daemon (flags as in the original TTstack), or build/list images.

    ttserver --image-path /var/lib/ttstack/images --cfgdb-path /var/lib/ttstack/state \\
             --cpu-total 2 --mem-total 4G --disk-total 40G --serv-addr 127.0.0.1 --serv-port 20000
    ttserver image build debian-12 --arch x86_64 --image-path /var/lib/ttstack/images
    ttserver image list --image-path /var/lib/ttstack/images
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import platform
import re
import sys
from pathlib import Path

from ttclient import arches, configfile
from ttclient.argtypes import arch_list, engine_list, mib, number_in
from ttclient.audit import add_log_options, configure_logging
from ttclient.configfile import add_config_option
from ttclient.guard import add_allowed_host_option
from ttclient.imagenames import ENGINES
from ttclient.rules import MAX_LIFE_TIME
from ttclient.serving import add_http_timeout_options

DEFAULT_IMAGES = "/var/lib/ttstack/images"
DEFAULT_STATE = "/var/lib/ttstack/state"
DEFAULT_TOKENS = "/etc/ttstack/tokens"


def _port_range(text: str) -> tuple[int, int]:
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("use FIRST-LAST, e.g. 40000-49999") from exc
    if first > last:
        raise argparse.ArgumentTypeError(f"{text}: FIRST is above LAST")
    if not 1024 <= first <= last <= 65535:
        raise argparse.ArgumentTypeError("port range must lie within 1024-65535")
    return first, last


def _ifname(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an interface name (1-15 of"
                                         " letters, digits, _ and -)")
    return text


def _subnet(text: str) -> str:
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc} (e.g. 10.213.0.0/24)") from exc
    if net.prefixlen > 29:
        raise argparse.ArgumentTypeError(f"{text!r} is too small: /29 or larger")
    return str(net)


def _defaults() -> dict:
    """ServerConfig's defaults: the parser states none of its own."""
    from .config import ServerConfig

    return {f.name: f.default for f in dataclasses.fields(ServerConfig)
            if f.default is not dataclasses.MISSING}


def serve_parser() -> argparse.ArgumentParser:
    """The parser of `ttserver` (the daemon's options); defaults from ServerConfig."""
    d = _defaults()
    p = argparse.ArgumentParser(
        prog="ttserver", description="ttstack host daemon: ENVs of real VMs over HTTP/JSON.",
        epilog="Sub-commands: 'ttserver image build|import|list ...' (see 'ttserver image"
               " build --help' and the others),"
               " 'ttserver token add|list|del ...' (see 'ttserver token --help'). "
               "Sizes are MiB or take a suffix: 512M, 4G, 1T.")
    p.add_argument("--image-path", type=Path, default=Path(DEFAULT_IMAGES),
                   help=f"directory of images ENGINE:OS-VERSION:ARCH (default {DEFAULT_IMAGES})")
    p.add_argument("--cfgdb-path", type=Path, default=Path(DEFAULT_STATE),
                   help=f"state directory: SQLite DB, VM disks, SSH key (default {DEFAULT_STATE})")
    p.add_argument("--cpu-total", type=number_in(int, 1, 4096), default=os.cpu_count() or 1,
                   help="vCPUs this host may hand out (default: host CPUs)")
    p.add_argument("--mem-total", type=mib, default=d["mem_total_mib"],
                   help=f"guest memory to hand out (default {d['mem_total_mib']} MiB)")
    p.add_argument("--disk-total", type=mib, default=d["disk_total_mib"],
                   help=f"virtual disk size of VM clones to hand out (default "
                        f"{d['disk_total_mib']} MiB)")
    p.add_argument("--serv-addr", default=d["serv_addr"],
                   help=f"address for the API and the forwarded VM ports (default "
                        f"{d['serv_addr']}; before exposing it, set --tokens-file)")
    p.add_argument("--serv-port", type=number_in(int, 1, 65535), default=d["serv_port"],
                   help=f"API port (default {d['serv_port']})")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default=d["accel"],
                   help="auto: KVM only if a guest kernel really boots under it, else TCG")
    p.add_argument("--port-range", type=_port_range, default=(d["port_first"], d["port_last"]),
                   help=f"host ports for forwards, FIRST-LAST (default "
                        f"{d['port_first']}-{d['port_last']})")
    p.add_argument("--boot-timeout", type=number_in(float, 1, 86400), default=d["boot_timeout"],
                   help=f"seconds a VM may take until its guest agent answers (default "
                        f"{d['boot_timeout']:.0f})")
    p.add_argument("--run-output-cap", type=mib, default=d["run_output_cap"] >> 20,
                   metavar="SIZE", help="bytes of each output stream a run keeps; more is "
                   f"cut and flagged truncated (MiB or a suffix; default "
                   f"{d['run_output_cap'] >> 20} MiB)")
    p.add_argument("--life-time", type=number_in(int, 1, MAX_LIFE_TIME),
                   default=d["default_life_time"],
                   help=f"default ENV lifetime in seconds (default {d['default_life_time']})")
    p.add_argument("--token-max-vms", type=number_in(int, 0, 100_000), default=d["token_max_vms"],
                   metavar="N",
                   help="VMs one (non-admin) API token may have on record, stopped ones too"
                        " (default: only the server's totals limit it)")
    p.add_argument("--token-max-mem", type=mib, default=d["token_max_mem_mib"],
                   metavar="SIZE", help="guest memory one (non-admin) API token may have on"
                                        " record, e.g. 8G (default: the server's totals)")
    p.add_argument("--allow-outgoing", action=argparse.BooleanOptionalAction, default=False,
                   help="let VMs open connections to the outside (default: cut off; an ENV"
                        " can still deny it)")
    p.add_argument("--engines", type=engine_list, default=d["engines"], metavar="ENGINE,...",
                   help="image engines to offer: qemu (VMs) and/or lxc (containers; they "
                        "share this host's kernel, see docs/operator.md); default qemu")
    p.add_argument("--warm-clones", action=argparse.BooleanOptionalAction,
                   default=d["warm_clones"],
                   help="start VMs from a saved memory snapshot of their image (about a"
                        " second instead of a boot; on by default: each image's template is"
                        " built in the background at start); ENVs may still ask for cold"
                        " boots")
    p.add_argument("--cold-boots", type=number_in(int, 0, 1024), default=d["cold_boots"],
                   metavar="N",
                   help="cold boots running at once; more VMs wait `pending` (default 0: one"
                        " per host CPU, as a boot under TCG keeps a CPU busy)")
    p.add_argument("--tcg-tb-cache", type=number_in(int, 0, 1024, "MiB"),
                   default=d["tcg_tb_cache_mib"], metavar="MIB",
                   help="MiB of translated code each TCG guest's QEMU may keep (QEMU's"
                        " tb-size; 0: QEMU's default, an eighth of the host's RAM up to"
                        f" 1 GiB; default {d['tcg_tb_cache_mib']})")
    p.add_argument("--template-cache", type=Path, default=None, metavar="DIR",
                   help="share warm-clone templates with other servers on this host through"
                        " DIR (hard links: same filesystem as --cfgdb-path)")
    p.add_argument("--storage", choices=["auto", "qcow2", "btrfs", "zfs"], default=d["storage"],
                   help="VM disk clones: qcow2 overlays, btrfs snapshots when the state"
                        " and images are on one btrfs, or ZFS clones (auto picks by"
                        " filesystem)")
    p.add_argument("--network", choices=["user", "bridge"], default=d["network"],
                   help="user: QEMU user networking, nothing to set up (default); bridge: a"
                        " Linux bridge with DHCP and nftables port mapping (root, nft,"
                        " dnsmasq; see docs/operator.md)")
    p.add_argument("--bridge-name", type=_ifname, default=d["bridge_name"],
                   help=f"bridge for --network bridge (default {d['bridge_name']})")
    p.add_argument("--bridge-subnet", type=_subnet, default=d["bridge_subnet"],
                   help=f"VM addresses for --network bridge; the first is the host's"
                        f" (default {d['bridge_subnet']})")
    p.add_argument("--tokens-file", type=Path, default=None,
                   help=f"API tokens ('ttserver token add'; default {DEFAULT_TOKENS}, read"
                        " when it exists); without tokens the API is open, which a server"
                        " on a non-loopback address refuses unless --insecure-no-auth")
    p.add_argument("--insecure-no-auth", action=argparse.BooleanOptionalAction, default=False,
                   help="serve without API tokens even if a tokens file exists, on any"
                        " address (anyone who reaches the port may run code in VMs)")
    add_allowed_host_option(p, "server")
    add_http_timeout_options(p)
    p.add_argument("--libvirt-uri", default=d["libvirt_uri"],
                   help=f"libvirt connection (default {d['libvirt_uri']})")
    add_log_options(p)
    add_config_option(p, "/etc/ttstack/ttserver.toml")
    return p


def image_parser() -> argparse.ArgumentParser:
    """The parser of `ttserver image build|import|list`."""
    p = argparse.ArgumentParser(prog="ttserver image", description="build or list images")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build a Debian image with mmdebstrap (cached)")
    b.set_defaults(parser=b)  # errors found after parsing print this usage
    b.add_argument("os", nargs="+", help="OS-VERSION, e.g. debian-12 (several: each)")
    b.add_argument("--arch", type=arch_list, action="extend", default=None,
                   help=f"the guest arch, or several (comma list or repeated): "
                        f"{', '.join(p.name for p in arches.PROFILES)} or an alias "
                        f"(amd64, arm64, ppc64el, ...); default the host's "
                        f"({platform.machine()})")
    b.add_argument("--all-arches", action="store_true",
                   help="every arch Debian ships a kernel for in that release")
    b.add_argument("--kernels-from", default="", metavar="OS-VERSION[,...]",
                   help="also boot the same root filesystem with these releases' kernels: "
                        "one more image each, e.g. debian-13-linux6.1 (a kernel matrix)")
    b.add_argument("--jobs", type=number_in(int, 1, 64), default=os.cpu_count() or 1,
                   help="builds at once (default: the CPU count, %(default)s)")
    b.add_argument("--image-path", type=Path, default=Path(DEFAULT_IMAGES))
    b.add_argument("--disk-size", type=mib, default=2048, help="virtual disk size (2G)")
    b.add_argument("--mirror", default=None, help="Debian mirror (default: the host's)")
    b.add_argument("--timeout", type=number_in(float, 1, 7 * 86400, "seconds"), default=1800,
                   help="seconds one image's mmdebstrap may take before it is stopped and"
                        " that image fails (default %(default)s)")
    b.add_argument("--force", action="store_true", help="rebuild even if present")
    b.add_argument("--engine", choices=("qemu", "lxc"), default="qemu",
                   help="qemu: a VM image (default); lxc: a container image made from the "
                        "VM image of the same OS and arch (built first when missing)")
    imp = sub.add_parser("import", help="import a generic cloud image (qcow2, raw, ...):"
                                        " its VMs get a cloud-init NoCloud seed")
    imp.add_argument("file", type=Path, help="the image file")
    imp.add_argument("--name", required=True, help="ENGINE:OS-VERSION:ARCH, e.g."
                                                   " qemu:ubuntu-20.04:x86_64")
    imp.add_argument("--image-path", type=Path, default=Path(DEFAULT_IMAGES))
    imp.add_argument("--force", action="store_true", help="replace an existing image")
    ls = sub.add_parser("list", help="list images under --image-path")
    ls.add_argument("--image-path", type=Path, default=Path(DEFAULT_IMAGES))
    return p


def token_parser() -> argparse.ArgumentParser:
    """The parser of `ttserver token add|list|del`."""
    p = argparse.ArgumentParser(prog="ttserver token",
                                description="manage API tokens (shown once, stored hashed)")
    p.add_argument("--tokens-file", type=Path, default=Path(DEFAULT_TOKENS),
                   help=f"default {DEFAULT_TOKENS}")
    # also after the action (`token add alice --tokens-file F`); given there it wins
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--tokens-file", type=Path, default=argparse.SUPPRESS,
                       help=f"default {DEFAULT_TOKENS}")
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("add", help="create a token and print it", parents=[where])
    a.add_argument("name", help="who it is for; ENVs it creates are owned by this name")
    a.add_argument("--admin", action="store_true", help="may see and act on every ENV")
    sub.add_parser("list", help="token names and roles", parents=[where])
    d = sub.add_parser("del", help="revoke a token (takes effect at once)", parents=[where])
    d.add_argument("name")
    return p


def token_main(argv: list[str]) -> int:
    """Run `ttserver token` with `argv`: 0, or 1 after printing the error."""
    from . import auth
    args = token_parser().parse_args(argv)
    try:
        if args.action == "add":
            print(auth.add_token(args.tokens_file, args.name, args.admin))
            print(f"(token for {args.name} added to {args.tokens_file}; it is not shown again)",
                  file=sys.stderr)
        elif args.action == "del":
            auth.delete_token(args.tokens_file, args.name)
            print(f"revoked {args.name}", file=sys.stderr)
        else:
            text = args.tokens_file.read_text() if args.tokens_file.exists() else ""
            for name, role in sorted(auth.parse(text, str(args.tokens_file)).values()):
                print(f"{name}\t{role}")
    except (OSError, ValueError) as exc:
        print(f"ttserver token: {exc}", file=sys.stderr)
        return 1
    return 0


def image_main(argv: list[str]) -> int:
    """Run `ttserver image` with `argv`: 0, or 1 after printing why the build or import
    failed."""
    args = image_parser().parse_args(argv)
    if args.action == "list":
        from .images import scan
        if not args.image_path.is_dir():
            print(f"ttserver image list: {args.image_path} is not a directory (give the"
                  " image dir with --image-path)", file=sys.stderr)
            return 1
        for img in scan(args.image_path, ENGINES):
            warn = f"  ({'; '.join(img.warnings)})" if img.warnings else ""
            print(f"{img.name.full}\t{img.size_mib} MiB\t{img.path}{warn}")
        return 0
    if args.action == "import":
        from ttclient.imagenames import ImageNameError

        from .images.build import BuildError
        from .images.importer import import_image
        try:
            target = import_image(args.file, args.name, args.image_path, force=args.force)
        except (BuildError, ImageNameError, OSError) as exc:  # BuildError: a failed step too
            print(f"ttserver image import: {exc}", file=sys.stderr)
            return 1
        print(f"[image import] {args.name} at {target}", file=sys.stderr)
        return 0
    from ttclient.serving import exit_on_sigterm

    from .images.build import BuildError, build_many, plan
    if args.all_arches and args.arch:
        args.parser.error("give --arch or --all-arches, not both")
    kernels_from = tuple(args.kernels_from.split(","))
    try:
        pairs, kernels_from = plan(args.os, args.arch, args.all_arches, kernels_from)
        if args.all_arches and kernels_from:  # say which arches the kernels' releases lack
            every, _ = plan(args.os, None, True)
            for os_version, arch in (p for p in every if p not in pairs):
                print(f"[image build] {os_version}:{arch}: skipped (no {arch} kernel in "
                      f"{', '.join(kernels_from)})", file=sys.stderr)
    except BuildError as exc:
        args.parser.error(str(exc))
    exit_on_sigterm()  # a stopped build still unmounts and removes its work trees
    results = build_many(pairs, args.image_path, jobs=args.jobs, disk_mib=args.disk_size,
                         mirror=args.mirror, timeout=args.timeout, force=args.force,
                         kernels_from=kernels_from, engine=args.engine)
    failed = {name: why for name, why in results.items() if why}
    for name, why in failed.items():
        print(f"ttserver image build: {name}: {why}", file=sys.stderr)
    if len(results) > 1:
        print(f"[image build] {len(results) - len(failed)} of {len(results)} images ready"
              + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def serve_main(argv: list[str]) -> int:
    """Run the daemon with `argv` until it is stopped: 0; 2 for a missing dependency, an
    unusable --accel kvm or a bad --life-time; 1 when the server cannot start."""
    args = configfile.parse_args(serve_parser(), argv)
    configure_logging(args.log_level, args.log_format)
    try:
        import uvicorn  # noqa: F401 - fail here, with the install hint

        from ttclient.serving import serve

        from .config import ServerConfig
        from .envs import EnvManager
        from .local_service import create_app
    except ImportError as exc:
        print(f"ttserver: missing server dependency ({exc.name}); "
              "install with: pip install 'ttstack[server]'", file=sys.stderr)
        return 2
    cfg = ServerConfig(image_path=args.image_path.resolve(), cfgdb_path=args.cfgdb_path.resolve(),
                       cpu_total=args.cpu_total, mem_total_mib=args.mem_total,
                       disk_total_mib=args.disk_total, serv_addr=args.serv_addr,
                       serv_port=args.serv_port, accel=args.accel,
                       port_first=args.port_range[0], port_last=args.port_range[1],
                       boot_timeout=args.boot_timeout, default_life_time=args.life_time,
                       run_output_cap=args.run_output_cap << 20,
                       libvirt_uri=args.libvirt_uri, allow_outgoing=args.allow_outgoing,
                       warm_clones=args.warm_clones, network=args.network,
                       template_cache=(args.template_cache.resolve()
                                       if args.template_cache else None),
                       storage=args.storage, token_max_vms=args.token_max_vms,
                       token_max_mem_mib=args.token_max_mem,
                       bridge_name=args.bridge_name, bridge_subnet=args.bridge_subnet,
                       tcg_tb_cache_mib=args.tcg_tb_cache, cold_boots=args.cold_boots,
                       engines=args.engines)
    if args.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("ttserver: --accel kvm but /dev/kvm is missing or not usable; use --accel auto"
              " (probes) or tcg", file=sys.stderr)
        return 2
    from .auth import TokenStore
    tokens_file = _tokens_file(args)
    if tokens_file is None and not args.insecure_no_auth and not _loopback(cfg.serv_addr):
        print(f"ttserver: --serv-addr {cfg.serv_addr} is reachable from other machines and"
              f" there is no tokens file ({DEFAULT_TOKENS}, or --tokens-file): add one with"
              " 'ttserver token add NAME --admin', or pass --insecure-no-auth",
              file=sys.stderr)
        return 2
    try:
        tokens = TokenStore(tokens_file)
        manager = EnvManager(cfg)
        manager.start_background()
    except Exception as exc:  # libvirt not running, unwritable state dir, ...
        print(f"ttserver: cannot start: {exc}", file=sys.stderr)
        if "manager" in locals():
            manager.stop_background()  # a half-made bridge, rules, dnsmasq
        return 1
    # uvicorn turns SIGTERM/SIGINT into a clean stop; VMs stay on record and are adopted
    # (or reaped, if expired) on the next start.
    if tokens_file is None:
        logging.getLogger("ttserver").warning("no API tokens: the API is open to every"
                                              " caller that reaches %s", cfg.serv_addr)
    serve(create_app(manager, tokens, tuple(args.allowed_host)), cfg.serv_addr, cfg.serv_port,
          on_stop=manager.stop_background, header_timeout=args.http_header_timeout,
          body_timeout=args.http_body_timeout)
    return 0


def _tokens_file(args: argparse.Namespace) -> Path | None:
    """The tokens file the daemon uses: --tokens-file (it must exist: TokenStore fails at
    start otherwise), else the default one when it exists; None with --insecure-no-auth."""
    if args.insecure_no_auth:
        return None
    if args.tokens_file is not None:
        return args.tokens_file
    return Path(DEFAULT_TOKENS) if Path(DEFAULT_TOKENS).exists() else None


def _loopback(addr: str) -> bool:
    """True when `addr` (an IP or a name) only reaches this machine."""
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Dispatch `ttserver` to its `image` or `token` sub-command, else the daemon; the exit
    status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "image":
        return image_main(argv[1:])
    if argv and argv[0] == "token":
        return token_main(argv[1:])
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
