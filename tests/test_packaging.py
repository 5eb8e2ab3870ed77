"""Operator packaging: the systemd units are valid, and their command lines parse with the
daemons' real argument parsers (a renamed flag breaks this test, not a production host)."""

from __future__ import annotations

import configparser
import re
import shlex
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
    bindir = Path(sys.executable).parent
    for name in ("ttserver.service", "ttproxy.service"):
        text = (UNITS / name).read_text().replace("/opt/ttstack/bin/", f"{bindir}/")
        (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.iterdir())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ttserver" not in proc.stderr and "ttproxy" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(("name", "ceiling"), [("ttproxy.service", 2.0),
                                              ("ttserver.service", 5.0)])
def test_units_are_hardened(tmp_path: Path, name: str, ceiling: float):
    """systemd's own exposure score (0 safe .. 10 exposed): ttproxy holds no privilege at
    all; ttserver keeps only the capabilities libvirt, chown and bridge mode need."""
    bindir = Path(sys.executable).parent
    (tmp_path / name).write_text((UNITS / name).read_text().replace("/opt/ttstack/bin/",
                                                                     f"{bindir}/"))
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           str(tmp_path / name)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match[1]) <= ceiling, proc.stdout


def test_ttserver_help_covers_every_flag_and_the_image_commands():
    out = subprocess.run([sys.executable, "-m", "ttserver.cli", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    for flag in ("--image-path", "--cfgdb-path", "--cpu-total", "--mem-total", "--disk-total",
                 "--serv-addr", "--serv-port", "--accel", "--port-range", "--boot-timeout",
                 "--life-time", "--allow-outgoing", "--libvirt-uri", "--log-level",
                 "--tcg-tb-cache", "--cold-boots", "ttserver image build|import|list"):
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


WHEELHOUSE = Path("/var/lib/ttstack/wheelhouse")  # scripts/setup-host.sh fills it


def venv_with(tmp_path: Path, name: str, *requirements: str) -> Path:
    """A clean venv (no system site-packages) at tmp_path/name with `requirements`
    installed from the built wheel and the wheelhouse only (no network); its bin dir."""
    venv = tmp_path / name
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index",
                          "--find-links", str(WHEELHOUSE), "--find-links",
                          str(tmp_path / "dist"), *requirements], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return venv / "bin"


@pytest.mark.slow
def test_sdist_and_wheel_build_and_install_into_clean_venvs(tmp_path: Path):
    root = Path(__file__).resolve().parent.parent
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                          str(dist), str(root)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,), (sdist,) = dist.glob("ttstack-*.whl"), dist.glob("ttstack-*.tar.gz")
    import tarfile
    import zipfile

    with zipfile.ZipFile(wheel) as whl, tarfile.open(sdist) as tar:
        assert any(n.endswith("/LICENSE") for n in whl.namelist())
        assert any(n.endswith("/LICENSE") for n in tar.getnames())

    client = venv_with(tmp_path, "client", str(wheel))
    assert subprocess.run([str(client / "tt"), "--help"], capture_output=True,
                          timeout=60).returncode == 0
    light = subprocess.run([str(client / "python"), "-c", "import fastapi"],
                           capture_output=True, timeout=60)
    assert light.returncode != 0, "the client pulled in the server's dependencies"
    venv_with(tmp_path, "client", f"ttstack[pytest] @ {wheel.as_uri()}")
    out = subprocess.run([str(client / "pytest"), "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "--tt-os" in out

    server = venv_with(tmp_path, "server", f"ttstack[server] @ {wheel.as_uri()}")
    res = subprocess.run([str(server / "ttserver"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--cfgdb-path" in res.stdout, res.stderr
