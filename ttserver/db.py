"""SQLite state under --cfgdb-path: ENVs, their VMs and the host ports they hold.

Everything the server needs to find (and clean) after a restart is written here *before*
the thing is created, so a crash leaves a record to reconcile rather than an orphan.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DiskFull
from .host.ports import PortMap

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS envs (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    spec TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    env TEXT NOT NULL REFERENCES envs(name),
    idx INTEGER NOT NULL,
    image TEXT NOT NULL,
    cpu INTEGER NOT NULL,
    mem_mib INTEGER NOT NULL,
    disk_mib INTEGER NOT NULL,
    state TEXT NOT NULL,
    domain TEXT NOT NULL,
    dir TEXT NOT NULL,
    ssh_port INTEGER NOT NULL,
    forwards TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    boot_seconds REAL,
    boot_mode TEXT NOT NULL DEFAULT '',
    net_addr TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS vms_env ON vms(env);
"""
# Schema changes after version 1: {version: statements}, applied in order, each once.
# Add a step here (and bump SCHEMA_VERSION) instead of editing SCHEMA for old DBs.
MIGRATIONS: dict[int, list[str]] = {}
SCHEMA_VERSION = 1


class NewerSchema(RuntimeError):
    """The state DB was written by a newer ttserver."""


@dataclass
class VMRow:
    """One row of the `vms` table: a VM of an ENV, its sizes (MiB), state, libvirt domain,
    directory and the host ports it holds."""

    id: str
    env: str
    idx: int
    image: str
    cpu: int
    mem_mib: int
    disk_mib: int
    state: str
    domain: str
    dir: str
    ssh_port: int
    forwards: PortMap  # without SSH (ssh_port)
    error: str = ""
    boot_seconds: float | None = None
    boot_mode: str = ""  # cold | warm | container
    net_addr: str = ""  # its address on the bridge (--network bridge), else ""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VMRow:
        """The row as a VMRow, `forwards` decoded from its JSON text to {guest port: host
        port} ints."""
        data = dict(row)
        data["forwards"] = {int(k): int(v) for k, v in json.loads(data["forwards"]).items()}
        return cls(**data)


@dataclass
class EnvRow:
    """One row of the `envs` table (times in seconds since the epoch, `spec` the admitted
    request as a dict); `vms` is filled by StateDB, in index order."""

    name: str
    owner: str
    state: str
    created_at: float
    expires_at: float
    spec: dict
    error: str = ""
    vms: list[VMRow] = field(default_factory=list)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EnvRow:
        """The row as an EnvRow, `spec` decoded from its JSON text; `vms` left empty."""
        data = dict(row)
        data["spec"] = json.loads(data["spec"])
        return cls(**data)


