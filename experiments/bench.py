"""Benchmarks: ``python -m experiments.bench {charlm,sample,compile,word2vec} [flags]``.

* ``charlm``: char-LM training throughput, jaxseq vs flax.linen vs PyTorch
  (``experiments/bench_charlm.py``; results in ``benchmarks/charlm.md``);
* ``sample``: char-LM sampling throughput, jaxseq's compiled scan vs Python loops;
* ``compile``: train-step compile time against sequence length;
* ``word2vec``: delegated to ``experiments/bench_word2vec.py``.

``python -m experiments.bench COMMAND --help`` lists each command's flags.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = ("charlm", "sample", "compile", "word2vec")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "word2vec":
        from experiments import bench_word2vec  # another benchmark; imported only when asked
        return bench_word2vec.main(rest)
    if command in ("charlm", "sample", "compile"):
        from experiments import bench_charlm
        return bench_charlm.main([command, *rest])
    print(f"python -m experiments.bench: error: unknown command {command!r}; choose from "
          f"{', '.join(COMMANDS)} (see --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from experiments import _cli
    sys.exit(_cli.run_main(main))
