"""Requirements for a guest's venv, resolved and gathered on the host (the VMs have no
network).

1. `uv pip compile` resolves the requirement set for the guest's Python version and
   platform (`--python-version 3.13 --python-platform x86_64-manylinux_2_36`), so
   environment markers are those of the guest, not of the host. The set always holds the
   controller's own pytest, pytest-xdist and execnet versions (a worker must speak the
   controller's protocol), plus the user's `--tt-native-install` specs.
2. `pip download --no-deps` with the guest's tags fetches a wheel per pinned
   distribution, or its sdist when no wheel fits (the guest builds it).
3. Build requirements of local projects and of those sdists (their `pyproject.toml`, or
   setuptools by default) are resolved and fetched the same way, for the guest's
   isolated builds.

The venv of the non-local pins is cached on the host (`venv_key`), so a session with the
same requirements on the same guest Python restores it instead of installing; local
projects (`.`) are installed in every session, from the shipped tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import platformdirs

BASE_DISTRIBUTIONS = ("pytest", "pytest-xdist", "execnet")
UV_GLIBC = range(17, 41)  # manylinux_2_X values `uv pip compile --python-platform` knows
DEFAULT_BUILD_REQUIRES = ["setuptools>=40.8.0", "wheel"]  # PEP 517's legacy default
# requirements resolved online this recently are resolved from uv's cache (seconds)
RESOLVE_TTL = 6 * 3600
# Shell line run in every VM: one JSON line with what the wheel tags depend on. No `site`
# (-S), no environment (-E) and no imports beyond the built-in os and sys: `platform` and
# `json` cost a fresh TCG clone about a second of imports. `os.confstr` is what
# platform.libc_ver() reads for a running interpreter ("glibc 2.36").
PROBE = ("command -v python3 >/dev/null 2>&1 || { echo 'python3 not found' >&2; exit 127; }; "
         "python3 -S -E -c '"
         "import os, sys\n"
         "try:\n    libc = os.confstr(\"CS_GNU_LIBC_VERSION\") or \"\"\n"
         "except (ValueError, OSError):\n    libc = \"\"\n"
         "print(\"{\\\"version\\\": \\\"%d.%d\\\", \\\"full_version\\\": \\\"%s\\\", "
         "\\\"machine\\\": \\\"%s\\\", \\\"libc\\\": \\\"%s\\\"}\" % (sys.version_info[0], "
         "sys.version_info[1], sys.version.split()[0], os.uname().machine, "
         "libc.split()[-1] if libc.startswith(\"glibc \") else \"\"))'")


class InstallError(Exception):
    """The requirements cannot be resolved or fetched; the message has the tool's error."""


@dataclass(frozen=True)
class GuestPython:
    """What decides which wheels a guest can use (from `PROBE`)."""

    version: str  # "3.11"
    full_version: str  # "3.11.2"
    machine: str  # platform.machine(): "x86_64", "aarch64"
    libc: str  # glibc version, "2.36"; "" when not glibc

    @classmethod
    def from_probe(cls, line: str) -> GuestPython:
        """The GuestPython that `line`, the JSON line `PROBE` prints, describes (missing
        fields are ""); json.JSONDecodeError when it is not JSON."""
        data = json.loads(line)
        return cls(**{k: data.get(k, "") for k in
                      ("version", "full_version", "machine", "libc")})

    @property
    def _glibc_minor(self) -> int:
        match = re.fullmatch(r"2\.(\d+)", self.libc)
        return int(match.group(1)) if match else 17

    def uv_platform(self) -> str:
        """`uv pip compile --python-platform` value for this guest."""
        if self.machine in ("x86_64", "aarch64"):
            minor = max((g for g in UV_GLIBC if g <= self._glibc_minor), default=17)
            return f"{self.machine}-manylinux_2_{minor}"
        if self.machine == "riscv64":
            return "riscv64-unknown-linux"
        return "linux"

    def pip_tags(self) -> list[str]:
        """`pip download` options selecting the wheels this guest can install."""
        abi = "cp" + self.version.replace(".", "")
        platforms = [f"manylinux_2_{m}_{self.machine}" for m in
                     range(self._glibc_minor, 16, -1)]
        platforms += [f"manylinux2014_{self.machine}", f"linux_{self.machine}"]
        if self.machine in ("x86_64", "i686"):
            platforms += [f"manylinux2010_{self.machine}", f"manylinux1_{self.machine}"]
        args = ["--python-version", self.version, "--implementation", "cp", "--abi", abi]
        for p in platforms:
            args += ["--platform", p]
        return args


