"""`ttserver image import` reads an image file as data, never as a pointer to host files
(issue 24): backing files, external data files and multi-file formats are refused with the
reason, before anything is converted. No VM needed: qemu-img only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NAME = "qemu:evil-1:x86_64"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def import_image(src: Path, images: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ttserver.cli", "image", "import", str(src),
                           "--name", NAME, "--image-path", str(images)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file an image author would like to read (think: the server's SSH key)."""
    path = tmp_path / "id_ed25519"
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY----- not for VMs\n" * 100)
    return path


def test_backing_file_is_refused(tmp_path: Path, secret: Path):
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil), "1M")
    res = import_image(evil, tmp_path / "images")
    assert res.returncode == 1, res.stderr
    assert "backing file" in res.stderr and str(secret) in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "images" / NAME).exists()


def test_external_data_file_is_refused(tmp_path: Path):
    evil = tmp_path / "evil.qcow2"
    data = tmp_path / "data.raw"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", str(evil),
             "1M")
    res = import_image(evil, tmp_path / "images")
    assert res.returncode == 1 and "external data file" in res.stderr, res.stderr


def test_multi_file_vmdk_is_refused(tmp_path: Path):
    evil = tmp_path / "evil.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(evil), "1M")
    res = import_image(evil, tmp_path / "images")
    assert res.returncode == 1 and "VMDK of several files" in res.stderr, res.stderr


def test_a_raw_file_that_looks_like_a_qcow2_with_backing_is_refused(tmp_path: Path,
                                                                    secret: Path):
    """The format is probed once, without opening anything else; never again by convert."""
    evil = tmp_path / "disk.img"  # "raw" by its name, a qcow2 header inside
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil), "1M")
    res = import_image(evil, tmp_path / "images")
    assert res.returncode == 1 and "backing file" in res.stderr, res.stderr


def test_a_plain_single_file_image_gets_past_the_check(tmp_path: Path):
    """A self-contained qcow2 is read (and then fails later for want of a Linux root)."""
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", str(plain), "1M")
    res = import_image(plain, tmp_path / "images")
    assert res.returncode == 1 and "no Linux root filesystem" in res.stderr, res.stderr
