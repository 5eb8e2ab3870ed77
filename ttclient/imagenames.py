"""Image names (`ENGINE:OS-VERSION:ARCH`) and OS-prefix matching.

Lives in the client package because the server, the proxy and the pytest plugin must all
agree on which images a prefix selects, and only the client package is installed everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import arches

# qemu: VMs; lxc: containers (ttserver/containers). A prefix that names no engine means
# DEFAULT_ENGINE: `debian-12` never selects containers (docs/decisions.md, 84)
ENGINES = ("qemu", "lxc")
DEFAULT_ENGINE = "qemu"

# Users write Debian's arch names or the kernel's; images are named with ttclient.arches'.
ARCH_ALIASES = arches.spellings()
ANY_ARCH = "*"  # `debian-13:*`: every arch (as `debian-13` alone)

_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # fullmatch


class ImageNameError(ValueError):
    """An image name or OS prefix that cannot be used; the message says why. As such:
    malformed, the caller's input is wrong (HTTP 400)."""


class NoMatchingImage(ImageNameError):
    """A well-formed prefix that matches no image on offer (HTTP 404)."""


@dataclass(frozen=True, order=True)
class ImageName:
    """A parsed image name: engine, OS-VERSION and the kernel's arch name, all lower case."""

    engine: str
    os: str  # OS-VERSION, e.g. "debian-12"
    arch: str

    @property
    def full(self) -> str:
        """`ENGINE:OS-VERSION:ARCH`, the name of the image's directory."""
        return f"{self.engine}:{self.os}:{self.arch}"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.full


def parse_image_name(name: str) -> ImageName:
    """Parse `ENGINE:OS-VERSION:ARCH`, refusing anything that could escape a directory."""
    parts = name.split(":")
    if len(parts) != 3:
        raise ImageNameError(f"image name {name!r} is not ENGINE:OS-VERSION:ARCH")
    engine, os_version, arch = (p.lower() for p in parts)
    if engine not in ENGINES:
        raise ImageNameError(f"image {name!r}: unknown engine {engine!r} (known: "
                             f"{', '.join(ENGINES)})")
    if not _PART.fullmatch(os_version) or ".." in os_version:
        raise ImageNameError(f"image {name!r}: bad OS-VERSION {os_version!r}")
    if arch not in ARCH_ALIASES:
        raise ImageNameError(f"image {name!r}: unknown arch {arch!r} (known: "
                             f"{', '.join(p.name for p in arches.PROFILES)})")
    return ImageName(engine, os_version, ARCH_ALIASES[arch])


def _squash(text: str) -> str:
    """Lower-case and drop separators, so `ubuntu2004` matches `ubuntu-20.04`."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass(frozen=True)
class OsPrefix:
    """One user-given prefix: an OS part matched by prefix, and an optional exact arch."""

    text: str
    os_part: str
    arch: str | None
    engine: str | None = None
    # a whole image name (`qemu:debian-13:x86_64`): that image alone when it exists (not
    # also `qemu:debian-13-linux6.1:x86_64`); otherwise its OS part is a prefix
    name: ImageName | None = None

    def matches(self, image: ImageName) -> bool:
        """True when the image's arch is this prefix's (if it has one), its engine this
        prefix's (DEFAULT_ENGINE if it names none) and its OS, separators dropped, starts
        with the prefix's OS part."""
        if self.arch and image.arch != self.arch:
            return False
        if image.engine != (self.engine or DEFAULT_ENGINE):
            return False
        return _squash(image.os).startswith(self.os_part)


