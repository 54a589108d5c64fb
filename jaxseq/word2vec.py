"""Word2Vec (skip-gram and CBOW) in JAX, trained with word2vec.c's recipe.

What is word2vec.c's, unchanged: a vocabulary cut at ``min_count``; subsampling that keeps
a word of frequency f with probability (sqrt(f/(s*T)) + 1) * s*T/f; a window shrunk per
centre uniformly to 1..W; negatives drawn from unigram^0.75; input vectors initialised
uniform in [-0.5/D, 0.5/D) and output vectors at zero; plain SGD whose rate decays linearly
from 0.025 (skip-gram) or 0.05 (CBOW) to 1e-4 of that; for CBOW the mean of the context,
whose gradient every context word receives in full. A full-softmax objective
(``objective="softmax"``) is there for small vocabularies: the one-hot picture in which
p(c | x) is a softmax over the whole output table.

What is different, and why (the design). word2vec.c and gensim update one pair at a time
with BLAS level-1 loops; in JAX on a CPU per-row work is expensive (every gathered or
scattered row costs tens of nanoseconds) and matrix products are cheap. So the step is
built around products:

* **Segments instead of pairs.** A batch is B segments of L consecutive kept centre words
  plus W words either side. The device gathers each segment's L + 2W input rows and L
  output rows once, scores every (centre, input) cell of the segment with one batched
  product, and keeps the cells that are real pairs with a mask (offset 0 < |o| <= the
  centre's shrunk window, same sentence). Each pair of word2vec.c appears exactly once per
  epoch, but a row is gathered and scattered about 2.3 times per centre instead of twice
  per pair (~11 per centre).
* **Shared negatives** (BlazingText, Gupta & Khare 2017; also Intel's HogBatch). The
  step's segments form G groups; the M negatives drawn for a group are shared by all of
  its pairs and weighted K/M, so that each pair's negative term has word2vec's
  expectation; their scores and gradients become products with a (G, M, D) array.
* **Local shuffling.** Segment order is shuffled every epoch within consecutive blocks
  of ``shuffle_block`` segments (2048, about 33k words), so a step mixes B places of that
  stretch of the corpus. Measured on the benchmark corpus: strict corpus order lowers
  analogy accuracy, a shuffle across the whole epoch raises it but costs ~0.03 SimLex
  Spearman for CBOW; the local shuffle matches gensim (which walks the corpus in order
  with two threads) on all three scores.
* **Sparse updates with optax.** Each loss is a pure function of the gathered rows; its
  gradient w.r.t. those rows (in closed form for negative sampling, equal to ``jax.grad``
  of the loss as the tests check, because autodiff of log-sigmoid costs two extra
  transcendentals per score; ``jax.grad`` for the softmax) goes through
  ``optax.sgd(optax.linear_schedule(...))`` and the result is scatter-added into the
  tables. A dense optimizer over the full (V, D) tables would cost more per step than
  all the rest.
* **Duplicates.** Rows that occur several times in a step receive the sum of their pairs'
  updates, computed from the same (stale) values: n contributions at rate lr act like
  one step of size n * lr, and when they agree (a small vocabulary, a huge batch) that
  overshoots and diverges. Ordinary steps are kept moderate (512 centres, about 2,800
  pairs, 16 negative groups) so this is close to sequential SGD; past n * lr =
  ``dup_limit`` a row's update is scaled down to ``dup_limit / lr`` times the mean of
  its contributions, which leaves ordinary steps alone and keeps large batches finite
  (though a batch that is huge next to the vocabulary still learns poorly: keep it moderate).
* **Overlap.** Batches are built with NumPy on a background thread while the device runs
  ``steps_per_call`` steps in one jitted ``lax.scan``.

    >>> from jaxseq import word2vec
    >>> sentences = word2vec.tokenize(open("corpus.txt").read())      # doctest: +SKIP
    >>> result = word2vec.train(sentences, word2vec.TrainConfig(mode="skipgram"))  # doctest: +SKIP
    >>> word2vec.most_similar(result.vocab.words, result.vectors, "king")           # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import pathlib
import signal
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxseq._w2v_data import (
    PAD_SENTENCE,
    BatchProducer,
    Chunk,
    EncodedCorpus,
    SegmentBatch,
    Vocab,
    build_vocab,
    encode,
    epoch_chunks,
    keep_probabilities,
    negative_cdf,
    pair_mask,
    pairs_from_batch,
    sample_negatives,
    sample_windows,
    subsample,
    tokenize,
)
from jaxseq._w2v_eval import (
    NO_GENSIM,
    AnalogyScore,
    PairScore,
    Scores,
    evaluate,
    evaluate_analogies,
    evaluate_pairs,
    format_scores,
    gensim_test_data,
    spearman,
)
from jaxseq._w2v_io import load as load_vectors
from jaxseq._w2v_io import save_binary, save_text
from jaxseq._w2v_model import (
    MODES,
    OBJECTIVES,
    TrainConfig,
    TrainState,
    Word2VecParams,
    cbow_hidden,
    cbow_negative_grads,
    cbow_negative_loss,
    cbow_softmax_loss,
    init_params,
    make_chunk_fn,
    make_optimizer,
    skipgram_negative_grads,
    skipgram_negative_loss,
    skipgram_softmax_loss,
    step_loss,
    train_step,
)
from jaxseq import checkpoint as ckpt
from jaxseq import parallel
from jaxseq.errors import UsageError

__all__ = [
    "MODES", "OBJECTIVES", "NO_GENSIM", "PAD_SENTENCE", "AnalogyScore", "EncodedCorpus",
    "PairScore", "Plan", "Prepared", "Scores", "SegmentBatch", "TrainConfig", "TrainResult",
    "TrainState", "UsageError", "Vocab", "Word2VecParams", "analogy", "build_vocab", "check_resume",
    "find_resume_checkpoint",
    "cbow_hidden", "cbow_negative_grads", "cbow_negative_loss", "cbow_softmax_loss", "encode",
    "evaluate", "evaluate_analogies", "evaluate_pairs", "format_scores", "gensim_test_data",
    "init_params", "keep_probabilities", "load_vectors", "make_chunk_fn", "make_optimizer",
    "most_similar", "negative_cdf", "pair_mask", "pairs_from_batch", "plan", "prepare",
    "sample_negatives", "sample_windows", "save_binary", "save_text", "skipgram_negative_grads",
    "skipgram_negative_loss", "skipgram_softmax_loss", "spearman", "step_loss", "subsample",
    "tokenize", "train", "train_step",
]


class Prepared(NamedTuple):
    """What training needs from the corpus: vocabulary, ids, and the sampling tables."""

    vocab: Vocab
    corpus: EncodedCorpus
    keep: np.ndarray          # (V,) subsampling keep probabilities
    cdf: np.ndarray           # (V,) cumulative unigram^0.75


def prepare(sentences: Sequence[Sequence[str]], config: TrainConfig) -> Prepared:
    """Builds the vocabulary and encodes the corpus (raises UsageError on bad input)."""
    config.validate()
    vocab = build_vocab(sentences, config.min_count)
    corpus = encode(sentences, vocab)
    return Prepared(vocab, corpus, keep_probabilities(vocab.counts, config.sample),
                    negative_cdf(vocab.counts))


class TrainResult(NamedTuple):
    vocab: Vocab
    params: Word2VecParams
    vectors: np.ndarray           # (V, D) the input vectors, as exported
    raw_words: int                # corpus words per epoch (before subsampling)
    seconds: float                # training wall time, compilation included
    words_per_s: float            # corpus words trained in this call / seconds
    epochs_done: float            # fraction of the requested epochs completed
    interrupted: Optional[int]    # signal number that stopped training early (0: should_stop),
                                  # None when every epoch ran
    checkpoint: Optional[pathlib.Path] = None  # the last checkpoint written (checkpoint_dir)
    resumed_from: Optional[tuple[int, int]] = None  # (epoch, call) a resume started at


CHECKPOINT_KIND = "word2vec"


def _position(chunk: Chunk) -> tuple[int, int]:
    """(epoch, calls done in it) after ``chunk``; a finished epoch is (epoch + 1, 0)."""
    if chunk.call + 1 >= chunk.calls:
        return chunk.epoch + 1, 0
    return chunk.epoch, chunk.call + 1


def _config_dict(config: TrainConfig) -> dict:
    return {k: getattr(config, k) for k in config.__dataclass_fields__}


def find_resume_checkpoint(directory: str | os.PathLike) -> Optional[pathlib.Path]:
    """The checkpoint a resume of ``directory`` starts from, or None when it holds none.

    Falls back to the previous checkpoint when the newest is unreadable; when checkpoint
    files exist but none can be read, raises the newest one's UsageError instead of
    silently starting over.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        return None
    found = ckpt.find(directory)
    if found is None:
        for name in (ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME):
            if (directory / name).is_file():
                ckpt.read_meta(directory / name)  # raises the reason
    return found


