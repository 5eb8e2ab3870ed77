"""Which image directories the server offers (ttserver.images.scan): a hand-made image
with a bad meta.json, or two directories spelling one name, must not break or confuse
every other request."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ttserver.admission import canonical_counts
from ttserver.errors import BadRequest
from ttserver.images import scan


def make(root: Path, name: str, meta: object = None) -> Path:
    d = root / name
    d.mkdir()
    for part in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (d / part).write_bytes(b"x")
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return d


@pytest.mark.parametrize("meta", [{"virtual_size_mib": "big"}, {"virtual_size_mib": None},
                                  {"virtual_size_mib": -5}, {"virtual_size_mib": 1.5},
                                  '{"virtual_size_mib": 1e400}', {"cmdline": 3},
                                  {"virtual_size_mib": True}])
def test_an_image_with_a_bad_meta_json_is_skipped_and_named(tmp_path, caplog, meta):
    """`"virtual_size_mib": "big"` made GET /images, /status and every POST /envs answer
    400 "invalid literal for int()" (others: 500), naming no image."""
    make(tmp_path, "qemu:debian-12:x86_64", {"virtual_size_mib": 2048})
    make(tmp_path, "qemu:debian-13:x86_64", meta)
    with caplog.at_level(logging.WARNING):
        found = scan(tmp_path)
    assert [(i.name.full, i.size_mib) for i in found] == [("qemu:debian-12:x86_64", 2048)]
    assert "qemu:debian-13:x86_64/meta.json" in caplog.text


def test_a_meta_json_that_is_no_object_is_ignored(tmp_path):
    make(tmp_path, "qemu:debian-12:x86_64", [1, 2])
    assert [i.name.full for i in scan(tmp_path)] == ["qemu:debian-12:x86_64"]


def test_two_directories_of_one_image_name_give_one_image(tmp_path, caplog):
    """`qemu:debian-12:amd64` beside `qemu:debian-12:x86_64` listed the name twice, and the
    server picked whichever directory sorted last."""
    own = make(tmp_path, "qemu:debian-12:x86_64")
    make(tmp_path, "qemu:debian-12:amd64")
    make(tmp_path, "QEMU:Debian-12:X86_64")
    with caplog.at_level(logging.WARNING):
        found = scan(tmp_path)
    assert [(i.name.full, i.path) for i in found] == [("qemu:debian-12:x86_64", own)]
    assert caplog.text.count("skipping image directory") == 2


def test_a_broken_canonical_directory_does_not_hide_a_usable_alias(tmp_path):
    """An incomplete `qemu:debian-12:x86_64`, or one with a bad meta.json, made the
    complete `qemu:debian-12:amd64` beside it skipped too: no debian-12 image at all."""
    alias = make(tmp_path, "qemu:debian-12:amd64")
    (tmp_path / "qemu:debian-12:x86_64").mkdir()  # incomplete
    other = make(tmp_path, "qemu:debian-13:amd64")
    make(tmp_path, "qemu:debian-13:x86_64", {"virtual_size_mib": "big"})
    assert [(i.name.full, i.path) for i in scan(tmp_path)] == [
        ("qemu:debian-12:x86_64", alias), ("qemu:debian-13:x86_64", other)]


def test_whole_sizes_written_as_float_or_text_still_count(tmp_path):
    make(tmp_path, "qemu:debian-12:x86_64", {"virtual_size_mib": 2048.0})
    make(tmp_path, "qemu:debian-13:x86_64", {"virtual_size_mib": "4096"})
    assert [i.size_mib for i in scan(tmp_path)] == [2048, 4096]


def test_counts_are_keyed_by_canonical_image_names():
    assert canonical_counts({"qemu:debian-13:arm64": 1, " QEMU:Debian-12:amd64": 2}) == {
        "qemu:debian-13:aarch64": 1, "qemu:debian-12:x86_64": 2}
    with pytest.raises(BadRequest, match="counts names qemu:debian-13:aarch64 twice"):
        canonical_counts({"qemu:debian-13:arm64": 1, "qemu:debian-13:aarch64": 1})
    with pytest.raises(BadRequest, match="counts: image name 'debian-13' is not ENGINE"):
        canonical_counts({"debian-13": 1})
