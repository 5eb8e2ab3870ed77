"""The `tt_vm` handle's pure logic: reading the guest's listening sockets, port arguments."""

from __future__ import annotations

import pytest

from pytest_ttstack import VM, CommandFailed, RunResult, WaitTimeout
from pytest_ttstack.vm import listener

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
          "timeout inode\n")


def tcp(addr: str, port: int, state: str = "0A") -> str:
    return f"   0: {addr}:{port:04X} 00000000:0000 {state} 00000000:00000000 00:00000000 0 0 1\n"


@pytest.mark.parametrize("lines, expected", [
    ([tcp("00000000", 8123)], "reachable"),  # 0.0.0.0
    ([tcp("0F02000A", 8123)], "reachable"),  # 10.0.2.15, the guest's own address
    ([tcp("0" * 32, 8123)], "reachable"),  # ::
    ([tcp("0100007F", 8123)], "loopback"),  # 127.0.0.1: the trial's false "ready"
    ([tcp("0200007F", 8123)], "loopback"),  # 127.0.0.2
    ([tcp("0" * 24 + "01000000", 8123)], "loopback"),  # ::1
    ([tcp("0000000000000000FFFF00000100007F", 8123)], "loopback"),  # ::ffff:127.0.0.1
    ([tcp("0100007F", 8123), tcp("0" * 32, 8123)], "reachable"),
    ([tcp("00000000", 8124)], None),  # another port
    ([tcp("00000000", 8123, "01")], None),  # ESTABLISHED, not LISTEN
    ([], None),
])
def test_listener_tells_reachable_from_loopback_only(lines, expected):
    assert listener(HEADER + "".join(lines), 8123) == expected


class FakeClient:
    """Records update_env calls; answers as a server would."""

    def __init__(self) -> None:
        self.updates: list[list[int]] = []

    def update_env(self, name: str, add_ports: list[int]) -> dict:
        self.updates.append(add_ports)
        return {"vms": [{"id": "vm1", "ports": {str(p): 40000 + p for p in add_ports}}]}


def vm(client: FakeClient) -> VM:
    return VM(client, "env", {"id": "vm1", "name": "env-0", "image": "qemu:debian-12:x86_64",
                              "os": "debian-12", "arch": "x86_64", "ssh_host": "127.0.0.1",
                              "ssh_port": 41022})  # type: ignore[arg-type]


def test_port_22_is_the_ssh_forward_and_digits_are_a_port():
    """port(22) was the server's refusal ("22 is always forwarded"); port("8000") asked
    the server for the forward, then raised KeyError '8000'."""
    client = FakeClient()
    handle = vm(client)
    assert handle.port(22) == ("127.0.0.1", 41022)
    assert client.updates == []
    assert handle.port("8000") == ("127.0.0.1", 48000)
    assert handle.port(8000) == ("127.0.0.1", 48000) and client.updates == [[8000]]
    with pytest.raises(ValueError, match="give a guest TCP port number"):
        handle.port("http")


def test_the_names_tests_use_are_exported():
    assert issubclass(CommandFailed, AssertionError) and issubclass(WaitTimeout, TimeoutError)
    assert not RunResult(1, "", "").ok
