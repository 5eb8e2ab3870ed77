"""`--network bridge` on real VMs, inside a network namespace this test makes (the
machine's own network is never touched): DHCP gives each VM its address, SSH and an
exposed port work through the nftables port MAP, the MAP and SETs hold exactly the live
VMs' entries, deny-outgoing blocks a VM→host connection, a server restart keeps VMs
reachable, and bridge, TAPs, rules and dnsmasq are gone afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from ttserver.host.bridge import Lease

from helpers import ServerProcess, new_run_dir, veth_namespace, wait_env

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nsenter", "nft", "dnsmasq", "ip")),
    reason="bridge mode needs nsenter, nft, dnsmasq and ip (scripts/setup-host.sh)")]

OUTER, INNER = "10.231.7.1", "10.231.7.2"  # veth ends: this namespace / the test's one
SUBNET = "10.232.7.0/24"


@dataclass
class Host:
    ns: str
    bridge: str
    veth: str  # the test's own link in the namespace
    srv: ServerProcess
    run_dir: Path

    def sh(self, *argv: str, check: bool = True) -> str:
        """A command inside the test's network namespace."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", *argv],
                              capture_output=True, text=True, check=check, timeout=60).stdout

    def links(self) -> list[str]:
        return [link["ifname"] for link in json.loads(self.sh("ip", "-j", "link"))]

    def spoof_drops(self) -> int:
        """Packets the bridge table dropped at VMs' ports (its counter rule)."""
        out = self.sh("nft", "-j", "list", "table", "bridge", f"ttstack_{self.bridge}")
        return sum(e["counter"]["packets"] for item in json.loads(out)["nftables"]
                   for e in item.get("rule", {}).get("expr", []) if "counter" in e)

    def nft_elements(self) -> dict:
        out = self.sh("nft", "-j", "list", "table", "ip", f"ttstack_{self.bridge}",
                      check=False)
        found: dict = {"forwards": {}, "host_ports": [], "denied": []}
        for item in json.loads(out)["nftables"] if out else []:
            body = item.get("map") or item.get("set")
            if body and body["name"] == "forwards":
                found["forwards"] = {e[0]: tuple(e[1]["concat"]) for e in body.get("elem", [])}
            elif body:
                found[body["name"]] = sorted(body.get("elem", []))
        return found


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with veth_namespace("ttb", OUTER, INNER) as (ns, _, inner):
        bridge = f"ttbr{ns[3:]}"
        run_dir = new_run_dir("bridge-")
        srv = ServerProcess(run_dir / "state", host=INNER, port_range="43000-43499",
                            prefix=("nsenter", f"--net=/run/netns/{ns}"),
                            extra=("--network", "bridge", "--bridge-name", bridge,
                                   "--bridge-subnet", SUBNET))
        try:
            yield Host(ns, bridge, inner, srv.start(), run_dir)
        finally:
            srv.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def run(h: Host, name: str, cmd: str) -> list[dict]:
    resp = requests.post(f"{h.srv.url}/envs/{name}/run", json={"cmd": cmd}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def guest_connect(family: str, host: str, port: int, scope: str = "") -> str:
    """A guest shell command: a TCP connect from the VM, printing what became of it
    (`scope`: the interface of an IPv6 link-local `host`)."""
    where = f"('{host}', {port}" + (f", 0, socket.if_nametoindex('{scope}'))" if scope
                                    else ")")
    return (f"python3 -c \"import socket; s = socket.socket(socket.{family}); "
            f"s.settimeout(4); s.connect({where}); print('connected')\" 2>&1 | tail -1")


def ssh(h: Host, port: int, cmd: str) -> subprocess.CompletedProcess:
    """From this namespace, through the mapped port, with the server's key."""
    return subprocess.run(
        ["ssh", "-i", str(h.srv.cfgdb / "ssh" / "id_ed25519"), "-p", str(port),
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", f"root@{INNER}", cmd],
        capture_output=True, text=True, timeout=60)


def ssh_until_up(h: Host, port: int, cmd: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        res = ssh(h, port, cmd)
        if res.returncode == 0 or time.monotonic() > deadline:
            assert res.returncode == 0, res.stderr
            return res.stdout
        time.sleep(2)


@pytest.mark.slow
def test_a_warm_clone_on_the_bridge_takes_its_own_mac_and_lease(host: Host):
    """Clones of a template (made on user networking) get their NIC plugged on their TAP
    before the saved state loads, then take their own MAC and DHCP lease: each holds the
    address on record and serves SSH, with its own host key, through its mapped port."""
    h = host
    deadline = time.monotonic() + 600
    while not any(t["state"] == "ready" and t["key"].startswith("qemu:debian-12:") for t in
                  requests.get(h.srv.url + "/status", timeout=10).json()["templates"]):
        assert time.monotonic() < deadline, "no debian-12 template"
        time.sleep(2)
    resp = requests.post(h.srv.url + "/envs", json={"name": "warm", "os_prefix": ["debian-12"],
                                                    "vm_number": 2}, timeout=30)
    assert resp.status_code == 202, resp.text
    env = wait_env(h.srv.url, "warm")
    assert env["state"] == "running", env["error"]
    assert [vm["boot_mode"] for vm in env["vms"]] == ["warm", "warm"], h.srv.log_tail(60)
    macs = run(h, "warm", "cat /sys/class/net/e*/address")
    addrs = run(h, "warm", "ip -4 -o addr show scope global")
    for vm, mac, addr in zip(env["vms"], macs, addrs, strict=True):
        assert mac["stdout"].strip() == Lease.of(vm["id"], vm["address"]).mac, (vm, mac)
        assert f"{vm['address']}/24" in addr["stdout"], addr  # the template's lease is gone
        assert "10.0.2.15" not in addr["stdout"], addr
        assert ssh_until_up(h, vm["ssh_port"], "hostname") == f"{vm['name']}\n"
        served = subprocess.run(
            ["ssh-keyscan", "-T", "20", "-t", "ed25519", "-p", str(vm["ssh_port"]), INNER],
            capture_output=True, text=True, timeout=60).stdout.split()[2]
        file = run(h, "warm", "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub")
        assert served in {r["stdout"].strip() for r in file}
    assert len({r["stdout"] for r in run(h, "warm", "cut -d' ' -f2 "
                                         "/etc/ssh/ssh_host_ed25519_key.pub")}) == 2
    found = h.nft_elements()
    assert {k: tuple(v) for k, v in found["forwards"].items()} == {
        vm["ssh_port"]: (vm["address"], 22) for vm in env["vms"]}
    assert requests.delete(h.srv.url + "/envs/warm", timeout=120).status_code == 200
    assert h.nft_elements() == {"forwards": {}, "host_ports": [], "denied": []}
    assert sorted(h.links()) == sorted(["lo", h.veth, h.bridge])  # no TAP left


@pytest.mark.slow
def test_bridge_network_end_to_end(host: Host):
    h = host
    for name, extra in (("open", {"ports": [8080]}), ("closed", {"deny_outgoing": True})):
        resp = requests.post(h.srv.url + "/envs", json={"name": name, "os_prefix": ["debian-12"],
                                                        **extra}, timeout=30)
        assert resp.status_code == 202, resp.text
    envs = {name: wait_env(h.srv.url, name) for name in ("open", "closed")}
    assert all(e["state"] == "running" for e in envs.values()), envs
    vm_open, vm_closed = envs["open"]["vms"][0], envs["closed"]["vms"][0]

    # DHCP gave each VM the address on record
    for name, vm in (("open", vm_open), ("closed", vm_closed)):
        assert vm["address"].startswith("10.232.7."), vm
        out = run(h, name, "ip -4 -o addr show scope global")[0]["stdout"]
        assert f"{vm['address']}/24" in out, out

    # the nft MAP and SETs hold exactly the live VMs' entries
    expected = {vm_open["ssh_port"]: (vm_open["address"], 22),
                vm_open["ports"]["8080"]: (vm_open["address"], 8080),
                vm_closed["ssh_port"]: (vm_closed["address"], 22)}
    found = h.nft_elements()
    assert {k: tuple(v) for k, v in found["forwards"].items()} == expected
    assert found["host_ports"] == sorted(expected)
    assert found["denied"] == [vm_closed["address"]]

    # SSH and an exposed port through the mapped host ports, from outside the namespace
    assert ssh_until_up(h, vm_open["ssh_port"], "hostname") == "open-0\n"
    run(h, "open", "cd /tmp && echo served > index.html && "
                   "(setsid python3 -m http.server 8080 >/dev/null 2>&1 &)")
    deadline = time.monotonic() + 60
    while True:
        try:
            page = requests.get(f"http://{INNER}:{vm_open['ports']['8080']}/index.html",
                                timeout=5)
            break
        except requests.RequestException:
            assert time.monotonic() < deadline, "the exposed port never answered"
            time.sleep(1)
    assert page.text == "served\n"

    # ports change live: one more map element, then back to the original map
    resp = requests.patch(f"{h.srv.url}/envs/open", json={"add_ports": [9090]}, timeout=30)
    assert resp.status_code == 200, resp.text
    added = resp.json()["vms"][0]["ports"]["9090"]
    found = h.nft_elements()
    assert tuple(found["forwards"][added]) == (vm_open["address"], 9090)
    assert added in found["host_ports"]
    resp = requests.patch(f"{h.srv.url}/envs/open", json={"remove_ports": [9090]}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert {k: tuple(v) for k, v in h.nft_elements()["forwards"].items()} == expected

    # no VM opens a connection to the host (the API's address inside the namespace, or
    # the gateway): only DHCP is for VMs; SSH *into* both still works
    for name in ("open", "closed"):
        for addr in (INNER, "10.232.7.1"):
            out = run(h, name, guest_connect("AF_INET", addr, h.srv.port))[0]["stdout"]
            assert "timed out" in out, (name, addr, out)
    assert ssh_until_up(h, vm_closed["ssh_port"], "hostname") == "closed-0\n"

    # anti-spoofing: what a VM sends from another address than its lease is dropped at
    # its bridge port (counted by the bridge table's drop rule; what it sends from its own
    # address passes there — whether the other VM then hears it depends on the host's
    # br_netfilter, which sends bridged traffic through the routed rules), and no IPv6 of
    # a VM reaches the host (rogue router advertisements, neighbour spoofing)
    iface = "$(ls /sys/class/net | grep -v '^lo$' | head -1)"
    spoof = "10.232.7.200"
    assert run(h, "closed", f"ip addr add {spoof}/24 dev {iface}")[0]["exit_code"] == 0
    dropped = []
    for source in (vm_closed["address"], spoof):
        send = (f"python3 -c \"import socket; s = socket.socket(socket.AF_INET, "
                f"socket.SOCK_DGRAM); s.bind(('{source}', 0)); "
                f"[s.sendto(b'x', ('{vm_open['address']}', 5555)) for _ in range(3)]\"")
        before = h.spoof_drops()
        assert run(h, "closed", f"{send}; sleep 2")[0]["exit_code"] == 0
        dropped.append(h.spoof_drops() - before)
    assert dropped[0] == 0 and dropped[1] >= 1, dropped
    run(h, "closed", f"ip addr del {spoof}/24 dev {iface}")
    host_ll = [a["local"] for a in json.loads(h.sh("ip", "-6", "-j", "addr", "show", "dev",
                                                   h.bridge))[0]["addr_info"]
               if a["local"].startswith("fe80")]
    assert host_ll, "the bridge has no IPv6 link-local address"
    # the images keep IPv6 off; root in a VM can turn it on
    res = run(h, "open", f"IF={iface}; sysctl -qw net.ipv6.conf.$IF.disable_ipv6=0 && "
                         f"ip -6 addr add fe80::5eed/64 dev $IF nodad")
    assert res[0]["exit_code"] == 0, res
    out = run(h, "open", f"IF={iface}; " + guest_connect("AF_INET6", host_ll[0], 9, "$IF")
              )[0]["stdout"]
    assert "timed out" in out, out

    # a server restart removes and rebuilds bridge, rules and DHCP; VMs stay reachable
    h.srv.stop(clean=False)
    assert h.bridge not in h.links(), h.srv.log_tail()
    assert h.nft_elements()["forwards"] == {}
    h.srv.start()
    assert {k: tuple(v) for k, v in h.nft_elements()["forwards"].items()} == expected
    assert ssh_until_up(h, vm_open["ssh_port"], "hostname") == "open-0\n"

    # stop an ENV: its entries and TAP go, its address stays on record; start: all back
    assert requests.post(f"{h.srv.url}/envs/closed/stop", timeout=180).status_code == 200
    found = h.nft_elements()
    assert {k: tuple(v) for k, v in found["forwards"].items()} == {
        k: v for k, v in expected.items() if v[0] == vm_open["address"]}
    assert found["denied"] == []
    assert len(h.links()) == 4, h.links()  # lo, veth, bridge, the open VM's TAP
    assert requests.post(f"{h.srv.url}/envs/closed/start", timeout=60).status_code == 202
    restarted = wait_env(h.srv.url, "closed")
    assert restarted["state"] == "running", restarted["error"]
    assert restarted["vms"][0]["address"] == vm_closed["address"]
    found = h.nft_elements()
    assert {k: tuple(v) for k, v in found["forwards"].items()} == expected
    assert found["denied"] == [vm_closed["address"]]
    assert ssh_until_up(h, vm_closed["ssh_port"], "hostname") == "closed-0\n"

    # delete: entries, TAPs and leases go; stop: bridge, table and dnsmasq go too
    for name in ("open", "closed"):
        assert requests.delete(f"{h.srv.url}/envs/{name}", timeout=120).status_code == 200
    assert h.nft_elements() == {"forwards": {}, "host_ports": [], "denied": []}
    assert sorted(h.links()) == sorted(["lo", h.veth, h.bridge])  # no TAP left
    assert (h.srv.cfgdb / "bridge" / "dhcp-hosts").read_text() == ""
    h.srv.stop()
    assert h.bridge not in h.links()
    assert h.sh("nft", "list", "tables").strip() == ""
    dnsmasq = subprocess.run(["pgrep", "-f", f"dnsmasq.*{h.srv.cfgdb}"],
                             capture_output=True, text=True).stdout
    assert dnsmasq == ""
    assert subprocess.run(["virsh", "list", "--name"], capture_output=True, text=True
                          ).stdout.count(f"tt-{envs['open']['server_id']}") == 0
