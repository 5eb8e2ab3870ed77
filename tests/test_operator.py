"""What an operator reads: Prometheus metrics at /metrics and the JSON audit trail, on a
real ttserver with tokens, around a real ENV's life; and the same /metrics through a
real ttproxy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import ProxyProcess, ServerProcess, add_token, new_run_dir, wait_env

pytestmark = pytest.mark.vm


def h(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def scrape(url: str, token: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of GET url/metrics."""
    resp = requests.get(url + "/metrics", headers=h(token), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[ServerProcess, dict[str, str], Path]]:
    run_dir = new_run_dir("ops-")
    tokens_file = run_dir / "tokens"
    tokens = {"alice": add_token(tokens_file, "alice"),
              "root": add_token(tokens_file, "root", "--admin")}
    srv = ServerProcess(run_dir / "state", port_range="45500-45599",
                        extra=("--tokens-file", str(tokens_file), "--log-format", "json"))
    srv.start()
    srv.token = tokens["root"]
    try:
        yield srv, tokens, srv.log
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def audit_lines(log: Path) -> list[dict]:
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if line.startswith("{")]
    return [line for line in lines if line["logger"] == "ttstack.audit"]


def test_metrics_and_audit_follow_an_env_through_its_life(secured):
    srv, tokens, log = secured
    refused = requests.get(srv.url + "/metrics", headers=h(tokens["alice"]), timeout=10)
    assert refused.status_code == 403 and "admin token" in refused.json()["detail"]
    assert requests.get(srv.url + "/metrics", timeout=10).status_code == 401
    before = scrape(srv.url, tokens["root"])
    assert value(before, "ttstack_cpu_total") == 4
    assert value(before, "ttstack_forward_ports_total") == 100

    resp = requests.post(srv.url + "/envs", headers=h(tokens["alice"]), timeout=30, json={
        "name": "ops", "os_prefix": ["debian-12:x86_64"]})
    assert resp.status_code == 202, resp.text
    env = wait_env(srv.url, "ops", headers=h(tokens["alice"]))
    assert env["state"] == "running", env["error"]
    mode = env["vms"][0]["boot_mode"]
    during = scrape(srv.url, tokens["root"])
    assert value(during, "ttstack_env_events_total", event="create") == 1
    assert value(during, "ttstack_vm_boot_seconds_count", mode=mode) == \
        value(before, "ttstack_vm_boot_seconds_count", mode=mode) + 1
    assert value(during, "ttstack_vms", state="running") == 1
    assert value(during, "ttstack_vms_by_image", image="qemu:debian-12:x86_64") == 1
    assert value(during, "ttstack_cpu_reserved") == 1
    assert value(during, "ttstack_memory_reserved_bytes") == 512 << 20
    assert value(during, "ttstack_forward_ports_used") == 1  # its SSH port
    assert value(during, "ttstack_http_requests_total", route="/envs", method="POST",
                 code="202") == 1

    assert requests.delete(srv.url + "/envs/ops", headers=h(tokens["alice"]),
                           timeout=120).status_code == 200
    after = scrape(srv.url, tokens["root"])
    assert value(after, "ttstack_env_events_total", event="delete") == 1
    assert value(after, "ttstack_vms", state="running") == 0
    assert value(after, "ttstack_cpu_reserved") == 0

    events = audit_lines(log)
    create = next(e for e in events if e["event"] == "create")
    assert (create["env"], create["token"], create["source"], create["vms"],
            create["images"]) == ("ops", "alice", "127.0.0.1", 1, ["qemu:debian-12:x86_64"])
    assert create["level"] == "info" and create["ts"].endswith("Z")
    assert any(e["event"] == "delete" and e["env"] == "ops" and e["token"] == "alice"
               for e in events)
    denied = [e for e in events if e["event"] == "denied"]
    assert {(e["status"], e["path"]) for e in denied} >= {(403, "/metrics"), (401, "/metrics")}
    assert any(e.get("token") == "alice" for e in denied)
    text = log.read_text()
    assert all(token not in text for token in tokens.values()), "a token value was logged"


def test_the_proxy_serves_metrics_its_servers_authorise(secured):
    srv, tokens, _ = secured
    proxy = ProxyProcess([srv.address], srv.cfgdb.parent,
                         extra=("--token-file", str(write_token(srv, tokens["root"]))))
    proxy.start()
    try:
        assert requests.get(proxy.url + "/metrics", headers=h(tokens["alice"]),
                            timeout=30).status_code == 403
        # a missing token is the caller's 401, not "server down" and an empty list
        for path in ("/envs", "/status"):
            resp = requests.get(proxy.url + path, timeout=30)
            assert resp.status_code == 401, (path, resp.status_code, resp.text)
        samples = scrape(proxy.url, tokens["root"])
        assert value(samples, "ttstack_proxy_server_up", server=srv.address) == 1
        assert value(samples, "ttstack_proxy_server_health_misses", server=srv.address) == 0
    finally:
        proxy.stop()


def write_token(srv: ServerProcess, token: str) -> Path:
    path = srv.cfgdb.parent / "proxy-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path
