"""Errors that entry points turn into one clear line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: a flag, a file or a checkpoint.

    Command-line entry points catch it and print ``error: <message>`` with exit code 2
    instead of a traceback. Library code raises it where the cause is the caller's input.
    """
