"""Every item, doctests and unittest methods included, checks that it runs on the OS its
id names (native mode tags ids with the OS: test_x[debian-12:x86_64])."""

import os
import platform
import re

import pytest

IN_VM = os.path.isdir("/root/ttnative")


@pytest.fixture(autouse=True)
def _runs_on_its_os(request):
    match = re.search(r"\[debian-(\d+):", request.node.nodeid)
    if IN_VM:
        assert match, f"ran in a VM without an OS in its id: {request.node.nodeid}"
        assert platform.freedesktop_os_release()["VERSION_ID"] == match.group(1)
    else:
        assert match is None
