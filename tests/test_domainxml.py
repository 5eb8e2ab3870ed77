"""The domain XML we hand libvirt: well-formed, no relabeling, restricted user networking."""

import shutil
import xml.etree.ElementTree as ET

import pytest

from ttclient import arches
from ttserver.vm.domainxml import DomainSpec, render

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def spec(**kw):
    base = dict(name="tt-abc-1", arch="x86_64", accel="tcg", vcpus=2, mem_mib=512,
                disk="/var/lib/x/disk.qcow2", kernel="/img/q:debian-12:x86_64/vmlinuz",
                initrd="/img/q:debian-12:x86_64/initrd.img",
                cmdline="root=/dev/vda rw console=ttyS0 quiet", console_log="/v/console.log",
                netdev="user,id=ttnet0,restrict=on,hostfwd=tcp:127.0.0.1:40000-:22",
                uid=64055, gid=107, title="ttstack e/0")
    base.update(kw)
    return DomainSpec(**base)


def test_tcg_domain_is_plain_qemu_with_restricted_user_net():
    root = ET.fromstring(render(spec()))
    assert root.get("type") == "qemu"
    assert root.find("vcpu").text == "2"
    args = [a.get("value") for a in root.find(f"{QEMU_NS}commandline")]
    assert "-netdev" in args
    assert any("restrict=on" in a and "hostfwd=tcp:127.0.0.1:40000-:22" in a for a in args)
    sec = root.find("seclabel")
    assert sec.get("relabel") == "no" and sec.find("label").text == "+64055:+107"


def test_kvm_and_aarch64_variants():
    assert ET.fromstring(render(spec(accel="kvm"))).get("type") == "kvm"
    arm = ET.fromstring(render(spec(arch="aarch64")))
    assert arm.find("os/type").get("machine") == "virt"
    assert "console=ttyAMA0" in arm.find("os/cmdline").text
    args = [a.get("value") for a in arm.find(f"{QEMU_NS}commandline")]
    assert "max,pauth-impdef=on" in args


def test_paths_with_quotes_are_escaped():
    root = ET.fromstring(render(spec(disk="/var/lib/it's/disk.qcow2")))
    assert root.find("devices/disk/source").get("file") == "/var/lib/it's/disk.qcow2"


def test_text_nodes_are_escaped_and_libvirt_accepts_the_xml():
    """Text values (cmdline, title, kernel path) were pasted into the XML unescaped: an
    '&' or '<' in an imported image's cmdline made XML libvirt refuses."""
    import libvirt  # real libvirt: define (parse and validate), then undefine; nothing runs

    odd = spec(name="tt-xmltest-0", cmdline="root=/dev/vda1 ro quiet a=<b>&c",
               title="ttstack <e> & 'f'/0", kernel="/img/a&b/vmlinuz")
    root = ET.fromstring(render(odd))
    assert root.find("os/cmdline").text == "root=/dev/vda1 ro quiet a=<b>&c"
    assert root.find("title").text == "ttstack <e> & 'f'/0"
    assert root.find("os/kernel").text == "/img/a&b/vmlinuz"
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.defineXML(render(odd))
        try:
            assert dom.name() == "tt-xmltest-0"
            reread = ET.fromstring(dom.XMLDesc(0))
            assert reread.find("os/cmdline").text == "root=/dev/vda1 ro quiet a=<b>&c"
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_a_memory_file_is_the_machines_ram_backend_shared_or_private():
    """Warm templates keep the guest's RAM in a file (shared); clones map it privately."""
    def args(**kw):
        return [a.get("value") for a in ET.fromstring(render(spec(**kw))).find(
            f"{QEMU_NS}commandline")]

    assert not any("memory-backend" in a for a in args())
    shared = args(memory_file="/t/k@1,x/memory.ram", memory_shared=True)
    backend = shared[shared.index("-object") + 1]
    assert backend == ("memory-backend-file,id=tt.ram,size=512M,"
                       "mem-path=/t/k@1,,x/memory.ram,share=on")  # a comma doubled
    assert shared[shared.index("-machine") + 1] == "memory-backend=tt.ram"
    private = args(memory_file="/t/memory.ram", incoming=True)
    assert "share=off" in private[private.index("-object") + 1]
    assert private[-2:] == ["-incoming", "defer"]


