"""Pure logic of the `tt` verbs (ttclient/shell.py, commands.py): console tails, SSH
command lines and config blocks, image rows, port lists; no server."""

from __future__ import annotations

import argparse

import pytest

from ttclient.cli import _ports
from ttclient.commands import image_rows, image_table
from ttclient.shell import config_block, new_console_text, ssh_argv

VM = {"name": "t-0", "id": "abc-1", "idx": 0, "state": "running", "ssh_host": "10.0.0.5",
      "ssh_port": 40022}


@pytest.mark.parametrize(("old", "new", "added"), [
    ("", "a\n", "a\n"),
    ("a\nb\n", "b\nc\n", "c\n"),            # the window moved by a line
    ("a\nb\nc", "b\ncd\n", "d\n"),          # the last line grew
    ("x\n", "x\nx\n", "x\n"),               # a repeated line is still new
    ("a\n", "a\n", ""),
    ("a\nb\n", "q\nr\n", "q\nr\n"),         # no overlap: everything is new
])
def test_new_console_text(old, new, added):
    assert new_console_text(old, new) == added


def test_ssh_argv_quotes_the_command_and_writes_no_known_hosts():
    argv = ssh_argv(VM, "/k/id", ["printf", "%s", "a b"], tty=False)
    assert argv[:3] == ["ssh", "-p", "40022"]
    assert "UserKnownHostsFile=/dev/null" in argv and "StrictHostKeyChecking=no" in argv
    assert argv[argv.index("-i") + 1] == "/k/id" and "-t" not in argv
    assert argv[-3:] == ["10.0.0.5", "--", "printf %s 'a b'"]
    assert ssh_argv(VM, None, [], tty=True)[-2:] == ["-t", "10.0.0.5"]


def test_config_block():
    block = config_block(VM, "~/k")
    assert block.splitlines()[:3] == ["Host t-0", "  HostName 10.0.0.5", "  Port 40022"]
    assert "  User root" in block and "  IdentitiesOnly yes" in block
    assert "  IdentityFile ~" not in block  # made absolute for other tools' working dirs


def test_image_rows_take_the_best_template_state_over_servers():
    image = {"name": "qemu:debian-12:x86_64", "os": "debian-12", "arch": "x86_64",
             "engine": "qemu", "size_mib": 2048}
    status = {"images": [image, {**image, "name": "qemu:debian-13:x86_64"}],
              "servers": [{"templates": [{"key": "qemu:debian-12:x86_64-1cpu-512m",
                                          "state": "building"}]},
                          {"templates": [{"key": "qemu:debian-12:x86_64-1cpu-512m",
                                          "state": "ready"}]}]}
    assert [(r["name"], r["template"]) for r in image_rows(status)] == [
        ("qemu:debian-12:x86_64", "ready"), ("qemu:debian-13:x86_64", "none")]


def test_image_list_columns_line_up_with_long_names():
    """`qemu:debian-13-linux6.1:x86_64` (a kernel variant) overflowed fixed widths."""
    rows = [{"name": n, "os": n.split(":")[1], "arch": n.split(":")[2], "size_mib": 2048,
             "template": "none"}
            for n in ("qemu:debian-13:x86_64", "qemu:debian-13-linux6.1:x86_64",
                      "qemu:debian-12:aarch64")]
    lines = image_table(rows)
    assert len({line.index("warm template:") for line in lines}) == 1, lines
    assert len({line.index("debian-1", 5) for line in lines}) == 1, lines
    assert image_table([]) == ["no images"]


def test_port_lists():
    assert _ports("80,443/tcp") == [80, 443]
    with pytest.raises(argparse.ArgumentTypeError, match="only TCP"):
        _ports("53/udp")
