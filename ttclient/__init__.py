"""ttstack client library: the HTTP client, the `tt` CLI and the logic shared by every part.

Kept free of server dependencies so `pip install ttstack` is enough for test authors.
"""

from importlib import metadata

try:  # one source: pyproject.toml's version, as installed
    __version__ = metadata.version("ttstack")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
