"""JSON answers written a piece at a time, for answers that carry large byte strings.

A run's output may be tens of MiB per VM. Turned into one `str`, then into JSON text, then
into the body's bytes, it would sit in the server's memory three or four times over;
here the bytes a guest printed are held once and written as JSON a PIECE at a time
(text with bytes that are not UTF-8 escaped as \\xNN, or base64).

Values are what `json` takes, plus two wrappers for bytes: `Text` (a JSON string of the
bytes as UTF-8 text; the object holding it gains `"escaped": true|false` at its end, saying
whether any Text of it had bytes that are not UTF-8) and `Base64`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass

PIECE = 3 << 16  # bytes encoded at a time: 192 KiB (a multiple of 3 for base64)

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Text:
    """Bytes to write as a JSON string of UTF-8 text."""

    data: Buffer


@dataclass(frozen=True)
class Base64:
    """Bytes to write as a JSON string of their base64."""

    data: Buffer


def text_pieces(data: Buffer, size: int = PIECE) -> Iterator[tuple[str, bool]]:
    """`data` as text, `size` bytes at a time, cut only before a UTF-8 lead byte (so a
    character is never split): (piece, whether it had bytes that are not UTF-8, which are
    escaped as \\xNN)."""
    view = memoryview(data)
    start = 0
    while start < len(view):
        end = min(start + size, len(view))
        back = 0
        while end < len(view) and back < 3 and view[end] & 0xC0 == 0x80:
            end -= 1
            back += 1
        piece = bytes(view[start:end])
        try:
            yield piece.decode(), False
        except UnicodeDecodeError:
            yield piece.decode(errors="backslashreplace"), True
        start = end


def dumps_iter(value: object) -> Iterator[bytes]:
    """`value` as UTF-8 JSON, in pieces."""
    if isinstance(value, dict):
        yield b"{"
        escaped: bool | None = None
        for n, (key, item) in enumerate(value.items()):
            yield (b", " if n else b"") + json.dumps(str(key)).encode() + b": "
            if isinstance(item, Text):
                yield b'"'
                for piece, bad in text_pieces(item.data):
                    escaped = bool(escaped) or bad
                    yield json.dumps(piece, ensure_ascii=False)[1:-1].encode()
                yield b'"'
                escaped = bool(escaped)
            elif isinstance(item, Base64):
                yield b'"'
                view = memoryview(item.data)
                for at in range(0, len(view), PIECE):
                    yield base64.b64encode(view[at:at + PIECE])
                yield b'"'
            else:
                yield from dumps_iter(item)
        if escaped is not None:
            yield b', "escaped": ' + (b"true" if escaped else b"false")
        yield b"}"
    elif isinstance(value, list | tuple):
        yield b"["
        for n, item in enumerate(value):
            if n:
                yield b", "
            yield from dumps_iter(item)
        yield b"]"
    else:
        yield json.dumps(value, ensure_ascii=False).encode()
