"""The packages' layering holds: ttproxy never imports ttserver (it must run where
libvirt is absent), and the `tt` client imports neither daemon nor pydantic."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_ttproxy_imports_nothing_from_ttserver():
    assert "ttserver" not in loaded_after(
        "import ttproxy.proxy_service, ttproxy.cli, ttproxy.proxy")


def test_the_client_needs_no_daemon_and_no_pydantic():
    loaded = loaded_after("import ttclient.cli, ttclient.api")
    assert not loaded & {"ttserver", "ttproxy", "pydantic", "fastapi", "libvirt"}
