"""Train Word2Vec (skip-gram or CBOW) and write word2vec text and binary vectors.

    python -m experiments.word2vec --mode skipgram                 # Tiny Shakespeare words
    python -m experiments.word2vec --mode cbow --corpus text.txt --out runs/w2v --eval
    python -m experiments.word2vec --query king --analogy man king woman

Writes ``OUT/vectors.txt`` and ``OUT/vectors.bin`` (header ``vocab_size dim``; both load
with gensim's ``KeyedVectors.load_word2vec_format``) and ``OUT/run.json``. SIGINT/SIGTERM
stop training between device calls; the vectors trained so far are still written, and so
is ``OUT/checkpoint.npz`` (also written at every epoch end and every ``--save-every`` device
calls); the exit code is 130/143. ``--resume`` continues such a run to exactly the vectors
an uninterrupted run with the same flags gives:

    python -m experiments.word2vec --out runs/w2v --epochs 5            # Ctrl-C midway
    python -m experiments.word2vec --out runs/w2v --epochs 5 --resume

``--devices N`` shards each step's segments over N devices (default: all of them) with the
tables replicated; the vectors do not depend on N beyond float summation order. With
``--coordinator/--num-processes/--process-id`` several processes train together; every
process reads the corpus and builds the same batches, and only process 0 writes files and
prints results.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from typing import Sequence

import jax

from experiments import _cli
from jaxseq import parallel, word2vec
from jaxseq.data import load_corpus
from jaxseq.errors import UsageError

DEFAULT_OUT = "runs/word2vec"


def _parser():
    p = _cli.parser("python -m experiments.word2vec",
                    "Train skip-gram or CBOW word vectors with JAX (word2vec.c's recipe, "
                    "batched as matrix products; see jaxseq/word2vec.py).")
    p.add_argument("--corpus", default=None, metavar="PATH",
                   help="UTF-8 text file, one sentence per line (default: Tiny Shakespeare "
                        "via $JAXSEQ_DATA, the data/ cache, or a download)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"output directory (default: {DEFAULT_OUT}-<mode>)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it already holds files")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.npz (the same flags "
                        "are required; starts from the beginning when there is none yet)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also write the checkpoint every N device calls (default 0: at the "
                        "end of each epoch, when stopped, and at the end)")
    p.add_argument("--query", action="append", default=[], metavar="WORD",
                   help="print the nearest neighbours of WORD after training (repeatable)")
    p.add_argument("--topn", type=int, default=10, help="neighbours printed per --query")
    p.add_argument("--analogy", nargs=3, action="append", default=[], metavar=("A", "B", "C"),
                   help="print the best D for A:B::C:D (repeatable)")
    p.add_argument("--eval", action="store_true",
                   help="print WordSim-353 and SimLex-999 Spearman and Google analogy "
                        "accuracy (data files from gensim's package)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    _cli.add_parallel_flags(p)
    _cli.add_dataclass_flags(p, word2vec.TrainConfig)
    return p


def _check_out(out: pathlib.Path, overwrite: bool, resume: bool = False) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise UsageError(f"output directory {out} is not empty; pass --resume to continue "
                         f"its run, --overwrite or choose another --out")


def _write_json(path: pathlib.Path, record: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = _cli.config_from_args(word2vec.TrainConfig, args)
    config.validate()
    if args.topn <= 0:
        raise UsageError(f"--topn must be positive, got {args.topn}")
    if args.save_every < 0:
        raise UsageError(f"--save-every must be >= 0, got {args.save_every}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    _cli.start_parallel(args)
    if args.devices is not None and args.devices > 1:
        parallel.data_mesh(args.devices)  # too many devices: fail before reading the corpus
    main_process = parallel.is_main_process()
    out = pathlib.Path(args.out or f"{DEFAULT_OUT}-{config.mode}")
    if main_process:
        _check_out(out, args.overwrite, args.resume)
        if args.resume:
            found = word2vec.find_resume_checkpoint(out)  # unreadable: fail early
            if found is not None:
                word2vec.check_resume(found, config)  # another config: before the corpus

    sentences = word2vec.tokenize(load_corpus(args.corpus))
    prepared = word2vec.prepare(sentences, config)
    words = prepared.vocab.words
    known = set(words)
    for w in [*args.query, *(x for triple in args.analogy for x in triple)]:
        if w.lower() not in known:
            raise UsageError(f"word {w!r} is not in the vocabulary ({len(words)} words "
                             f"with --min-count {config.min_count}; words are lower-cased)")
    if main_process:
        print(f"corpus: {prepared.corpus.raw_words:,} words, vocabulary {len(words):,} "
              f"(min count {config.min_count})", file=sys.stderr)

    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    result = word2vec.train(prepared, config, progress=args.progress, handle_signals=True,
                            devices=args.devices, checkpoint_dir=out, resume=args.resume,
                            save_every=args.save_every)
    if not main_process:
        return 128 + result.interrupted if result.interrupted else 0
    out.mkdir(parents=True, exist_ok=True)
    word2vec.save_text(out / "vectors.txt", words, result.vectors)
    word2vec.save_binary(out / "vectors.bin", words, result.vectors)
    record = {"config": {k: getattr(config, k) for k in config.__dataclass_fields__},
              "corpus": str(args.corpus) if args.corpus else "tinyshakespeare",
              "corpus_words": result.raw_words, "devices": args.devices or jax.device_count(), "vocab_size": len(words),
              "seconds": result.seconds, "words_per_s": result.words_per_s,
              "epochs_done": result.epochs_done * config.epochs,
              "resumed_from": result.resumed_from and {"epoch": result.resumed_from[0],
                                                       "call": result.resumed_from[1]},
              "interrupted": signal.Signals(result.interrupted).name
              if result.interrupted else None}
    _write_json(out / "run.json", record)

    if result.interrupted:
        name = signal.Signals(result.interrupted).name
        print(f"interrupted by {name} after {result.epochs_done * config.epochs:.2f} of "
              f"{config.epochs} epochs; vectors trained so far saved in {out}/vectors.txt "
              f"and vectors.bin, checkpoint in {out}/checkpoint.npz; continue with the same "
              f"flags and --out {out} --resume", file=sys.stderr)
        return 128 + result.interrupted
    print(f"trained {config.mode} in {result.seconds:.1f}s ({result.words_per_s:,.0f} "
          f"words/s); vectors in {out}/vectors.txt and {out}/vectors.bin", file=sys.stderr)

    for q in args.query:
        neighbours = word2vec.most_similar(words, result.vectors, q.lower(), topn=args.topn)
        print(f"{q}: " + ", ".join(f"{w} {s:.3f}" for w, s in neighbours))
    for a, b, c in args.analogy:
        (d, score), = word2vec.analogy(words, result.vectors, a.lower(), b.lower(), c.lower())
        print(f"{a} : {b} :: {c} : {d} ({score:.3f})")
    if args.eval:
        scores = word2vec.evaluate(words, result.vectors)
        print(word2vec.NO_GENSIM if scores is None else word2vec.format_scores(scores))
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
