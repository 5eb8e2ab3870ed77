"""How a pushed file lands in a guest, the same through the agent and over SSH.

The bytes go to a new file made next to the target by `mktemp` (mode 0600, so a secret
is never readable while it is written, and a write that fails never leaves a half file
at the target); once all of it is there, it gets its mode and is renamed over the
target. A target that exists and is not a regular file (`/dev/null`, a FIFO, a
directory) is refused: writing a device or changing its mode breaks the guest. A
symlink is followed: its target is replaced. The mode is the one asked for, else the
replaced file's, else 0644. The file is owned by root (both transports run as root).
"""

from __future__ import annotations

import shlex

NOT_REGULAR = 3  # PREPARE's exit status for a target that is not a regular file

# $1 = target. Prints the temporary file's path; exit NOT_REGULAR with stat's file type
# on stderr when the target exists and is not a regular file.
PREPARE = ('real=$(readlink -m -- "$1") || exit 1; '
           'if [ -e "$real" ] && [ ! -f "$real" ]; then '
           f'stat -Lc %F -- "$real" >&2; exit {NOT_REGULAR}; fi; '
           'umask 077; mktemp -- "$real.ttstack-XXXXXX"')
# $1 = temporary file, $2 = target, $3 = octal mode or "" (keep the replaced file's)
COMMIT = ('real=$(readlink -m -- "$2") || exit 1; m=$3; '
          '[ -n "$m" ] || m=$(stat -c %a -- "$real" 2>/dev/null) || m=644; '
          'chmod "$m" "$1" && mv -f -- "$1" "$real" || { rm -f -- "$1"; exit 1; }')
DISCARD = 'rm -f -- "$1"'


def refusal(path: str, kind: str) -> str:
    """The error for a push to `path`, which is a `kind` (stat's words)."""
    return (f"{path} is a {kind.strip() or 'special file'}, not a regular file: a push "
            f"writes regular files only")


def ssh_command(path: str, mode: int | None) -> str:
    """One remote shell command doing PREPARE, `cat` from stdin into the temporary file
    and COMMIT; the temporary file goes whatever fails."""
    q = shlex.quote
    return (f"tmp=$(sh -c {q(PREPARE)} sh {q(path)}) || exit $?; "
            """trap 'rm -f -- "$tmp"' EXIT; """
            f'cat > "$tmp" && sh -c {q(COMMIT)} sh "$tmp" {q(path)} {q(mode_arg(mode))}')


def mode_arg(mode: int | None) -> str:
    """COMMIT's mode argument: octal digits, or "" to keep the replaced file's."""
    return "" if mode is None else f"{mode:o}"
