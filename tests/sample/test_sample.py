"""A sample user suite; tests/test_plugin.py runs it in a subprocess against a real server.

Expected per run with two images: 11 passed, 2 failed, 1 skipped.
"""

import json
import os
import urllib.request

import pytest


def test_runs_on_every_os(tt_vm):
    assert tt_vm.run("uname -m").stdout == "x86_64\n"
    raw = tt_vm.run(r"printf '\377\000'; kill -9 $$", binary=True)
    assert (raw.stdout, raw.exit_code, raw.signal) == (b"\xff\x00", 137, 9)
    # over SSH too: a warm clone's sshd serves the clone's host key, which the server
    # pins (debian-13's OpenSSH 10 kept serving the template's: "Host key verification")
    assert tt_vm.run("echo over-ssh", use_ssh=True).stdout == "over-ssh\n"
    out = os.environ.get("SAMPLE_OUT")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(out, f"{worker}-{tt_vm.image}.json"), "w") as f:
            json.dump({"worker": worker, "vm": tt_vm.name, "image": tt_vm.image}, f)


def test_fails_on_purpose(tt_vm):
    # something on the VM's console, so its tail in the failure report has a known line
    tt_vm.run("echo sample-console-line > /dev/console")
    assert tt_vm.run("echo $((6*7))").stdout == "41\n"


@pytest.mark.tt_os("debian-13")
def test_only_trixie(tt_vm):
    assert tt_vm.os == "debian-13"


@pytest.mark.tt_os("centos")
def test_only_centos(tt_vm):
    raise AssertionError("must be skipped: no CentOS requested")


def test_without_vm():
    assert 6 * 7 == 42


def test_env_fixture(tt_env):
    assert tt_env.name.startswith("pytest-")


def test_reaches_a_service_in_the_vm(tt_vm):
    tt_vm.run("echo served-from-$(hostname) > /tmp/index.html; cd /tmp && "
              "setsid python3 -m http.server 8000 >/dev/null 2>&1 &", check=True)
    if os.environ.get("SAMPLE_TT_PORT"):  # run with --tt-port=8000: forwarded at once
        assert 8000 in tt_vm.ports
    host, port = tt_vm.wait_for_port(8000, timeout=120)
    with urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=30) as resp:
        assert resp.read().decode() == f"served-from-{tt_vm.name}\n"
    assert tt_vm.port(8000) == (host, port)


def test_gets_a_vm_of_its_own(tt_fresh_vm, tt_vm, tt_image):
    assert tt_fresh_vm.image == tt_vm.image == tt_image
    assert tt_fresh_vm.name != tt_vm.name
    assert tt_fresh_vm.run("hostname").stdout == f"{tt_fresh_vm.name}\n"
    tt_vm.run("touch /tmp/shared-mark", check=True)
    assert tt_fresh_vm.run("test -e /tmp/shared-mark").exit_code == 1


def test_testinfra_host(tt_host, tt_vm):
    assert tt_host.backend.get_pytest_id() == f"ttstack://{tt_vm.name}"
    assert tt_host.package("openssh-server").is_installed
    assert tt_host.file("/etc/os-release").contains("Debian")
    assert tt_host.system_info.distribution == "debian"
    assert tt_host.run("printf '\\377'").stdout_bytes == b"\xff"
