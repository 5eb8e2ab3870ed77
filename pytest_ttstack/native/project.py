"""What native mode ships into each VM, and how host paths name the shipped copy.

The project is the pytest rootdir. In a git work tree exactly the files git sees are
shipped: tracked ones and untracked ones that `.gitignore` does not exclude (so no `.env`,
no build output, but binary test data, `build/` folders and disk images that are tracked
all go). Outside git every file goes but VCS folders, caches and virtualenvs.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

GUEST_ROOT = "/root/ttnative"
GUEST_PROJECT = f"{GUEST_ROOT}/project"
GUEST_SITE = f"{GUEST_ROOT}/site"
GUEST_VENV = f"{GUEST_ROOT}/venv"
GUEST_WHEELS = f"{GUEST_ROOT}/wheels"
# outside git only: never worth shipping
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".pytest_cache", ".mypy_cache",
             ".ruff_cache", ".tox", ".nox", ".venv", "venv", "node_modules"}
# what the guest imports of this package: the guest plugin and what it needs
GUEST_MODULES = ("__init__.py", "options.py", "native/__init__.py", "native/ids.py",
                 "native/guest.py")


def project_files(rootdir: Path) -> list[str]:
    """Paths relative to `rootdir` of the files to ship (see module docstring).
    ShipError when git fails for another reason than "not a git repository" (e.g.
    "dubious ownership"): falling back to every file would ship what .gitignore hides."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(rootdir), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard", "--", "."], capture_output=True, timeout=120)
    except FileNotFoundError:
        proc = None  # no git on this machine: every file but the obvious junk
    if proc is not None and proc.returncode == 0:
        names = [n for n in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
        return sorted(n for n in set(names) if os.path.lexists(rootdir / n))
    if proc is not None and b"not a git repository" not in proc.stderr:
        raise ShipError(f"git ls-files in {rootdir} failed: "
                        f"{proc.stderr.decode(errors='replace').strip()}")
    found = []
    for dirpath, dirnames, filenames in os.walk(rootdir):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(rootdir)
        found += [str(rel / f) for f in filenames if not f.endswith((".pyc", ".pyo"))]
    return sorted(found)


class ShipError(Exception):
    """The project's file list cannot be made; the message has git's words."""


def add_files(tar: tarfile.TarFile, root: Path, names: Iterable[str], arcdir: str) -> int:
    """Add root/NAME as arcdir/NAME for each name; returns the bytes added."""
    total = 0
    for name in names:
        info = tar.gettarinfo(str(root / name), arcname=f"{arcdir}/{name}")
        if info.islnk():  # a second hard link to one file: ship it as a file again
            info.type, info.linkname = tarfile.REGTYPE, ""
            info.size = os.stat(root / name).st_size
        if info.isreg():
            with open(root / name, "rb") as f:
                tar.addfile(info, f)
            total += info.size
        elif info.issym() or info.isdir():
            tar.addfile(info)
    return total


def guest_site_tar(tar: tarfile.TarFile) -> None:
    """The guest plugin as `site/pytest_ttstack/...` (only what the guest imports)."""
    package = Path(__file__).resolve().parent.parent
    add_files(tar, package, GUEST_MODULES, "site/pytest_ttstack")


def tar_bytes(build: Callable[[tarfile.TarFile], None]) -> bytes:
    """An uncompressed tar archive made by `build(tar)`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        build(tar)
    return buf.getvalue()


class PathMap:
    """Maps host paths under the rootdir to the shipped copy in the guest."""

    def __init__(self, rootdir: Path, invocation_dir: Path) -> None:
        self.rootdir = rootdir.resolve()
        self.invocation_dir = invocation_dir.resolve()

    def guest(self, host_path: Path) -> str | None:
        """The guest path of `host_path`, or None when it is outside the project."""
        try:
            rel = host_path.resolve().relative_to(self.rootdir)
        except ValueError:
            return None
        return GUEST_PROJECT if rel == Path(".") else f"{GUEST_PROJECT}/{rel.as_posix()}"

    @property
    def guest_cwd(self) -> str:
        """Where the worker starts: the invocation dir's copy, else the project root."""
        return self.guest(self.invocation_dir) or GUEST_PROJECT

    def arg(self, arg: str) -> str:
        """A path or test id (`tests/x.py::test`, `DIR`) that exists under the project,
        as its guest path; anything else unchanged."""
        path, sep, rest = arg.partition("::")
        host = Path(path) if os.path.isabs(path) else self.invocation_dir / path
        try:
            exists = host.exists()
        except OSError:
            exists = False
        if not path or not exists:
            return arg
        guest = self.guest(host)
        return arg if guest is None else guest + sep + rest
