"""Char-RNN on Tiny Shakespeare (or any UTF-8 text).

Train:   python -m experiments.charrnn --cell gru [--data FILE] [--out DIR] [--resume]
Sample:  python -m experiments.charrnn sample --checkpoint DIR --prime "ROMEO:" --length 500
"""

from __future__ import annotations

import math
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _cli
from jaxseq import charrnn
from jaxseq.data import load_corpus
from jaxseq.errors import UsageError

DEFAULT_OUT = "runs/charrnn"


def _train_parser():
    p = _cli.parser("python -m experiments.charrnn",
                    "Train a character-level RNN/LSTM/GRU language model. "
                    "Use 'python -m experiments.charrnn sample --help' for sampling.")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="UTF-8 text file to train on (default: Tiny Shakespeare via "
                        "$JAXSEQ_DATA, the data/ cache, or a download)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"run directory for checkpoints and metrics.jsonl (default: "
                        f"{DEFAULT_OUT}-<cell>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start again even if --out already holds a run")
    p.add_argument("--preset", choices=sorted(charrnn.PRESETS), default="default",
                   help="a named set of defaults (explicit flags still win): "
                        + "; ".join(f"{k}: {v or 'the defaults below'}"
                                    for k, v in charrnn.PRESETS.items()))
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    _cli.add_parallel_flags(p)
    _cli.add_dataclass_flags(p, charrnn.CharRNNConfig)
    return p


def _sample_parser():
    p = _cli.parser("python -m experiments.charrnn sample",
                    "Generate text from a trained char-RNN checkpoint.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="run directory (or checkpoint.npz file) to sample from")
    p.add_argument("--prime", default="\n", help="text to condition on before generating")
    p.add_argument("--length", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="> 0; lower is more conservative")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely characters (0: all)")
    p.add_argument("--num", type=int, default=1, help="number of samples, drawn as one batch")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed; same seed, same text")
    return p


def _explicit_flags(argv: Sequence[str]) -> set[str]:
    return {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}


def train_main(argv: Sequence[str]) -> int:
    p = _train_parser()
    args = p.parse_args(argv)
    preset = charrnn.PRESETS[args.preset]
    given = _explicit_flags(argv)
    overrides = {k: v for k, v in preset.items() if k not in given}
    config = _cli.config_from_args(charrnn.CharRNNConfig, args, **overrides)
    config.validate()
    _cli.start_parallel(args)
    out = pathlib.Path(args.out or f"{DEFAULT_OUT}-{config.cell}")
    text = load_corpus(args.data)
    result = charrnn.train(config, text, out, resume=args.resume, overwrite=args.overwrite,
                           progress=args.progress, devices=args.devices)
    from jaxseq import parallel
    if result.exit_code == 0 and result.history and parallel.is_main_process():
        last = result.history[-1]
        print(f"done: step {last['step']}, validation {last['val_loss']:.4f} nats "
              f"({last['val_bpc']:.4f} bits/char), best {result.best_val:.4f}; run in {out}",
              file=sys.stderr)
    return result.exit_code


def sample_main(argv: Sequence[str]) -> int:
    args = _sample_parser().parse_args(argv)
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.length <= 0 or args.num <= 0 or args.top_k < 0:
        raise UsageError("--length and --num must be positive and --top-k >= 0")
    if not args.prime:
        raise UsageError("--prime must hold at least one character")
    from jaxseq.sample import sample
    model, params, vocab, _ = charrnn.load_for_sampling(args.checkpoint)
    prime = vocab.encode(args.prime)
    ids = sample(model, params, jax.random.key(args.seed), jnp.asarray(prime),
                 length=args.length, num=args.num, temperature=args.temperature,
                 top_k=args.top_k)
    texts = [args.prime + vocab.decode(row) for row in np.asarray(ids)]
    print(("\n" + "=" * 40 + "\n").join(texts))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sample":
        return sample_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
