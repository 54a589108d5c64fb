"""Alias of ``python -m benchmarks`` (the benchmarks live in ``benchmarks/``).

``python -m experiments.bench COMMAND [flags]`` runs ``python -m benchmarks COMMAND
[flags]``: same commands, flags and output. Kept so that older command lines still work;
it imports ``benchmarks`` only when run, so ``experiments`` does not depend on it otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.__main__ import main as benchmarks_main

    return benchmarks_main(argv)


if __name__ == "__main__":
    from experiments import _cli

    sys.exit(_cli.run_main(main))
