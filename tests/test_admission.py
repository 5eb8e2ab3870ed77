"""Admission rules and response views as pure logic (ttserver/admission.py, views.py): no
server, no VM, no libvirt; milliseconds."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from ttserver import admission, views
from ttserver.admission import EnvRequest
from ttserver.config import ServerConfig
from ttserver.db import EnvRow
from ttserver.errors import BadRequest, InsufficientResources, TTError

CFG = ServerConfig(image_path=Path("/nonexistent"), cfgdb_path=Path("/state"),
                   cpu_total=4, mem_total_mib=4096, disk_total_mib=10240,
                   default_life_time=600, max_life_time=3600)


@pytest.mark.parametrize(("change", "words"), [
    ({"name": "-bad"}, "ENV name"),
    ({"name": "x" * 41}, "ENV name"),
    ({"name": "ok\n"}, "ENV name"),  # "$" in a re.match let a trailing newline through
    ({"ports": list(range(1000, 1033))}, "at most 32 forwarded ports"),
    ({"vm_number": 0}, "vm_number must be 1..500"),
    ({"vm_number": 501}, "vm_number must be 1..500"),
    ({"mem_size": 64}, r"^mem_size must be >= 128 \(MiB\), not 64$"),  # named cpu_num too
    ({"cpu_num": 0}, r"^cpu_num must be >= 1, not 0$"),
    ({"life_time": 3601}, "life_time must be 1..3600"),
    ({"ports": [22]}, "22 is always"),
    ({"ports": [70000]}, "port 70000"),
    ({"ssh_keys": ["ssh-ed25519 AAA\nssh-rsa BBB"]}, "single OpenSSH public key"),
    ({"ssh_keys": ["not a key"]}, "single OpenSSH public key"),
    ({"ssh_keys": ["ssh-ed25519 " + "A" * 40000]}, "at most 32 KiB in all"),
])
def test_validate_refuses_with_what_to_change(change, words):
    req = EnvRequest(**{"name": "ok", "os_prefix": ["debian-12"], **change})
    with pytest.raises(BadRequest, match=words):
        admission.validate(req, CFG)


def image(full: str, size_mib: int) -> SimpleNamespace:
    return SimpleNamespace(name=SimpleNamespace(full=full), size_mib=size_mib)


def test_plan_vms_counts_indexes_and_disks():
    chosen = [image("qemu:debian-12:x86_64", 2048), image("qemu:debian-13:x86_64", 3072)]
    req = EnvRequest(name="e", os_prefix=["debian"], vm_number=2, disk_size=2500,
                     first_index=5)
    vms = admission.plan_vms(req, chosen, "abc123", Path("/state/vms"))  # type: ignore[arg-type]
    assert [v.idx for v in vms] == [5, 6, 7, 8]
    assert [v.disk_mib for v in vms] == [2500, 2500, 3072, 3072]  # at least the image's
    assert all(v.state == "pending" and v.id.startswith("abc123-") for v in vms)
    assert all(v.dir == f"/state/vms/{v.id}" and v.domain == f"tt-{v.id}" for v in vms)
    assert len({v.id for v in vms}) == 4
    assert admission.needs(vms) == {"cpu": 4, "mem_mib": 2048, "disk_mib": 11144}
    counted = EnvRequest(name="e", os_prefix=["debian"], counts={"qemu:debian-13:x86_64": 1})
    assert [v.image for v in admission.plan_vms(counted, chosen, "a", Path("/v"))  # type: ignore[arg-type]
            ] == ["qemu:debian-13:x86_64"]


def test_check_room_names_what_is_short_with_numbers():
    used = {"cpu": 3, "mem_mib": 1024, "disk_mib": 0}
    admission.check_room(used, CFG, {"cpu": 1, "mem_mib": 3072, "disk_mib": 10240}, "for x")
    with pytest.raises(InsufficientResources) as exc:
        admission.check_room(used, CFG, {"cpu": 2, "mem_mib": 512, "disk_mib": 1}, "for ENV 'x'")
    assert str(exc.value.args[0]) == ("not enough resources for ENV 'x' "
                                      "(cpu: need 2, free 1 of 4)")


def test_token_limits_count_every_vm_on_record_of_that_owner(tmp_path):
    """--token-max-vms/--token-max-mem: what a token's ENVs hold (stopped VMs too) plus
    the new VMs; 403 naming the numbers and the flag."""
    from dataclasses import replace

    from ttserver.db import StateDB

    db = StateDB(tmp_path / "db.sqlite")
    chosen = [image("qemu:debian-12:x86_64", 1024)]
    for name, owner, state in (("a1", "alice", "running"), ("a2", "alice", "stopped"),
                               ("b1", "bob", "running")):
        vms = admission.plan_vms(EnvRequest(name=name, os_prefix=["debian-12"]), chosen,
                                 "s", tmp_path)  # type: ignore[arg-type]
        with db.transaction() as c:
            db.insert_env(c, EnvRow(name=name, owner=owner, state=state, created_at=0,
                                    expires_at=1, spec={}))
            for vm in vms:
                db.insert_vm(c, replace(vm, state=state))
    assert db.held_by("alice") == {"vms": 2, "mem_mib": 1024}
    assert db.held_by("nobody") == {"vms": 0, "mem_mib": 0}
    new = admission.plan_vms(EnvRequest(name="n", os_prefix=["debian-12"], vm_number=2),
                             chosen, "s", tmp_path)  # type: ignore[arg-type]
    admission.check_token_limits(db.held_by("alice"), CFG, new, "alice")  # no limits set
    limited = replace(CFG, token_max_vms=3, token_max_mem_mib=4096)
    with pytest.raises(TTError) as exc:
        admission.check_token_limits(db.held_by("alice"), limited, new, "alice")
    assert exc.value.status == 403
    assert "2 VM(s) on record + 2 > --token-max-vms 3" in exc.value.message
    admission.check_token_limits(db.held_by("bob"), limited, new, "bob")
    with pytest.raises(TTError, match=r"512 MiB on record \+ 1024 MiB > --token-max-mem 1024"):
        admission.check_token_limits(db.held_by("bob"), replace(limited, token_max_mem_mib=1024),
                                     new, "bob")


@pytest.mark.parametrize(("life_time", "add", "remove", "words"), [
    (0, [], [], "life_time must be 1..3600"),
    (3600, [], [], "may live 3600 s from its creation at most: life_time <= 2600 now"),
    (None, [8080], [], "port(s) [8080] are already forwarded"),
    (None, [], [9090], "port(s) [9090] are not forwarded by ENV 'e'"),
    (None, [22], [], "22 is always forwarded"),
    (None, list(range(2000, 2032)), [], "at most 32 forwarded ports"),
])
def test_an_update_is_checked_against_the_env_and_the_limits(life_time, add, remove, words):
    """Created at t=0, now t=1000, max_life_time 3600, forwarding 8080."""
    env = EnvRow(name="e", owner="", state="running", created_at=0.0, expires_at=600.0,
                 spec={"ports": [8080]})
    with pytest.raises(BadRequest, match=re.escape(words)):
        admission.check_update(env, CFG, life_time, add, remove, now=1000.0)
    # within the limits: no error (removing 8080 frees a place for a 32nd port)
    admission.check_update(env, CFG, 2600, list(range(2000, 2032)), [8080], now=1000.0)


def test_views_name_vms_and_show_outgoing():
    vm = admission.plan_vms(EnvRequest(name="My_Env", os_prefix=["d"]),
                            [image("qemu:debian-12:x86_64", 1)], "s", Path("/v"))[0]  # type: ignore[list-item]
    assert views.hostname("My_Env", 3) == "my-env-3"
    assert views.vm_refs(vm) == {vm.id, "my-env-0", "0"}
    env = EnvRow(name="My_Env", owner="", state="running", created_at=1.0, expires_at=2.0,
                 spec={"ports": [80]}, vms=[vm])
    view = views.env_view(env, "s", "127.0.0.1", restricted=True)
    assert view["outgoing"] == "denied" and view["ports"] == [80]
    assert view["vms"][0]["name"] == "my-env-0" and view["vms"][0]["os"] == "debian-12"
    assert view["vms"][0]["ssh_host"] == "127.0.0.1"


@pytest.mark.parametrize(("server_warm", "env_warm", "network", "wanted"), [
    ("warm", None, "user", True), ("warm", False, "user", False), ("warm", True, "user", True),
    ("cold", None, "user", False), ("cold", True, "user", False),  # was True: a template kept
    ("warm", None, "bridge", True), ("cold", None, "bridge", False),  # bridge: decision 68
])
def test_which_envs_boot_warm(server_warm, env_warm, network, wanted):
    from ttserver.vm.boot import VMBooter
    from ttserver.vm.network import BridgedNetwork, UserNetwork

    booter = SimpleNamespace(
        network={"user": UserNetwork, "bridge": BridgedNetwork}[network],
        cfg=SimpleNamespace(warm_clones=server_warm == "warm"))
    env = SimpleNamespace(spec={} if env_warm is None else {"warm": env_warm})
    assert VMBooter._wants_warm(booter, env) is wanted  # type: ignore[arg-type]
