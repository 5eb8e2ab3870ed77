"""OS-prefix matching: the rule every part (server, proxy, plugin) must agree on."""

import pytest

from ttclient.imagenames import (
    ImageNameError,
    NoMatchingImage,
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


ALL_ARCHES = [parse_image_name(f"qemu:debian-13:{a}") for a in (
    "x86_64", "i386", "aarch64", "armhf", "ppc64le", "s390x", "riscv64")]


@pytest.mark.parametrize("alias,canonical", [
    ("amd64", "x86_64"), ("x86_64", "x86_64"), ("i686", "i386"), ("x86", "i386"),
    ("arm64", "aarch64"), ("armv7l", "armhf"), ("arm", "armhf"), ("ppc64el", "ppc64le"),
    ("PPC64LE", "ppc64le"), ("s390x", "s390x"), ("riscv64", "riscv64")])
def test_platform_machine_and_debian_arch_names_are_aliases(alias, canonical):
    assert parse_image_name(f"qemu:debian-13:{alias}").arch == canonical
    assert [i.arch for i in match_images([f"debian-13:{alias}"], ALL_ARCHES)] == [canonical]
    assert [i.arch for i in match_images([f"debian13-{alias}"], ALL_ARCHES)] == [canonical]


def test_a_star_arch_means_every_arch():
    every = sorted(i.full for i in ALL_ARCHES)
    assert names_of(["debian-13:*"]) == every
    assert names_of(["qemu:debian-13:*"]) == every
    assert names_of(["debian-13"]) == every


def names_of(prefixes):
    return sorted(i.full for i in match_images(prefixes, ALL_ARCHES))


def test_an_unknown_arch_lists_the_known_ones():
    with pytest.raises(ImageNameError, match="known: x86_64, i386, aarch64, armhf, ppc64le"):
        parse_os_prefix("debian-13:mips")
    with pytest.raises(ImageNameError, match="known: x86_64"):
        parse_image_name("qemu:debian-13:sparc64")


def test_a_whole_image_name_selects_that_image_and_not_its_kernel_variants():
    """`qemu:debian-13:x86_64` also selected `qemu:debian-13-linux6.1:x86_64`: a whole
    name was only ever a prefix (docs/images.md said otherwise)."""
    both = [parse_image_name(n) for n in ("qemu:debian-13:x86_64",
                                          "qemu:debian-13-linux6.1:x86_64")]
    assert [i.full for i in match_images(["qemu:debian-13:x86_64"], both)] == [
        "qemu:debian-13:x86_64"]
    assert [i.full for i in match_images(["QEMU:Debian-13:amd64"], both)] == [
        "qemu:debian-13:x86_64"]
    assert len(match_images(["debian-13:amd64"], both)) == 2  # an OS prefix: every kernel
    # a whole name no image has is still a prefix (decision 12)
    assert [i.os for i in match_images(["qemu:debian-1:x86_64"], both)] == [
        "debian-13", "debian-13-linux6.1"]


@pytest.mark.parametrize("bad,why", [
    ("debian-13:*:*", "'debian-13' is no engine (known: qemu, lxc)"),
    ("debian-13:armhf:*", "'debian-13' is no engine"),
    ("foo:debian-13:*", "'foo' is no engine"),
    ("debian-13::", "'debian-13' is no engine"),
    ("qemu:debian-13:x86_64:extra", "has more than ENGINE:OS-VERSION:ARCH"),
    ("lxd:debian-12", "'lxd' is no engine (known: qemu, lxc)"),  # said "unknown arch"
    ("debian-12:sparc", "unknown arch 'sparc'"),
])
def test_malformed_prefixes_say_what_is_wrong(bad, why):
    """Three-part prefixes not starting with an engine were accepted (`debian-13:*:*`) or
    refused with a wrong reason ("unknown arch 'debian-13'")."""
    with pytest.raises(ImageNameError) as err:
        parse_os_prefix(bad)
    assert why in str(err.value)


def test_spaces_around_a_prefix_part_are_ignored():
    assert names_of(["debian-13 : arm64"]) == names_of(["debian-13:arm64"]) == [
        "qemu:debian-13:aarch64"]


def test_an_os_ending_like_an_arch_alias_gets_a_hint():
    """`mydistro-x86` was read as OS `mydistro` on i386 and matched nothing, with no word
    on why although `qemu:mydistro-x86:x86_64` was in the list."""
    odd = [parse_image_name("qemu:mydistro-x86:x86_64")]
    with pytest.raises(ImageNameError) as err:
        match_images(["mydistro-x86"], odd)
    assert "read as OS 'mydistro' on i386" in str(err.value)
    assert "write 'mydistro-x86:*'" in str(err.value)
    assert [i.full for i in match_images(["mydistro-x86:*"], odd)] == [
        "qemu:mydistro-x86:x86_64"]
    with pytest.raises(ImageNameError) as err:  # no such OS at all: no hint
        match_images(["fedora-arm64"], odd)
    assert "read as OS" not in str(err.value)


def test_the_tt_os_marker_selects_as_the_server_does():
    """The plugin's @pytest.mark.tt_os kept matching a whole image name as a prefix (its
    kernel variants too) after the server had stopped doing so."""
    from pytest_ttstack.matrix import select
    requested = ["qemu:debian-13:x86_64", "qemu:debian-13-linux6.1:x86_64",
                 "qemu:debian-12:aarch64"]
    for prefixes in (["qemu:debian-13:x86_64"], ["debian-13"], ["deb"], ["debian-12:arm64"]):
        expected = {i.full for i in match_images(prefixes, [parse_image_name(r)
                                                            for r in requested])}
        assert set(select(requested, prefixes)) == expected, prefixes
    assert select(requested, ["qemu:debian-13:x86_64"]) == ["qemu:debian-13:x86_64"]
    assert select(requested, None) == requested


def test_the_hint_also_comes_for_the_engine_form():
    odd = [parse_image_name("qemu:mydistro-x86:x86_64")]
    with pytest.raises(ImageNameError) as err:
        match_images(["qemu:mydistro-x86"], odd)
    assert "write 'qemu:mydistro-x86:*'" in str(err.value)
    assert [i.full for i in match_images(["qemu:mydistro-x86:*"], odd)] == [
        "qemu:mydistro-x86:x86_64"]


def test_a_prefix_without_an_engine_selects_vms_only():
    """`debian-12` means QEMU VMs, as before containers existed; containers are asked for
    by name (`lxc:debian-12`), alone or beside VMs."""
    available = [parse_image_name(n) for n in ("qemu:debian-12:x86_64", "lxc:debian-12:x86_64",
                                               "lxc:debian-13:aarch64")]
    assert [i.full for i in match_images(["debian-12"], available)] == ["qemu:debian-12:x86_64"]
    assert [i.full for i in match_images(["lxc:debian", "qemu:debian-12"], available)] == [
        "lxc:debian-12:x86_64", "lxc:debian-13:aarch64", "qemu:debian-12:x86_64"]
    assert [i.full for i in match_images(["lxc:debian-13:arm64"], available)] == [
        "lxc:debian-13:aarch64"]
    with pytest.raises(NoMatchingImage):
        match_images(["debian-13"], available)


def test_test_ids_name_the_engine_only_when_an_os_runs_under_two():
    from pytest_ttstack.matrix import image_id

    alone = ["qemu:debian-12:x86_64", "lxc:debian-13:x86_64"]
    assert [image_id(i, alone) for i in alone] == ["debian-12:x86_64", "debian-13:x86_64"]
    both = ["qemu:debian-12:x86_64", "lxc:debian-12:x86_64", "qemu:debian-12:aarch64"]
    assert [image_id(i, both) for i in both] == [
        "qemu:debian-12:x86_64", "lxc:debian-12:x86_64", "debian-12:aarch64"]
    assert image_id("lxc:debian-12:x86_64") == "debian-12:x86_64"