def check_resume(path: pathlib.Path, config: TrainConfig, vocab: Optional[Vocab] = None
                 ) -> dict:
    """The metadata of a word2vec checkpoint, after checking it continues this run.

    ``vocab`` None checks the config only (before the corpus is read).

    Raises:
      UsageError: another kind of checkpoint, another config, or another vocabulary.
    """
    meta = ckpt.read_meta(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise UsageError(f"cannot resume from {path}: it is not a word2vec checkpoint")
    saved, now = meta.get("config", {}), _config_dict(config)
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        raise UsageError(f"cannot resume from {path}: it was trained with "
                         + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {now[k]})"
                                     for k in diff))
    if vocab is not None and (meta.get("words") != list(vocab.words)
                              or meta.get("counts") != [int(c) for c in vocab.counts]):
        raise UsageError(f"cannot resume from {path}: this corpus gives another vocabulary "
                         f"({len(vocab)} words, the checkpoint has {len(meta.get('words', []))});"
                         f" another --corpus?")
    return meta


class _StopSignals:
    """SIGINT/SIGTERM set a flag that the training loop checks between device calls."""

    def __init__(self, enabled: bool):
        self.received: Optional[int] = None
        self._enabled = enabled
        self._old = {}

    def __enter__(self):
        if self._enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class Plan(NamedTuple):
    segments_per_step: int
    negative_groups: int      # divides segments_per_step
    steps_per_call: int
    total_steps: int


