"""Local stand-in for six (see pyproject.toml)."""

PY3 = True
VENDORED = True
