"""Port maps have one direction, guest port -> host port, from the state DB to QEMU's
hostfwd and the bridge's nftables map (pure logic: nft is not run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ttserver.db import VMRow
from ttserver.host import bridge
from ttserver.host.bridge import BridgeNetwork
from ttserver.vm.network import port_map


def vm_row(ssh_port: int, forwards: dict[int, int]) -> VMRow:
    return VMRow(id="v1", env="e", idx=0, image="qemu:debian-12:x86_64",
                 cpu=1, mem_mib=512, disk_mib=0, state="running", domain="d", dir="/x",
                 ssh_port=ssh_port, forwards=forwards)


def test_a_vms_port_map_is_guest_to_host_with_ssh():
    assert port_map(vm_row(41000, {8080: 41001, 53: 41002})) == {
        22: 41000, 8080: 41001, 53: 41002}


def test_the_bridge_maps_each_host_port_to_its_guest_port(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path):
    sent: list[str] = []
    monkeypatch.setattr(bridge, "nft", lambda script, check=True: sent.append(script))
    net = BridgeNetwork(tmp_path, "ttbr-t", "10.99.0.0/24", allow_outgoing=False)
    net.map_port("10.99.0.5", 8080, 41001)
    net.unmap_port(41001)
    assert sent[0] == ("add element ip ttstack_ttbr_t forwards { 41001 : 10.99.0.5 . 8080 }\n"
                       "add element ip ttstack_ttbr_t host_ports { 41001 }\n")
    assert "host_ports { 41001 }" in sent[1] and "forwards { 41001 }" in sent[1]