class StateDB:
    """The state DB at `path` (created, or migrated to SCHEMA_VERSION, on open; NewerSchema
    when a newer ttserver wrote it). Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # 0600: ENV specs hold users' SSH keys and owners; SQLite gives its -wal and -shm
        # files the database file's mode
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        """Bring the DB to `SCHEMA_VERSION`, counted in SQLite's `PRAGMA user_version`.
        Version 0 is any DB before versioning (its columns are checked one by one);
        each later step runs once, in a transaction with its version bump. A DB from a
        newer server is refused (NewerSchema) rather than misread."""
        with self.transaction() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise NewerSchema(f"the state DB {self.path} has schema version {version}; "
                                  f"this ttserver knows up to {SCHEMA_VERSION}: run the "
                                  "newer ttserver, or start with another --cfgdb-path")
            if version == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                cols = {r["name"] for r in c.execute("PRAGMA table_info(vms)")}
                for name in ("boot_mode", "net_addr"):  # added before versioning
                    if name not in cols:
                        c.execute(f"ALTER TABLE vms ADD COLUMN {name} TEXT NOT NULL DEFAULT ''")
                version = 1
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    c.execute(statement)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one `BEGIN IMMEDIATE` transaction, holding the DB's lock:
        committed on exit, rolled back (and the exception re-raised) on any error."""
        with self._lock, self._full_disk():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _full_disk(self) -> Iterator[None]:
        """SQLite's "database or disk is full" as DiskFull (507) naming the directory."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):
                raise
            raise DiskFull(f"the server's disk is full ({self.path.parent}): nothing can be "
                           "recorded; the operator must free space there") from exc

    def server_id(self) -> str:
        """A short id unique to this state DB; prefixes every libvirt domain we create, so
        several ttservers can share one libvirtd without touching each other's VMs."""
        with self.transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE key='server_id'").fetchone()
            if row:
                return row["value"]
            sid = secrets.token_hex(3)
            c.execute("INSERT INTO meta(key, value) VALUES ('server_id', ?)", (sid,))
            return sid

    # ENVs -------------------------------------------------------------------------------
    def insert_env(self, c: sqlite3.Connection, env: EnvRow) -> None:
        """Insert the ENV's row (not its VMs) through `c`, a connection from transaction();
        sqlite3.IntegrityError when the name is taken."""
        c.execute("INSERT INTO envs(name, owner, state, created_at, expires_at, spec, error)"
                  " VALUES (?,?,?,?,?,?,?)",
                  (env.name, env.owner, env.state, env.created_at, env.expires_at,
                   json.dumps(env.spec), env.error))

    def insert_vm(self, c: sqlite3.Connection, vm: VMRow) -> None:
        """Insert the VM's row through `c`, a connection from transaction()."""
        c.execute("INSERT INTO vms(id, env, idx, image, cpu, mem_mib, disk_mib, state, domain,"
                  " dir, ssh_port, forwards, error, boot_seconds, boot_mode, net_addr)"
                  " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  (vm.id, vm.env, vm.idx, vm.image, vm.cpu, vm.mem_mib, vm.disk_mib, vm.state,
                   vm.domain, vm.dir, vm.ssh_port, json.dumps(vm.forwards), vm.error,
                   vm.boot_seconds, vm.boot_mode, vm.net_addr))

    def get_env(self, name: str) -> EnvRow | None:
        """The ENV with its VMs (in index order), or None when there is no such ENV."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM envs WHERE name=?", (name,)).fetchone()
            if not row:
                return None
            env = EnvRow.from_row(row)
            env.vms = self.vms_of(name)
            return env

    def name_like(self, name: str) -> str | None:
        """The ENV name on record that equals `name` ignoring case, or None: hostnames
        (ENV-IDX) and `tt env get`'s folders do not tell case apart."""
        with self._lock:
            row = self._conn.execute("SELECT name FROM envs WHERE name=? COLLATE NOCASE",
                                     (name,)).fetchone()
            return row[0] if row else None

    def vms_of(self, env: str) -> list[VMRow]:
        """The VM rows of ENV `env`, in index order; [] for an unknown ENV."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM vms WHERE env=? ORDER BY idx", (env,))
            return [VMRow.from_row(r) for r in rows.fetchall()]

    def list_envs(self) -> list[EnvRow]:
        """Every ENV with its VMs, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM envs ORDER BY created_at").fetchall()
            envs = [EnvRow.from_row(r) for r in rows]
        for env in envs:
            env.vms = self.vms_of(env.name)
        return envs

    def count_envs(self) -> int:
        """How many ENVs are on record, in any state."""
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM envs").fetchone()[0]

    def all_vms(self) -> list[VMRow]:
        """Every VM row on record, of every ENV, in no particular order."""
        with self._lock:
            return [VMRow.from_row(r) for r in self._conn.execute("SELECT * FROM vms")]

    def set_env(self, name: str, **fields: object) -> None:
        """Update the named columns of the ENV's row (`spec` given as a dict); no error when
        there is no such ENV."""
        if "spec" in fields:
            fields["spec"] = json.dumps(fields["spec"])
        self._update("envs", "name", name, fields)

    def set_vm(self, vm_id: str, **fields: object) -> None:
        """Update the named columns of the VM's row (`forwards` given as a dict); no error
        when there is no such VM."""
        if "forwards" in fields:
            fields["forwards"] = json.dumps(fields["forwards"])
        self._update("vms", "id", vm_id, fields)

    def _update(self, table: str, key: str, value: str, fields: dict[str, object]) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._conn.execute(f"UPDATE {table} SET {cols} WHERE {key}=?",
                               (*fields.values(), value))

    def delete_vm(self, vm_id: str) -> None:
        """Delete one VM's row (its ENV stays)."""
        with self.transaction() as c:
            c.execute("DELETE FROM vms WHERE id=?", (vm_id,))

    def delete_env(self, name: str) -> None:
        """Delete the ENV's row and its VMs' rows, in one transaction."""
        with self.transaction() as c:
            c.execute("DELETE FROM vms WHERE env=?", (name,))
            c.execute("DELETE FROM envs WHERE name=?", (name,))

    def used(self) -> dict[str, int]:
        """CPU, memory and disk held by every VM on record (booting ones included); a
        stopped VM holds only its disk."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN state='stopped' THEN 0 ELSE cpu END),0) cpu,"
                " COALESCE(SUM(CASE WHEN state='stopped' THEN 0 ELSE mem_mib END),0) mem,"
                " COALESCE(SUM(disk_mib),0) disk FROM vms").fetchone()
        return {"cpu": row["cpu"], "mem_mib": row["mem"], "disk_mib": row["disk"]}

    def held_by(self, owner: str) -> dict[str, int]:
        """What the ENVs of `owner` hold, stopped VMs included: {"vms", "mem_mib"}."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) vms, COALESCE(SUM(mem_mib),0) mem FROM vms"
                " WHERE env IN (SELECT name FROM envs WHERE owner=?)", (owner,)).fetchone()
        return {"vms": row["vms"], "mem_mib": row["mem"]}

    def used_ports(self) -> set[int]:
        """Every host port a VM on record holds: SSH ports and forwards."""
        ports: set[int] = set()
        for vm in self.all_vms():
            ports.add(vm.ssh_port)
            ports.update(vm.forwards.values())
        return ports
