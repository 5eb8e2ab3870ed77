"""Doctests are items too.

>>> double(4)
8
"""


def double(x):
    """
    >>> double(2)
    4
    >>> double("ab")
    'abab'
    """
    return 2 * x
