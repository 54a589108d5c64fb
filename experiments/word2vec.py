"""Train Word2Vec (skip-gram or CBOW) and write word2vec text and binary vectors.

    python -m experiments.word2vec --mode skipgram                 # Tiny Shakespeare words
    python -m experiments.word2vec --mode cbow --data text.txt --out runs/w2v --eval
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
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _cli, _malloc, _run
from jaxseq import checkpoint as ckpt
from jaxseq import parallel, word2vec
from jaxseq._w2v_data import BatchProducer
from jaxseq.data import load_corpus
from jaxseq.errors import UsageError

DEFAULT_OUT = "runs/word2vec"


# --------------------------------------------------------------------------- the run


class TrainResult(NamedTuple):
    vocab: word2vec.Vocab
    params: word2vec.Word2VecParams
    vectors: np.ndarray  # (V, D) the input vectors, as exported
    raw_words: int  # corpus words per epoch (before subsampling)
    seconds: float  # training wall time, compilation included
    words_per_s: float  # corpus words trained in this call / seconds
    epochs_done: float  # fraction of the requested epochs completed
    interrupted: int | None  # signal number that stopped training early (0: should_stop),
    # None when every epoch ran
    checkpoint: pathlib.Path | None = None  # the last checkpoint written (run_dir)
    resumed_from: tuple[int, int] | None = None  # (epoch, call) a resume started at


class _Progress:
    """Where the run is: position, words done, the checkpoint and metrics it last wrote."""

    def __init__(self, position: tuple[int, int], done_words: float, calls_per_epoch: int):
        self.position, self.done_words, self.calls_per_epoch = position, done_words, calls_per_epoch
        self.saved_at, self.checkpoint, self.calls_since_save = position, None, 0
        self.loss = None

    @property
    def call_index(self) -> int:
        """Device calls done since the start of the run (the metrics' ``step``)."""
        return self.position[0] * self.calls_per_epoch + self.position[1]


def _resume_point(run_dir: _run.RunDir | None, prepared, config, log):
    """``(state or None, position, done_words, resumed_from)`` from the run directory's
    checkpoint; a fresh start is ``(None, (0, 0), 0.0, None)``."""
    found = run_dir.check() if run_dir is not None else None
    if found is None:
        return None, (0, 0), 0.0, None
    meta = word2vec.check_resume(found, config, prepared.vocab)
    template = word2vec.initial_state(prepared, config, word2vec.plan(prepared, config))
    state, _ = ckpt.load(found, template)
    position = (int(meta["epoch"]), int(meta["call"]))
    done_words = float(meta["done_words"])
    if position[0] >= config.epochs:
        log(f"{found} holds a finished run ({config.epochs} epochs): nothing to train")
    else:
        log(
            f"resumed from {found} at epoch {position[0] + 1}, device call {position[1]} of "
            f"the epoch ({done_words / prepared.corpus.raw_words:.2f} epochs done)"
        )
    return state, position, done_words, position


def train(
    sentences,
    config: word2vec.TrainConfig,
    *,
    progress: bool = True,
    handle_signals: bool = False,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    devices: int | None = None,
    gather_updates: bool = True,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    save_every: int = 0,
) -> TrainResult:
    """Trains word vectors, optionally with checkpoints in a run directory.

    Args:
      sentences: tokenized sentences (``word2vec.tokenize``), or ``word2vec.prepare``'s output.
      config: hyperparameters.
      progress: show a tqdm bar with words/s on stderr.
      handle_signals: stop cleanly on SIGINT/SIGTERM (between device calls) and report
        the signal in ``TrainResult.interrupted``, keeping the vectors trained so far.
      should_stop: polled between device calls; True stops training early.
      log: where one-line messages go (default: stderr).
      devices: shard each step's segments over this many devices (default: all).
      gather_updates: see ``word2vec.make_chunk_fn``.
      run_dir: write ``checkpoint.npz`` and ``metrics.jsonl`` here at the end of every
        epoch, every ``save_every`` device calls, when training stops early and at the end.
        Batches are a pure function of (seed, epoch, position), so a resume continues to
        exactly the vectors of an uninterrupted run.
      resume: continue from ``run_dir``'s checkpoint (from the beginning, with a log line,
        when there is none yet).
      overwrite: start afresh in a ``run_dir`` that holds files, removing its checkpoints;
        without it (or ``resume``) such a directory is refused and nothing is deleted.
      save_every: device calls between checkpoints (0: only at epoch ends).

    Raises:
      UsageError: bad config, too many devices, a run directory that holds a run, or a
        checkpoint that is unreadable or of another run.
    """
    prepared = (
        sentences
        if isinstance(sentences, word2vec.Prepared)
        else word2vec.prepare(sentences, config)
    )
    config.validate()
    log = log or _run.log_to_stderr
    if save_every < 0:
        raise UsageError(f"--save-every must be >= 0, got {save_every}")
    if not parallel.is_main_process():
        progress, log = False, (lambda msg: None)
    dir_ = (
        None
        if run_dir is None
        else _run.RunDir(
            run_dir, resume=resume, overwrite=overwrite, writer=parallel.is_main_process(), log=log
        )
    )
    state, position, done_words, resumed_from = _resume_point(dir_, prepared, config, log)
    trainer = word2vec.make_trainer(
        prepared,
        config,
        state=state,
        devices=devices,
        with_loss=progress,
        gather_updates=gather_updates,
    )
    if dir_ is not None:
        dir_.create()
    if trainer.mesh is not None:
        log(
            f"word2vec: {parallel.describe(trainer.mesh)}, "
            f"{trainer.plan.segments_per_step // trainer.mesh.size} of "
            f"{trainer.plan.segments_per_step} segments per step on each device"
        )
    calls = trainer.plan.total_steps // (trainer.plan.steps_per_call * config.epochs)
    where = _Progress(position, done_words, calls)
    metrics = (
        None
        if dir_ is None
        else _run.MetricsLog(dir_.path / _run.METRICS_NAME, enabled=dir_.writer)
    )
    if metrics is not None and resumed_from is not None:
        metrics.trim(where.call_index)
    return _loop(
        prepared,
        config,
        trainer,
        where,
        dir_,
        metrics,
        progress=progress,
        log=log,
        handle_signals=handle_signals,
        should_stop=should_stop,
        save_every=save_every,
        resumed_from=resumed_from,
    )


def _loop(
    prepared,
    config,
    trainer,
    where: _Progress,
    dir_,
    metrics,
    *,
    progress,
    log,
    handle_signals,
    should_stop,
    save_every,
    resumed_from,
) -> TrainResult:
    """Device calls from ``where`` to the last epoch's end, or until told to stop."""
    from tqdm.auto import tqdm

    state, start_words, start = trainer.state, where.done_words, time.perf_counter()
    total_words = prepared.corpus.raw_words * config.epochs

    def save() -> None:
        if dir_ is None or where.saved_at == where.position and where.checkpoint is not None:
            return
        local = parallel.to_local(state) if trainer.mesh is not None else state
        meta = word2vec.checkpoint_meta(config, prepared.vocab, where.position, where.done_words)
        where.checkpoint = dir_.save(local, meta) or where.checkpoint
        where.saved_at, where.calls_since_save = where.position, 0
        metrics.write(
            {
                "step": where.call_index,
                "epoch": where.position[0],
                "epochs_done": where.done_words / prepared.corpus.raw_words,
                "words_per_s": (where.done_words - start_words)
                / max(time.perf_counter() - start, 1e-9),
                **({"loss": float(where.loss)} if where.loss is not None else {}),
            }
        )

    make_epoch = lambda epoch: word2vec.epoch_batches(
        prepared,
        config,
        trainer.plan,
        epoch,
        skip=where.position[1] if epoch == where.position[0] else 0,
    )
    with _run.StopSignals(handle_signals) as signals:
        producer = BatchProducer(make_epoch, config.epochs, first_epoch=where.position[0])
        bar = tqdm(
            total=total_words,
            initial=min(round(where.done_words), total_words),
            disable=not progress,
            unit="word",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            desc=f"word2vec {config.mode}",
        )
        try:
            # Compile while the producer builds the first batches.
            run_chunk = trainer.chunk_fn.lower(state, trainer.batch_shapes).compile()
            for chunk in producer:
                if signals.received is not None or (should_stop is not None and should_stop()):
                    break
                state, loss = run_chunk(state, trainer.put_batch(chunk.batch))
                if where.loss is not None:  # the previous call is done by now
                    bar.set_postfix(epoch=chunk.epoch + 1, loss=f"{float(where.loss):.3f}")
                where.loss, where.done_words = loss, where.done_words + chunk.raw_words
                where.position = word2vec.position_after(chunk)
                where.calls_since_save += 1
                bar.update(min(round(where.done_words), total_words) - bar.n)
                if where.position[1] == 0 or (save_every and where.calls_since_save >= save_every):
                    save()
            jax.block_until_ready(state)
            save()  # the end, or where training stopped early
        finally:
            producer.close()
            bar.close()
    interrupted = None
    if where.done_words < total_words * (1 - 1e-9):
        interrupted = signals.received if signals.received is not None else 0
    return _result(
        prepared, config, state, trainer, where, start, start_words, interrupted, resumed_from, log
    )


def _result(
    prepared, config, state, trainer, where, start, start_words, interrupted, resumed_from, log
) -> TrainResult:
    seconds = time.perf_counter() - start
    params = state.params if trainer.mesh is None else parallel.to_local(state.params)
    if not bool(jnp.all(jnp.isfinite(params.w_in))):
        log("warning: training produced non-finite vectors; try a lower --lr or --batch")
    total_words = prepared.corpus.raw_words * config.epochs
    return TrainResult(
        prepared.vocab,
        params,
        np.asarray(params.w_in),
        prepared.corpus.raw_words,
        seconds,
        (where.done_words - start_words) / max(seconds, 1e-9),
        where.done_words / max(total_words, 1),
        interrupted,
        where.checkpoint,
        resumed_from,
    )


# --------------------------------------------------------------------------- command line


def _parser():
    p = _cli.parser(
        "python -m experiments.word2vec",
        "Train skip-gram or CBOW word vectors with JAX (word2vec.c's recipe, "
        "batched as matrix products; see jaxseq/word2vec.py).",
    )
    p.add_argument(
        "--data",
        "--corpus",
        dest="data",
        default=None,
        metavar="PATH",
        help="UTF-8 text file, one sentence per line (default: Tiny Shakespeare "
        "via $JAXSEQ_DATA, the data/ cache, or a download); --corpus is an "
        "alias",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"output directory (default: {DEFAULT_OUT}-<mode>)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="write into --out even if it already holds files"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint.npz (the same flags "
        "are required; starts from the beginning when there is none yet)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        metavar="N",
        help="also write the checkpoint every N device calls (default 0: at the "
        "end of each epoch, when stopped, and at the end)",
    )
    p.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="WORD",
        help="print the nearest neighbours of WORD after training (repeatable)",
    )
    p.add_argument("--topn", type=int, default=10, help="neighbours printed per --query")
    p.add_argument(
        "--analogy",
        nargs=3,
        action="append",
        default=[],
        metavar=("A", "B", "C"),
        help="print the best D for A:B::C:D (repeatable)",
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help="print WordSim-353 and SimLex-999 Spearman and Google analogy "
        "accuracy (data files from gensim's package)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _cli.add_parallel_flags(p)
    _cli.add_dataclass_flags(p, word2vec.TrainConfig)
    return p


def _write_json(path: pathlib.Path, record: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_before_reading(args, config: word2vec.TrainConfig, out: pathlib.Path) -> None:
    """The refusals that need no corpus: bad flags, too many devices, an occupied --out,
    an unreadable checkpoint or one of another config."""
    if args.topn <= 0:
        raise UsageError(f"--topn must be positive, got {args.topn}")
    if args.save_every < 0:
        raise UsageError(f"--save-every must be >= 0, got {args.save_every}")
    if args.devices is not None and args.devices > 1:
        parallel.data_mesh(args.devices)
    if parallel.is_main_process():
        run_dir = _run.RunDir(out, resume=args.resume, overwrite=args.overwrite, log=lambda s: None)
        found = run_dir.check()
        if found is not None:
            word2vec.check_resume(found, config)


def _check_words(args, config: word2vec.TrainConfig, words: Sequence[str]) -> None:
    known = set(words)
    for w in [*args.query, *(x for triple in args.analogy for x in triple)]:
        if w.lower() not in known:
            raise UsageError(
                f"word {w!r} is not in the vocabulary ({len(words)} words "
                f"with --min-count {config.min_count}; words are lower-cased)"
            )


def _write_outputs(out: pathlib.Path, args, config, result: TrainResult) -> None:
    words = result.vocab.words
    out.mkdir(parents=True, exist_ok=True)
    word2vec.save_text(out / "vectors.txt", words, result.vectors)
    word2vec.save_binary(out / "vectors.bin", words, result.vectors)
    record = {
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "corpus": str(args.data) if args.data else "tinyshakespeare",
        "corpus_words": result.raw_words,
        "devices": args.devices or jax.device_count(),
        "vocab_size": len(words),
        "seconds": result.seconds,
        "words_per_s": result.words_per_s,
        "epochs_done": result.epochs_done * config.epochs,
        "resumed_from": result.resumed_from
        and {"epoch": result.resumed_from[0], "call": result.resumed_from[1]},
        "interrupted": signal.Signals(result.interrupted).name if result.interrupted else None,
    }
    _write_json(out / "run.json", record)


def _print_queries(args, result: TrainResult) -> None:
    words = result.vocab.words
    for q in args.query:
        neighbours = word2vec.most_similar(words, result.vectors, q.lower(), topn=args.topn)
        print(f"{q}: " + ", ".join(f"{w} {s:.3f}" for w, s in neighbours))
    for a, b, c in args.analogy:
        ((d, score),) = word2vec.analogy(words, result.vectors, a.lower(), b.lower(), c.lower())
        print(f"{a} : {b} :: {c} : {d} ({score:.3f})")
    if args.eval:
        scores = word2vec.evaluate(words, result.vectors)
        print(word2vec.NO_GENSIM if scores is None else word2vec.format_scores(scores))


def main(argv: Sequence[str] | None = None) -> int:
    _malloc.retain_freed_memory()
    args = _parser().parse_args(argv)
    config = _cli.config_from_args(word2vec.TrainConfig, args)
    config.validate()
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    _cli.start_parallel(args)
    out = pathlib.Path(args.out or f"{DEFAULT_OUT}-{config.mode}")
    _check_before_reading(args, config, out)
    prepared = word2vec.prepare(word2vec.tokenize(load_corpus(args.data)), config)
    _check_words(args, config, prepared.vocab.words)
    main_process = parallel.is_main_process()
    if main_process:
        print(
            f"corpus: {prepared.corpus.raw_words:,} words, vocabulary "
            f"{len(prepared.vocab):,} (min count {config.min_count})",
            file=sys.stderr,
        )
    result = train(
        prepared,
        config,
        progress=args.progress,
        handle_signals=True,
        devices=args.devices,
        run_dir=out,
        resume=args.resume,
        overwrite=args.overwrite,
        save_every=args.save_every,
    )
    code = _run.exit_code_for(result.interrupted or None)
    if not main_process:
        return code
    _write_outputs(out, args, config, result)
    if result.interrupted:
        print(
            f"interrupted by {signal.Signals(result.interrupted).name} after "
            f"{result.epochs_done * config.epochs:.2f} of {config.epochs} epochs; vectors "
            f"trained so far saved in {out}/vectors.txt and vectors.bin, checkpoint in "
            f"{out}/checkpoint.npz; continue with the same flags and --out {out} --resume",
            file=sys.stderr,
        )
        return code
    print(
        f"trained {config.mode} in {result.seconds:.1f}s ({result.words_per_s:,.0f} "
        f"words/s); vectors in {out}/vectors.txt and {out}/vectors.bin",
        file=sys.stderr,
    )
    _print_queries(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
