"""What the root daemon does to files in directories QEMU's user can write: never
through a symlink (issue 24, low). Plain files, no server."""

from __future__ import annotations

import pytest

from ttserver.host import storage


def test_ownership_changes_never_follow_a_symlink(tmp_path):
    """VM directories are writable by QEMU's user: a disk swapped for a link to a host
    file must not make root chown/chmod that file (it did: os.chown, Path.chmod)."""
    host_file = tmp_path / "shadow"
    host_file.write_text("secret")
    host_file.chmod(0o600)
    link = tmp_path / "disk.qcow2"
    link.symlink_to(host_file)
    with pytest.raises(OSError):
        storage.set_owner(link, 12345, 12345, 0o644)
    assert (host_file.stat().st_uid, oct(host_file.stat().st_mode & 0o777)) == (0, "0o600")
    plain = tmp_path / "plain"
    plain.write_text("x")
    storage.set_owner(plain, 12345, 12345, 0o640)
    assert (plain.stat().st_uid, oct(plain.stat().st_mode & 0o777)) == (12345, "0o640")
