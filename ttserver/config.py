"""Server settings, filled from the command line (ttserver/cli.py takes its defaults
from here: each default is stated once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttclient.rules import MAX_LIFE_TIME


@dataclass
class ServerConfig:
    """The server's settings (sizes in MiB, times in seconds), as ttserver/cli.py fills them
    from its options."""

    image_path: Path
    cfgdb_path: Path
    cpu_total: int
    mem_total_mib: int = 4096
    disk_total_mib: int = 40960
    serv_addr: str = "127.0.0.1"
    serv_port: int = 20000
    accel: str = "auto"
    port_first: int = 40000
    port_last: int = 49999
    boot_timeout: float = 300.0
    run_output_cap: int = 64 << 20  # bytes kept of each output stream of a run
    default_life_time: int = 6 * 3600
    max_life_time: int = MAX_LIFE_TIME
    libvirt_uri: str = "qemu:///system"
    reap_interval: float = 2.0
    # QEMU user networking with restrict=on cuts every VM off the outside unless the
    # operator opts in; an ENV may still deny it (`deny_outgoing`).
    allow_outgoing: bool = False
    # ENVs boot from memory snapshots of their image unless they ask otherwise
    warm_clones: bool = True
    # a directory shared with other servers' templates (hard links; see warm/snapshots.py)
    template_cache: Path | None = None
    # user: QEMU user networking per VM (no host set-up, ports by QEMU hostfwd);
    # bridge: a Linux bridge, TAPs, nftables port MAP and dnsmasq (see host/bridge.py)
    network: str = "user"
    storage: str = "auto"  # auto | qcow2 | btrfs | zfs (see host/storage.py)
    bridge_name: str = "ttbr0"
    # per-token limits (tokens that are not admin tokens; None: only the server's totals):
    # VMs and memory (MiB) of every ENV on record that the token created, stopped included
    token_max_vms: int | None = None
    token_max_mem_mib: int | None = None
    bridge_subnet: str = "10.213.0.0/24"
    # MiB of translated code each TCG guest's QEMU may keep (QEMU's tb-size; 0: QEMU's
    # default, an eighth of host RAM up to 1 GiB): see docs/decisions.md, 76
    tcg_tb_cache_mib: int = 0
    # cold boots running at once, server-wide (0: one per host CPU; see vm/boot.py)
    cold_boots: int = 0
    # the image engines whose images this server offers: qemu (VMs), lxc (containers,
    # which share the host's kernel: the operator turns them on; docs/operator.md)
    engines: tuple[str, ...] = ("qemu",)

    @property
    def db_file(self) -> Path:
        """The SQLite state DB: `ttserver.sqlite` under --cfgdb-path."""
        return self.cfgdb_path / "ttserver.sqlite"

    @property
    def vms_path(self) -> Path:
        """The directory holding one directory per VM: `vms` under --cfgdb-path."""
        return self.cfgdb_path / "vms"

    @property
    def ssh_key(self) -> Path:
        """The server's private SSH key for guests: `ssh/id_ed25519` under --cfgdb-path."""
        return self.cfgdb_path / "ssh" / "id_ed25519"

    @property
    def forward_addr(self) -> str:
        """Where forwarded ports listen: the API's address (0.0.0.0 means every address)."""
        return self.serv_addr

    @property
    def connect_addr(self) -> str:
        """Where the server itself reaches forwarded ports."""
        return "127.0.0.1" if self.serv_addr in ("0.0.0.0", "") else self.serv_addr
