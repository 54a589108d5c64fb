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

The training loop (progress, checkpoints, resume, signals) is ``train`` in the
``experiments/word2vec.py`` command; this module holds its pieces: ``prepare``, ``plan``,
``make_trainer`` (the placed state and the jitted chunk function), ``epoch_batches``,
checkpoint metadata, vectors I/O, ``most_similar`` and ``analogy``. A minimal loop:

    >>> prepared = word2vec.prepare(word2vec.tokenize(text), config)     # doctest: +SKIP
    >>> trainer = word2vec.make_trainer(prepared, config)                 # doctest: +SKIP
    >>> state = trainer.state                                             # doctest: +SKIP
    >>> for epoch in range(config.epochs):                                # doctest: +SKIP
    ...     for chunk in word2vec.epoch_batches(prepared, config, trainer.plan, epoch):
    ...         state, _ = trainer.chunk_fn(state, trainer.put_batch(chunk.batch))
    >>> word2vec.most_similar(prepared.vocab.words, state.params.w_in, "king")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import checkpoint as ckpt
from jaxseq import parallel
from jaxseq._w2v_data import (
    PAD_SENTENCE,
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
from jaxseq.errors import UsageError

__all__ = [
    "MODES",
    "OBJECTIVES",
    "NO_GENSIM",
    "PAD_SENTENCE",
    "AnalogyScore",
    "EncodedCorpus",
    "PairScore",
    "Plan",
    "Prepared",
    "Scores",
    "SegmentBatch",
    "TrainConfig",
    "Trainer",
    "TrainState",
    "UsageError",
    "Vocab",
    "Word2VecParams",
    "analogy",
    "build_vocab",
    "check_resume",
    "checkpoint_meta",
    "epoch_batches",
    "make_trainer",
    "position_after",
    "cbow_hidden",
    "cbow_negative_grads",
    "cbow_negative_loss",
    "cbow_softmax_loss",
    "encode",
    "evaluate",
    "evaluate_analogies",
    "evaluate_pairs",
    "format_scores",
    "gensim_test_data",
    "init_params",
    "keep_probabilities",
    "load_vectors",
    "make_chunk_fn",
    "make_optimizer",
    "most_similar",
    "negative_cdf",
    "pair_mask",
    "pairs_from_batch",
    "plan",
    "prepare",
    "sample_negatives",
    "sample_windows",
    "save_binary",
    "save_text",
    "skipgram_negative_grads",
    "skipgram_negative_loss",
    "skipgram_softmax_loss",
    "spearman",
    "step_loss",
    "subsample",
    "tokenize",
    "train_step",
]


class Prepared(NamedTuple):
    """What training needs from the corpus: vocabulary, ids, and the sampling tables."""

    vocab: Vocab
    corpus: EncodedCorpus
    keep: np.ndarray  # (V,) subsampling keep probabilities
    cdf: np.ndarray  # (V,) cumulative unigram^0.75


def prepare(sentences: Sequence[Sequence[str]], config: TrainConfig) -> Prepared:
    """Builds the vocabulary and encodes the corpus (raises UsageError on bad input)."""
    config.validate()
    vocab = build_vocab(sentences, config.min_count)
    corpus = encode(sentences, vocab)
    return Prepared(
        vocab, corpus, keep_probabilities(vocab.counts, config.sample), negative_cdf(vocab.counts)
    )


CHECKPOINT_KIND = "word2vec"


def position_after(chunk: Chunk) -> tuple[int, int]:
    """(epoch, calls done in it) after ``chunk``; a finished epoch is (epoch + 1, 0)."""
    if chunk.call + 1 >= chunk.calls:
        return chunk.epoch + 1, 0
    return chunk.epoch, chunk.call + 1


def _config_dict(config: TrainConfig) -> dict:
    return {k: getattr(config, k) for k in config.__dataclass_fields__}


def checkpoint_meta(
    config: TrainConfig, vocab: Vocab, position: tuple[int, int], done_words: float
) -> dict:
    """The JSON metadata saved beside the state: config, vocabulary and data position
    (``(epoch, calls done in it)``, and corpus words trained so far)."""
    return {
        "kind": CHECKPOINT_KIND,
        "config": _config_dict(config),
        "epoch": position[0],
        "call": position[1],
        "done_words": done_words,
        "words": list(vocab.words),
        "counts": [int(c) for c in vocab.counts],
    }


def check_resume(path: pathlib.Path, config: TrainConfig, vocab: Vocab | None = None) -> dict:
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
        raise UsageError(
            f"cannot resume from {path}: it was trained with "
            + ", ".join(f"{k}={saved.get(k)} (now {now[k]})" for k in diff)
        )
    if vocab is not None and (
        meta.get("words") != list(vocab.words)
        or meta.get("counts") != [int(c) for c in vocab.counts]
    ):
        raise UsageError(
            f"cannot resume from {path}: this corpus gives another vocabulary "
            f"({len(vocab)} words, the checkpoint has {len(meta.get('words', []))});"
            f" another corpus?"
        )
    return meta


class Plan(NamedTuple):
    segments_per_step: int
    negative_groups: int  # divides segments_per_step
    steps_per_call: int
    total_steps: int


def plan(prepared: Prepared, config: TrainConfig) -> Plan:
    """Batch geometry for this corpus (small corpora get smaller steps and calls)."""
    expected_kept = float(np.sum(prepared.vocab.counts * prepared.keep))
    n_seg = max(1, math.ceil(expected_kept / config.segment))
    per_step = min(config.segments_per_step, n_seg)
    groups = max(
        g for g in range(1, min(config.negative_groups, per_step) + 1) if per_step % g == 0
    )
    steps = min(config.steps_per_call, math.ceil(n_seg / per_step))
    calls = math.ceil(n_seg / (per_step * steps))
    return Plan(per_step, groups, steps, calls * steps * config.epochs)


class Trainer(NamedTuple):
    """What a training loop runs: the state placed on its devices and the chunk function.

    Attributes:
      plan: the batch geometry (``plan``).
      mesh: the data-parallel mesh, or None on one device.
      state: the initial (or restored) ``TrainState``, placed on the mesh.
      chunk_fn: jitted ``(state, batch) -> (state, loss)`` (``make_chunk_fn``); lower it
        with ``batch_shapes`` to compile ahead of the first batch.
      batch_shapes: ``SegmentBatch`` of ``ShapeDtypeStruct``, ``(steps, per_step, ...)``.
      put_batch: places a host ``SegmentBatch`` as ``chunk_fn`` expects it.
    """

    plan: Plan
    mesh: Any
    state: TrainState
    chunk_fn: Callable
    batch_shapes: SegmentBatch
    put_batch: Callable[[SegmentBatch], SegmentBatch]


def initial_state(prepared: Prepared, config: TrainConfig, plan_: Plan) -> TrainState:
    """Fresh tables (``init_params``) and optimizer state; the template a checkpoint loads into."""
    params = init_params(jax.random.key(config.seed), len(prepared.vocab), config.dim)
    return TrainState(params, make_optimizer(config, plan_.total_steps).init(params))


def make_trainer(
    prepared: Prepared,
    config: TrainConfig,
    *,
    state: TrainState | None = None,
    devices: int | None = None,
    with_loss: bool = True,
    gather_updates: bool = True,
) -> Trainer:
    """The state and chunk function of a run, for one device or a data-parallel mesh.

    Args:
      prepared: the corpus (``prepare``).
      config: hyperparameters.
      state: a restored state (default: ``initial_state``).
      devices: shard each step's segments over this many devices (default: every device,
        across processes); the tables are replicated and the global batch does not depend
        on the device count.
      with_loss: the chunk function also returns a loss (``make_chunk_fn``).
      gather_updates: see ``make_chunk_fn``.

    Raises:
      UsageError: too many devices, or a step whose segments do not divide evenly over them.
    """
    plan_ = plan(prepared, config)
    per_step, groups, steps, total_steps = plan_
    mesh = _mesh(devices, per_step, config)
    state = initial_state(prepared, config, plan_) if state is None else state
    width = config.segment + 2 * config.window
    shapes = SegmentBatch(
        *(
            jax.ShapeDtypeStruct((steps, per_step, n), jnp.int32)
            for n in (width, width, config.segment, config.segment, config.segment)
        ),
        jax.ShapeDtypeStruct((steps, groups, config.shared_negatives), jnp.int32),
    )
    optimizer = make_optimizer(config, total_steps)
    if mesh is None:
        chunk_fn = make_chunk_fn(config, optimizer, with_loss=with_loss)
        return Trainer(plan_, None, state, chunk_fn, shapes, lambda batch: batch)
    state = parallel.replicate(mesh, state)
    # Negative groups follow the segments when they split evenly; otherwise the (small)
    # negative-id array is replicated.
    neg_axis = 1 if groups % mesh.size == 0 else None

    def put_batch(batch: SegmentBatch) -> SegmentBatch:
        return SegmentBatch(
            *(parallel.shard_batch(mesh, x, axis=1) for x in batch[:-1]),
            parallel.shard_batch(mesh, batch.neg_ids, axis=1)
            if neg_axis
            else parallel.replicate(mesh, batch.neg_ids),
        )

    shardings = SegmentBatch(
        *(parallel.batch_sharding(mesh, 3, 1) for _ in range(5)),
        parallel.batch_sharding(mesh, 3, 1) if neg_axis else parallel.replicated(mesh),
    )
    shapes = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    chunk_fn = make_chunk_fn(
        config,
        optimizer,
        with_loss=with_loss,
        state_sharding=jax.tree.map(lambda x: x.sharding, state),
        gather_updates=gather_updates,
    )
    return Trainer(plan_, mesh, state, chunk_fn, shapes, put_batch)


def epoch_batches(
    prepared: Prepared, config: TrainConfig, plan_: Plan, epoch: int, *, skip: int = 0
) -> Iterator[Chunk]:
    """The device calls' batches of one epoch, after the first ``skip`` of them.

    Each epoch's randomness is its own generator seeded by ``(seed, epoch)``, so a resume
    rebuilds any epoch's remaining batches without replaying the earlier ones.
    """
    return epoch_chunks(
        prepared.corpus,
        prepared.keep,
        prepared.cdf,
        window=config.window,
        segment=config.segment,
        segments_per_step=plan_.segments_per_step,
        steps_per_call=plan_.steps_per_call,
        shared_negatives=config.shared_negatives,
        negative_groups=plan_.negative_groups,
        shuffle_block=config.shuffle_block,
        rng=np.random.default_rng([config.seed, epoch]),
        epoch=epoch,
        skip=skip,
    )


def _mesh(devices: int | None, per_step: int, config: TrainConfig):
    """The data-parallel mesh for ``devices`` (None: all), or None for one device."""
    if devices is not None and devices < 1:
        raise UsageError(f"devices must be positive, got {devices}")
    single = devices == 1 or (devices is None and len(jax.devices()) == 1)
    if single and jax.process_count() == 1:
        return None  # the plain jitted step, no sharding machinery at all
    mesh = parallel.data_mesh(devices)  # raises UsageError for too many devices
    if mesh.size == 1:
        return None
    if per_step % mesh.size:
        reduced = per_step < config.segments_per_step
        raise UsageError(
            f"a step's {per_step} segments (batch {config.batch} / segment "
            f"{config.segment}{', reduced to fit this small corpus' if reduced else ''}) "
            f"must divide evenly over {mesh.size} devices; change batch or devices"
        )
    return mesh


def most_similar(
    words: Sequence[str],
    vectors: np.ndarray,
    query: str | Sequence[str],
    *,
    negative: Sequence[str] = (),
    topn: int = 10,
) -> list[tuple[str, float]]:
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
            raise UsageError(
                f"word {w!r} is not in the vocabulary ({len(words)} words; "
                f"words are lower-cased and need min_count occurrences)"
            )
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


def analogy(
    words: Sequence[str], vectors: np.ndarray, a: str, b: str, c: str, *, topn: int = 1
) -> list[tuple[str, float]]:
    """The best d for a : b :: c : d (3CosAdd: closest to b - a + c, not a, b or c)."""
    return most_similar(words, vectors, [b, c], negative=[a], topn=topn)