def plan(prepared: Prepared, config: TrainConfig) -> Plan:
    """Batch geometry for this corpus (small corpora get smaller steps and calls)."""
    expected_kept = float(np.sum(prepared.vocab.counts * prepared.keep))
    n_seg = max(1, math.ceil(expected_kept / config.segment))
    per_step = min(config.segments_per_step, n_seg)
    groups = max(g for g in range(1, min(config.negative_groups, per_step) + 1)
                 if per_step % g == 0)
    steps = min(config.steps_per_call, math.ceil(n_seg / per_step))
    calls = math.ceil(n_seg / (per_step * steps))
    return Plan(per_step, groups, steps, calls * steps * config.epochs)


def train(sentences: Sequence[Sequence[str]] | Prepared, config: TrainConfig, *,
          progress: bool = True, handle_signals: bool = False,
          should_stop: Callable[[], bool] | None = None,
          log: Callable[[str], None] | None = None, devices: Optional[int] = None,
          gather_updates: bool = True, checkpoint_dir: str | os.PathLike | None = None,
          resume: bool = False, save_every: int = 0) -> TrainResult:
    """Trains word vectors.

    Args:
      sentences: tokenized sentences (``tokenize``), or the output of ``prepare``.
      config: hyperparameters.
      progress: show a tqdm bar with words/s on stderr.
      handle_signals: stop cleanly on SIGINT/SIGTERM (between device calls) and report
        the signal in ``TrainResult.interrupted``, keeping the vectors trained so far.
      should_stop: polled between device calls; True stops training early.
      log: where to write one-line messages (default: stderr).
      devices: shard each step's segments over this many devices (default: every device,
        across processes after ``parallel.initialize_distributed``); the tables are
        replicated and the global batch does not depend on the device count, so neither do
        the vectors (up to float summation order). One device runs the plain jitted step.
      gather_updates: with several devices, all-gather each step's update rows and scatter
        them into every copy of the tables (True), or let XLA all-reduce whole tables of
        partial updates (False; slower, kept for comparison).
      checkpoint_dir: write ``checkpoint.npz`` (tables, optimizer state, position, config,
        vocabulary) here at the end of every epoch, every ``save_every`` device calls, when
        training stops early and at the end. Batches are a pure function of (seed, epoch,
        position), so a resume continues to exactly the vectors of an uninterrupted run.
      resume: continue from ``checkpoint_dir``'s checkpoint (from the beginning, with a log
        line, when there is none yet). Without it an old checkpoint there is removed.
      save_every: device calls between checkpoints (0: only at epoch ends).

    Returns:
      A ``TrainResult``; a seed gives the same vectors every run.

    Raises:
      UsageError: bad config, too many devices, a step whose segments do not divide
        evenly over the devices, or a checkpoint that is unreadable or of another run.
    """
    prepared = sentences if isinstance(sentences, Prepared) else prepare(sentences, config)
    config.validate()
    vocab, corpus = prepared.vocab, prepared.corpus
    log = log or (lambda msg: print(msg, file=sys.stderr))
    per_step, groups, steps, total_steps = plan(prepared, config)
    mesh = _mesh(devices, per_step, config)
    if not parallel.is_main_process():
        progress, log = False, (lambda msg: None)
    if save_every < 0:
        raise UsageError(f"--save-every must be >= 0, got {save_every}")
    key = jax.random.key(config.seed)
    params = init_params(key, len(vocab), config.dim)
    optimizer = make_optimizer(config, total_steps)
    state = TrainState(params, optimizer.init(params))
    main = parallel.is_main_process()
    first_epoch, first_call, done_words, resumed_from = 0, 0, 0.0, None
    if checkpoint_dir is not None:
        checkpoint_dir = pathlib.Path(checkpoint_dir)
        found = find_resume_checkpoint(checkpoint_dir) if resume else None
        if found is not None:
            meta = check_resume(found, config, vocab)
            state, _ = ckpt.load(found, state)
            first_epoch, first_call = int(meta["epoch"]), int(meta["call"])
            done_words, resumed_from = float(meta["done_words"]), (first_epoch, first_call)
            if found.name != ckpt.CHECKPOINT_NAME:
                log(f"warning: {checkpoint_dir / ckpt.CHECKPOINT_NAME} is unreadable; "
                    f"resuming from the previous checkpoint {found.name}")
            if first_epoch >= config.epochs:
                log(f"{found} holds a finished run ({config.epochs} epochs): nothing to train")
            else:
                log(f"resumed from {found} at epoch {first_epoch + 1}, device call "
                    f"{first_call} of the epoch ({done_words / corpus.raw_words:.2f} epochs "
                    f"done)")
        else:
            if resume:
                log(f"no checkpoint in {checkpoint_dir} yet: starting from the beginning")
            if main:
                for name in (ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME):
                    (checkpoint_dir / name).unlink(missing_ok=True)
    width = config.segment + 2 * config.window
    shapes = SegmentBatch(
        *(jax.ShapeDtypeStruct((steps, per_step, n), jnp.int32)
          for n in (width, width, config.segment, config.segment, config.segment)),
        jax.ShapeDtypeStruct((steps, groups, config.shared_negatives), jnp.int32))
    if mesh is None:
        state_sharding, put_batch = None, (lambda batch: batch)
    else:
        state = parallel.replicate(mesh, state)
        state_sharding = jax.tree.map(lambda x: x.sharding, state)
        # Negative groups follow the segments when they split evenly; otherwise the (small)
        # negative-id array is replicated.
        neg_axis = 1 if groups % mesh.size == 0 else None

        def put_batch(batch: SegmentBatch) -> SegmentBatch:
            return SegmentBatch(
                *(parallel.shard_batch(mesh, x, axis=1) for x in batch[:-1]),
                parallel.shard_batch(mesh, batch.neg_ids, axis=1) if neg_axis
                else parallel.replicate(mesh, batch.neg_ids))

        shardings = SegmentBatch(
            *(parallel.batch_sharding(mesh, 3, 1) for _ in range(5)),
            parallel.batch_sharding(mesh, 3, 1) if neg_axis else parallel.replicated(mesh))
        shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes, shardings)
        log(f"word2vec: {parallel.describe(mesh)}, {per_step // mesh.size} of {per_step} "
            f"segments per step on each device")

    def make_epoch(epoch: int):
        # Each epoch's randomness is its own generator seeded by (seed, epoch), so a resume
        # can rebuild any epoch's remaining batches without replaying the earlier ones.
        return epoch_chunks(corpus, prepared.keep, prepared.cdf, window=config.window,
                            segment=config.segment, segments_per_step=per_step,
                            steps_per_call=steps, shared_negatives=config.shared_negatives,
                            negative_groups=groups, shuffle_block=config.shuffle_block,
                            rng=np.random.default_rng([config.seed, epoch]), epoch=epoch,
                            skip=first_call if epoch == first_epoch else 0)

    position = (first_epoch, first_call)
    saved_at, last_checkpoint = position, None

    def save_checkpoint():
        nonlocal saved_at, last_checkpoint
        if checkpoint_dir is None or saved_at == position and last_checkpoint is not None:
            return
        local = state if mesh is None else parallel.to_local(state)
        if main:
            meta = {"kind": CHECKPOINT_KIND, "config": _config_dict(config),
                    "epoch": position[0], "call": position[1], "done_words": done_words,
                    "words": list(vocab.words), "counts": [int(c) for c in vocab.counts]}
            last_checkpoint = ckpt.save(checkpoint_dir, local, meta)
        saved_at = position

    start = time.perf_counter()
    total_words = corpus.raw_words * config.epochs
    pending, interrupted, calls_since_save, start_words = None, None, 0, done_words
    with _StopSignals(handle_signals) as signals:
        producer = BatchProducer(make_epoch, config.epochs, first_epoch=first_epoch)
        bar = tqdm(total=total_words, initial=min(round(done_words), total_words),
                   disable=not progress, unit="word", unit_scale=True,
                   dynamic_ncols=True, file=sys.stderr, desc=f"word2vec {config.mode}")
        try:
            # Compile while the producer builds the first batches.
            run_chunk = make_chunk_fn(config, optimizer, with_loss=progress,
                                      state_sharding=state_sharding,
                                      gather_updates=gather_updates).lower(
                state, shapes).compile()
            for chunk in producer:
                if signals.received is not None or (should_stop is not None and should_stop()):
                    break
                state, loss = run_chunk(state, put_batch(chunk.batch))
                if pending is not None and pending[0] is not None:  # that call is done by now
                    bar.set_postfix(epoch=pending[1] + 1, loss=f"{float(pending[0]):.3f}")
                pending = (loss, chunk.epoch)
                done_words += chunk.raw_words
                position = _position(chunk)
                calls_since_save += 1
                bar.update(min(round(done_words), total_words) - bar.n)
                if checkpoint_dir is not None and (
                        position[1] == 0 or (save_every and calls_since_save >= save_every)):
                    save_checkpoint()
                    calls_since_save = 0
            jax.block_until_ready(state)
            save_checkpoint()  # the end, or where training stopped early
        finally:
            producer.close()
            bar.close()
        if done_words < total_words * (1 - 1e-9):
            interrupted = signals.received if signals.received is not None else 0
    seconds = time.perf_counter() - start
    params = state.params if mesh is None else parallel.to_local(state.params)
    if not bool(jnp.all(jnp.isfinite(params.w_in))):
        log("warning: training produced non-finite vectors; try a lower --lr or --batch")
    vectors = np.asarray(params.w_in)
    return TrainResult(vocab, params, vectors, corpus.raw_words, seconds,
                       (done_words - start_words) / max(seconds, 1e-9),
                       done_words / max(total_words, 1),
                       interrupted, last_checkpoint, resumed_from)


