"""ttproxy's pure logic: placement policy and how parts of an ENV merge into one view."""

from __future__ import annotations

import pytest

from ttproxy.merge import Part, merge_env, merge_results
from ttproxy.placement import Capacity, PlacementError, place

D12, D13 = "qemu:debian-12:x86_64", "qemu:debian-13:x86_64"


def cap(addr: str, cpu: int = 4, mem: int = 4096, disk: int = 40960,
        images: tuple[str, ...] = (D12, D13), order: int = 0) -> Capacity:
    return Capacity(addr, dict.fromkeys(images, 2048), cpu, mem, disk, order)


def test_most_free_memory_first_spreads_vms():
    plan = place([D12], 3, 1, 512, None, [cap("a", mem=2048), cap("b", mem=1024, order=1)])
    assert plan.parts == {"a": {D12: 2}, "b": {D12: 1}}
    assert plan.first_indexes() == {"a": 0, "b": 2}


def test_ties_go_to_the_first_listed_server():
    plan = place([D12], 1, 1, 512, None, [cap("a"), cap("b", order=1)])
    assert plan.parts == {"a": {D12: 1}}


def test_only_servers_with_the_image_are_used():
    plan = place([D12, D13], 1, 1, 512, None,
                 [cap("a", images=(D12,)), cap("b", images=(D13,), order=1)])
    assert plan.parts == {"a": {D12: 1}, "b": {D13: 1}}


def test_an_env_too_big_for_one_server_spans_two():
    plan = place([D12], 2, 1, 512, None, [cap("a", cpu=1), cap("b", cpu=1, order=1)])
    assert plan.parts == {"a": {D12: 1}, "b": {D12: 1}}


@pytest.mark.parametrize("servers, words", [
    ([cap("a", cpu=1)], "cpu 1"),
    ([cap("a", mem=256)], "mem 256 MiB"),
    ([cap("a", disk=100)], "disk 100 MiB"),
    ([cap("a", images=(D13,))], "no server that is up has image"),
])
def test_what_does_not_fit_says_why(servers: list[Capacity], words: str):
    with pytest.raises(PlacementError, match=words):
        place([D12], 2, 1, 512, None, servers)


def test_disk_size_counts_against_free_disk():
    with pytest.raises(PlacementError, match="disk 8192 MiB"):
        place([D12], 1, 1, 512, 8192, [cap("a", disk=4096)])


def view(state: str, idxs: list[int], error: str = "", created: float = 10.0) -> dict:
    return {"name": "e", "state": state, "owner": "o", "created_at": created,
            "expires_at": created + 100, "error": error, "server_id": "x", "ports": [],
            "outgoing": "denied",
            "vms": [{"id": f"id{i}", "name": f"e-{i}", "idx": i, "image": D12,
                     "state": "running" if state == "running" else "booting"} for i in idxs]}


def test_parts_merge_in_vm_order_with_their_server():
    env = merge_env([Part("b", view("running", [2], created=5)), Part("a", view("running",
                                                                              [0, 1]))])
    assert [v["name"] for v in env["vms"]] == ["e-0", "e-1", "e-2"]
    assert [v["server"] for v in env["vms"]] == ["a", "a", "b"]
    assert env["state"] == "running" and env["created_at"] == 5 and env["servers"] == ["b", "a"]


def test_a_part_still_booting_makes_the_env_creating_and_failure_wins():
    assert merge_env([Part("a", view("running", [0])),
                      Part("b", view("creating", [1]))])["state"] == "creating"
    env = merge_env([Part("a", view("running", [0])), Part("b", view("failed", [1], "boom"))])
    assert env["state"] == "failed" and env["error"] == "boom"


def test_a_down_server_makes_the_env_degraded_and_names_it():
    env = merge_env([Part("a", view("running", [0])),
                     Part("b", view("running", [1]), down_error="no answer")])
    assert env["state"] == "degraded"
    assert "server b is down (no answer)" in env["error"]
    assert [v["state"] for v in env["vms"]] == ["running", "unreachable"]


def test_results_of_a_down_server_are_reported_not_dropped():
    replies = [("a", {"results": [{"vm": "e-0", "exit_code": 0}]})]
    down = {"b": [{"name": "e-1", "id": "id1", "image": D12}]}
    out = merge_results(replies, down, "run")
    assert [(r["vm"], r["server"]) for r in out] == [("e-0", "a"), ("e-1", "b")]
    assert out[1]["exit_code"] is None and "server b is down" in out[1]["error"]