@dataclass(frozen=True)
class Resolution:
    """The resolved set for one guest Python."""

    pins: list[str]  # "name==version" lines
    local: list[str]  # local projects as uv printed them, relative to the rootdir: "."


def cache_dir() -> Path:
    """Where wheels and venvs are cached: $TTSTACK_CACHE_DIR, else the user cache dir."""
    return Path(os.environ.get("TTSTACK_CACHE_DIR") or platformdirs.user_cache_dir("ttstack"))


def remembered_guests() -> dict[str, tuple[GuestPython, str]]:
    """The guest Python last probed in each image, with the image's digest then (the
    server's ImageInfo.digest, "" when it gave none), by image name (e.g.
    "qemu:debian-12:x86_64"), from the cache dir; {} when none is readable. With the same
    digest now, the image is the same build: the probe can be skipped."""
    try:
        data = json.loads((cache_dir() / "guest-pythons.json").read_text())
        return {image: (GuestPython(**entry["python"]), str(entry.get("digest") or ""))
                for image, entry in data.items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def remember_guests(found: dict[str, tuple[GuestPython, str]]) -> None:
    """Adds `found` (image name -> (probed Python, image digest)) to the remembered
    guests; written whole and renamed into place, so concurrent sessions never read half
    a file. OSError is ignored: remembering only saves time."""
    merged = {**remembered_guests(), **found}
    path = cache_dir() / "guest-pythons.json"
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({k: {"python": asdict(v), "digest": d}
                                       for k, (v, d) in sorted(merged.items())}, indent=1))
        partial.rename(path)
    except OSError:
        partial.unlink(missing_ok=True)


def base_requirements() -> list[str]:
    """The controller's own versions of what a worker needs."""
    return [f"{name}=={metadata.version(name)}" for name in BASE_DISTRIBUTIONS]


def _tool(args: list[str], what: str, cwd: Path, timeout: float = 600,
          env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "UV_PYTHON_DOWNLOADS": "never",
                                   "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})
    except FileNotFoundError as exc:
        raise InstallError(f"{what}: {args[0]} is not installed "
                           "(pip install 'ttstack[pytest]')") from exc
    except subprocess.TimeoutExpired as exc:
        raise InstallError(f"{what}: no result within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        raise InstallError(f"{what} failed:\n" + "\n".join(lines[-30:]))
    return proc.stdout


def _uv() -> str:
    return shutil.which("uv") or str(Path(sys.executable).with_name("uv"))


def _is_local(line: str) -> bool:
    return line.startswith((".", "/", "-e ")) or " @ file:" in line


def resolve(specs: list[str], guest: GuestPython, rootdir: Path, work: Path,
            base: bool = True) -> Resolution:
    """Resolve `specs` (pip syntax, paths relative to `rootdir`), plus the base set when
    `base`, for `guest`; InstallError with uv's explanation when there is no solution."""
    lines = base_requirements() if base else []
    for spec in specs:
        spec = spec.strip()
        for opt in ("-r", "-c"):
            if spec.startswith(opt + " ") or (spec.startswith(opt) and len(spec) > 2
                                              and not spec.startswith("--")):
                path = spec[2:].strip()
                spec = f"{opt} {(rootdir / path).resolve()}"
        lines.append(spec)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]
    src = work / f"requirements-{guest.version}-{guest.machine}-{digest}.in"
    src.write_text("\n".join(lines) + "\n")
    # uv keeps a local project's built metadata in its cache, keyed on its files; a new
    # git tag changes a setuptools-scm version without touching them, so local ones are
    # always rebuilt
    refresh = [f"--refresh-package={name}" for name in _local_names(lines, rootdir)]
    compile_args = [_uv(), "pip", "compile", "--quiet", "--no-header", "--no-annotate",
                    *refresh, "--python-version", guest.version, "--python-platform",
                    guest.uv_platform(), str(src)]
    what = (f"resolving {', '.join(specs) or 'the worker set'} for Python {guest.version} "
            f"({guest.machine})")
    # Asking the index costs ~9 s here (measured: 8.8 s online, 1.1 s from uv's cache).
    # The same requirements resolved online less than RESOLVE_TTL ago are resolved from
    # uv's cache (--offline); a miss there (a new requirement) goes online as before.
    stamp = cache_dir() / "native-resolved" / f"{digest}-{guest.version}-{guest.uv_platform()}"
    out = None
    with contextlib.suppress(OSError, InstallError):
        if time.time() - stamp.stat().st_mtime < RESOLVE_TTL:
            out = _tool([*compile_args[:3], "--offline", *compile_args[3:]], what, rootdir)
    if out is None:
        out = _tool(compile_args, what, rootdir)
        with contextlib.suppress(OSError):
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.touch()
    pins: list[str] = []
    local: list[str] = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "--")):
            continue
        (local if _is_local(line) else pins).append(line)
    return Resolution(pins=pins, local=local)