def _mesh(devices: Optional[int], per_step: int, config: TrainConfig):
    """The data-parallel mesh for ``devices`` (None: all), or None for one device."""
    if devices is not None and devices < 1:
        raise UsageError(f"--devices must be positive, got {devices}")
    single = devices == 1 or (devices is None and len(jax.devices()) == 1)
    if single and jax.process_count() == 1:
        return None  # the plain jitted step, no sharding machinery at all
    mesh = parallel.data_mesh(devices)  # raises UsageError for too many devices
    if mesh.size == 1:
        return None
    if per_step % mesh.size:
        reduced = per_step < config.segments_per_step
        raise UsageError(
            f"a step's {per_step} segments (--batch {config.batch} / --segment "
            f"{config.segment}{', reduced to fit this small corpus' if reduced else ''}) "
            f"must divide evenly over {mesh.size} devices; change --batch or --devices")
    return mesh


def most_similar(words: Sequence[str], vectors: np.ndarray, query: str | Sequence[str], *,
                 negative: Sequence[str] = (), topn: int = 10) -> list[tuple[str, float]]:
    """Nearest neighbours by cosine similarity of ``sum(positive) - sum(negative)``.

    Args:
      words: the V words.
      vectors: (V, D).
      query: a word or a list of positive words.
      negative: words to subtract.
      topn: how many neighbours.

    Raises:
      UsageError: a query word is not in the vocabulary.
    """
    positive = [query] if isinstance(query, str) else list(query)
    index = {w: i for i, w in enumerate(words)}
    for w in (*positive, *negative):
        if w not in index:
            raise UsageError(f"word {w!r} is not in the vocabulary ({len(words)} words; "
                             f"words are lower-cased and need --min-count occurrences)")
    unit = np.asarray(vectors, np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    target = unit[[index[w] for w in positive]].sum(0)
    if negative:
        target = target - unit[[index[w] for w in negative]].sum(0)
    sims = unit @ (target / max(float(np.linalg.norm(target)), 1e-12))
    for w in (*positive, *negative):
        sims[index[w]] = -np.inf
    top = np.argsort(-sims)[:topn]
    return [(words[i], float(sims[i])) for i in top if np.isfinite(sims[i])]


def analogy(words: Sequence[str], vectors: np.ndarray, a: str, b: str, c: str, *,
            topn: int = 1) -> list[tuple[str, float]]:
    """The best d for a : b :: c : d (3CosAdd: closest to b - a + c, not a, b or c)."""
    return most_similar(words, vectors, [b, c], negative=[a], topn=topn)
