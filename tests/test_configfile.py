"""`--config FILE` (TOML) for ttserver and ttproxy: the daemons' own parsers, and one real
ttserver started from a file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ttclient import configfile
from ttproxy.cli import build_parser as proxy_parser
from ttserver.cli import serve_parser

from helpers import ServerProcess, new_run_dir


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ttserver.toml"
    path.write_text(text)
    return path


def test_the_file_sets_flags_and_the_command_line_wins(tmp_path):
    path = write(tmp_path, 'port-range = "41000-41099"\nmem_total = "3G"\n'
                           'allow-outgoing = true\nallowed-host = ["tt.lab", "tt2.lab"]\n')
    args = configfile.parse_args(serve_parser(), ["--config", str(path), "--mem-total", "2G",
                                                  "--allowed-host", "x.lab"])
    assert args.port_range == (41000, 41099)  # from the file
    assert args.mem_total == 2048  # the flag wins
    assert args.allow_outgoing is True
    assert args.allowed_host == ["tt.lab", "tt2.lab", "x.lab"]  # a list adds up
    plain = configfile.parse_args(serve_parser(), ["--mem-total", "1G"])
    assert plain.mem_total == 1024 and plain.config is None


def test_a_required_flag_may_come_from_the_file(tmp_path):
    path = tmp_path / "ttproxy.toml"
    path.write_text('server-set = "127.0.0.1:20000,127.0.0.1:20001"\nhealth-interval = 2.5\n')
    args = configfile.parse_args(proxy_parser(), ["--config", str(path)])
    assert args.health_interval == 2.5 and len(args.server_set) == 2


@pytest.mark.parametrize(("text", "words"), [
    ('serv_prot = 1\n', "unknown key 'serv_prot' (did you mean 'serv-port'?"),
    ('serv_port = 1\nserv-port = 2\n', "'serv_port' and 'serv-port' are the same key"),
    ('serv-port = 70000\n', "70000 is outside 1-65535"),
    ('cpu-total = -3\n', "-3 is outside 1-4096"),
    ('life-time = 0\n', "0 is outside 1-604800"),
    ('serv-port = "many"\n', "argument --serv-port: 'many' is not a number"),
    ('port-range = "9-1"\n', "9-1: FIRST is above LAST"),
    ('port-range = "80-90"\n', "port range must lie within 1024-65535"),
    ('allow-outgoing = "yes"\n', "allow-outgoing is a switch: write allow-outgoing = true"),
    ('mem-total = true\n', "mem-total takes a value, not True"),
    ('mem-total = ["1G", "2G"]\n', "mem-total takes one value, not a list"),
    ('[server]\nport = 1\n', "server"),
    ('serv-port = \n', "not TOML"),
])
def test_a_bad_file_is_a_usage_error_naming_file_and_key(tmp_path, capsys, text, words):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exc:
        configfile.parse_args(serve_parser(), ["--config", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"config {path}" in err and words in err, err


def test_a_missing_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        configfile.parse_args(serve_parser(), ["--config", str(tmp_path / "nope.toml")])
    assert "No such file or directory" in capsys.readouterr().err


def test_ttserver_runs_from_a_config_file():
    """A real daemon: what the file sets shows in /status, a flag given beside it wins."""
    run_dir = new_run_dir("cfg-")
    config = run_dir / "ttserver.toml"
    # the test's ServerProcess passes --disk-total 40G itself; warm-clones only the file
    config.write_text('disk-total = "30G"\nwarm-clones = true\nrun-output-cap = "8M"\n')
    srv = ServerProcess(run_dir / "state", extra=("--config", str(config))).start()
    try:
        st = requests.get(srv.url + "/status", timeout=10).json()
        assert st["warm_clones"] is True and st["disk_total_mib"] == 40 * 1024
        res = subprocess.run([sys.executable, "-m", "ttserver.cli", "--config",
                              str(run_dir / "missing.toml")], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2 and "missing.toml" in res.stderr
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_the_documented_examples_parse(tmp_path):
    """docs/operator.md's full examples are files both daemons take."""
    docs = (Path(__file__).parents[1] / "docs" / "operator.md").read_text()
    blocks = [b.split("```", 1)[0] for b in docs.split("```toml\n")[1:]]
    assert len(blocks) == 2
    for block, parser in zip(blocks, (serve_parser(), proxy_parser()), strict=True):
        path = tmp_path / "example.toml"
        path.write_text(block)
        args = configfile.parse_args(parser, ["--config", str(path)])
        assert args.log_format == "json"


def test_token_commands_take_the_file_after_the_action_too(tmp_path):
    # `ttserver token add alice --tokens-file F` was "unrecognized arguments"
    tokens = tmp_path / "tokens"
    res = subprocess.run([sys.executable, "-m", "ttserver.cli", "token", "add", "alice",
                          "--tokens-file", str(tokens)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and tokens.read_text().startswith("alice "), res.stderr
    res = subprocess.run([sys.executable, "-m", "ttserver.cli", "token", "--tokens-file",
                          str(tokens), "list"], capture_output=True, text=True, timeout=60)
    assert res.stdout == "alice\tuser\n", res.stderr
