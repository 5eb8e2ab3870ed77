"""ttproxy's pure logic: placement policy, how parts of an ENV (and the members' statuses)
merge into one view, who may see what the proxy remembers, and where it remembers ENVs."""

from __future__ import annotations

import pytest

from ttproxy.directory import EnvDirectory
from ttproxy.merge import Part, may_see, merge_env, merge_results, merge_status
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


def test_remembered_views_are_for_admins_and_owners_only():
    """A part on a server that is down is shown from memory: to an admin or the ENV's
    owner; never to a caller without a name (no live server vouched for anybody), even for
    an ENV made without a token (owner "")."""
    mine, anonymous = {"owner": "alice"}, {"owner": ""}
    assert may_see(mine, {"name": "alice", "admin": False})
    assert may_see(mine, {"name": "root", "admin": True})
    assert not may_see(mine, {"name": "bob", "admin": False})
    assert not may_see(anonymous, {"name": "", "admin": False})


def test_status_sums_the_servers_that_answered_and_names_the_rest():
    def st(cpu: int, image: str) -> dict:
        return {"cpu_total": cpu, "cpu_used": 1, "mem_total_mib": 1024, "mem_used_mib": 0,
                "disk_total_mib": 10, "disk_used_mib": 0, "env_count": 5,
                "images": [{"name": image}]}

    got = merge_status([("a:1", st(4, D12)), ("b:2", "timed out"), ("c:3", st(2, D12))],
                       env_count=3)
    assert (got["cpu_total"], got["cpu_used"], got["env_count"]) == (6, 2, 3)
    assert [(r["address"], r["health"]) for r in got["servers"]] == [
        ("a:1", "up"), ("b:2", "down"), ("c:3", "up")]
    assert got["servers"][1]["error"] == "timed out" and got["servers_up"] == 2
    assert got["images"] == [{"name": D12, "servers": ["a:1", "c:3"]}]


def test_the_directory_keeps_holders_in_vm_order_and_forgets_parts():
    d = EnvDirectory()
    d.remember("e", "a:1", {"v": 1})
    d.remember("e", "b:2", {"v": 2})
    d.remember("e", "a:1", {"v": 3})  # a newer view, same place in the order
    assert d.holders("e") == ["a:1", "b:2"] and d.last("e", "a:1") == {"v": 3}
    assert "e" in d and len(d) == 1
    d.forget("e", "a:1")
    assert d.parts() == [("e", "b:2", {"v": 2})]
    d.forget("e", "b:2")  # the last holder gone: the ENV is unknown
    assert "e" not in d and d.holders("e") == [] and d.last("e", "b:2") is None


class FakeServer:
    """A ttserver stand-in on loopback for the proxy's rollback logic: it answers health,
    status and listings, takes POST /envs but answers only after `post_delay` seconds (the
    proxy gives up first), and answers DELETE with `delete_status`."""

    def __init__(self, post_delay: float, delete_status: int) -> None:
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.posted: list[str] = []
        self.deleted: list[str] = []
        self.listed = 0
        status = {"cpu_total": 4, "cpu_used": 0, "mem_total_mib": 4096, "mem_used_mib": 0,
                  "disk_total_mib": 40960, "disk_used_mib": 0, "env_count": 0,
                  "images": [{"name": f"qemu:debian-{v}:x86_64", "os": f"debian-{v}",
                              "arch": "x86_64", "engine": "qemu", "size_mib": 1024,
                              "warnings": []} for v in (12, 13)]}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def answer(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self.answer(200, {"ok": True, "server_id": "fake"})
                elif self.path == "/status":
                    self.answer(200, status)
                elif self.path.startswith("/envs"):
                    fake.listed += 1
                    self.answer(200, [])
                else:
                    self.answer(404, {"detail": "no"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.posted.append(body["name"])
                time.sleep(post_delay)  # admitted, but the answer comes too late
                self.answer(202, {"name": body["name"]})

            def do_DELETE(self) -> None:
                fake.deleted.append(self.path)
                self.answer(delete_status, {"deleted": self.path.rsplit("/", 1)[-1]}
                            if delete_status == 200 else {"detail": "busy"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("delete_status", [200, 503])
def test_a_create_that_timed_out_is_rolled_back_or_said_to_be_left(delete_status):
    """A server that does not answer a create in time may have made its part anyway: the
    proxy deletes it there too, and says so when it cannot (it said 'nothing was left'
    and never asked that server)."""
    from ttproxy.proxy import Proxy, ProxyError
    from ttproxy.servers import ServerSet

    fake = FakeServer(post_delay=3, delete_status=delete_status)
    servers = ServerSet([fake.address], request_timeout=1)
    try:
        servers.get(fake.address).up = True  # no health probing thread: marked by hand
        proxy = Proxy(servers)
        with pytest.raises(ProxyError) as info:
            proxy.create({"name": "slow", "os_prefix": ["debian-12"], "vm_number": 1,
                          "cpu_num": 1, "mem_size": 512, "disk_size": None})
        assert fake.posted == ["slow"]
        assert fake.deleted == ["/envs/slow"]
        message = str(info.value)
        if delete_status == 200:
            assert "nothing was left on any server" in message, message
        else:
            assert "nothing was left" not in message, message
            assert f"may be left on {fake.address}" in message, message
            assert "tt env del slow" in message, message
    finally:
        fake.close()


def test_an_env_over_the_servers_vm_limit_is_refused_before_any_server_is_asked():
    """The proxy counts an ENV's VMs as the server does (vm_number per matched image, 500
    in all): it used to place 2 x 300 VMs and hand a server a part it then refused."""
    from ttproxy.proxy import Proxy, ProxyError
    from ttproxy.servers import ServerSet

    fake = FakeServer(post_delay=0, delete_status=200)
    servers = ServerSet([fake.address], request_timeout=5)
    try:
        servers.get(fake.address).up = True
        with pytest.raises(ProxyError) as info:
            Proxy(servers).create({"name": "big", "os_prefix": ["debian"], "vm_number": 300,
                                   "cpu_num": 1, "mem_size": 128, "disk_size": None})
        assert info.value.status == 400
        assert str(info.value) == (
            "an ENV holds at most 500 VMs; 300 per image x 2 matched image(s) is 600: "
            "lower vm_number or match fewer images")
        assert fake.posted == []
    finally:
        fake.close()


def test_made_up_names_do_not_fan_out_to_every_server_each_time():
    """An unknown name makes the proxy re-learn every server's ENVs with its own (admin)
    token; 30 requests for made-up names made 30 rounds of that (one per server each)."""
    from ttproxy.proxy import Proxy, ProxyError
    from ttproxy.servers import ServerSet

    fake = FakeServer(post_delay=0, delete_status=200)
    servers = ServerSet([fake.address], request_timeout=5)
    try:
        servers.get(fake.address).up = True
        proxy = Proxy(servers)
        for i in range(30):
            with pytest.raises(ProxyError) as info:
                proxy.get(f"made-up-{i}")
            assert info.value.status == 404
        assert 1 <= fake.listed <= 3, fake.listed
    finally:
        fake.close()
