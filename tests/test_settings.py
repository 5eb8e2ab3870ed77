"""Settings are declared once: the daemon's flags take ServerConfig's defaults; the
version comes from the installed distribution (pyproject.toml)."""

from __future__ import annotations

from importlib import metadata

import ttclient
from ttserver.cli import serve_parser
from ttserver.config import ServerConfig


def test_flag_defaults_are_the_config_defaults():
    args = serve_parser().parse_args([])
    cfg = ServerConfig(image_path=args.image_path, cfgdb_path=args.cfgdb_path,
                       cpu_total=args.cpu_total)
    assert (args.mem_total, args.disk_total) == (cfg.mem_total_mib, cfg.disk_total_mib)
    assert (args.serv_addr, args.serv_port, args.accel) == (cfg.serv_addr, cfg.serv_port,
                                                            cfg.accel)
    assert args.port_range == (cfg.port_first, cfg.port_last)
    assert (args.boot_timeout, args.life_time) == (cfg.boot_timeout, cfg.default_life_time)
    assert (args.storage, args.network, args.libvirt_uri) == (cfg.storage, cfg.network,
                                                              cfg.libvirt_uri)
    assert (args.bridge_name, args.bridge_subnet) == (cfg.bridge_name, cfg.bridge_subnet)
    assert f"(default {cfg.serv_port})" in serve_parser().format_help()


def test_one_version():
    assert ttclient.__version__ == metadata.version("ttstack")
