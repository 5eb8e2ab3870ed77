"""What a request may hold, checked alike by both daemons and by `tt` before it sends
anything: ENV names (also URL path segments), VM references (a VM's name, id or index),
VMs per ENV, vCPUs per VM. Standard library only: the `tt` client, the plugin and both
daemons share it (contract.py, which needs pydantic, builds its models on these).

A name is checked before it is put in a path, so `tt env show ../status` is refused with
the rule instead of reaching another endpoint (dot segments are resolved by the HTTP
client before a request leaves).
"""

from __future__ import annotations

import re
from urllib.parse import quote

# fullmatch only: "$" would let a trailing "\n" through
ENV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
ENV_NAME_RULE = "1-40 letters, digits, '-' or '_', starting with a letter or digit"

# VMs one ENV may hold, in all (vm_number per image times the images matched), as the
# original TTstack allowed; below it the server's CPU, memory, disk and port pool decide.
MAX_VMS_PER_ENV = 500
MAX_CPUS = 64  # vCPUs per VM
MAX_PORTS = 32  # forwarded guest ports per ENV (each VM gets them all), besides SSH
MAX_LIFE_TIME = 7 * 24 * 3600  # seconds an ENV may live from its creation
# how an OpenSSH public key line starts: the key types authorized_keys takes (sshd(8),
# AUTHORIZED_KEYS FILE FORMAT)
KEY_TYPES = ("ssh-", "ecdsa-", "sk-")

# VM names are ENV-IDX, ids are made of the same characters, indexes are digits
VM_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


def env_name_error(name: str) -> str:
    """"" when `name` is a valid ENV name, else the message saying what to change."""
    return "" if ENV_NAME.fullmatch(name) else f"ENV name {name!r}: use {ENV_NAME_RULE}"


def vm_ref_error(ref: str) -> str:
    """"" when `ref` can name a VM (a name, id or index), else the message."""
    return "" if VM_REF.fullmatch(ref) else (
        f"VM {ref!r}: give a VM's name (ENV-0), id or index (0, 1, ...)")


def path_segment(text: str) -> str:
    """`text` as one URL path segment (percent-quoted); ValueError for what no server
    path segment can be: "", "." or ".." (an HTTP client resolves those away)."""
    if text in ("", ".", ".."):
        raise ValueError(f"{text!r} cannot name an ENV or a VM")
    return quote(text, safe="")


def name_taken_error(name: str, taken: str) -> str:
    """Why ENV `name` cannot be created while ENV `taken` (equal ignoring case) exists."""
    if taken == name:
        return f"ENV {name!r} already exists; delete it or pick another name"
    return (f"ENV {taken!r} exists: names must differ in more than case (hostnames ignore "
            "it); pick another name")


def env_size_error(vm_number: int, images: int) -> str:
    """"" when `vm_number` VMs of each of `images` images fit in one ENV, else the
    message saying what to change."""
    if vm_number * images <= MAX_VMS_PER_ENV:
        return ""
    return (f"an ENV holds at most {MAX_VMS_PER_ENV} VMs; {vm_number} per image x "
            f"{images} matched image(s) is {vm_number * images}: lower vm_number or "
            "match fewer images")
