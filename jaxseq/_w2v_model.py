"""Word2Vec objectives and the jitted sparse SGD step (see ``jaxseq.word2vec`` for the design)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq._w2v_data import SegmentBatch, pair_mask
from jaxseq.config import field
from jaxseq.errors import UsageError

MODES = ("skipgram", "cbow")
OBJECTIVES = ("negative", "softmax")


class Word2VecParams(NamedTuple):
    """The two embedding tables (word2vec.c's syn0 and syn1neg).

    w_in: (V, D) input vectors, the word vectors that are exported.
    w_out: (V, D) output vectors.
    """

    w_in: jax.Array
    w_out: jax.Array


def init_params(key: jax.Array, vocab_size: int, dim: int) -> Word2VecParams:
    """word2vec.c's initialisation: inputs uniform in [-0.5/D, 0.5/D), outputs zero."""
    w_in = (jax.random.uniform(key, (vocab_size, dim), jnp.float32) - 0.5) / dim
    return Word2VecParams(w_in, jnp.zeros((vocab_size, dim), jnp.float32))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of the training algorithm (the CLI adds corpus and output flags)."""

    mode: str = field(
        "skipgram", "skipgram predicts context from centre, cbow the reverse", choices=MODES
    )
    objective: str = field(
        "negative",
        "negative sampling, or the full softmax over the vocabulary (small vocabularies only)",
        choices=OBJECTIVES,
    )
    dim: int = field(100, "embedding size")
    window: int = field(5, "maximal context window W (each centre's is uniform on 1..W)")
    negative: int = field(5, "negative samples K per pair (per centre for cbow)")
    min_count: int = field(5, "drop words seen fewer times")
    sample: float = field(1e-3, "subsampling threshold for frequent words (0: off)")
    epochs: int = field(5, "passes over the corpus")
    lr: float | None = field(
        None,
        "initial learning rate, decayed linearly to 1e-4 of it "
        "(default: 0.025 skip-gram, 0.05 cbow)",
    )
    batch: int = field(512, "centre words per step (rounded down to whole segments)")
    segment: int = field(16, "consecutive centre words per segment of a batch")
    shared_negatives: int = field(
        16,
        "negatives M drawn per group of segments, shared by all the group's pairs and weighted K/M",
    )
    negative_groups: int = field(
        16,
        "groups of segments per step, each with its own shared "
        "negatives (more groups: less weight on each negative row)",
    )
    dup_limit: float = field(
        1.6,
        "caps lr * (pair contributions a row sums in one step); "
        "past it the row gets that many times their mean (keeps large "
        "batches from diverging)",
    )
    shuffle_block: int = field(
        2048,
        "segments are shuffled within consecutive blocks of this many (0: across the whole epoch)",
    )
    steps_per_call: int = field(16, "train steps fused into one jitted call")
    min_lr_fraction: float = field(1e-4, "final learning rate as a fraction of lr")
    seed: int = field(0, "seed for initialisation and sampling; same seed, same vectors")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.025 if self.mode == "skipgram" else 0.05

    @property
    def segments_per_step(self) -> int:
        return max(1, self.batch // self.segment)

    @property
    def dup_cap(self) -> float:
        """Most pair contributions a row may sum in one step (``dup_limit / lr``)."""
        return self.dup_limit / self.learning_rate

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.objective not in OBJECTIVES:
            raise UsageError(
                f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        for name in (
            "dim",
            "window",
            "negative",
            "min_count",
            "epochs",
            "batch",
            "segment",
            "shared_negatives",
            "negative_groups",
            "steps_per_call",
        ):
            value = getattr(self, name)
            if value <= 0:
                raise UsageError(f"{name} must be positive, got {value}")
        if self.batch < self.segment:
            raise UsageError(f"batch ({self.batch}) must be at least segment ({self.segment})")
        if not self.learning_rate > 0 or not np.isfinite(self.learning_rate):
            raise UsageError(f"lr must be positive, got {self.lr}")
        if self.sample < 0:
            raise UsageError(f"sample must be >= 0, got {self.sample}")
        if not 0 < self.min_lr_fraction <= 1:
            raise UsageError(f"min_lr_fraction must be in (0, 1], got {self.min_lr_fraction}")
        if not self.dup_limit > 0:
            raise UsageError(f"dup_limit must be positive, got {self.dup_limit}")


# ----------------------------------------------------------------------------- objectives
# Each loss is a pure function of the rows gathered for one step. It is the *sum* over the
# step's pairs (not the mean), so that jax.grad gives each pair word2vec's own update size.


def skipgram_negative_loss(in_rows, out_rows, neg_rows, mask, num_negative: int):
    """Skip-gram with negative sampling, each group's negatives shared by all its pairs.

    For a pair (context x, centre c) word2vec maximises
    log s(u_x . v_c) + sum_{k<K} log s(-u_x . v_{n_k}). Here the B segments form G groups
    and each group's M negatives stand for K/M of a pair's negatives: input x, in P_x
    pairs, gets the negative term (K P_x / M) sum_m log s(-u_x . v_m) -- the expectation of
    K private draws per pair, computed with matrix products instead of row-by-row dots.

    Args:
      in_rows: (B, L + 2W, D) input vectors u of each segment's positions.
      out_rows: (B, L, D) output vectors v of the centres.
      neg_rows: (G, M, D) output vectors of each group's negatives (G divides B).
      mask: (B, L, L + 2W) bool, which (centre, input) cells are pairs (``pair_mask``).
      num_negative: K.

    Returns:
      Scalar loss summed over pairs.
    """
    groups, m, dim = neg_rows.shape
    scores = jnp.einsum("bcd,bjd->bcj", out_rows, in_rows)
    positive = jnp.sum(jnp.where(mask, jax.nn.log_sigmoid(scores), 0.0))
    weight = jnp.sum(mask, axis=1).astype(in_rows.dtype).reshape(groups, -1) * (num_negative / m)
    neg_scores = jnp.einsum("gnd,gmd->gnm", in_rows.reshape(groups, -1, dim), neg_rows)
    negative = jnp.sum(weight * jnp.sum(jax.nn.log_sigmoid(-neg_scores), axis=-1))
    return -(positive + negative)


def cbow_hidden(in_rows, mask):
    """CBOW's hidden vector: the mean of each centre's context vectors.

    Args:
      in_rows: (B, L + 2W, D); mask: (B, L, L + 2W).

    Returns:
      (B, L, D) means (zero for a centre without context) and (B, L) context counts.
    """
    m = mask.astype(in_rows.dtype)
    count = jnp.sum(m, axis=-1)
    hidden = jnp.einsum("bcj,bjd->bcd", m, in_rows) / jnp.maximum(count, 1.0)[..., None]
    return hidden, count


def cbow_negative_loss(hidden, out_rows, neg_rows, valid, num_negative: int):
    """CBOW with negative sampling: predict each centre from the mean of its context.

    Loss per centre c with context mean h: -log s(h . v_c) - (K/M) sum_m log s(-h . v_m),
    over the M negatives of the centre's group, which again stand for K private ones.

    Args:
      hidden: (B, L, D) context means (``cbow_hidden``).
      out_rows: (B, L, D) output vectors of the centres.
      neg_rows: (G, M, D) output vectors of each group's negatives.
      valid: (B, L) bool, centres that have at least one context word.
      num_negative: K.
    """
    groups, m, dim = neg_rows.shape
    positive = jnp.where(valid, jax.nn.log_sigmoid(jnp.sum(hidden * out_rows, -1)), 0.0)
    neg_scores = jnp.einsum("gnd,gmd->gnm", hidden.reshape(groups, -1, dim), neg_rows)
    negative = jnp.where(valid.reshape(groups, -1, 1), jax.nn.log_sigmoid(-neg_scores), 0.0)
    return -(jnp.sum(positive) + jnp.sum(negative) * (num_negative / m))


def skipgram_softmax_loss(in_rows, out_ids, w_out, mask):
    """Skip-gram with the full softmax over the vocabulary (the one-hot picture).

    -log p(c | x) = logsumexp_w(u_x . v_w) - u_x . v_c for every pair (x, c).

    Args:
      in_rows: (B, L + 2W, D); out_ids: (B, L) centre ids; w_out: (V, D) the whole output
      table; mask: (B, L, L + 2W).
    """
    logits = jnp.einsum("bjd,vd->bjv", in_rows, w_out)
    pairs_per_input = jnp.sum(mask, axis=1).astype(in_rows.dtype)
    log_norm = jnp.sum(pairs_per_input * jax.nn.logsumexp(logits, axis=-1))
    scores = jnp.einsum("bcd,bjd->bcj", w_out[out_ids], in_rows)
    return log_norm - jnp.sum(jnp.where(mask, scores, 0.0))


def cbow_softmax_loss(hidden, out_ids, w_out, valid):
    """CBOW with the full softmax: -log p(c | h) = logsumexp_w(h . v_w) - h . v_c.

    Args:
      hidden: (B, L, D) context means; out_ids: (B, L); w_out: (V, D); valid: (B, L).
    """
    logits = jnp.einsum("bcd,vd->bcv", hidden, w_out)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, out_ids[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0))


# ----------------------------------------------------------------------------- the step
class TrainState(NamedTuple):
    params: Word2VecParams
    opt_state: Any


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Plain SGD whose lr decays linearly to ``lr * min_lr_fraction`` (word2vec.c's alpha)."""
    lr = config.learning_rate
    schedule = optax.linear_schedule(lr, lr * config.min_lr_fraction, max(1, total_steps))
    return optax.sgd(schedule)


def _row_scale(rows, weights, vocab_size: int, cap: float):
    """Per-slot factor min(1, cap / total weight of that slot's word in this step).

    A word that occurs many times in one step gets the sum of all its pairs' gradients at
    once, computed from stale rows; past ``cap`` pair-contributions the sum is scaled down
    to ``cap`` times the mean, which keeps very large batches from diverging while leaving
    ordinary steps untouched.
    """
    total = jnp.zeros((vocab_size,), weights.dtype).at[rows].add(weights, mode="promise_in_bounds")
    return jnp.minimum(1.0, cap / jnp.maximum(total.at[rows].get(mode="promise_in_bounds"), 1e-12))


def _t(x):
    """Swaps the last two axes into a fresh array (XLA's CPU dot is much faster on a
    plain row-major operand than on a transposed view, so keep the transpose a copy)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def skipgram_negative_grads(in_rows, out_rows, neg_rows, mask, num_negative: int):
    """Closed-form gradient of ``skipgram_negative_loss`` w.r.t. its three row arrays.

    Equal to ``jax.grad`` of the loss (tested) but needs only sigmoids, where autodiff of
    log-sigmoid evaluates exp and log1p twice per score, and it lays the products out
    as plain row-major matmuls.
    """
    groups, m, dim = neg_rows.shape
    scores = jnp.einsum("bcd,bjd->bcj", out_rows, in_rows)
    pos = jnp.where(mask, jax.nn.sigmoid(-scores), 0.0)  # -dL/dscore
    g_out = -jnp.einsum("bcj,bjd->bcd", pos, in_rows)
    g_in = -jnp.einsum("bjc,bcd->bjd", _t(pos), out_rows)
    weight = jnp.sum(mask, axis=1).astype(in_rows.dtype) * (num_negative / m)
    grouped = in_rows.reshape(groups, -1, dim)
    neg = weight.reshape(groups, -1, 1) * jax.nn.sigmoid(
        jnp.einsum("gnd,gmd->gnm", grouped, neg_rows)
    )  # dL/dneg_score
    g_in = g_in + jnp.einsum("gnm,gmd->gnd", neg, neg_rows).reshape(in_rows.shape)
    g_neg = jnp.einsum("gmn,gnd->gmd", _t(neg), grouped)
    return g_in, g_out, g_neg


def cbow_negative_grads(hidden, out_rows, neg_rows, valid, num_negative: int):
    """Closed-form gradient of ``cbow_negative_loss`` w.r.t. hidden, out_rows, neg_rows."""
    groups, m, dim = neg_rows.shape
    pos = jnp.where(valid, jax.nn.sigmoid(-jnp.sum(hidden * out_rows, -1)), 0.0)
    grouped = hidden.reshape(groups, -1, dim)
    scale = valid.reshape(groups, -1, 1).astype(hidden.dtype) * (num_negative / m)
    neg = scale * jax.nn.sigmoid(jnp.einsum("gnd,gmd->gnm", grouped, neg_rows))
    g_hidden = -pos[..., None] * out_rows + jnp.einsum("gnm,gmd->gnd", neg, neg_rows).reshape(
        hidden.shape
    )
    g_out = -pos[..., None] * hidden
    g_neg = jnp.einsum("gmn,gnd->gmd", _t(neg), grouped)
    return g_hidden, g_out, g_neg


def step_loss(config: TrainConfig, params: Word2VecParams, batch: SegmentBatch) -> jax.Array:
    """The loss of one batch per training pair (per centre for CBOW), for monitoring."""
    w_in, w_out = params
    mask = pair_mask(batch.in_sentence, batch.out_sentence, batch.out_window, config.window)
    in_rows = w_in[batch.in_ids]
    if config.mode == "cbow":
        hidden, count = cbow_hidden(in_rows, mask)
        valid = count > 0
        n = jnp.sum(valid)
        if config.objective == "softmax":
            loss = cbow_softmax_loss(hidden, batch.out_ids, w_out, valid)
        else:
            loss = cbow_negative_loss(
                hidden, w_out[batch.out_ids], w_out[batch.neg_ids], valid, config.negative
            )
    else:
        n = jnp.sum(mask)
        if config.objective == "softmax":
            loss = skipgram_softmax_loss(in_rows, batch.out_ids, w_out, mask)
        else:
            loss = skipgram_negative_loss(
                in_rows, w_out[batch.out_ids], w_out[batch.neg_ids], mask, config.negative
            )
    return loss / jnp.maximum(n, 1)


def train_step(
    config: TrainConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: SegmentBatch,
    gather_updates: Any | None = None,
) -> TrainState:
    """One sparse SGD step: gather rows, take the loss gradient w.r.t. them, scatter back.

    Only the rows a step touches are read and written: the gradient w.r.t. the gathered
    rows goes through ``optimizer`` (optax SGD with the decaying schedule), which turns it
    into ``-lr * grad``, and the result is scatter-added with duplicates summed (then
    capped, see ``_row_scale``). For CBOW the loss is a function of the context mean h
    and, as in word2vec.c, each context word receives the whole dL/dh, not dL/dh / |ctx|.

    Args:
      config: the hyperparameters (static).
      optimizer: from ``make_optimizer``.
      state: parameters and optimizer state (its step count drives the schedule).
      batch: one step's ``SegmentBatch`` (B segments).
      gather_updates: data-parallel runs only: a replicated ``NamedSharding`` to which the
        scattered ids and update rows are constrained, so that each device all-gathers the
        (few) update rows and scatters them into its own copy of the tables, instead of
        XLA all-reducing a whole (V, D) table of partial updates per step.

    Returns:
      The new state.
    """

    def scatter_add(table, rows, updates):
        if gather_updates is not None:
            rows = jax.lax.with_sharding_constraint(rows, gather_updates)
            updates = jax.lax.with_sharding_constraint(updates, gather_updates)
        return table.at[rows].add(updates, mode="promise_in_bounds")

    params, opt_state = state
    w_in, w_out = params
    vocab_size, dim = w_in.shape
    k = config.negative
    mask = pair_mask(batch.in_sentence, batch.out_sentence, batch.out_window, config.window)
    mask_f = mask.astype(jnp.float32)
    in_ids = batch.in_ids.reshape(-1)
    in_rows = w_in.at[batch.in_ids].get(mode="promise_in_bounds")
    in_scale = _row_scale(in_ids, jnp.sum(mask_f, axis=1).reshape(-1), vocab_size, config.dup_cap)
    cbow = config.mode == "cbow"
    if cbow:
        hidden, count = cbow_hidden(in_rows, mask)
        valid = count > 0

    def to_inputs(g_hidden):  # word2vec.c: every context word gets the undivided dL/dh
        return jnp.einsum("bjc,bcd->bjd", _t(mask_f), g_hidden)

    if config.objective == "softmax":
        if cbow:
            g_h, g_out = jax.grad(cbow_softmax_loss, argnums=(0, 2))(
                hidden, batch.out_ids, w_out, valid
            )
            g_in = to_inputs(g_h)
        else:
            g_in, g_out = jax.grad(skipgram_softmax_loss, argnums=(0, 2))(
                in_rows, batch.out_ids, w_out, mask
            )
        g_in = g_in.reshape(-1, dim) * in_scale[:, None]
        (u_in, u_out), opt_state = optimizer.update((g_in, g_out), opt_state)
        w_in = scatter_add(w_in, in_ids, u_in)
        return TrainState(Word2VecParams(w_in, w_out + u_out), opt_state)

    out_ids = batch.out_ids.reshape(-1)
    out_rows = w_out.at[batch.out_ids].get(mode="promise_in_bounds")
    neg_rows = w_out.at[batch.neg_ids].get(mode="promise_in_bounds")
    if cbow:
        g_h, g_out, g_neg = cbow_negative_grads(hidden, out_rows, neg_rows, valid, k)
        g_in = to_inputs(g_h)
        centre_weight = valid.astype(jnp.float32).reshape(-1)
    else:
        g_in, g_out, g_neg = skipgram_negative_grads(in_rows, out_rows, neg_rows, mask, k)
        centre_weight = jnp.sum(mask_f, axis=2).reshape(-1)
    groups, m = batch.neg_ids.shape
    # Every negative of a group stands for (pairs in the group) * K / M pair-negatives.
    neg_weight = jnp.sum(centre_weight.reshape(groups, -1), axis=1, keepdims=True) * k / m
    rows_out = jnp.concatenate([out_ids, batch.neg_ids.reshape(-1)])
    weights_out = jnp.concatenate(
        [centre_weight, jnp.broadcast_to(neg_weight, (groups, m)).reshape(-1)]
    )
    out_scale = _row_scale(rows_out, weights_out, vocab_size, config.dup_cap)
    g_in = g_in.reshape(-1, dim) * in_scale[:, None]
    g_out = jnp.concatenate([g_out.reshape(-1, dim), g_neg.reshape(-1, dim)]) * out_scale[:, None]
    (u_in, u_out), opt_state = optimizer.update((g_in, g_out), opt_state)
    w_in = scatter_add(w_in, in_ids, u_in)
    w_out = scatter_add(w_out, rows_out, u_out)
    return TrainState(Word2VecParams(w_in, w_out), opt_state)


def make_chunk_fn(
    config: TrainConfig,
    optimizer: optax.GradientTransformation,
    *,
    with_loss: bool = True,
    state_sharding: Any = None,
    gather_updates: bool = True,
):
    """Jitted ``(state, stacked batches) -> (state, loss)``: a ``lax.scan`` of train steps.

    The loss is ``step_loss`` of the first batch, after the updates (cheaper than every
    step's loss, which the update itself does not need; the first batch is the one never
    made of filler segments). ``with_loss=False`` returns None instead and compiles about
    a third faster (for runs without a progress display).

    ``state_sharding`` (a pytree of shardings like the state, on a data-parallel mesh) keeps
    the state's layout from call to call; the batches arrive sharded along their segment
    axis and XLA inserts the collectives. ``gather_updates`` then picks how the sparse
    updates reach the replicated tables (see ``train_step``); it is ignored without a mesh.
    """
    gather = None
    if state_sharding is not None and gather_updates:
        mesh = jax.tree.leaves(state_sharding)[0].mesh
        gather = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, batch):
        return train_step(config, optimizer, state, batch, gather), None

    def run_chunk(state: TrainState, batches: SegmentBatch):
        state, _ = jax.lax.scan(step, state, batches)
        if not with_loss:
            return state, None
        first = jax.tree.map(lambda x: x[0], batches)
        return state, step_loss(config, state.params, first)

    if state_sharding is None:
        return jax.jit(run_chunk, donate_argnums=0)
    mesh = jax.tree.leaves(state_sharding)[0].mesh
    loss_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        run_chunk,
        donate_argnums=0,
        out_shardings=(state_sharding, loss_sharding if with_loss else None),
    )
