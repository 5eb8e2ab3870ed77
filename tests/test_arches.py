"""The arch table (ttclient.arches) and what reads it, without booting a foreign guest
(tests/test_multiarch.py does, on request): the image builder's choices, its parallel
runs and their progress, the server's check for a missing emulator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ttclient import arches
from ttserver import admission
from ttserver.host import binfmt
from ttserver.images import build

from helpers import IMAGE_PATH

ROOT = Path(__file__).resolve().parent.parent


def test_names_and_aliases_are_unique_and_lower_case():
    spellings = [s for p in arches.PROFILES for s in (p.name, *p.aliases)]
    assert len(spellings) == len(set(spellings))
    assert all(s == s.lower() for s in spellings)
    assert arches.by_name("ARM64") is arches.by_name("aarch64")
    with pytest.raises(KeyError, match="known: x86_64, i386"):
        arches.by_name("mips64el")


def test_setup_host_installs_every_emulator_and_qemu_user_for_foreign_tests():
    script = (ROOT / "scripts/setup-host.sh").read_text()
    foreign = re.search(r'TTSTACK_FOREIGN_TESTS:-}" = 1 \]; then\n(.*?)\nfi', script, re.S)
    assert foreign, "setup-host.sh has no TTSTACK_FOREIGN_TESTS block"
    wanted = {p.qemu_package for p in arches.PROFILES} | {"qemu-user-static", "arch-test"}
    installed = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", foreign.group(1))) | {
        "qemu-system-x86"}  # in the default list
    assert wanted <= installed, wanted - installed


def test_only_the_hosts_own_family_builds_without_qemu_user():
    assert not binfmt.needs_emulation(arches.by_name("x86_64"), host="x86_64")
    assert not binfmt.needs_emulation(arches.by_name("i386"), host="x86_64")
    assert binfmt.needs_emulation(arches.by_name("aarch64"), host="x86_64")
    assert binfmt.needs_emulation(arches.by_name("x86_64"), host="aarch64")
    assert all(p.qemu_user.startswith("qemu-") for p in arches.PROFILES
               if binfmt.needs_emulation(p, host="x86_64"))


def test_a_missing_emulator_is_named_with_its_package(monkeypatch):
    monkeypatch.setattr(admission.shutil, "which", lambda _name: None)
    assert admission.emulator_missing("s390x") == (
        "this host cannot run s390x guests: qemu-system-s390x is not installed "
        "(apt-get install qemu-system-misc)")
    monkeypatch.undo()
    assert admission.emulator_missing("x86_64") == ""  # scripts/setup-host.sh installs it


def _ttserver_image(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ttserver.cli", "image", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,rc,message", [
    (("build", "debian-13", "--arch", "i386"), 2,
     "Debian trixie ships no i386 kernel to boot; i386 images: debian-11, debian-12"),
    (("build", "debian-12", "--arch", "riscv64"), 2,
     "Debian bookworm ships no riscv64 kernel to boot; riscv64 images: debian-13, debian-sid"),
    (("build", "debian-12", "--kernels-from", "debian-13"), 2,
     "--kernels-from debian-13: only releases up to debian-12 can lend"),
    (("build", "debian-13", "--timeout", "nan"), 2, "nan is outside 1-604800"),
    (("build", "debian-13", "--timeout", "0"), 2, "0 is outside 1-604800 (seconds)"),
    (("build", "debian-13", "--arch", "mips"), 2, "argument --arch: unknown arch 'mips'"),
    (("build", "debian-13", "--arch", "arm64,"), 2, "an empty arch name"),
    (("build", "debian-13", "--all-arches", "--arch", "arm64"), 2,
     "give --arch or --all-arches, not both"),
    (("build", "debian-13", "--jobs", "0"), 2, "0 is outside 1-64"),
    (("build", "fedora-40"), 2, "cannot build fedora-40; buildable: debian-11"),
])
def test_image_build_refuses_what_it_cannot_build_before_doing_anything(
        tmp_path, args, rc, message):
    res = _ttserver_image(*args, "--image-path", str(tmp_path))
    assert res.returncode == rc, res.stderr
    assert message in res.stderr
    if rc == 2:  # the build subcommand's usage, not `ttserver image`'s
        assert res.stderr.startswith("usage: ttserver image build"), res.stderr
    assert list(tmp_path.iterdir()) == []  # no work tree, no cache dir


def test_the_build_plan_names_each_image_once_and_only_buildable_ones():
    """The same image named twice (repeated, aliased, upper case) was built twice at once
    in one work directory; --all-arches with --kernels-from planned arches the other
    release has no kernel for (riscv64 in bookworm), to fail hours later."""
    pairs, kernels = build.plan(["debian-13", "Debian-13"], ["amd64", "x86_64", "arm64"],
                                False, ("debian-12", " debian-12", ""))
    assert pairs == [("debian-13", "x86_64"), ("debian-13", "aarch64")]
    assert kernels == ("debian-12",)
    pairs, _ = build.plan(["debian-13"], None, True, ("debian-12",))
    assert [a for _, a in pairs] == ["x86_64", "aarch64", "armhf", "ppc64le", "s390x"]
    assert [a for _, a in build.plan(["debian-13"], None, True)[0]] == [
        "x86_64", "aarch64", "armhf", "ppc64le", "s390x", "riscv64"]
    assert build.plan(["debian-12"], None, False, host="aarch64")[0] == [
        ("debian-12", "aarch64")]
    with pytest.raises(build.BuildError, match="host's arch 'loongarch64' is not a guest"):
        build.plan(["debian-12"], None, False, host="loongarch64")


def test_the_same_image_named_twice_is_looked_at_once():
    res = _ttserver_image("build", "debian-12", "DEBIAN-12", "--arch", "amd64,x86_64",
                          "--image-path", str(IMAGE_PATH))  # cached: nothing is built
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("exists at") == 1, res.stderr


def test_all_arches_with_kernels_from_says_which_it_skips(tmp_path, monkeypatch, capsys):
    """The arches --kernels-from's release has no kernel for were left out silently."""
    from ttserver import cli
    from ttserver.images import build as build_mod
    planned: list = []
    monkeypatch.setattr(build_mod, "build_many",  # nothing is built
                        lambda pairs, *a, **kw: planned.extend(pairs) or {})
    monkeypatch.setattr("ttclient.serving.exit_on_sigterm", lambda: None)
    assert cli.image_main(["build", "debian-13", "--all-arches", "--kernels-from",
                           "debian-12", "--image-path", str(tmp_path)]) == 0
    assert ("debian-13", "riscv64") not in planned and ("debian-13", "aarch64") in planned
    assert ("[image build] debian-13:riscv64: skipped (no riscv64 kernel in debian-12)"
            in capsys.readouterr().err)


