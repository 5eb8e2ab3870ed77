"""An image's digest (GET /images `digest`): what tells clients a build apart."""

from __future__ import annotations

import os
from pathlib import Path

from ttclient.imagenames import parse_image_name
from ttproxy.merge import merge_status
from ttserver.images import Image


def image(tmp_path: Path) -> Image:
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    return Image(parse_image_name("qemu:debian-12:x86_64"), tmp_path, 1024)


def test_the_digest_changes_with_the_files_and_only_then(tmp_path):
    img = image(tmp_path)
    first = img.digest()
    assert img.digest() == first and len(first) == 16
    assert img.to_dict()["digest"] == first
    os.utime(tmp_path / "vmlinuz", ns=(1, 1))  # a kernel replaced or touched
    assert img.digest() != first
    (tmp_path / "initrd.img").unlink()
    assert img.to_dict()["digest"] == ""  # mid-replacement: unknown, not an error


def test_a_proxy_gives_a_digest_only_when_its_servers_agree():
    def status(digest: str) -> dict:
        return {k: 0 for k in ("cpu_total", "cpu_used", "mem_total_mib", "mem_used_mib",
                               "disk_total_mib", "disk_used_mib")} | {
            "images": [{"name": "qemu:debian-12:x86_64", "digest": digest}]}

    same = merge_status([("a:1", status("d1")), ("b:2", status("d1"))], 0)
    assert same["images"][0]["digest"] == "d1"
    differ = merge_status([("a:1", status("d1")), ("b:2", status("d2")), ("c:3", status("d2"))], 0)
    assert "digest" not in differ["images"][0] and differ["images"][0]["servers"] == [
        "a:1", "b:2", "c:3"]
