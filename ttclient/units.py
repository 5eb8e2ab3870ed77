"""Sizes on the command line: a plain number is MiB, or give a suffix (`512M`, `4G`, `1T`)."""

from __future__ import annotations

import re

_FACTORS = {"": 1, "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024,
            "t": 1024 * 1024, "tb": 1024 * 1024, "tib": 1024 * 1024}


def parse_mib(text: str | int) -> int:
    """Return a size in MiB; raise ValueError with a hint on anything else."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _FACTORS:
            raise ValueError(f"size {text!r} is not a number of MiB or a size like 512M, 4G")
        value = int(m.group(1)) * _FACTORS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value