def test_image_list_of_a_missing_dir_says_so(tmp_path):
    res = _ttserver_image("list", "--image-path", str(tmp_path / "none"))
    assert res.returncode == 1
    assert "is not a directory" in res.stderr


def test_build_many_reports_each_image_and_goes_on_past_a_failure():
    """A cached image (the suite's own) and one that cannot be built, in parallel: the
    failure is that image's alone."""
    results = build.build_many([("debian-13", "i386"), ("debian-12", "x86_64")], IMAGE_PATH,
                               jobs=2)
    assert list(results) == ["qemu:debian-13:i386", "qemu:debian-12:x86_64"]
    assert "ships no i386 kernel" in results["qemu:debian-13:i386"]
    assert results["qemu:debian-12:x86_64"] == ""


def test_a_step_shows_its_progress_and_a_timeout_kills_its_whole_group(tmp_path):
    marker = tmp_path / "grandchild.pid"
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(build.BuildError, match="did not finish within 2s"):
        build.run_step(["sh", "-c", f"echo 'I: one'; echo two >&2; sleep 60 & echo $! > "
                                    f"{marker}; wait"], 2, "the step", lines.append)
    assert time.monotonic() - started < 30
    assert sorted(lines) == ["I: one", "two"]  # both streams, in either order
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILLed with its group, then reaped by init
    assert not os.path.exists(f"/proc/{pid}"), "the step's grandchild outlived its timeout"


def test_a_failed_step_says_why_with_the_tail_of_its_errors():
    with pytest.raises(build.BuildError) as err:
        build.run_step(["sh", "-c", "echo out; echo 'E: no such package' >&2; exit 3"], 10,
                       "mmdebstrap")
    assert str(err.value) == "mmdebstrap failed (exit 3):\nE: no such package"
    assert build.run_step(["sh", "-c", "echo out; echo err >&2"], 10, "x") == "out\n"


