"""ttstack client library: the HTTP client, the `tt` CLI and the logic shared by every part.

Kept free of server dependencies so `pip install ttstack` is enough for test authors.
"""

__version__ = "0.1.0"
