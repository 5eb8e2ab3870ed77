"""`tt` refuses bad input itself, before anything is sent: each case gives exit 2 (bad
usage) or 1 (bad input) and a line saying what to fix. The server address is a closed
port, so a case that reached the network would say "cannot reach" instead; no server is
needed. Every case here was a defect found by a hostile trial (traceback, the wrong
endpoint's JSON with exit 0, a private key sent to the server, a pydantic message...).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ttclient import api
from ttclient.api import ApiError, Client
from ttclient.cli import build_parser, main
from ttclient.rules import path_segment

from helpers import free_port as closed_port  # nothing listens on it

ENV_NAME_RULE = "1-40 letters, digits, '-' or '_'"


@pytest.fixture()
def tt(tmp_path, monkeypatch, capsys):
    """Run `tt` in-process against a closed port: (exit code, stdout, stderr)."""
    monkeypatch.setenv("TT_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("TT_SERVER", f"127.0.0.1:{closed_port()}")
    monkeypatch.delenv("TT_TOKEN", raising=False)
    # the same tries, without the 7.5 s of waits between them
    monkeypatch.setattr("ttclient.api.RETRY", api.RETRY.new(backoff_factor=0))

    def run(*words: str) -> tuple[int, str, str]:
        try:
            code = main(list(words))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def refused(result: tuple[int, str, str], code: int, *fragments: str) -> None:
    """Exit `code`, nothing sent (no "cannot reach"), one error line with `fragments`."""
    got, _, err = result
    lines = [line for line in err.splitlines() if "error" in line]
    assert got == code, err
    assert "cannot reach" not in err, "the bad input was sent to the server"
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.mark.parametrize("name", ["", ".", "..", "../status", "a/b", "x?y", "a" * 41])
def test_env_names_are_checked_before_they_go_into_a_url(tt, name):
    # `tt env show ../status` printed /status's JSON with exit 0; '' gave a traceback
    refused(tt("env", "show", name), 2, ENV_NAME_RULE)
    refused(tt("env", "del", "ok", name), 2, ENV_NAME_RULE)


@pytest.mark.parametrize("ref", ["..", "../../status", "a b", ""])
def test_vm_refs_are_checked(tt, ref):
    refused(tt("env", "console", "e", ref), 2, "VM ")
    refused(tt("env", "run", "e", "--vm", ref, "--cmd", "true"), 2, "VM ")


def test_the_api_client_quotes_path_segments_and_refuses_dot_segments():
    assert path_segment("a b/c") == "a%20b%2Fc"
    client = Client(f"http://127.0.0.1:{closed_port()}", token=None)
    for name in ("", ".", ".."):
        with pytest.raises(ApiError, match="cannot name an ENV or a VM"):
            client.get_env(name)


def test_a_private_key_is_never_sent(tt, tmp_path):
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n"
                       "-----END OPENSSH PRIVATE KEY-----\n")
    refused(tt("env", "add", "e", "--os-prefix", "deb", "--ssh-key", str(private)), 1,
            "private key", f"{private}.pub")
    garbage = tmp_path / "notes.txt"
    garbage.write_text("hello\n")
    refused(tt("env", "add", "e", "--os-prefix", "deb", "--ssh-key", str(garbage)), 1,
            "not an OpenSSH public key")
    binary = tmp_path / "key.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    refused(tt("env", "add", "e", "--os-prefix", "deb", "--ssh-key", str(binary)), 1,
            "not a text file")


def test_a_public_key_file_with_several_keys_is_sent_line_by_line(tt, tmp_path):
    keys = tmp_path / "keys.pub"
    keys.write_text("# team\nssh-ed25519 AAAAC3 a@x\n\nssh-rsa AAAAB3 b@y\n")
    code, _, err = tt("env", "add", "e", "--os-prefix", "deb", "--ssh-key", str(keys))
    assert code == 1 and "cannot reach the server" in err  # accepted, then sent


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("-n", "0", "outside 1-500 (VMs)"), ("--vm-number", "501", "outside 1-500 (VMs)"),
    ("-c", "0", "outside 1-64 (vCPUs)"), ("-c", "many", "not a number (vCPUs, 1-64)"),
    ("-l", "0", "seconds"), ("-p", "22", "22 is always forwarded"),
    ("-l", "700000", "outside 1-604800 (seconds)"),  # the server's 7 days, said here
    ("-p", ",".join(str(p) for p in range(1000, 1033)), "33 ports: an ENV forwards at most 32"),
    ("-p", "70000", "1-65535"), ("-p", "80,x", "not a port number"),
    ("--wait-timeout", "-1", "seconds"), ("--wait-timeout", "nan", "seconds"),
    ("--wait-timeout", "inf", "seconds"), ("--ssh-key", "", "empty"),
])
def test_env_add_values_are_range_checked_here(tt, option, value, fragment):
    # these reached the server and came back as pydantic messages, exit 1
    refused(tt("env", "add", "e", "--os-prefix", "deb", option, value), 2, fragment)


@pytest.mark.parametrize("mode", ["999", "abc", "-1", "17777"])
def test_push_mode_must_be_octal(tt, tmp_path, mode):
    (tmp_path / "f").write_text("x")
    refused(tt("env", "push", "e", "--local", str(tmp_path / "f"), "--mode", mode), 2,
            "octal file mode")


def test_push_mode_is_not_for_a_tree(tt, tmp_path):
    """`-r --mode 0755` was accepted and the mode silently dropped."""
    (tmp_path / "d").mkdir()
    refused(tt("env", "push", "e", "--local", str(tmp_path / "d"), "-r", "--mode", "0755"),
            2, "--mode is for one file")


@pytest.mark.parametrize("mode,sent", [(0o44, "0044"), (0, "0000"), (0o755, "0755"),
                                       (0o4755, "4755")])
def test_push_sends_every_mode_as_the_api_takes_it(mode, sent):
    """`--mode 0044` went out as `44`, which the API's pattern (3-4 octal digits) refused
    with a 422 after the whole upload."""
    seen: dict = {}

    class Reply:
        def json(self) -> dict:
            return {"env": "e", "results": []}

    client = Client("http://127.0.0.1:1")
    client._call = lambda method, path, **kw: seen.update(kw) or Reply()  # type: ignore
    client.push("e", "/tmp/x", b"data", mode=mode)
    assert seen["params"]["mode"] == sent
    assert re.fullmatch("[0-7]{3,4}", sent)  # the route's Query pattern (ttclient/routes.py)


def test_guest_paths_must_be_absolute(tt, tmp_path):
    (tmp_path / "f").write_text("x")
    refused(tt("env", "push", "e", "--local", str(tmp_path / "f"), "--remote", "rel/x"), 2,
            "give an absolute path in the guest")
    refused(tt("env", "get", "e", "--remote", "etc/hostname"), 2, "absolute path")


def test_get_into_a_file_is_refused(tt, tmp_path, monkeypatch):
    # it was a NotADirectoryError traceback, after the VMs had been asked
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("ttclient.api.Client.get_env", lambda self, name: {
        "name": name, "state": "running", "vms": [{"id": "i", "name": "e-0", "idx": 0,
                                                   "state": "running"}]})
    refused(tt("env", "get", "e", "--remote", "/etc/hostname", "--local",
               str(tmp_path / "file")), 2, "is a file: give a directory")


def test_ssh_identity_is_checked_here(tt, tmp_path):
    refused(tt("env", "ssh", "e", "-i", str(tmp_path / "nope"), "--", "true"), 1,
            "No such file or directory")
    pub = tmp_path / "id.pub"
    pub.write_text("ssh-ed25519 AAAAC3 u@h\n")
    refused(tt("env", "ssh", "e", "-i", str(pub), "--", "true"), 1,
            f"is a public key: give the private key ({tmp_path / 'id'})")


def test_token_messages(tt, tmp_path, monkeypatch):
    refused(tt("config", "--token", "a b"), 1, "a token has no spaces")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    refused(tt("config", "--token", "-"), 1, "stdin held no token")
    assert tt("config", "--token", "t0k")[0] == 0
    code, out, _ = tt("config", "--token", "")  # forgets it
    assert code == 0 and "no token" in out
    assert json.loads((tmp_path / "config.json").read_text())["token"] == ""


def test_a_closed_pipe_ends_quietly():
    # `tt completion zsh | head -3` printed a BrokenPipeError traceback
    # (`true` exits before Python has started, so the pipe is closed when tt writes)
    res = subprocess.run(["bash", "-c", f"{sys.executable} -m ttclient.cli completion zsh "
                          "| true; echo ${PIPESTATUS[0]}"],
                         capture_output=True, text=True, timeout=60)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.stdout.strip() == "141"  # as a program SIGPIPE ended


def test_empty_paths_are_refused(tt):
    # `--local ''` meant the current directory
    refused(tt("env", "get", "e", "--remote", "/etc/hostname", "--local", ""), 2, "empty")
    refused(tt("env", "push", "e", "--local", ""), 2, "empty")
    refused(tt("env", "run", "e", "--script", ""), 2, "empty")


@pytest.mark.parametrize("addr", ["http://10.0.0.5", "10.0.0.5:20000", "", "a b"])
def test_config_takes_a_bare_host(tt, tmp_path, addr):
    # `tt config --serv-addr http://h` was saved and every later call failed
    refused(tt("config", "--serv-addr", addr), 2, "--serv-port")
    assert not (tmp_path / "config.json").exists()


def test_config_takes_ipv6_and_host_names(tt, tmp_path):
    for addr, saved in (("::1", "::1"), ("[fd00::5]", "fd00::5"), ("tt-1.lab", "tt-1.lab")):
        assert tt("config", "--serv-addr", addr)[0] == 0
        assert json.loads((tmp_path / "config.json").read_text())["serv_addr"] == saved
    refused(tt("config", "--serv-port", "0"), 2, "1-65535")


@pytest.mark.parametrize("server", ["", "nohost", "http://x:1/path"])
def test_an_empty_or_bad_server_option_is_refused(tt, server):
    # `--server ''` was ignored: the configured server was used instead
    refused(tt("--server", server, "env", "list"), 2, "HOST:PORT")


def test_a_command_without_double_dash_gets_the_hint(tt):
    refused(tt("env", "run", "e", "uname", "-a"), 2,
            "a command goes after '--': tt env run e -- uname -a")
    refused(tt("env", "ssh", "e", "0", "uname"), 2, "tt env ssh e -- uname")


def test_double_dash_is_plain_argparse_outside_run_and_ssh(tt):
    # `tt env show -- X` and `tt env del -- -X` were refused as "'--' is for env run"
    code, _, err = tt("env", "show", "--", "X")
    assert code == 1 and "cannot reach the server" in err  # X was taken as the name
    refused(tt("env", "del", "--", "-X"), 2, ENV_NAME_RULE)
    code, _, err = tt("--server", f"127.0.0.1:{closed_port()}", "env", "run", "e", "--",
                      "--cmd", "x")
    assert code == 1 and "cannot reach the server" in err  # `--cmd x` was the command


def test_run_usage_errors_exit_2(tt, tmp_path):
    refused(tt("env", "run", "e"), 2, "give the command one way")
    refused(tt("env", "run", "e", "--cmd", "true", "--", "true"), 2,
            "give the command one way")
    refused(tt("env", "update", "e"), 2, "--life-time")
    script = tmp_path / "prog"
    script.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    refused(tt("env", "run", "e", "--script", str(script)), 1, "not a UTF-8 text file")


def test_an_unreachable_server_says_where_its_address_came_from(tt, monkeypatch):
    code, _, err = tt("--server", f"127.0.0.1:{closed_port()}", "env", "list")
    assert code == 1 and "the address came from --server" in err
    assert "trying again in" in err  # the retries show, instead of a silent 7.5 s
    code, out, err = tt("status")
    # the client's part is printed before the server is asked
    assert code == 1 and out.startswith("tt ") and "config " in out
    assert "the address came from $TT_SERVER" in err
    monkeypatch.delenv("TT_SERVER")
    code, _, err = tt("env", "list")
    assert code == 1 and "tt config --serv-addr HOST --serv-port PORT" in err


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) for `tt` and every subcommand under it."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def test_every_option_in_help_is_in_the_docs():
    """docs/cli.md names every command and every option `--help` shows (it lacked
    `--script`, `kick`, `listall --json`...)."""
    docs = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    missing = []
    for words, parser in _parsers(build_parser()):
        if words and f"tt {' '.join(words)}" not in docs:
            missing.append(f"tt {' '.join(words)}")
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or not action.option_strings:
                continue
            for flag in action.option_strings:
                if flag not in ("-h", "--help") and not re.search(
                        rf"(?<![\w-]){re.escape(flag)}(?![\w-])", docs):
                    missing.append(f"tt {' '.join(words)} {flag}")
    assert not missing, missing