def parse_os_prefix(text: str) -> OsPrefix:
    """Parse `deb`, `debian-12`, `debian12-arm64`, `debian-12:aarch64`, a full image name
    or the start of one (`qemu:debian-12`, `qemu:deb`); `OS:*` (or `qemu:OS:*`) means
    every arch, as `OS` alone does."""
    raw = text.strip()
    if not raw:
        raise ImageNameError("empty OS prefix")
    parts = [part.strip() for part in raw.lower().split(":")]
    if len(parts) > 3:
        raise ImageNameError(f"OS prefix {raw!r} has more than ENGINE:OS-VERSION:ARCH")
    if len(parts) == 3 and parts[0] not in ENGINES:
        raise ImageNameError(f"OS prefix {raw!r}: three parts are ENGINE:OS-VERSION:ARCH, and"
                             f" {parts[0]!r} is no engine (known: {', '.join(ENGINES)})")
    lowered = ":".join(parts)
    if len(parts) == 3 and parts[2] != ANY_ARCH:
        name = parse_image_name(lowered)
        return OsPrefix(raw, _squash(name.os), name.arch, name.engine, name)
    engine = next((e for e in ENGINES if lowered.startswith(e + ":")), None)
    if engine:  # ENGINE:OS-prefix[:*], the start of an image name
        lowered = lowered[len(engine) + 1:]
    arch = None
    os_part = lowered
    if ":" in lowered:
        os_part, arch_text = lowered.split(":", 1)
        if arch_text != ANY_ARCH and arch_text not in ARCH_ALIASES:
            if not engine and re.match(r"[a-z]+-?\d", arch_text):  # lxd:debian-12
                raise ImageNameError(f"OS prefix {raw!r}: {os_part!r} is no engine (known: "
                                     f"{', '.join(ENGINES)})")
            raise ImageNameError(f"OS prefix {raw!r}: unknown arch {arch_text!r} (known: "
                                 f"{', '.join(p.name for p in arches.PROFILES)}, or *)")
        arch = ARCH_ALIASES.get(arch_text)
    else:
        for alias, canonical in ARCH_ALIASES.items():
            for sep in ("-", "_"):
                if lowered.endswith(sep + alias):
                    os_part, arch = lowered[: -len(alias) - 1], canonical
                    break
            if arch:
                break
    squashed = _squash(os_part)
    if not squashed:
        raise ImageNameError(f"OS prefix {raw!r} has no OS part")
    return OsPrefix(raw, squashed, arch, engine)


def selected_by(prefix: OsPrefix, available: list[ImageName]) -> list[ImageName]:
    """The images of `available` one parsed prefix selects, sorted: the image a whole name
    names when it is there, else every image the prefix matches (the one rule the server,
    the proxy, `--tt-os` and the plugin's tt_os marker share)."""
    if prefix.name in available:
        return [prefix.name]
    return sorted(img for img in available if prefix.matches(img))


def split_prefixes(text: str | list[str]) -> list[str]:
    """Accept `a,b` or a list of such strings (repeatable options)."""
    items = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        out.extend(p.strip() for p in item.split(",") if p.strip())
    return out


def match_images(prefixes: list[str], available: list[ImageName]) -> list[ImageName]:
    """Images selected by the prefixes, in prefix order, each once.

    Raises ImageNameError naming the prefix that matched nothing and what exists, because
    "no such image" without the list sends users hunting.
    """
    if not prefixes:
        raise ImageNameError("no OS prefix given (e.g. debian-12)")
    chosen: list[ImageName] = []
    for text in prefixes:
        prefix = parse_os_prefix(text)
        hits = selected_by(prefix, available)
        if not hits:
            names = ", ".join(sorted(i.full for i in available)) or "none"
            last = text.split(":")[-1].strip().lower()  # the OS part, if an arch was a suffix
            whole = OsPrefix(text, _squash(last), None)
            hint = ""
            if (prefix.arch and last not in ARCH_ALIASES and last != ANY_ARCH
                    and any(whole.matches(i) for i in available)):
                # `mydistro-x86`: an OS-VERSION that ends like an arch alias
                hint = (f"; it was read as OS {prefix.os_part!r} on {prefix.arch}: for the OS"
                        f" {last!r} on every arch write '{text.strip()}:*'")
            raise NoMatchingImage(f"{text!r} matches no image (as an OS prefix or an image "
                                  f"name){hint}; available: {names}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen
