"""Parametrize tests that use `tt_vm` over the requested OS images.

Ids name the image without its engine (`test_x[debian-12:x86_64]`) so reports and JUnit
show where a test ran; with the engine (`test_x[lxc:debian-12:x86_64]`) only when the run
has that OS and arch under two engines (a VM and a container). `@pytest.mark.tt_os("deb")`
narrows one test to the requested images matching those prefixes, and skips it with a
reason when none match.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from ttclient.imagenames import ImageNameError, parse_image_name, parse_os_prefix, selected_by


def image_id(image: str, among: Iterable[str] = ()) -> str:
    """The test id part for an image: `OS-VERSION:ARCH`, or `ENGINE:OS-VERSION:ARCH` when
    `among` (the run's images) has the same OS and arch under another engine;
    ImageNameError for a malformed name."""
    name = parse_image_name(image)
    short = f"{name.os}:{name.arch}"
    for other in map(parse_image_name, among):
        if (other.os, other.arch) == (name.os, name.arch) and other.engine != name.engine:
            return name.full
    return short


def _marker_prefixes(metafunc: pytest.Metafunc) -> list[str] | None:
    marks = list(metafunc.definition.iter_markers("tt_os"))
    if not marks:
        return None
    return [p for m in marks for arg in m.args for p in str(arg).split(",") if p.strip()]


def select(images: list[str], prefixes: list[str] | None) -> list[str]:
    """The images matched by any of `prefixes` (all of them when None), in their order;
    UsageError for a malformed prefix."""
    if prefixes is None:
        return list(images)
    try:
        parsed = [parse_os_prefix(p) for p in prefixes]
    except ImageNameError as exc:
        raise pytest.UsageError(f"@pytest.mark.tt_os: {exc}") from None
    names = [parse_image_name(img) for img in images]
    chosen = {hit for p in parsed for hit in selected_by(p, names)}
    return [img for img, name in zip(images, names, strict=True) if name in chosen]


def parametrize(metafunc: pytest.Metafunc, images: list[str] | None,
                fixture: str = "tt_image") -> None:
    """Parametrize `fixture` (indirectly) over the images a test's tt_os markers select; a
    single skipped param when no --tt-os was given or none match."""
    if images is None:
        params = [pytest.param(None, id="no-tt-os",
                               marks=pytest.mark.skip(reason="ttstack: no --tt-os given"))]
    else:
        wanted = _marker_prefixes(metafunc)
        chosen = select(images, wanted)
        if chosen:
            params = [pytest.param(img, id=image_id(img, images)) for img in chosen]
        else:
            reason = (f"ttstack: tt_os({', '.join(wanted or [])}) matches none of the "
                      f"requested OS images "
                      f"({', '.join(image_id(i, images) for i in images)})")
            params = [pytest.param(None, id="not-requested", marks=pytest.mark.skip(reason=reason))]
    metafunc.parametrize(fixture, params, indirect=True)
