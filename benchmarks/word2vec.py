"""Word2Vec benchmark: jaxseq against gensim, speed and quality, interleaved.

    python -m benchmarks word2vec --corpus PATH [--repeats 2] [--json]
    python -m benchmarks word2vec --prepare OUT.txt      # build the default corpus

Both implementations train on the same tokenized sentences (``jaxseq.word2vec.tokenize``)
with the same settings (dim 100, window 5, negative 5, min_count 5, sample 1e-3, 5 epochs,
lr 0.025 skip-gram / 0.05 CBOW decaying to 1e-4 of it); gensim runs with ``workers=2``.
Runs alternate (gensim, jaxseq, then jaxseq, gensim, ...) so a noisy shared machine hurts
both alike. "Effective words/s" = corpus words (before subsampling) per epoch * epochs /
training wall time, the vocabulary pass excluded for both; jaxseq's time includes its
compilation. Both sets of vectors are scored by the same NumPy evaluation (WordSim-353,
SimLex-999 Spearman, Google analogy accuracy).

Without ``--corpus`` the corpus is built once (``--prepare``) from what gensim's package
ships plus Tiny Shakespeare: the articles of gensim's shortened English Wikipedia dump
(markup stripped with gensim's ``filter_wiki``), ``lee_background.cor`` and Tiny
Shakespeare; about 745,000 words, the most that is available offline here.
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from experiments import _cli, _malloc
from jaxseq import word2vec
from jaxseq.data import cache_dir, load_corpus
from jaxseq.errors import UsageError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE = "lee_background.cor"
DEFAULT_CORPUS = "word2vec-bench.txt"


def prepare_corpus(out: pathlib.Path) -> int:
    """Writes the default benchmark corpus, one paragraph per line; returns its word count."""
    data = word2vec.gensim_test_data()
    if data is None:
        raise UsageError(
            "building the benchmark corpus needs gensim's test data "
            "(pip install 'jaxseq[eval]'), or pass --corpus PATH"
        )
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    lines = []
    with bz2.open(data / WIKI_DUMP, "rt", encoding="utf-8") as f:
        for _title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            lines.extend(p.strip() for p in filter_wiki(text).splitlines() if p.strip())
    lines.extend((data / LEE).read_text(encoding="utf-8").splitlines())
    lines.extend(load_corpus(None).splitlines())
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return sum(len(s) for s in word2vec.tokenize(text))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    dim: int = _cli.field(100, "embedding size")
    window: int = _cli.field(5, "maximal window")
    negative: int = _cli.field(5, "negative samples")
    min_count: int = _cli.field(5, "minimum word count")
    sample: float = _cli.field(1e-3, "subsampling threshold")
    epochs: int = _cli.field(5, "epochs")
    workers: int = _cli.field(2, "gensim worker threads")
    repeats: int = _cli.field(2, "runs of each implementation per mode (interleaved)")
    seed: int = _cli.field(0, "seed of the first repeat (then +1 per repeat)")


def _parser():
    p = _cli.parser(
        "python -m benchmarks word2vec",
        "Word2Vec speed and quality: jaxseq vs gensim on one corpus.",
    )
    p.add_argument(
        "--corpus",
        default=None,
        metavar="PATH",
        help=f"UTF-8 text, a sentence per line (default: the prepared corpus "
        f"{DEFAULT_CORPUS} in the data cache, built on first use)",
    )
    p.add_argument(
        "--prepare",
        default=None,
        metavar="OUT",
        help="only write the default corpus (gensim's Wikipedia sample, "
        "lee_background.cor and Tiny Shakespeare) to OUT and exit",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["skipgram", "cbow"],
        choices=list(word2vec.MODES),
        help="which architectures to run",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=["gensim", "jaxseq"],
        choices=["gensim", "jaxseq"],
        help="which implementations to run",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    _cli.add_dataclass_flags(p, BenchConfig)
    return p


def _lr(mode: str) -> float:
    return 0.025 if mode == "skipgram" else 0.05


def run_gensim(sentences, mode: str, cfg: BenchConfig, seed: int):
    from gensim.models import Word2Vec

    alpha = _lr(mode)
    model = Word2Vec(
        vector_size=cfg.dim,
        window=cfg.window,
        negative=cfg.negative,
        hs=0,
        min_count=cfg.min_count,
        sample=cfg.sample,
        sg=int(mode == "skipgram"),
        cbow_mean=1,
        alpha=alpha,
        min_alpha=alpha * 1e-4,
        workers=cfg.workers,
        seed=seed,
    )
    model.build_vocab(sentences)
    start = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=cfg.epochs)
    seconds = time.perf_counter() - start
    return list(model.wv.index_to_key), np.asarray(model.wv.vectors), seconds


def run_jaxseq(sentences, mode: str, cfg: BenchConfig, seed: int):
    config = word2vec.TrainConfig(
        mode=mode,
        dim=cfg.dim,
        window=cfg.window,
        negative=cfg.negative,
        min_count=cfg.min_count,
        sample=cfg.sample,
        epochs=cfg.epochs,
        lr=_lr(mode),
        seed=seed,
    )
    from experiments.word2vec import train  # the command's own run loop

    prepared = word2vec.prepare(sentences, config)
    result = train(prepared, config, progress=False)
    return list(result.vocab.words), result.vectors, result.seconds


def main(argv: Sequence[str] | None = None) -> int:
    _malloc.retain_freed_memory()  # as the command lines do (JAXSEQ_MALLOC=default: not)
    args = _parser().parse_args(argv)
    cfg = _cli.config_from_args(BenchConfig, args)
    for name in ("dim", "window", "negative", "min_count", "epochs", "workers", "repeats"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.prepare:
        n = prepare_corpus(pathlib.Path(args.prepare))
        print(f"wrote {args.prepare}: {n:,} words", file=sys.stderr)
        return 0
    if "gensim" in args.impls:
        try:
            import gensim  # noqa: F401
        except ImportError:
            raise UsageError(
                "the gensim side of the benchmark needs gensim "
                "(pip install 'jaxseq[eval]'), or pass --impls jaxseq"
            ) from None
    path = pathlib.Path(args.corpus) if args.corpus else cache_dir() / DEFAULT_CORPUS
    if args.corpus is None and not path.is_file():
        n = prepare_corpus(path)
        print(f"built the benchmark corpus {path} ({n:,} words)", file=sys.stderr)
    sentences = word2vec.tokenize(load_corpus(path))
    words = sum(len(s) for s in sentences)
    if words == 0:
        raise UsageError(f"corpus {path} holds no words")
    scorer = word2vec.evaluate
    have_eval = word2vec.gensim_test_data() is not None
    if not have_eval:
        print(word2vec.NO_GENSIM, file=sys.stderr)
    if not args.json:
        print(
            f"corpus {path}: {words:,} words, {len(sentences):,} sentences; dim {cfg.dim}, "
            f"window {cfg.window}, negative {cfg.negative}, min_count {cfg.min_count}, "
            f"sample {cfg.sample:g}, {cfg.epochs} epochs, gensim workers={cfg.workers}"
        )
    runners = {"gensim": run_gensim, "jaxseq": run_jaxseq}
    rows = []
    for rep in range(cfg.repeats):
        for mode in args.modes:
            order = list(args.impls) if rep % 2 == 0 else list(reversed(args.impls))
            for impl in order:
                vocab, vectors, seconds = runners[impl](sentences, mode, cfg, cfg.seed + rep)
                row = {
                    "impl": impl,
                    "mode": mode,
                    "repeat": rep,
                    "words_per_s": words * cfg.epochs / seconds,
                    "seconds": seconds,
                    "ws353": None,
                    "simlex": None,
                    "analogy": None,
                }
                if have_eval:
                    s = scorer(vocab, vectors)
                    row.update(
                        ws353=s.ws353.spearman,
                        simlex=s.simlex.spearman,
                        analogy=s.analogy.accuracy,
                        ws353_oov=s.ws353.oov_rate,
                        simlex_oov=s.simlex.oov_rate,
                        analogy_oov=s.analogy.oov_rate,
                    )
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(
                        f"  {mode:8s} {impl:6s} run {rep}: {row['words_per_s']:>11,.0f} "
                        f"words/s ({seconds:.2f}s)"
                        + (
                            f"  ws353 {row['ws353']:.3f} simlex {row['simlex']:.3f} "
                            f"analogy {row['analogy']:.2%}"
                            if have_eval
                            else ""
                        ),
                        flush=True,
                    )
    if not args.json:
        _summary(rows, args.modes, args.impls)
    return 0


def _median(rows, key):
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else float("nan")


def _summary(rows, modes, impls):
    print("\n| mode | impl | words/s (median) | ratio jaxseq/gensim | WS353 | SimLex | analogy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode in modes:
        med = {
            i: _median([r for r in rows if r["mode"] == mode and r["impl"] == i], "words_per_s")
            for i in impls
        }
        for impl in impls:
            mine = [r for r in rows if r["mode"] == mode and r["impl"] == impl]
            ratio = (
                f"{med['jaxseq'] / med['gensim']:.2f}x"
                if impl == "jaxseq" and "gensim" in med
                else ""
            )
            print(
                f"| {mode} | {impl} | {med[impl]:,.0f} | {ratio} | "
                f"{_median(mine, 'ws353'):.3f} | {_median(mine, 'simlex'):.3f} | "
                f"{_median(mine, 'analogy'):.2%} |"
            )


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
