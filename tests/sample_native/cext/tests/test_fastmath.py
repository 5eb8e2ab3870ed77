import sys

import fastmath
import six
from fastmath import _speed


def test_c_extension_built_in_the_guest():
    assert fastmath.add(2, 3) == 5
    assert _speed.__file__.startswith("/root/ttnative/venv/")
    assert f"cpython-{sys.version_info[0]}{sys.version_info[1]}" in _speed.__file__


def test_third_party_dependency():
    assert six.PY3
