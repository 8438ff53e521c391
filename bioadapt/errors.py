"""The one exception users of bioadapt catch.

Every message says what was wrong and what to do about it.
"""


class BioadaptError(ValueError):
    """Bad input or an unusable resource, explained for the user."""


class AccessDenied(PermissionError):
    """The caller may not touch this resource (it belongs to another user)."""
