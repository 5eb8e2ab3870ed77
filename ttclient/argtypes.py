"""argparse types shared by `tt`, ttserver and ttproxy (standard library only): a
number within a range and a size in MiB, each failing with an ArgumentTypeError that
says what is wrong."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .units import parse_mib


def number_in(convert: Callable[[str], float], low: float, high: float,
              unit: str = "") -> Callable[[str], float]:
    """An argparse type: `convert(text)` within low..high (NaN is outside), `unit` naming
    what it counts ("seconds", "vCPUs") in the message when given."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number" + (f" ({unit}, {low}-{high})" if unit else "")
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low}-{high}"
                                             + (f" ({unit})" if unit else ""))
        return value
    return parse


def mib(text: str) -> int:
    """argparse type: a size as MiB ('512', '1G'; units.parse_mib)."""
    try:
        return parse_mib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def arch_list(text: str) -> list[str]:
    """argparse type: a comma list of guest archs, names or aliases ('arm64,riscv64'), as
    their canonical names (ttclient.arches), in order, each once."""
    from . import arches
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise argparse.ArgumentTypeError(f"{text!r}: an empty arch name")
        try:
            name = arches.by_name(part).name
        except KeyError as exc:
            raise argparse.ArgumentTypeError(exc.args[0]) from None
        if name not in out:
            out.append(name)
    return out


def engine_list(text: str) -> tuple[str, ...]:
    """argparse type: a comma list of image engines ('qemu,lxc'), each once, in order."""
    from .imagenames import ENGINES
    out: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part not in ENGINES:
            raise argparse.ArgumentTypeError(f"{part!r} is no engine (known: "
                                             f"{', '.join(ENGINES)})")
        if part not in out:
            out.append(part)
    return tuple(out)
