"""The one exception users of bioadapt catch.

Every message says what was wrong and what to do about it.
"""


class BioadaptError(ValueError):
    """Bad input or an unusable resource, explained for the user."""
