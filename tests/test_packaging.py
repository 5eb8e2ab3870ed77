"""Operator packaging: the systemd units are valid, and their command lines parse with the
daemons' real argument parsers (a renamed flag breaks this test, not a production host)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ttproxy.cli import build_parser as proxy_parser
from ttserver.cli import serve_parser

UNITS = Path(__file__).resolve().parent.parent / "packaging" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read(UNITS / name)
    return cp


def exec_args(name: str, env_var: str) -> list[str]:
    """ExecStart's arguments with the unit's default $ENV_VAR expanded as systemd does."""
    service = unit(name)["Service"]
    default = shlex.split(service["Environment"])[0].split("=", 1)[1]
    argv = shlex.split(service["ExecStart"])
    return [a for arg in argv[1:] for a in (default.split() if arg == f"${env_var}" else [arg])]


def test_ttserver_unit_command_line_parses():
    args = serve_parser().parse_args(exec_args("ttserver.service", "TTSERVER_ARGS"))
    assert str(args.cfgdb_path).startswith("/var/lib/ttstack")
    assert args.serv_addr == "127.0.0.1"


def test_ttproxy_unit_command_line_parses():
    args = proxy_parser().parse_args(exec_args("ttproxy.service", "TTPROXY_ARGS"))
    assert args.server_set == ["127.0.0.1:20000"] and args.proxy_addr[0] == "127.0.0.1"


def test_units_pass_systemd_analyze_verify(tmp_path: Path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed on this host")
    bindir = Path(sys.executable).parent
    for name in ("ttserver.service", "ttproxy.service"):
        text = (UNITS / name).read_text().replace("/opt/ttstack/bin/", f"{bindir}/")
        (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.iterdir())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ttserver" not in proc.stderr and "ttproxy" not in proc.stderr, proc.stderr


def test_ttserver_help_covers_every_flag_and_the_image_commands():
    out = subprocess.run([sys.executable, "-m", "ttserver.cli", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    for flag in ("--image-path", "--cfgdb-path", "--cpu-total", "--mem-total", "--disk-total",
                 "--serv-addr", "--serv-port", "--accel", "--port-range", "--boot-timeout",
                 "--life-time", "--allow-outgoing", "--libvirt-uri", "--log-level",
                 "ttserver image build|list"):
        assert flag in out, flag


def test_the_wheel_says_it_is_a_typed_pytest_plugin(tmp_path: Path):
    """pytest's plugin list and PyPI's search find plugins by `Framework :: Pytest`;
    type checkers read a package's annotations only with a py.typed (PEP 561)."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(root)], check=True, timeout=300)
    wheel = zipfile.ZipFile(next(tmp_path.glob("ttstack-*.whl")))
    names = wheel.namelist()
    assert {"pytest_ttstack/py.typed", "ttclient/py.typed"} <= set(names)
    meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Classifier: Framework :: Pytest" in meta
