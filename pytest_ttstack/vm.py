"""The `tt_vm` object tests receive: one VM of the session's ENV, of the current matrix OS."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from ttclient.api import ApiError, Client
from ttclient.waiting import WaitTimeout, wait_for

SSH_PORT = 22
_V6_LOOPBACK = "0" * 24 + "01000000"  # ::1 as /proc/net/tcp6 writes it
_V4_MAPPED = "0000000000000000FFFF0000"  # ::ffff:a.b.c.d


def listener(proc_net_tcp: str, port: int) -> str | None:
    """What listens on TCP `port`, from the text of the guest's /proc/net/tcp and tcp6:
    "reachable" (a LISTEN socket on an address other than loopback: the wildcard or the
    guest's own), "loopback" (only 127.0.0.0/8 or ::1, which a forwarded port cannot
    reach: QEMU's user networking and the bridge both connect to the guest's address),
    or None. Source: the kernel's proc(5) format, addresses as hex words in host byte
    order (little-endian here: 127.0.0.1 is 0100007F)."""
    found = None
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A" or ":" not in fields[1]:
            continue
        addr, _, hexport = fields[1].partition(":")
        if not all(c in "0123456789ABCDEFabcdef" for c in hexport) or int(hexport, 16) != port:
            continue
        addr = addr.upper()
        v4 = addr if len(addr) == 8 else addr[24:] if addr.startswith(_V4_MAPPED) else None
        if (v4 is not None and v4.endswith("7F")) or addr == _V6_LOOPBACK:
            found = found or "loopback"
        else:
            return "reachable"
    return found


@dataclass(frozen=True)
class RunResult:
    """A command's outcome in one VM: exit code (None when it did not finish, 128+n when
    signal n ended it), output as text (bytes when run with `binary=True`), whether it
    timed out, its seconds, the signal, and whether the server's output cap cut a stream
    — the fields of the API's CommandResult (ttclient/contract.py) a test needs, with
    the same names."""

    exit_code: int | None
    stdout: str | bytes
    stderr: str | bytes
    timed_out: bool = False
    seconds: float = 0.0
    signal: int | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.exit_code == 0

    def check(self) -> RunResult:
        """Raise CommandFailed unless the command exited 0 (like subprocess's check=True)."""
        if not self.ok:
            raise CommandFailed(self)
        return self


class CommandFailed(AssertionError):
    """An assertion error for a command that did not exit 0; the message has its exit code
    (or timeout) and output, `result` the RunResult."""

    def __init__(self, result: RunResult) -> None:
        what = ("timed out" if result.timed_out else f"exited {result.exit_code}"
                + (f" (signal {result.signal})" if result.signal else ""))
        super().__init__(f"command {what}\nstdout:\n{result.stdout!s}\n"
                         f"stderr:\n{result.stderr!s}")
        self.result = result


class VM:
    """A handle on one VM; every call goes through the ttserver (or ttproxy) API."""

    def __init__(self, client: Client, env_name: str, view: dict) -> None:
        self._client = client
        self.env_name = env_name
        self.id: str = view["id"]
        self.name: str = view["name"]
        self.image: str = view["image"]
        self.os: str = view["os"]
        self.arch: str = view["arch"]
        self.ssh_host: str = view["ssh_host"]
        self.ssh_port: int = view["ssh_port"]
        # guest port -> host port; port() adds to it
        self.ports: dict[int, int] = {int(k): v for k, v in view.get("ports", {}).items()}

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.image} ssh={self.ssh_host}:{self.ssh_port}>"

    def run(self, cmd: str, timeout: float = 600, check: bool = False,
            use_ssh: bool = False, binary: bool = False) -> RunResult:
        """Run a shell command line in the VM (the guest's /bin/sh interprets it);
        `binary`: stdout and stderr as the exact bytes printed. RuntimeError (with the
        VM's console tail) when the VM cannot run it; CommandFailed with `check`."""
        reply = self._client.run(self.env_name, cmd, use_ssh=use_ssh, timeout=timeout,
                                 vms=[self.id], binary=binary)
        r = reply["results"][0]
        if r.get("error"):
            raise RuntimeError(f"{self.name}: {r['error']}")
        out: str | bytes = r["stdout"]
        err: str | bytes = r["stderr"]
        if binary:
            out, err = (base64.b64decode(r.get(k) or "") for k in ("stdout_b64", "stderr_b64"))
        result = RunResult(r["exit_code"], out, err, r["timed_out"], r["seconds"],
                           r.get("signal"), r.get("truncated", False))
        return result.check() if check else result

    def port(self, guest_port: int | str) -> tuple[str, int]:
        """(host, port) that reaches TCP `guest_port` (1-65535, an int or its digits) of
        this VM from here: for 22, the SSH forward every VM has; for another port the
        first call asks the server to forward it (for every VM of the ENV: forwards are
        per ENV), later calls answer from the handle. ValueError for a port that is not a
        number; ApiError when the server refuses (out of range, the ENV's 32-port limit)."""
        try:
            port = int(guest_port)
        except (TypeError, ValueError):
            raise ValueError(f"port {guest_port!r}: give a guest TCP port number") from None
        if port == SSH_PORT:
            return self.ssh_host, self.ssh_port
        if port not in self.ports:
            try:
                view = self._client.update_env(self.env_name, add_ports=[port])
            except ApiError:  # another worker may have added it a moment ago
                view = self._client.get_env(self.env_name)
                if str(port) not in next(v for v in view["vms"]
                                         if v["id"] == self.id).get("ports", {}):
                    raise
            mine = next(v for v in view["vms"] if v["id"] == self.id)
            self.ports = {int(k): v for k, v in mine.get("ports", {}).items()}
        return self.ssh_host, self.ports[port]

    def wait_for_port(self, guest_port: int | str, timeout: float = 60) -> tuple[str, int]:
        """Wait until a service listens on TCP `guest_port` in the guest on an address a
        forwarded port reaches (see `listener`; read from /proc/net/tcp and tcp6 through
        `run`), then `port(guest_port)`. A connect from here alone proves nothing: QEMU's
        user networking accepts on the host port whether or not anything listens in the
        guest. WaitTimeout after `timeout` seconds; its message says when the service
        listens on loopback only (bind it to 0.0.0.0 or ::)."""
        port = int(guest_port)
        seen: list[str | None] = [None]

        def check() -> bool | None:
            result = self.run("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", timeout=30)
            seen[0] = listener(str(result.stdout), port)
            return True if seen[0] == "reachable" else None

        what = f"{self.name}: a service listening on guest port {port}"
        try:
            wait_for(check, timeout, what=what)
        except WaitTimeout:
            if seen[0] != "loopback":
                raise
            raise WaitTimeout(f"{what} (it listens on loopback only, 127.0.0.1 or ::1, "
                              "which forwarded ports cannot reach: bind it to 0.0.0.0 or ::)",
                              timeout) from None
        return self.port(port)

    def put(self, local: str | Path, remote: str, mode: int | None = None) -> None:
        """Copy a local file to `remote` (an absolute path) in this VM."""
        data = Path(local).read_bytes()
        reply = self._client.push(self.env_name, remote, data, mode=mode, vms=[self.id])
        errors = [r["error"] for r in reply["results"] if r["error"]]
        if errors:
            raise RuntimeError(f"{self.name}: put {remote}: {errors[0]}")

    def get(self, remote: str, local: str | Path) -> Path:
        """Copy `remote` from this VM to `local` (a file path, or a directory to put it in)."""
        dest = Path(local)
        if dest.is_dir():
            dest = dest / Path(remote).name
        dest.write_bytes(self._client.pull(self.env_name, self.id, remote))
        return dest

    def console_tail(self, lines: int = 50) -> str:
        """The last `lines` lines of the VM's serial console, as text; ApiError when the
        server cannot give it."""
        return self._client.console(self.env_name, self.id, lines)
