"""One ENV view from the parts several servers hold (pure logic).

The proxy shows an ENV exactly as a ttserver would, plus `servers` (where its parts are)
and, per VM, `server`. A part on a server that does not answer shows its last known VMs
as `unreachable` and makes the ENV `degraded`, with an error that names the server.
"""

from __future__ import annotations

from dataclasses import dataclass

# what a mixed ENV is, most telling first: a part still booting makes the whole "creating"
PRECEDENCE = ("deleting", "failed", "creating", "starting", "stopping")


@dataclass
class Part:
    """The part of an ENV one server holds: its view (None if never seen) and, when the
    server is down, why."""

    address: str
    view: dict | None  # the server's view, or the last one seen if it is down
    down_error: str = ""  # non-empty: the server did not answer


@dataclass
class _Seen:
    address: str
    view: dict
    down_error: str


def merge_env(parts: list[Part]) -> dict:
    """The ENV view (a ttserver's shape plus `servers`) from its parts; ValueError when
    no part was ever seen."""
    known = [_Seen(p.address, p.view, p.down_error) for p in parts if p.view is not None]
    if not known:
        raise ValueError("no part of the ENV has ever been seen")
    first = known[0].view
    vms: list[dict] = []
    for p in known:
        for vm in p.view["vms"]:
            vm = {**vm, "server": p.address}
            if p.down_error:
                vm["state"] = "unreachable"
            vms.append(vm)
    vms.sort(key=lambda v: v.get("idx", 0))
    live = [p for p in known if not p.down_error]
    down = [p for p in parts if p.down_error]
    states = {p.view["state"] for p in live}
    errors = [f"server {p.address} is down ({p.down_error}); its VMs are unreachable"
              for p in down]
    errors += [p.view["error"] for p in live if p.view.get("error")]
    if down:
        state = "degraded"
    elif len(states) == 1:
        state = states.pop()
    else:
        state = next((s for s in PRECEDENCE if s in states), "degraded")
        if state == "degraded":
            errors.insert(0, "parts differ: " + ", ".join(
                f"{p.address} {p.view['state']}" for p in live))
    return {
        **first,
        "state": state,
        "error": "\n".join(errors),
        "created_at": min(p.view["created_at"] for p in known),
        "expires_at": min(p.view["expires_at"] for p in known),
        "server_id": "ttproxy",
        "servers": [p.address for p in parts],
        "vms": vms,
    }


def merge_results(replies: list[tuple[str, dict]], down: dict[str, list[dict]],
                  kind: str) -> list[dict]:
    """Merge per-server `results` lists (run or push), adding a result with an error for
    every VM on a server that is down, so nothing silently goes missing."""
    out: list[dict] = []
    for address, reply in replies:
        out += [{**r, "server": address} for r in reply["results"]]
    for address, vms in down.items():
        for vm in vms:
            base = {"vm": vm["name"], "id": vm["id"], "image": vm["image"], "server": address,
                    "error": f"server {address} is down"}
            if kind == "run":
                base.update(exit_code=None, signal=None, stdout="", stderr="", escaped=False,
                            stdout_b64=None, stderr_b64=None, stdout_bytes=0, stderr_bytes=0,
                            truncated=False, timed_out=False, seconds=0.0)
            else:
                base.update(bytes=0, seconds=0.0)
            out.append(base)
    return sorted(out, key=lambda r: _idx(r["vm"]))


def merge_status(members: list[tuple[str, dict | str]], env_count: int) -> dict:
    """The proxy's /status from its members' (address, their /status, or why they did not
    answer), in the members' order: resources summed over the servers that answered, a row
    per member (`address`, `health` up/down, its status or `error`), `servers_up`, the
    images of all (each with the `servers` having it) and `env_count` (ENVs the proxy
    knows, spanning ones counted once)."""
    rows: list[dict] = []
    images: dict[str, dict] = {}
    totals = dict.fromkeys(("cpu_total", "cpu_used", "mem_total_mib", "mem_used_mib",
                            "disk_total_mib", "disk_used_mib"), 0)
    for address, st in members:
        if not isinstance(st, dict):
            rows.append({"address": address, "health": "down", "error": st})
            continue
        rows.append({"address": address, "health": "up", **st})
        for key in totals:
            totals[key] += st[key]
        for img in st["images"]:
            merged = images.setdefault(img["name"], {**img, "servers": []})
            merged["servers"].append(address)
            if merged.get("digest") != img.get("digest"):  # builds differ: no one digest
                merged.pop("digest", None)
    return {"proxy": True, **totals, "env_count": env_count, "servers": rows,
            "servers_up": sum(r["health"] == "up" for r in rows),
            "images": [images[k] for k in sorted(images)]}


def may_see(view: dict, who: dict) -> bool:
    """Whether the caller `who` ({name, admin}, a server's whoami) may see an ENV part
    from the proxy's memory (its server is down, so no server decided): admins and the
    ENV's owner only; nobody when the caller has no name."""
    return bool(who.get("admin")) or bool(who.get("name")) and view.get("owner") == who["name"]


def _idx(vm_name: str) -> int:
    tail = vm_name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