def test_warm_domains_have_the_identity_port_after_the_agents():
    """Warm templates and clones carry the identity port (guest/identity.py), its socket
    path left to libvirt, after the agent's channel: the same virtio-serial port number
    in a template and its clones."""
    def channels(**kw):
        return [(c.find("target").get("name"), c.find("source"))
                for c in ET.fromstring(render(spec(**kw))).iterfind("devices/channel")]

    assert [name for name, _ in channels()] == ["org.qemu.guest_agent.0"]
    (agent, _), (name, source) = channels(identity_channel=True, incoming=True)
    assert (agent, name) == ("org.qemu.guest_agent.0", "org.ttstack.identity")
    assert source.attrib == {"mode": "bind"}


def test_a_clone_without_a_nic_still_has_a_user_network_stack_to_load():
    """Bridge-mode clones get their NIC over QMP, but their template's state has a
    section for QEMU's user network ("slirp"): loading failed without one."""
    def args(**kw):
        return [a.get("value") for a in ET.fromstring(render(spec(**kw))).find(
            f"{QEMU_NS}commandline")]

    clone = args(netdev="", incoming=True)
    assert clone[clone.index("-netdev") + 1] == "user,id=ttslirp,restrict=on"
    assert "-device" not in clone
    assert "-netdev" not in args(netdev="")  # a cold bridge boot: nothing


@pytest.mark.parametrize("profile", arches.PROFILES, ids=lambda p: p.name)
def test_every_arch_gets_its_machine_console_cpu_and_nic(profile):
    """Each arch's facts come from its one row in ttclient.arches; libvirt (when the
    arch's emulator is installed: x86_64 and i386 by default) parses and keeps them."""
    import libvirt

    xml = render(spec(name=f"tt-xmlarch-{profile.name.replace('_', '')}", arch=profile.name))
    root = ET.fromstring(xml)
    assert root.find("os/type").get("arch") == profile.libvirt_arch
    assert root.find("os/type").get("machine") == profile.qemu_machine
    assert f"console={profile.console}" in root.find("os/cmdline").text
    assert (root.find("features/acpi") is not None) == profile.acpi
    args = [a.get("value") for a in root.find(f"{QEMU_NS}commandline")]
    nic = args[args.index("-device") + 1]
    assert nic.startswith(f"{profile.nic_device},netdev=ttnet0")
    assert all(f"{k}={v}" in nic for k, v in profile.nic_address.items())
    assert ("-cpu" in args) == bool(profile.tcg_cpu)
    if not shutil.which(profile.qemu_system):
        pytest.skip(f"{profile.qemu_system} is not installed: libvirt cannot check the XML")
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.defineXML(xml)
        try:
            reread = ET.fromstring(dom.XMLDesc(0))
            assert reread.find("os/type").get("machine").startswith(profile.qemu_machine)
            assert reread.find("os/type").get("arch") == profile.libvirt_arch
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_a_tb_cache_bounds_tcg_translated_code_and_reaches_qemu():
    """Each TCG guest's translation buffer defaults to an eighth of the host's RAM (up to
    1 GiB) in QEMU, uncounted by admission; the server bounds it (--tcg-tb-cache)."""
    import libvirt

    assert ET.fromstring(render(spec(tb_cache_mib=0))).find("features/tcg") is None
    assert ET.fromstring(render(spec(accel="kvm", tb_cache_mib=256))).find("features/tcg") is None
    bounded = render(spec(name="tt-xmltest-tb", tb_cache_mib=256))
    root = ET.fromstring(bounded)
    cache = root.find("features/tcg/tb-cache")
    assert (cache.text, cache.get("unit")) == ("256", "MiB")
    arm = ET.fromstring(render(spec(arch="aarch64", tb_cache_mib=64)))
    assert arm.find("features/tcg/tb-cache").text == "64"
    conn = libvirt.open("qemu:///system")
    try:  # libvirt turns it into QEMU's -accel tcg,tb-size=N (its unit: MiB)
        argv = conn.domainXMLToNative("qemu-argv", bounded, 0)
        assert "tb-size=256" in argv, argv
    finally:
        conn.close()
