"""The one helper behind every frozen config dataclass of jaxseq and its experiments."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def field(default: Any, help: str, *, choices: Sequence[Any] | None = None, **kw: Any) -> Any:
    """A dataclass field that carries its description (and allowed values) in ``metadata``.

    The library reads nothing from the metadata; ``experiments/_cli.py`` turns each field
    into a command-line flag of the same name (dashes for underscores) described by
    ``help``.

    Args:
      default: the field's default value (immutable: a tuple, not a list).
      help: one line saying what the setting does.
      choices: the allowed values, or None for any value of the field's type.
      **kw: more metadata (``metavar``, ``cli=False`` to keep it off the command line).

    Returns:
      A ``dataclasses.field``.
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, **kw})
