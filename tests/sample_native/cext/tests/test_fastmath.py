import sys
from importlib import metadata

import fastmath
import six
from fastmath import _speed


def test_c_extension_built_in_the_guest():
    assert fastmath.add(2, 3) == 5
    assert _speed.__file__.startswith("/root/ttnative/venv/")
    assert f"cpython-{sys.version_info[0]}{sys.version_info[1]}" in _speed.__file__


def test_version_from_git_on_the_host():
    # setuptools-scm: .git is not shipped, the host's git tag still names the version
    assert metadata.version("fastmath") == "1.2.3"


def test_local_project_a_pinned_distribution_needs():
    # six is local (vendored/six); python-dateutil, from PyPI, depends on it
    assert six.VENDORED
    assert metadata.version("python-dateutil")
