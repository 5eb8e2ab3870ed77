"""Native mode (`--tt-native`): test functions run inside each VM's own Python.

The controller ships the project (rootdir, minus VCS and caches) and the host's pure-Python
pytest into every VM once, and starts a fork server there (native_zygote.py) that has
pytest imported. Each test × OS item then runs `pytest NODEID` in its VM — a fork of that
server, or a fresh `python3 -m pytest` if it is not running — and the phase reports it
writes (native_inner.py) become ordinary host reports with the OS in the id. A VM that
hangs gives an error report with its console tail at the deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shlex
import tarfile
from pathlib import Path

import pytest

from ttclient.api import ApiError

from .session import SessionEnv, TTSetupError
from .vm import VM

REMOTE = "/root/ttnative"
LOG_MARK = "---TTNATIVE-LOG---"
ZYGOTE = f"{REMOTE}/zygote"  # .fifo, .pid, .log of the fork server (native_zygote.py)
START_ZYGOTE = (f"(PYTHONPATH={REMOTE}/site setsid python3 {REMOTE}/site/ttnative_zygote.py "
                f"{ZYGOTE}.fifo </dev/null >{ZYGOTE}.log 2>&1 & echo $! >{ZYGOTE}.pid)")
SHIPPED_PACKAGES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py")
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "venv",
             "node_modules", ".tox", "build", "dist"}


def _package_path(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin) if spec.origin else None


def _filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
        return None
    if info.name.endswith((".pyc", ".qcow2", ".raw", ".img")):
        return None
    return info


def bundle(rootdir: Path) -> bytes:
    """A tar of the project and of pytest itself (the guest image has no pip or network)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(rootdir, arcname="project", filter=_filter)
        for name in SHIPPED_PACKAGES:
            path = _package_path(name)
            if path is not None:
                tar.add(path, arcname=f"site/{path.name}", filter=_filter)
        for helper in ("native_inner", "native_zygote"):
            tar.add(Path(__file__).with_name(f"{helper}.py"), arcname=f"site/tt{helper}.py")
    return buf.getvalue()


def ship(env: SessionEnv, rootdir: Path, fork_server: bool = True) -> None:
    """Copy the bundle into every VM and start the fork server there (unless each test is
    to get a fresh interpreter); TTSetupError says what failed (the run stops)."""
    try:
        _ship(env, bundle(rootdir), START_ZYGOTE if fork_server else "true")
    except ApiError as exc:
        raise TTSetupError(f"native mode: could not copy the project: {exc}") from exc


def _ship(env: SessionEnv, data: bytes, then: str) -> None:
    client = env.client
    reply = client.push(env.name, f"{REMOTE}.tar.gz", data)
    errors = [r["error"] for r in reply["results"] if r["error"]]
    if errors:
        raise TTSetupError(f"native mode: could not copy the project: {errors[0]}")
    res = client.run(env.name, f"rm -rf {REMOTE} && mkdir -p {REMOTE} && "
                               f"tar -xzf {REMOTE}.tar.gz -C {REMOTE} && {then}",
                     timeout=300)
    bad = [r for r in res["results"] if r["exit_code"] != 0]
    if bad:
        raise TTSetupError(f"native mode: unpacking failed on {bad[0]['vm']}: "
                           f"{bad[0]['stderr'] or bad[0]['error']}")


