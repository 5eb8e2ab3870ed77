"""The API contract (ttclient/contract.py, ttclient/routes.py), in process: the daemons'
answer shapes are exactly what the models declare, and the one route table maps a
service's answers and errors to HTTP the same way for ttserver and ttproxy."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel
from starlette.testclient import TestClient

from ttclient import jsonstream
from ttclient.contract import (
    CommandResult,
    Download,
    EnvCreate,
    EnvInfo,
    EnvUpdate,
    FileResult,
    RunRequest,
    ServiceError,
    VMInfo,
)
from ttclient.metrics import DaemonMetrics
from ttclient.routes import create_app
from ttproxy.merge import Part, merge_env, merge_results
from ttserver.db import EnvRow, VMRow
from ttserver.guest.command import Outcome, Output
from ttserver.views import env_view, vm_ref

PROXY_ONLY = {"server", "servers"}


def vm_row(idx: int = 0) -> VMRow:
    return VMRow(id=f"vm{idx}", env="e1", idx=idx, image="qemu:debian-12:x86_64", cpu=1,
                 mem_mib=512, disk_mib=4096, state="running", domain="tt-x-vm", dir="/x",
                 ssh_port=41000 + idx, forwards={22: 41000 + idx, 80: 41100 + idx},
                 boot_seconds=1.5, boot_mode="warm")


def env_row() -> EnvRow:
    return EnvRow(name="e1", owner="alice", state="running", created_at=1.0, expires_at=2.0,
                  spec={"ports": [80]}, vms=[vm_row(0), vm_row(1)])


def fields(model: type[BaseModel], proxy: bool) -> set[str]:
    return {f for f in model.model_fields if proxy or f not in PROXY_ONLY}


def test_a_servers_env_view_has_exactly_the_declared_fields():
    view = env_view(env_row(), "srv1", "127.0.0.1", restricted=False)
    assert set(view) == fields(EnvInfo, proxy=False)
    for vm in view["vms"]:
        assert set(vm) == fields(VMInfo, proxy=False)
    assert EnvInfo.model_validate(view).model_dump(exclude_unset=True) == view


def test_a_proxys_merged_view_has_exactly_the_declared_fields():
    part = env_view(env_row(), "srv1", "127.0.0.1", restricted=False)
    merged = merge_env([Part("127.0.0.1:1", part), Part("127.0.0.1:2", part, "refused")])
    assert set(merged) == fields(EnvInfo, proxy=True)
    for vm in merged["vms"]:
        assert set(vm) == fields(VMInfo, proxy=True)
    assert EnvInfo.model_validate(merged).model_dump(exclude_unset=True) == merged


def test_command_and_file_results_have_one_shape_on_server_and_proxy():
    outcome = Outcome(0, None, Output(b"out\xff", 4), Output(b"", 0), False, 0.1234)
    for binary in (False, True):
        on_server = json.loads(b"".join(jsonstream.dumps_iter(
            {**vm_ref(vm_row()), **outcome.fields(binary), "error": ""})))
        assert set(on_server) == fields(CommandResult, proxy=False)
        CommandResult.model_validate(on_server)
        assert on_server["escaped"] is not binary
    vms = [{"name": "e1-1", "id": "vm1", "image": "qemu:debian-12:x86_64"}]
    for kind, model in (("run", CommandResult), ("push", FileResult)):
        merged = merge_results([], {"127.0.0.1:2": vms}, kind)
        assert set(merged[0]) == fields(model, proxy=True), kind
        model.model_validate(merged[0])


class Service:
    """A minimal EnvService: one ENV, answers with an undeclared key, and errors."""

    title = "test"
    description = "in-process"

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.authenticate = self._auth if token else None
        self.calls: list[tuple] = []
        self.metrics = DaemonMetrics()

    def may_scrape(self, caller: object) -> None:
        pass

    def _auth(self, authorization: str | None) -> str:
        if authorization != f"Bearer {self.token}":
            raise ServiceError("this server needs an API token", 401)
        return "alice"

    def health(self) -> dict:
        return {"ok": True, "server_id": "s"}

    def whoami(self, caller: object) -> dict:
        return {"name": str(caller), "admin": False}

    def status(self, caller: object) -> dict:
        raise ValueError("no status here")

    def list_envs(self, caller: object, owner: str | None) -> list[dict]:
        return [self.get(caller, "e1")]

    def create(self, caller: object, body: EnvCreate) -> dict:
        raise ServiceError(f"ENV {body.name!r} already exists", 409)

    def get(self, caller: object, name: str) -> dict:
        if name != "e1":
            raise ServiceError(f"ENV {name!r} does not exist", 404)
        view = env_view(env_row(), "s", "127.0.0.1", restricted=True)
        return {**view, "internal_secret": "not in the contract"}

    def update(self, caller: object, name: str, body: EnvUpdate) -> dict:
        return self.get(caller, name)

    stop = start = get

    def delete(self, caller: object, name: str) -> dict:
        return {"deleted": name}

    def run(self, caller: object, name: str, body: RunRequest) -> list[dict]:
        self.calls.append(("run", caller, body.cmd))
        return []

    def may_push(self, caller: object, name: str) -> None:
        self.calls.append(("may_push", caller, name))
        self.get(caller, name)

    def push(self, caller, name, path, data, mode, vms, use_ssh) -> list[dict]:
        self.calls.append(("push", caller, path, data.read(), mode, vms, use_ssh))
        return []

    def pull(self, caller, name, vm, path, use_ssh) -> Download:
        return Download(6, iter([b"\x00by", b"tes"]))

    def console(self, caller, name, vm, lines) -> str:
        return f"{lines} lines"


@pytest.fixture
def client():
    return TestClient(create_app(Service(), frozenset({"testserver"})))


def test_answers_drop_undeclared_keys_and_proxy_fields_stay_out(client):
    env = client.get("/envs/e1").json()
    assert "internal_secret" not in env
    assert set(env) == fields(EnvInfo, proxy=False)
    assert env["outgoing"] == "denied"
    assert client.get("/envs").json() == [env]
    assert client.get("/health").json() == {"ok": True, "server_id": "s"}


def test_errors_become_their_status_with_one_detail(client):
    assert client.get("/envs/nope").status_code == 404
    answer = client.post("/envs", json={"name": "e1", "os_prefix": "deb"})
    assert (answer.status_code, answer.json()) == (409, {"detail": "ENV 'e1' already exists"})
    assert client.get("/status").json() == {"detail": "no status here"}
    assert client.post("/envs/e1/run", json={"cmd": ""}).status_code == 422


def test_files_and_console_are_bytes_and_text(client):
    pulled = client.get("/envs/e1/vms/0/files", params={"path": "/etc/x"})
    assert pulled.content == b"\x00bytes"
    assert pulled.headers["content-type"] == "application/octet-stream"
    assert client.get("/envs/e1/vms/0/console", params={"lines": 7}).text == "7 lines"
    pushed = client.put("/envs/e1/files", params={"path": "/tmp/f", "mode": "0644"},
                        content=b"data")
    assert pushed.json() == {"env": "e1", "results": []}


def test_the_caller_comes_from_the_guard_before_the_body():
    service = Service(token="s3cret")
    client = TestClient(create_app(service, frozenset({"testserver"})))
    refused = client.put("/envs/e1/files", params={"path": "/tmp/f"}, content=b"x" * 1000)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert service.calls == []  # refused before any route ran
    ok = client.put("/envs/e1/files", params={"path": "/tmp/f"}, content=b"x",
                    headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200, ok.text
    assert service.calls[0] == ("may_push", "alice", "e1")
    assert client.get("/whoami", headers={"Authorization": "Bearer s3cret"}).json() == {
        "name": "alice", "admin": False}
    assert client.get("/health").status_code == 200  # open path, no token


def test_both_daemons_publish_answer_schemas():
    spec = create_app(Service(), frozenset({"testserver"})).openapi()
    answer = spec["paths"]["/envs/{name}"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EnvInfo"}
    assert "CommandResult" in spec["components"]["schemas"]


def test_one_caller_cannot_take_every_thread_and_health_needs_none():
    """A caller may have IN_FLIGHT long requests (run, files) in progress; more are 429 at
    once. Two callers that fill the whole thread pool still leave /health answering (it
    waited for a free thread: 40 long runs stalled the server)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import requests
    import uvicorn

    from ttclient import routes

    service = Service()
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow_run(caller, name, body):
        entered.release()
        release.wait(60)
        return []

    service.run = slow_run  # type: ignore[method-assign]
    app = create_app(service, frozenset({"127.0.0.1"}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    def run(token: str) -> int:
        return requests.post(f"{url}/envs/e1/run", json={"cmd": "sleep"}, timeout=60,
                             headers={"Authorization": f"Bearer {token}"}).status_code

    limit = routes.IN_FLIGHT
    try:
        with ThreadPoolExecutor(max_workers=3 * limit) as pool:
            first = [pool.submit(run, "alice") for _ in range(limit + 5)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in first) < 5:
                assert time.monotonic() < deadline, "the extra requests were not refused"
                time.sleep(0.05)
            refused = [f.result() for f in first if f.done()]
            assert refused == [429] * 5
            second = [pool.submit(run, "bob") for _ in range(limit)]  # bob is not alice
            for _ in range(2 * limit):
                assert entered.acquire(timeout=30), "a run did not start"
            started = time.monotonic()
            health = requests.get(url + "/health", timeout=10)
            assert health.status_code == 200 and time.monotonic() - started < 2
            release.set()
            assert sorted(f.result(60) for f in first + second) == (
                [200] * (2 * limit) + [429] * 5)
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


def test_metrics_count_requests_by_route_template(client):
    client.get("/envs/e1")
    client.get("/envs/nope")
    text = client.get("/metrics").text
    assert ('ttstack_http_requests_total{code="200",method="GET",route="/envs/{name}"} 1.0'
            in text), text
    assert 'route="/envs/{name}"' in text and 'route="/envs/e1"' not in text
    assert "ttstack_http_request_duration_seconds_bucket" in text