def _local_names(lines: list[str], rootdir: Path) -> list[str]:
    """Project names of the local folders among requirement lines (`.`, `./sub[x]`)."""
    names = []
    for line in lines:
        if not _is_local(line):
            continue
        try:
            text = (rootdir / _local_path(line) / "pyproject.toml").read_text()
            name = tomllib.loads(text).get("project", {}).get("name")
        except (OSError, ValueError):
            continue
        if name:
            names.append(name)
    return names


def _build_requires(pyproject: bytes | None) -> list[str]:
    if pyproject is None:
        return list(DEFAULT_BUILD_REQUIRES)
    try:
        system = tomllib.loads(pyproject.decode()).get("build-system", {})
    except (ValueError, UnicodeDecodeError):
        return list(DEFAULT_BUILD_REQUIRES)
    return list(system.get("requires", DEFAULT_BUILD_REQUIRES))


def _sdist_pyproject(path: Path) -> bytes | None:
    """The top-level pyproject.toml of an sdist (.tar.gz or .zip), if it has one."""
    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.count("/") == 1
                         and n.endswith("/pyproject.toml")]
                return z.read(names[0]) if names else None
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml"):
                    f = t.extractfile(m)
                    return f.read() if f else None
    except (OSError, tarfile.TarError, zipfile.BadZipFile):
        return None
    return None


def _download(pins: list[str], guest: GuestPython, dest: Path, rootdir: Path) -> None:
    if pins:
        _tool([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--prefer-binary", *guest.pip_tags(), "-d", str(dest), *pins],
              f"downloading {len(pins)} distributions for Python {guest.version} "
              f"({guest.machine})", rootdir)


def gather(res: Resolution, guest: GuestPython, rootdir: Path, dest: Path,
           work: Path, deps: bool = True, built_in_guest: list[str] | None = None) -> None:
    """Fill `dest` with what the guest needs to install `res` offline: the pins (when
    `deps`) and the build requirements of the local projects built in the guest
    (`built_in_guest`, default all of `res.local`) and of sdists among the pins."""
    dest.mkdir(parents=True, exist_ok=True)
    _download(["pip", *(res.pins if deps else [])], guest, dest, rootdir)  # pip: see provision
    seen_sdists: set[str] = set()
    build: set[str] = set()
    for line in res.local if built_in_guest is None else built_in_guest:
        path = _local_path(line)
        pyproject = rootdir / path / "pyproject.toml"
        build.update(_build_requires(pyproject.read_bytes() if pyproject.is_file() else None))
    for _round in range(3):  # sdists among build requirements are rare; bounded
        sdists = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip"))
                  and p.name not in seen_sdists]
        for sdist in sdists:
            seen_sdists.add(sdist.name)
            build.update(_build_requires(_sdist_pyproject(sdist)))
        if not build:
            return
        _download(resolve(sorted(build), guest, rootdir, work, base=False).pins,
                  guest, dest, rootdir)
        build = set()


SCM_BACKENDS = ("setuptools-scm", "setuptools_scm", "hatch-vcs", "hatch_vcs")


def _local_path(line: str) -> str:
    """The folder of a local project as uv printed it (`.`, `-e ./sub[x]`, `n @ file://`)."""
    return line.removeprefix("-e ").split(" @ file://")[-1].split("[")[0].strip()


