"""Benchmarks: ``python -m benchmarks {charlm,sample,compile,word2vec,recurrence,nnx} [flags]``.

* ``charlm``: char-LM training throughput, jaxseq vs flax.linen vs PyTorch
  (``benchmarks/charlm.py``; results in ``benchmarks/charlm.md``);
* ``sample``: char-LM sampling throughput, jaxseq's compiled scan vs Python loops;
* ``compile``: train-step compile time against sequence length;
* ``word2vec``: jaxseq's word2vec vs gensim (``benchmarks/word2vec.py``; results in
  ``benchmarks/word2vec.md``);
* ``recurrence``: the recurrence kernels on their own (``benchmarks/recurrence.py``);
* ``nnx``: the Flax NNX training step against the functional one (``benchmarks/nnx.py``).

``python -m benchmarks COMMAND --help`` lists each command's flags.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("charlm", "sample", "compile", "word2vec", "recurrence", "nnx")


def _load(name: str):
    """``benchmarks.<name>``, imported only when its command runs; None if it is absent."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"benchmarks.{name}":
            raise  # the module exists but something it imports does not
        return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"python -m benchmarks: error: unknown command {command!r}; choose from "
            f"{', '.join(COMMANDS)} (see --help)",
            file=sys.stderr,
        )
        return 2
    if command in ("charlm", "sample", "compile"):
        return _load("charlm").main([command, *rest])
    module = _load(command)
    if module is None:
        print(f"error: benchmark {command!r} is not available", file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    from experiments import _cli

    sys.exit(_cli.run_main(main))
