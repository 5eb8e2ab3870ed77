"""The state DB's schema versions (PRAGMA user_version): old state dirs are migrated in
place, a newer server's DB is refused with a message; plain SQLite, no server."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from ttserver.db import SCHEMA_VERSION, NewerSchema, StateDB

BEFORE_VERSIONING = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE envs (name TEXT PRIMARY KEY, owner TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    spec TEXT NOT NULL, error TEXT NOT NULL DEFAULT '');
CREATE TABLE vms (id TEXT PRIMARY KEY, env TEXT NOT NULL REFERENCES envs(name),
    idx INTEGER NOT NULL, image TEXT NOT NULL, cpu INTEGER NOT NULL,
    mem_mib INTEGER NOT NULL, disk_mib INTEGER NOT NULL, state TEXT NOT NULL,
    domain TEXT NOT NULL, dir TEXT NOT NULL, ssh_port INTEGER NOT NULL,
    forwards TEXT NOT NULL, error TEXT NOT NULL DEFAULT '', boot_seconds REAL);
INSERT INTO meta VALUES ('server_id', 'abc123');
INSERT INTO envs VALUES ('e', '', 'running', 1.0, 2.0, '{}', '');
INSERT INTO vms VALUES ('abc123-1', 'e', 0, 'qemu:debian-12:x86_64', 1, 512, 2048,
    'running', 'tt-abc123-1', '/v/abc123-1', 40000, '{"80": 40001}', '', 12.5);
"""


def version(path) -> int:
    with sqlite3.connect(path) as c:
        return c.execute("PRAGMA user_version").fetchone()[0]


def test_a_state_dir_from_before_versioning_is_migrated_in_place(tmp_path):
    path = tmp_path / "ttserver.sqlite"
    with sqlite3.connect(path) as c:
        c.executescript(BEFORE_VERSIONING)
    db = StateDB(path)
    assert version(path) == SCHEMA_VERSION
    assert db.server_id() == "abc123"
    (vm,) = db.all_vms()
    assert (vm.forwards, vm.boot_seconds, vm.boot_mode, vm.net_addr) == ({80: 40001}, 12.5,
                                                                         "", "")
    StateDB(path)  # opening again changes nothing
    assert version(path) == SCHEMA_VERSION


def test_a_new_state_dir_starts_at_the_current_version(tmp_path):
    StateDB(tmp_path / "new.sqlite")
    assert version(tmp_path / "new.sqlite") == SCHEMA_VERSION


def test_a_newer_servers_db_is_refused_with_what_to_do(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    path = state / "ttserver.sqlite"
    with sqlite3.connect(path) as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(NewerSchema, match="run the newer ttserver"):
        StateDB(path)
    proc = subprocess.run([sys.executable, "-m", "ttserver.cli", "--cfgdb-path", str(state),
                           "--image-path", str(tmp_path), "--accel", "tcg"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ttserver: cannot start: the "
                                                           "state DB")


def test_the_state_db_is_private(tmp_path):
    """ENV specs hold owners and users' keys: the DB and its WAL files are 0600, also when
    an older server had left the file world-readable."""
    old = tmp_path / "old.sqlite"
    sqlite3.connect(old).close()
    old.chmod(0o644)
    for path in (tmp_path / "new.sqlite", old):
        db = StateDB(path)
        db.server_id()
        for f in [path, *path.parent.glob(path.name + "-*")]:
            assert oct(f.stat().st_mode & 0o777) == "0o600", f