def test_a_kernel_variant_is_named_by_its_kernel_series(tmp_path):
    assert build.kernel_variant_name("debian-13", "vmlinuz-6.1.0-28-cloud-amd64") == \
        "debian-13-linux6.1"
    assert build.kernel_variant_name("debian-13", "vmlinux-6.12.9-powerpc64le") == \
        "debian-13-linux6.12"  # ppc64el's kernel is an ELF vmlinux
    with pytest.raises(ValueError, match="no kernel version"):
        build.kernel_variant_name("debian-13", "vmlinuz")
    for name in ("vmlinuz-6.12.9-amd64", "initrd.img-6.12.9-amd64", "vmlinuz-6.1.0-28-amd64",
                 "initrd.img-6.1.0-28-amd64", "vmlinuz-5.10.0-1-amd64"):  # no initrd: skipped
        (tmp_path / name).touch()
    own = ["vmlinuz-6.12.9-amd64", "initrd.img-6.12.9-amd64"]
    assert [(k.name, i.name) for k, i in build.kernel_variants(tmp_path, own)] == [
        ("vmlinuz-6.1.0-28-amd64", "initrd.img-6.1.0-28-amd64")]
    from ttclient.imagenames import match_images, parse_image_name
    both = [parse_image_name(n) for n in ("qemu:debian-13:x86_64",
                                          "qemu:debian-13-linux6.1:x86_64")]
    assert len(match_images(["debian-13"], both)) == 2
    assert [i.os for i in match_images(["debian-13-linux6.1"], both)] == ["debian-13-linux6.1"]


def test_a_long_silent_step_still_shows_it_is_alive(monkeypatch):
    """dpkg configuring packages under qemu-user prints nothing for minutes: the builder's
    tick says how far it got (tests/test_arches.py checks the call, build() the text)."""
    monkeypatch.setattr(build, "TICK", 0.2)
    ticks: list[float] = []
    build.run_step(["sleep", "1.1"], 10, "a quiet step", tick=lambda: ticks.append(1))
    assert 3 <= len(ticks) <= 6, ticks


def test_a_mirror_without_the_archs_packages_is_named_with_the_fix(monkeypatch, tmp_path):
    """This host's mirror lists ppc64el and s390x packages but answers 404 for their
    files: mmdebstrap's last lines alone did not say what to do."""
    def fail(cmd, timeout, what, *callbacks):
        raise build.BuildError(f"{what} failed (exit 25):\nE: Failed to fetch http://m/"
                               "pool/main/z/zlib/zlib1g_1_s390x.deb  404  Not Found")
    monkeypatch.setattr(build, "run_step", fail)
    monkeypatch.setattr(build.binfmt, "ensure", lambda entry: None)
    with pytest.raises(build.BuildError) as err:
        build.build("debian-13", "s390x", tmp_path, mirror="http://m/debian")
    assert str(err.value).endswith("(the mirror http://m/debian lists s390x packages it "
                                   "does not serve: pass --mirror with one that carries "
                                   "s390x)")
    assert [p.name for p in tmp_path.iterdir()] == [".cache"]  # no work tree left


def test_templates_are_only_for_arches_that_were_tried():
    """keep_warm asked every image for a template at start, pseries and s390x too, whose
    clones could never take their identity (then through fw_cfg) and were never tried
    since: the template mechanism itself says no."""
    from ttserver.images import Image
    from ttserver.warm.snapshots import Templates

    def image(arch: str) -> Image:
        from ttclient.imagenames import parse_image_name
        return Image(name=parse_image_name(f"qemu:debian-13:{arch}"), path=Path("/x"),
                     size_mib=2048)

    assert [a for a in ("x86_64", "i386", "aarch64", "armhf", "ppc64le", "s390x", "riscv64")
            if Templates.supports(image(a))] == ["x86_64", "i386", "aarch64", "armhf",
                                                  "riscv64"]


def test_a_binfmt_entry_registered_meanwhile_counts_as_registered(monkeypatch, tmp_path):
    """An ENV's foreign-arch containers start in parallel after a host reboot: all saw
    the entry missing, the kernel refused the second registration (EEXIST) and that
    container failed."""
    (tmp_path / "binfmt").mkdir()
    (tmp_path / "binfmt" / "register").write_text("")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "qemu-aarch64.conf").write_text(
        ":qemu-aarch64:M::\\x7fELF::/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OCF\n")
    monkeypatch.setattr(binfmt, "BINFMT", tmp_path / "binfmt")
    monkeypatch.setattr(binfmt, "CONF_DIR", tmp_path / "conf")
    real = Path.write_text

    def kernel(self: Path, *args, **kw):  # the register file: another process was first
        if self.name == "register":
            raise FileExistsError(17, "File exists")
        return real(self, *args, **kw)

    monkeypatch.setattr(Path, "write_text", kernel)
    binfmt.ensure("qemu-aarch64")
