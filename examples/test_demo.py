"""A small suite run by scripts/demo.sh: each test runs once per --tt-os image."""

import pytest


def test_kernel_is_linux(tt_vm):
    assert tt_vm.run("uname -s").stdout == "Linux\n"


def test_os_release_matches_the_matrix_os(tt_vm):
    version = tt_vm.os.split("-")[-1]
    out = tt_vm.run("cat /etc/os-release").check().stdout
    assert f'VERSION_ID="{version}"' in out


def test_files_round_trip(tt_vm, tmp_path):
    src = tmp_path / "hello.txt"
    src.write_text("hello from the host\n")
    tt_vm.put(src, "/root/hello.txt")
    assert tt_vm.run("cat /root/hello.txt").stdout == "hello from the host\n"
    back = tt_vm.get("/root/hello.txt", tmp_path / "back.txt")
    assert back.read_text() == "hello from the host\n"


@pytest.mark.tt_os("debian-13")
def test_only_on_trixie(tt_vm):
    assert "trixie" in tt_vm.run("cat /etc/os-release").stdout
