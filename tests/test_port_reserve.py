"""Forward ports are reserved from the kernel's automatic port assignment
(ttserver/host/ports.py): a VM waiting minutes for a boot slot kept its port only on record,
and an outgoing connection of the host could take it as its local port; QEMU's hostfwd
then failed ("Could not set up host forwarding rule", seen in benchmarks/warm.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ttserver.host.ports import covers, parse_ranges, reserve

from helpers import ServerProcess, new_run_dir, veth_namespace

OUTER, INNER = "10.236.7.1", "10.236.7.2"  # veth ends: this namespace / the test's one


@pytest.mark.parametrize(("text", "first", "last", "covered"), [
    ("", 40000, 40010, False),
    ("40000-40010\n", 40000, 40010, True),
    ("8080,39000-40004,40005-41000", 40000, 40010, True),
    ("40000-40004,40006-40010", 40000, 40010, False),  # a gap
    ("40002-40010", 40000, 40010, False),
    ("40000", 40000, 40000, True),
])
def test_a_range_is_covered_only_without_a_gap(text: str, first: int, last: int,
                                                covered: bool):
    assert covers(parse_ranges(text), first, last) is covered


def test_reserve_adds_the_range_to_what_is_there_and_says_why_it_cannot(tmp_path: Path):
    sysctl, ephemeral = tmp_path / "ip_local_reserved_ports", tmp_path / "ip_local_port_range"
    sysctl.write_text("8080\n")
    ephemeral.write_text("32768\t60999\n")

    def add(first: int, last: int, path: Path = sysctl) -> str:
        return reserve(first, last, path, ephemeral, tmp_path / "lock")

    assert add(40000, 40999) == ""
    assert sysctl.read_text() == "8080,40000-40999\n"
    assert add(40100, 40200) == "" and sysctl.read_text() == "8080,40000-40999\n"
    assert "No such file" in add(40000, 40999, tmp_path / "missing")


def test_a_range_that_would_starve_outgoing_connections_is_not_reserved(tmp_path: Path):
    """--port-range 20000-65535 would have left the host no port for any outgoing
    connection (DNS, apt...), and the reservation outlives the server."""
    sysctl, ephemeral = tmp_path / "ip_local_reserved_ports", tmp_path / "ip_local_port_range"
    sysctl.write_text("\n")
    ephemeral.write_text("32768\t60999\n")
    why = reserve(20000, 65535, sysctl, ephemeral, tmp_path / "lock")
    assert "would leave 0 of the 28232 automatic ports 32768-60999" in why
    assert sysctl.read_text() == "\n"
    assert reserve(20000, 40000, sysctl, ephemeral, tmp_path / "lock") == ""  # 7233 of them


def test_the_server_reserves_its_forward_ports_in_its_network_namespace():
    with veth_namespace("ttr", OUTER, INNER) as (ns, _, _):
        def reserved() -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "cat",
                                   "/proc/sys/net/ipv4/ip_local_reserved_ports"],
                                  capture_output=True, text=True, check=True).stdout
        assert reserved().strip() == ""  # a new namespace reserves nothing
        run_dir = new_run_dir("reserve-")
        srv = ServerProcess(run_dir / "state", host=INNER, port_range="45100-45199",
                            prefix=("nsenter", f"--net=/run/netns/{ns}"))
        try:
            srv.start()
            assert covers(parse_ranges(reserved()), 45100, 45199), reserved()
            assert "could not reserve" not in srv.log.read_text()
        finally:
            srv.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
