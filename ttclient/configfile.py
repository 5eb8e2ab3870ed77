"""`--config FILE`: a daemon's flags as a TOML file (shared by ttserver and ttproxy).

The keys are the long flags without their dashes, with `-` or `_` (`serv-port = 20000`,
`mem-total = "4G"`, `allow-outgoing = true`, `allowed-host = ["a", "b"]`); values are
what the flag takes, written as TOML strings, integers, floats, booleans or arrays (a
repeatable flag). Flags given on the command line win over the file; a repeatable flag's
values from both are kept. An unknown key or a bad value is an error naming the file and
the key.

Standard library only (tomllib, Python 3.11+).
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from pathlib import Path


class ConfigFileError(ValueError):
    """The file cannot be read or holds a key or value the daemon does not take."""


def add_config_option(parser: argparse.ArgumentParser, example: str) -> None:
    """`--config FILE` on a daemon's parser (`example`: the usual path, for the help)."""
    parser.add_argument("--config", type=Path, metavar="FILE", default=None,
                        help=f"read flags from this TOML file (e.g. {example}); keys are the "
                             "long flags' names, flags on the command line win")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name without dashes (`serv-port`) -> its action."""
    return {opt[2:]: action for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt not in ("--help", "--config")}


def file_argv(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """The flags `path` stands for, as command-line words for `parser`. ConfigFileError
    when it cannot be read or parsed, or for a key no flag has, or a value of the wrong
    kind (a table, a boolean for a flag that takes a value, ...)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigFileError(f"config {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"config {path}: not TOML: {exc}") from exc
    options = _options(parser)
    words: list[str] = []
    seen: dict[str, str] = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name in seen:
            raise ConfigFileError(f"config {path}: {seen[name]!r} and {key!r} are the same "
                                  "key; keep one")
        seen[name] = key
        action = options.get(name)
        if action is None:
            near = difflib.get_close_matches(name, list(options), n=1)
            raise ConfigFileError(
                f"config {path}: unknown key {key!r} ("
                + (f"did you mean {near[0]!r}? " if near else "")
                + f"keys are the long flags' names: {parser.prog} --help)")
        takes_value = action.nargs != 0
        if isinstance(value, bool):
            if takes_value:
                raise ConfigFileError(f"config {path}: {key} takes a value, not {value}")
            negated = f"--no-{name}" in action.option_strings
            if value:
                words.append(f"--{name}")
            elif negated:
                words.append(f"--no-{name}")
            continue
        if not takes_value:
            raise ConfigFileError(f"config {path}: {key} is a switch: write {key} = true")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not isinstance(action, argparse._AppendAction):
            raise ConfigFileError(f"config {path}: {key} takes one value, not a list")
        for item in values:
            if isinstance(item, (dict, list)):
                raise ConfigFileError(f"config {path}: {key}: give a string or a number")
            words.append(f"--{name}={item}")
    return words


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`, with the flags of its `--config FILE` (if any) before them, so the
    command line wins. A bad file exits like any usage error (status 2), the message
    naming the file and key."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    given = pre.parse_known_args(argv)[0].config
    if given is None:
        return parser.parse_args(argv)
    if not given.strip():
        parser.error("--config: give a file (it is empty)")
    path = Path(given)
    try:
        words = file_argv(parser, path)
    except ConfigFileError as exc:
        parser.error(str(exc))
    # the file alone first, so a bad value is reported as the file's (what is required
    # may come from the command line)
    required = [a for a in parser._actions if a.required]
    parser.exit_on_error = False
    for action in required:
        action.required = False
    try:
        parser.parse_args(words)
    except argparse.ArgumentError as exc:
        parser.error(f"config {path}: {exc}")
    finally:
        parser.exit_on_error = True
        for action in required:
            action.required = True
    return parser.parse_args(words + argv)
