"""Start real ttserver processes for tests and check hosts for leftovers."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests

from ttclient.api import ENV_POLL_BACKOFF, ENV_POLL_FIRST, ENV_POLL_MAX, TRANSIENT_STATES
from ttclient.waiting import WaitTimeout, wait_for

IMAGE_PATH = Path(os.environ.get("TTSTACK_IMAGE_PATH", "/var/lib/ttstack/images"))
RUNS_PATH = Path(os.environ.get("TTSTACK_TEST_RUNS", "/var/lib/ttstack/test-runs"))
# warm-clone templates shared by the suite's servers (kept between runs: each server checks
# an entry against its image's fingerprint before it imports it)
TEMPLATE_CACHE = RUNS_PATH / "template-cache"

# What the suite's child pytest runs (subprocesses, pytester, their xdist workers) get in
# PYTEST_ADDOPTS: the plugins of our own test tools left out. schemathesis and hypothesis
# (test_fuzz) load at every pytest start, ~4 of the ~5.5 s each child run took on a 2-core
# TCG host (`python3 -X importtime -m pytest --co`); a project using ttstack has neither.
CHILD_PYTEST_ADDOPTS = "-p no:schemathesis -p no:hypothesispytest -p no:benchmark"


def free_port() -> int:
    """A free loopback port for a test daemon's API, drawn from 22000-29999: outside the
    kernel's ephemeral range (32768-60999) and so outside every forward range the tests
    give servers (41000-49999). A port the kernel picked (bind to 0) once landed in such
    a range and a leak check found it "listening"."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(22000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 22000-29999 on 127.0.0.1")


