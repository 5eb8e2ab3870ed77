"""Property-based fuzzing of the real HTTP API (ttserver and ttproxy) with schemathesis,
driven by their own /openapi.json: whatever a client sends, the answer is never a 5xx;
with tokens on, every call without a token is a 401 (checked before its body is read),
and with an admin token still never a 5xx.

The server's image directory holds one image whose kernel is garbage, so a create that
the fuzzer happens to get right fails fast in QEMU instead of booting a VM for minutes;
the create, failure and delete paths still run for real against libvirt.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from helpers import IMAGE_PATH, ProxyProcess, ServerProcess, leftovers, new_run_dir

pytestmark = pytest.mark.vm
EXAMPLES = 40  # per operation: ~15 operations x 40 = ~600 cases per target
CASES: dict[str, int] = {}


def _dud_images(root: Path) -> Path:
    images = root / "images"
    img = images / "qemu:debian-12:x86_64"
    img.mkdir(parents=True)
    (img / "disk.qcow2").symlink_to(IMAGE_PATH / "qemu:debian-12:x86_64" / "disk.qcow2")
    (img / "vmlinuz").write_bytes(b"not a kernel\n")
    (img / "initrd.img").write_bytes(b"\n")
    for p in (images, img):
        p.chmod(0o755)
    return images


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, object]]:
    run_dir = new_run_dir("fuzz-")
    srv = ServerProcess(run_dir / "state", _dud_images(run_dir), port_range="49000-49499",
                        extra=("--cpu-total", "4", "--mem-total", "2G", "--no-warm-clones")).start()
    proxy = ProxyProcess([srv.address], run_dir).start()
    sid = srv.server_id()
    try:
        yield {"server": srv, "proxy": proxy}
        srv.delete_all_envs()
        assert leftovers(sid, run_dir / "state", [])["domains"] == []
        status = requests.get(srv.url + "/status", timeout=10).json()
        assert (status["cpu_used"], status["mem_used_mib"], status["disk_used_mib"]) == (0,
                                                                                       0, 0)
    finally:
        print(f"\nfuzz cases run: {CASES}")
        proxy.stop()
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server_schema(targets):
    return schemathesis.openapi.from_url(targets["server"].url + "/openapi.json")


@pytest.fixture(scope="module")
def proxy_schema(targets):
    return schemathesis.openapi.from_url(targets["proxy"].url + "/openapi.json")


server_api = schemathesis.pytest.from_fixture("server_schema")
proxy_api = schemathesis.pytest.from_fixture("proxy_schema")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _check(case, who: str) -> None:
    CASES[who] = CASES.get(who, 0) + 1
    response = case.call(timeout=120)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: "
        f"{response.text[:500]}\nreproduce: {case.as_curl_command()}")


@pytest.mark.slow
@server_api.parametrize()
@FUZZ
def test_server_never_answers_5xx(case):
    _check(case, "server")


@pytest.mark.slow
@proxy_api.parametrize()
@FUZZ
def test_proxy_never_answers_5xx(case):
    _check(case, "proxy")


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[ServerProcess, str]]:
    run_dir = new_run_dir("fuzz-auth-")
    tokens = run_dir / "tokens"
    token = subprocess.run([sys.executable, "-m", "ttserver.cli", "token", "--tokens-file",
                            str(tokens), "add", "fuzzer", "--admin"], capture_output=True,
                           text=True, check=True, timeout=30).stdout.strip()
    srv = ServerProcess(run_dir / "state", _dud_images(run_dir), port_range="44500-44999",
                        extra=("--mem-total", "2G", "--no-warm-clones",
                               "--tokens-file", str(tokens))).start()
    try:
        yield srv, token
        for env in requests.get(srv.url + "/envs", timeout=10,
                                headers={"Authorization": f"Bearer {token}"}).json():
            requests.delete(f"{srv.url}/envs/{env['name']}", timeout=120,
                            headers={"Authorization": f"Bearer {token}"})
    finally:
        srv.stop(clean=False)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def secured_schema(secured):
    srv, _token = secured
    return schemathesis.openapi.from_url(srv.url + "/openapi.json")  # open, like /health


secured_api = schemathesis.pytest.from_fixture("secured_schema")
OPEN_PATHS = {"/health"}


@secured_api.parametrize()
@pytest.mark.slow
@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_with_tokens_unauthenticated_calls_are_401_and_none_is_5xx(case, secured):
    srv, token = secured
    CASES["secured"] = CASES.get("secured", 0) + 1
    anonymous = case.call(timeout=120, headers={"Authorization": ""})
    if case.path not in OPEN_PATHS:
        assert anonymous.status_code == 401, (
            f"{case.method} {case.formatted_path} without a token -> "
            f"{anonymous.status_code}: {anonymous.text[:300]}")
    admin = case.call(timeout=120, headers={"Authorization": f"Bearer {token}"})
    assert admin.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {admin.status_code}: {admin.text[:500]}\n"
        f"reproduce: {case.as_curl_command()}")
