"""NoCloud seed disks for imported cloud images: a tiny FAT volume labelled CIDATA with
`meta-data` and `user-data`, attached as the VM's second disk. cloud-init finds it on its
first boot and sets the hostname and root's SSH keys (ttstack's own key and the user's).

Made with mkfs.vfat and mcopy: no mount, no loop device. The guest agent cannot be
installed offline, so it must be in the image; the seed only makes sure it runs.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from ..host import storage

SEED = "seed.img"
SEED_KIB = 1024


def user_data(hostname: str, keys: list[str]) -> str:
    """The cloud-config text (JSON after `#cloud-config`): hostname, root's authorized
    `keys`, ed25519 host keys only, C.UTF-8 locale, and the guest agent started."""
    # JSON is YAML: no YAML writer needed, and no quoting surprises in keys
    config = {
        "hostname": hostname, "manage_etc_hosts": True, "disable_root": False,
        "ssh_pwauth": False, "ssh_authorized_keys": keys,
        # RSA host keys take ~40 s to generate under TCG: ed25519 only
        "ssh_genkeytypes": ["ed25519"],
        # always present (glibc), nothing to generate; images' default (en_US) may not be
        "locale": "C.UTF-8",
        "runcmd": [["sh", "-c", "systemctl start qemu-guest-agent || true"]],
    }
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def make_seed(vm_dir: Path, instance_id: str, hostname: str, keys: list[str], uid: int,
              gid: int) -> Path:
    """Write the NoCloud seed image `seed.img` (1 MiB FAT, label CIDATA) into `vm_dir`,
    owned by uid:gid; its path. CalledProcessError when mkfs.vfat or mcopy fails."""
    seed = vm_dir / SEED
    seed.unlink(missing_ok=True)
    subprocess.run(["mkfs.vfat", "-n", "CIDATA", "-C", str(seed), str(SEED_KIB)],
                   check=True, capture_output=True, timeout=60)
    with tempfile.TemporaryDirectory() as tmp:
        meta, user = Path(tmp) / "meta-data", Path(tmp) / "user-data"
        meta.write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
        user.write_text(user_data(hostname, keys))
        subprocess.run(["mcopy", "-i", str(seed), str(meta), str(user), "::/"],
                       check=True, capture_output=True, timeout=60)
    storage.set_owner(seed, uid, gid)
    return seed