class DaemonProcess:
    """A daemon subprocess (ttserver or ttproxy) on loopback, started and awaited on its
    /health, with its output in `self.log`."""

    name = "daemon"
    host = "127.0.0.1"
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _launch(self, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {timeout}s:\n{self.log_tail()}")

    def _signal(self, sig: int, wait: float) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class ServerProcess(DaemonProcess):
    """A ttserver subprocess on loopback with its own state dir and port range."""

    name = "ttserver"

    def __init__(self, cfgdb: Path, image_path: Path = IMAGE_PATH, *,
                 extra: tuple[str, ...] = (), port: int | None = None,
                 port_range: str | None = None, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", prefix: tuple[str, ...] = (),
                 template_cache: Path | None = TEMPLATE_CACHE) -> None:
        self.host = host
        self.template_cache = template_cache
        self.prefix = list(prefix)  # e.g. nsenter into a network namespace
        self.cfgdb = cfgdb
        self.env = env
        self.image_path = image_path
        self.port = port or free_port()
        self.port_range = port_range or "41000-41999"
        self.extra = list(extra)
        self.token: str | None = None  # the API token delete_all_envs uses
        self.log = cfgdb.parent / f"{cfgdb.name}-server.log"

    def start(self, timeout: float = 60) -> ServerProcess:
        cmd = [*self.prefix, sys.executable, "-m", "ttserver.cli",
               "--image-path", str(self.image_path),
               "--cfgdb-path", str(self.cfgdb), "--serv-addr", self.host,
               "--serv-port", str(self.port), "--port-range", self.port_range,
               "--cpu-total", "4", "--mem-total", "4G", "--disk-total", "40G",
               "--accel", "tcg", *self.extra]
        if self.template_cache is not None:
            cmd += ["--template-cache", str(self.template_cache)]
        if "--tokens-file" not in self.extra:  # the host's own tokens file is not the test's
            cmd.append("--insecure-no-auth")
        self._launch(cmd, timeout, self.env)
        self.sid = self.server_id()
        return self

    def delete_all_envs(self) -> None:
        """Test teardown: a failed test must not leave VMs running for the next one."""
        # a server with tokens lists and deletes what `self.token` (set by the test) owns
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            resp = requests.get(self.url + "/envs", timeout=10, headers=headers)
            resp.raise_for_status()
            for env in resp.json():
                requests.delete(f"{self.url}/envs/{env['name']}", timeout=120,
                                headers=headers)
        except requests.RequestException:
            pass

    def stop(self, sig: int = signal.SIGTERM, clean: bool = True) -> None:
        if self.proc and self.proc.poll() is None and sig == signal.SIGTERM and clean:
            self.delete_all_envs()
        elif clean and self.proc and self.proc.poll() is not None and getattr(self, "sid", None):
            # a test failed after stopping the server: its VMs must not outlive the test
            names = subprocess.run(["virsh", "list", "--name"], capture_output=True,
                                   text=True, timeout=60).stdout.split()
            for name in names:
                if name.startswith(f"tt-{self.sid}-"):
                    subprocess.run(["virsh", "destroy", name], capture_output=True, timeout=60)
        was_running = bool(self.proc and self.proc.poll() is None)
        self._signal(sig, 30)
        if was_running and sig == signal.SIGTERM and clean and getattr(self, "sid", None):
            # a stopped server leaves no domain at all: no VM, no template build
            left = [d for d in all_domains() if d.startswith(f"tt-{self.sid}-")]
            assert left == [], f"{self.name} left domains after its stop: {left}"

    def server_id(self) -> str:
        return requests.get(self.url + "/health", timeout=5).json()["server_id"]


def wait_env(url: str, name: str, timeout: float = 600, headers: dict | None = None) -> dict:
    """The ENV's view once it left `creating`/`starting`, polled as Client.wait_env does
    (0.2 s at first: most of the suite's VMs are warm clones, running in ~1.5 s)."""
    def settled() -> dict | None:
        env = requests.get(f"{url}/envs/{name}", timeout=10, headers=headers).json()
        return env if env["state"] not in TRANSIENT_STATES else None

    try:
        return wait_for(settled, timeout, interval=ENV_POLL_FIRST, backoff=ENV_POLL_BACKOFF,
                        max_interval=ENV_POLL_MAX, what=f"ENV {name}")
    except WaitTimeout:
        raise AssertionError(f"ENV {name} still creating after {timeout}s") from None


def create_env(srv: ServerProcess, name: str, prefixes: tuple[str, ...] | list[str] = (
        "debian-12",), **kw: object) -> dict:
    """POST an ENV of `prefixes` (and the fields `kw`) and wait until it runs; its view."""
    resp = requests.post(srv.url + "/envs", json={"name": name, "os_prefix": list(prefixes),
                                                  **kw}, timeout=30)
    assert resp.status_code == 202, resp.text
    env = wait_env(srv.url, name)
    assert env["state"] == "running", env["error"]
    return env


def run_cmd(srv: ServerProcess, name: str, cmd: str, **kw: object) -> list[dict]:
    """POST /envs/NAME/run of `cmd` (and the fields `kw`); the per-VM results."""
    resp = requests.post(f"{srv.url}/envs/{name}/run", json={"cmd": cmd, **kw}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def all_domains() -> list[str]:
    """Names of every libvirt domain on the host (any state)."""
    return subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                          capture_output=True, text=True, timeout=60).stdout.split()


def leftovers(server_id: str, cfgdb: Path, ports: list[int]) -> dict[str, list]:
    """Everything of this server's VMs that should be gone: domains, qemu processes, VM
    dirs, listening forwarded ports. Warm-clone template builds (`tt-<sid>-tpl-*`) are the
    server's background work, not a VM's: ServerProcess.stop() checks that they end."""
    tpl = f"tt-{server_id}-tpl-"
    domains = [d for d in all_domains()
               if d.startswith(f"tt-{server_id}-") and not d.startswith(tpl)]
    procs = [line.split()[0] for line in subprocess.run(
        ["pgrep", "-af", f"guest=tt-{server_id}-"], capture_output=True,
        text=True).stdout.splitlines() if f"guest={tpl}" not in line]
    vms_dir = cfgdb / "vms"
    dirs = sorted(p.name for p in vms_dir.iterdir()) if vms_dir.is_dir() else []
    listening = []
    for port in ports:
        with socket.socket() as s:
            s.settimeout(0.5)
            # a port in the kernel's ephemeral range can "connect" to itself (TCP
            # simultaneous open when the source port drawn equals it): not a listener
            if s.connect_ex(("127.0.0.1", port)) == 0 and s.getsockname() != s.getpeername():
                listening.append(port)
    # containers (the lxc engine): nspawn processes, mounts (overlay roots, disks), loop
    # devices and cgroups of this server's containers
    containers = [line.split()[0] for line in subprocess.run(
        ["pgrep", "-af", f"--machine=tt-{server_id}-"], capture_output=True,
        text=True).stdout.splitlines()]
    containers += [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                   if line.split()[1].startswith(f"{cfgdb}/vms/")
                   and line.split()[1].rsplit("/", 1)[-1] in ("root", "layer")]
    containers += [line for line in subprocess.run(["losetup", "-a"], capture_output=True,
                                                   text=True).stdout.splitlines()
                   if f"({cfgdb}/vms/" in line]
    containers += [str(d) for top in (Path("/sys/fs/cgroup/memory"),
                                      Path("/sys/fs/cgroup/systemd"), Path("/run/ttstack/cgroup2"))
                   for d in top.glob(f"ttstack-{server_id}/*") if d.is_dir()]
    return {"domains": domains, "processes": procs, "dirs": dirs, "ports": listening,
            "containers": containers}


def wait_templates(srv: ServerProcess, timeout: float) -> list[dict]:
    """Wait until `srv` builds no template (none started or all finished); its templates
    as /status lists them."""
    deadline = time.monotonic() + timeout
    while True:
        found = requests.get(srv.url + "/status", timeout=10).json()["templates"]
        if not any(t["state"] == "building" for t in found) or time.monotonic() > deadline:
            return found
        time.sleep(2)


def warm_template_cache(timeout: float = 900) -> list[dict]:
    """Fill TEMPLATE_CACHE with the default-shape template of every image under IMAGE_PATH
    (a server builds them at start; nothing to do when the cache has them); the templates
    /status lists. A build that fails only makes the suite's VMs boot cold."""
    run_dir = new_run_dir("warmup-")
    srv = ServerProcess(run_dir / "state", port_range="40500-40999").start()
    try:
        return wait_templates(srv, timeout)
    finally:
        srv.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


NOTHING_LEFT = {"domains": [], "processes": [], "dirs": [], "ports": [], "containers": []}


def add_token(tokens: Path, name: str, *flags: str) -> str:
    """A new API token `name` in the tokens file `tokens` (`ttserver token add`); the
    token's text."""
    proc = subprocess.run([sys.executable, "-m", "ttserver.cli", "token", "--tokens-file",
                           str(tokens), "add", name, *flags], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def new_run_dir(prefix: str = "") -> Path:
    """A state dir QEMU (running as libvirt-qemu) can reach; pytest's tmp dirs are 0700."""
    RUNS_PATH.mkdir(parents=True, exist_ok=True)
    RUNS_PATH.chmod(0o755)
    path = RUNS_PATH / f"{prefix}{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    return path


def tt(address: str | None, *args: str, config: str = "/nonexistent/tt.json",
       timeout: float = 120, owner: str | None = None, token: str | None = None,
       stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `tt` CLI against `address` with its own config file (owner, token)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TT_TOKEN", "TT_SERVER")}
    env["TT_CONFIG"] = config
    if address:
        env["TT_SERVER"] = address
    if owner:
        env["TT_OWNER"] = owner
    if token:
        env["TT_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "ttclient.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, input=stdin)


class ProxyProcess(DaemonProcess):
    """A ttproxy subprocess on loopback in front of `servers`."""

    name = "ttproxy"

    def __init__(self, servers: list[str], log_dir: Path, port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.servers = servers
        self.extra = list(extra)
        self.port = port or free_port()
        self.log = log_dir / f"proxy-{self.port}.log"

    def start(self, timeout: float = 30) -> ProxyProcess:
        self._launch([sys.executable, "-m", "ttproxy.cli", "--proxy-addr", self.address,
                      "--server-set", ",".join(self.servers), "--health-interval", "0.5",
                      *self.extra], timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self._signal(sig, 15)


def ip(*argv: str) -> None:
    """`ip ARGV...`, checked."""
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def veth_namespace(prefix: str, outer_addr: str, inner_addr: str) -> Iterator[tuple[str, str, str]]:
    """A network namespace made for the test, linked to this one by a veth pair (/24
    addresses `outer_addr` here, `inner_addr` there): yields (namespace, outer link, inner
    link); both go afterwards."""
    tag = secrets.token_hex(3)
    ns, outer, inner = f"{prefix}{tag}", f"{prefix}o{tag}", f"{prefix}i{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", ns)
        ip("addr", "add", f"{outer_addr}/24", "dev", outer)
        ip("link", "set", outer, "up")
        ip("-n", ns, "addr", "add", f"{inner_addr}/24", "dev", inner)
        ip("-n", ns, "link", "set", inner, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, outer, inner
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=30)
