"""OS-prefix matching: the rule every part (server, proxy, plugin) must agree on."""

import pytest

from ttclient.imagenames import (
    ImageNameError,
    match_images,
    parse_image_name,
    parse_os_prefix,
    split_prefixes,
)
from ttclient.units import parse_mib

IMAGES = [parse_image_name(n) for n in (
    "qemu:debian-12:x86_64", "qemu:debian-12:aarch64", "qemu:debian-13:x86_64",
    "qemu:centos-7.9:x86_64", "qemu:centos-8:x86_64", "qemu:ubuntu-20.04:x86_64")]


def names(prefixes):
    return [i.full for i in match_images(prefixes, IMAGES)]


def test_short_prefix_matches_every_version_and_arch_case_insensitively():
    assert names(["CENT"]) == ["qemu:centos-7.9:x86_64", "qemu:centos-8:x86_64"]
    assert names(["deb"]) == ["qemu:debian-12:aarch64", "qemu:debian-12:x86_64",
                              "qemu:debian-13:x86_64"]


def test_version_prefix_ignores_separators():
    assert names(["ubuntu2004"]) == ["qemu:ubuntu-20.04:x86_64"]
    assert names(["debian12"]) == ["qemu:debian-12:aarch64", "qemu:debian-12:x86_64"]


def test_arch_suffix_and_aliases_narrow_the_match():
    assert names(["debian12-arm64"]) == ["qemu:debian-12:aarch64"]
    assert names(["debian-12:x86_64"]) == ["qemu:debian-12:x86_64"]
    assert names(["qemu:debian-12:amd64"]) == ["qemu:debian-12:x86_64"]


def test_the_start_of_an_image_name_is_a_prefix():
    # `tt env add --image qemu:debian-12` said "unknown arch 'debian-12'"
    assert names(["qemu:debian-12"]) == ["qemu:debian-12:aarch64", "qemu:debian-12:x86_64"]
    assert names(["QEMU:deb-arm64"]) == ["qemu:debian-12:aarch64"]
    assert parse_os_prefix("qemu:cent").engine == "qemu"


def test_overlapping_prefixes_give_each_image_once_in_order():
    assert names(["debian-13", "deb"]) == ["qemu:debian-13:x86_64", "qemu:debian-12:aarch64",
                                           "qemu:debian-12:x86_64"]


def test_unknown_prefix_error_lists_available_images():
    with pytest.raises(ImageNameError) as err:
        match_images(["fedora"], IMAGES)
    assert "'fedora' matches no image" in str(err.value)
    assert "qemu:centos-8:x86_64" in str(err.value)
    # `tt env add --image NAME` shares the message: it was "OS prefix 'NAME' matches..."
    assert "an OS prefix or an image name" in str(err.value)


@pytest.mark.parametrize("bad", ["qemu:../etc:x86_64", "qemu:debian-12", "xen:debian-12:x86_64",
                                 "qemu:debian-12:sparc", "qemu:/abs:x86_64",
                                 "qemu:debian-12\n:x86_64"])
def test_bad_image_names_are_refused(bad):
    with pytest.raises(ImageNameError):
        parse_image_name(bad)


def test_bad_prefixes_are_refused():
    for bad in ["", "  ", "deb:sparc", "-arm64"]:
        with pytest.raises(ImageNameError):
            parse_os_prefix(bad)
    with pytest.raises(ImageNameError):
        match_images([], IMAGES)


def test_split_prefixes_accepts_commas_and_repeats():
    assert split_prefixes(["deb, cent", "ubuntu2004"]) == ["deb", "cent", "ubuntu2004"]


@pytest.mark.parametrize("text,mib", [("512", 512), ("512M", 512), ("4G", 4096),
                                      ("1t", 1024 * 1024), (64, 64)])
def test_sizes(text, mib):
    assert parse_mib(text) == mib


@pytest.mark.parametrize("bad", ["", "4X", "-1", "0", "1.5G"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_mib(bad)