def _run_command(nodeid: str, tag: str, timeout: float) -> str:
    """Shell that runs one node id in the VM and prints its reports, LOG_MARK, and the tail
    of its output: through the fork server when it runs (pytest already imported),
    else as a fresh `python3 -m pytest`."""
    args = ["-q", "-p", "no:cacheprovider", "-p", "ttnative_inner", "--color=no",
            "-c", "/dev/null", "--rootdir", ".", nodeid]
    request = json.dumps({"args": args, "cwd": f"{REMOTE}/project", "timeout": timeout})
    direct = (f"cd {REMOTE}/project && TTNATIVE_RESULT=$T.jsonl PYTHONPATH={REMOTE}/site "
              f"python3 -m pytest {shlex.join(args)} >$T.log 2>&1")
    return f"""Z={ZYGOTE}; T={tag}
rm -f $T.jsonl $T.log $T.ack; printf '%s' {shlex.quote(request)} >$T.req; mkfifo $T.ack
alive() {{ kill -0 "$(cat $Z.pid 2>/dev/null)" 2>/dev/null; }}
while [ ! -p $Z.fifo ] && alive; do sleep 0.1; done  # it is still importing pytest
if [ -p $Z.fifo ] && alive && timeout 5 sh -c 'echo "$0" >"$1"' $T $Z.fifo; then
  cat $T.ack >/dev/null  # end-of-file when the forked run ends, however it ends
else
  {direct}
fi
cat $T.jsonl 2>/dev/null; echo {LOG_MARK}; tail -n 40 $T.log"""


def inner_nodeid(item: pytest.Item, our_id: str) -> str:
    """The item's node id as the VM's pytest knows it (without our OS parameter)."""
    nodeid = item.nodeid
    if not nodeid.endswith("]") or "[" not in nodeid:
        return nodeid
    head, _, params = nodeid[:-1].partition("[")
    if params == our_id:
        return head
    if params.endswith("-" + our_id):
        return f"{head}[{params[: -len(our_id) - 1]}]"
    if params.startswith(our_id + "-"):
        return f"{head}[{params[len(our_id) + 1:]}]"
    return nodeid


def _unfinished_phase(reports: list[dict]) -> str:
    """The phase a run that ended early was in, given the reports it wrote."""
    if not reports:
        return "setup"
    setup_passed = reports[0]["outcome"] == "passed"
    return "call" if len(reports) == 1 and setup_passed else "teardown"


def run_item(item: pytest.Item, vm: VM, our_id: str, timeout: float) -> bool:
    """Run one item in its VM and log the reports; returns True (the protocol is done)."""
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    nodeid = inner_nodeid(item, our_id)
    cmd = _run_command(nodeid, f"{REMOTE}/run-{abs(hash(item.nodeid))}", timeout)
    reports: list[dict] = []
    problem = ""
    try:
        res = vm.run(cmd, timeout=timeout)
        if res.timed_out:
            problem = f"native run on {vm.name} timed out after {timeout:.0f}s"
        else:
            out, _, log = res.stdout.partition(LOG_MARK)
            reports = [json.loads(line) for line in out.splitlines() if line.strip()]
            if not reports:
                problem = (f"native run of {nodeid!r} on {vm.name} produced no report; "
                           f"its pytest said:\n{log.strip()}")
            elif reports[-1]["when"] != "teardown":
                problem = (f"native run of {nodeid!r} on {vm.name} ended during its "
                           f"{_unfinished_phase(reports)} (the test process was killed, or "
                           f"the VM ran out of memory); its pytest said:\n{log.strip()}")
    except Exception as exc:  # a dead VM must give an error report, never a hang
        problem = f"native run on {vm.name} failed: {exc}"
    if problem:
        with contextlib.suppress(Exception):
            problem += f"\n---- console tail of {vm.name} ----\n{vm.console_tail(30)}"
        reports.append({"when": _unfinished_phase(reports), "outcome": "failed",
                        "longrepr": problem, "skip_reason": "", "duration": 0.0,
                        "sections": []})
    for r in reports:
        longrepr: object = r["longrepr"] or None
        if r["outcome"] == "skipped":
            longrepr = (str(item.path), item.location[1], r["skip_reason"] or "skipped")
        rep = pytest.TestReport(
            nodeid=item.nodeid, location=item.location, keywords=dict(item.keywords),
            outcome=r["outcome"], longrepr=longrepr, when=r["when"],
            sections=[tuple(s) for s in r["sections"]], duration=r["duration"])
        ihook.pytest_runtest_logreport(report=rep)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