def scm_versions(res: Resolution, rootdir: Path) -> dict[str, str]:
    """Environment for the guest's build of local projects that take their version from
    git (setuptools-scm, hatch-vcs): `SETUPTOOLS_SCM_PRETEND_VERSION_FOR_<NAME>` set to
    the version setuptools-scm computes here, where `.git` is (it is not shipped, and
    without it such a build fails: "unable to detect version"). The variable and name
    rule are setuptools-scm's (docs: "overrides", `_FOR_${DIST_NAME}`); InstallError
    when setuptools-scm cannot compute it."""
    env = {}
    for line in res.local:
        path = rootdir / _local_path(line)
        try:
            pyproject = tomllib.loads((path / "pyproject.toml").read_text())
        except (OSError, ValueError):
            continue
        requires = " ".join(pyproject.get("build-system", {}).get("requires", [])).lower()
        name = pyproject.get("project", {}).get("name")
        if not name or not any(b in requires for b in SCM_BACKENDS):
            continue
        version = _tool([_uv(), "tool", "run", "--from", "setuptools-scm", "python", "-m",
                         "setuptools_scm"], f"computing the git version of {name}",
                        path).strip().splitlines()[-1]
        env["SETUPTOOLS_SCM_PRETEND_VERSION_FOR_"
            + re.sub(r"[-_.]+", "_", name).upper()] = version
    return env


def pure_wheels(res: Resolution, rootdir: Path, out: Path, files: list[str],
                env: dict[str, str]) -> dict[str, Path]:
    """Local projects (not editable ones) built into wheels here with `uv build`: {line as
    uv printed it: wheel} for those whose wheel is pure Python (`*-none-any.whl`), which
    every guest Python installs as it is, with no build in the guest (a build there costs
    about a minute per project and VM under TCG: pip's isolated build environment). A
    project whose wheel is platform-specific, or that does not build here, is built in the
    guest as before (whose error, if any, is the one the user sees).

    Each is built from a copy of its shipped `files` (rootdir-relative), as the guest
    would, with the guest build's environment `env` (git versions: no .git in the copy):
    a build in the user's tree would leave build/ and *.egg-info behind there."""
    found = {}
    for i, line in enumerate(res.local):
        if line.startswith("-e "):
            continue
        try:
            prefix = (rootdir / _local_path(line)).resolve().relative_to(rootdir.resolve())
        except ValueError:
            continue  # outside the project: the guest build says so
        copy = out / f"src-{i}"
        for name in files:
            rel = Path(name) if prefix == Path(".") else None
            if rel is None and Path(name).is_relative_to(prefix):
                rel = Path(name).relative_to(prefix)
            if rel is not None and (rootdir / name).is_file():
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(rootdir / name, copy / rel)
        dest = out / f"local-{i}"
        try:
            _tool([_uv(), "build", "--wheel", "--quiet", "--out-dir", str(dest), str(copy)],
                  f"building {line}", rootdir, env=env)
        except InstallError:
            continue
        wheels = list(dest.glob("*.whl"))
        if len(wheels) == 1 and wheels[0].name.endswith("-none-any.whl"):
            found[line] = wheels[0]
    return found


def guest_uv(guest: GuestPython, dest: Path, rootdir: Path) -> Path | None:
    """uv's wheel for the guest's platform, at the host's uv version, downloaded into
    `dest`; None when there is none (a platform uv does not publish for) or it cannot be
    fetched. uv installs in the guest instead of pip when something must be installed or
    built there: measured in a Debian 12 guest under TCG, building the cext sample took
    43 s with uv against 128 s with pip (pip's own start-up and its isolated build
    environment are Python, uv's are native code)."""
    try:
        version = _tool([_uv(), "--version"], "uv --version", rootdir).split()[1]
        _tool([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", *guest.pip_tags(), "-d", str(dest), f"uv=={version}"],
              f"downloading uv for {guest.machine}", rootdir)
    except (InstallError, IndexError):
        return None
    wheels = sorted(dest.glob("uv-*.whl"))
    return wheels[-1] if wheels else None


def venv_key(guest: GuestPython, res: Resolution) -> str:
    """Cache key of the venv: the guest's Python and libc, and the pinned set."""
    facts = asdict(guest)
    layout = 2  # what a cached venv holds and how (bump when that changes)
    return hashlib.sha256(json.dumps([layout, facts, sorted(res.pins)]).encode()).hexdigest()[:20]
