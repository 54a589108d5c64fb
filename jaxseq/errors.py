"""The one exception the library raises for bad input from its caller."""


class UsageError(Exception):
    """Bad input from the caller: an argument or config field, a file or a checkpoint.

    The message names the argument or field (``hidden must be positive, got 0``); a
    command-line program catches it and reports it in its own terms.
    """
