"""Char-RNN pieces: config, batches, the train step, evaluation, checkpoint metadata.

Everything a training loop needs to know is in the frozen ``CharRNNConfig``; the data
position is a pure function of the step (sequential windows: ``step % windows``; random
windows: a NumPy generator seeded by ``(seed, step)``), so a checkpoint of (params,
optimizer state, carried hidden state, step, key) resumes to exactly the result of an
uninterrupted run. The loop itself (run directory, signals, progress, metrics) lives in
``experiments/charrnn.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import checkpoint as ckpt
from jaxseq import parallel
from jaxseq._cells import CELLS
from jaxseq._unroll import IMPLS
from jaxseq.config import field
from jaxseq.data import CharVocab, train_val_split
from jaxseq.errors import UsageError
from jaxseq.models import CharLM, char_lm, cross_entropy


@dataclasses.dataclass(frozen=True)
class CharRNNConfig:
    """Every setting of a char-RNN run (each one is a command-line flag)."""

    cell: str = field(
        "gru",
        "recurrent cell (mingru, minlstm: Feng et al. 2024, no recurrent matrix)",
        choices=tuple(CELLS),
    )
    layers: int = field(2, "number of stacked recurrent layers")
    hidden: int = field(256, "units per layer")
    embed: int = field(64, "character embedding width")
    input: str = field(
        "embedding", "feed learned embeddings or one-hot vectors", choices=("embedding", "onehot")
    )
    dropout: float = field(0.0, "dropout rate on embeddings, between and after layers")
    dtype: str = field(
        "float32",
        "compute dtype (bfloat16: mixed precision, f32 params)",
        choices=("float32", "bfloat16"),
    )
    steps: int = field(1500, "training steps")
    batch: int = field(64, "sequences per batch")
    seq: int = field(100, "characters per truncated-BPTT window")
    windows: str = field(
        "sequential",
        "sequential: hidden state carries across consecutive "
        "windows of each batch row (char-rnn); random: random windows, zero state",
        choices=("sequential", "random"),
    )
    lr: float = field(3e-3, "peak learning rate (Adam)")
    schedule: str = field(
        "cosine", "learning-rate schedule after warm-up", choices=("cosine", "constant")
    )
    warmup: int = field(100, "linear warm-up steps")
    clip: float = field(5.0, "clip gradients to this global norm (0: off)")
    seed: int = field(0, "random seed (initialisation, dropout, random windows)")
    eval_every: int = field(500, "steps between validation passes (and samples)")
    save_every: int = field(500, "steps between checkpoints")
    log_every: int = field(50, "steps between metrics.jsonl lines")
    sample_length: int = field(200, "characters of the sample printed at each evaluation")
    nan_policy: str = field(
        "stop",
        "on a non-finite loss or gradient: stop (keep the last good checkpoint) or skip the step",
        choices=("stop", "skip"),
    )
    train_fraction: float = field(0.9, "leading fraction of the corpus used for training")
    impl: str = field(
        "auto",
        "which implementation of the recurrent layers runs (see "
        "jaxseq.unroll; associative: mingru and minlstm only)",
        choices=IMPLS,
    )

    def validate(self) -> None:
        positive = (
            "layers",
            "hidden",
            "embed",
            "steps",
            "batch",
            "seq",
            "eval_every",
            "save_every",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sample_length < 0 or self.warmup < 0 or self.clip < 0:
            raise UsageError("sample_length, warmup and clip must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UsageError(f"lr must be positive, got {self.lr}")
        if not 0.0 < self.train_fraction < 1.0:
            raise UsageError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        choices = {
            "cell": tuple(CELLS),
            "input": ("embedding", "onehot"),
            "dtype": ("float32", "bfloat16"),
            "windows": ("sequential", "random"),
            "schedule": ("cosine", "constant"),
            "nan_policy": ("stop", "skip"),
            "impl": IMPLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )

    def model_fields(self) -> dict:
        """The settings that fix the parameter shapes (a resume must keep them)."""
        return {k: getattr(self, k) for k in ("cell", "layers", "hidden", "embed", "input")}


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    carry: Any  # hidden state carried across consecutive windows, leaves (batch, H)
    step: jax.Array  # () int32, steps done
    key: jax.Array  # (2,) uint32 raw key data; dropout keys are fold_in(key, step)


class Corpus(NamedTuple):
    vocab: CharVocab
    train: np.ndarray  # (N_train,) int32
    val: np.ndarray  # (N_val,) int32


def prepare_corpus(text: str, config: CharRNNConfig, vocab: CharVocab | None = None) -> Corpus:
    """Encodes the text and splits it; checks that it holds at least one batch of windows."""
    vocab = vocab or CharVocab.from_text(text)
    ids = vocab.encode(text)
    train, val = train_val_split(ids, config.train_fraction)
    need = config.batch * (config.seq + 1) if config.windows == "sequential" else config.seq + 1
    if len(train) < need:
        raise UsageError(
            f"corpus too short: the training split has {len(train)} characters, "
            f"batch {config.batch} x (seq {config.seq} + 1) needs {need}; "
            f"use a longer text or a smaller batch or seq"
        )
    if len(val) < 2:
        raise UsageError(f"corpus too short: the validation split has {len(val)} characters")
    return Corpus(vocab, train, val)


def build_model(config: CharRNNConfig, vocab_size: int) -> CharLM:
    return char_lm(
        vocab_size,
        cell=config.cell,
        hidden=config.hidden,
        layers=config.layers,
        embed=config.embed,
        dropout=config.dropout,
        input_mode=config.input,
        compute_dtype=jnp.dtype(config.dtype),
    )


def learning_rate(config: CharRNNConfig) -> optax.Schedule:
    if config.schedule == "constant":
        decay = optax.constant_schedule(config.lr)
    else:
        decay = optax.cosine_decay_schedule(
            config.lr, max(1, config.steps - config.warmup), alpha=0.05
        )
    if config.warmup == 0:
        return decay
    warm = optax.linear_schedule(config.lr / config.warmup, config.lr, config.warmup)
    return optax.join_schedules([warm, decay], [config.warmup])


def make_optimizer(config: CharRNNConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(config.clip)] if config.clip > 0 else []
    return optax.chain(*parts, optax.adam(learning_rate(config)))


def init_state(config: CharRNNConfig, model: CharLM, optimizer) -> TrainState:
    key = jax.random.key(config.seed)
    k_init, k_train = jax.random.split(key)
    params = model.init(k_init)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        carry=model.initial_carry((config.batch,)),
        step=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(k_train),
    )


# --------------------------------------------------------------------------- batches


def windows_per_epoch(config: CharRNNConfig, n_train: int) -> int:
    return (n_train // config.batch - 1) // config.seq


def batch_at(
    config: CharRNNConfig, train: np.ndarray, step: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The (inputs, targets, reset) of a step, both ``(T, B)`` int32; a pure function of step.

    Sequential: the training text is cut into ``B`` contiguous streams and step ``s`` reads
    window ``s % W`` of each, so row ``b`` of step ``s+1`` continues row ``b`` of step ``s``;
    ``reset`` is true at the start of each pass. Random: windows at offsets drawn from a
    generator seeded by ``(seed, step)``; the state is reset every step.
    """
    T, B = config.seq, config.batch
    if config.windows == "sequential":
        length = len(train) // B
        streams = train[: B * length].reshape(B, length)
        w = step % windows_per_epoch(config, len(train))
        chunk = streams[:, w * T : w * T + T + 1]
        return chunk[:, :-1].T.copy(), chunk[:, 1:].T.copy(), w == 0
    rng = np.random.default_rng([config.seed, step])
    starts = rng.integers(0, len(train) - T, size=B)
    idx = starts[:, None] + np.arange(T + 1)[None]
    chunk = train[idx]
    return chunk[:, :-1].T.copy(), chunk[:, 1:].T.copy(), True


# --------------------------------------------------------------------------- steps


def make_train_step(
    model: CharLM, optimizer, config: CharRNNConfig, *, impl: str = "auto", mesh: Any = None
) -> Callable:
    """The jitted ``(state, inputs, targets, reset) -> (state, metrics)``.

    Args:
      model, optimizer, config: the run's pieces (``build_model``, ``make_optimizer``).
      impl: the recurrent layers' implementation, one of ``jaxseq.IMPLS`` (``"auto"``,
        ``"scan"``, ``"fused"``, ``"associative"``; see ``jaxseq.unroll``).
      mesh: a data-parallel mesh (``parallel.data_mesh``) for a state placed by
        ``shard_state``: the fused layers split the batch over it under ``shard_map``, the
        new state keeps the old one's layout, and XLA sums the gradients across devices.

    A step whose loss or gradient is not finite changes nothing (``metrics['finite']`` is
    false); the caller then stops or skips.
    """

    def loss_fn(params, carry, inputs, targets, dropout_key):
        carry, logits = model.apply(
            params, carry, inputs, dropout_key=dropout_key, impl=impl, mesh=mesh
        )
        return cross_entropy(logits, targets).mean(), carry

    def train_step(state: TrainState, inputs, targets, reset):
        carry = jax.tree.map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), state.carry)
        dropout_key = (
            jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
            if config.dropout > 0
            else None
        )
        (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, carry, inputs, targets, dropout_key
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            params=pick(params, state.params),
            opt_state=pick(opt_state, state.opt_state),
            carry=pick(jax.lax.stop_gradient(new_carry), jax.tree.map(jnp.zeros_like, carry)),
            step=state.step + 1,
            key=state.key,
        )
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    if mesh is None:
        return jax.jit(train_step)
    rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh, 2, axis=0)
    layout = TrainState(params=rep, opt_state=rep, carry=rows, step=rep, key=rep)
    return jax.jit(train_step, out_shardings=(layout, rep))


def shard_state(mesh, state: TrainState) -> tuple[TrainState, Callable]:
    """``state`` placed for data parallelism over ``mesh`` (parameters, optimizer state, step
    and key replicated; the carried hidden state split by batch row), and the function that
    places a ``(T, B)`` batch of tokens likewise."""
    state = TrainState(
        params=parallel.replicate(mesh, state.params),
        opt_state=parallel.replicate(mesh, state.opt_state),
        carry=parallel.shard_tree(mesh, state.carry, axis=0),
        step=parallel.replicate(mesh, state.step),
        key=parallel.replicate(mesh, state.key),
    )
    return state, lambda a: parallel.shard_batch(mesh, a, axis=1)


def make_evaluator(model: CharLM, val: np.ndarray, *, seq: int, streams: int = 32) -> Callable:
    """``params -> mean nats per character`` over the whole validation split.

    The split is cut into ``streams`` contiguous rows read window by window with the hidden
    state carried, as in training; every character but the first of the split is predicted
    once (padding is masked out).
    """
    inputs, targets = val[:-1], val[1:]
    n = len(targets)
    streams = max(1, min(streams, n // seq or 1))
    length = -(-n // streams)
    length = -(-length // seq) * seq
    pad = streams * length - n
    x = np.concatenate([inputs, np.zeros(pad, np.int32)]).reshape(streams, length)
    y = np.concatenate([targets, np.zeros(pad, np.int32)]).reshape(streams, length)
    m = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]).reshape(streams, length)
    chunks = lambda a: jnp.asarray(a.reshape(streams, -1, seq).transpose(1, 2, 0))  # (C, T, S)
    xs, ys, ms = chunks(x), chunks(y), chunks(m)

    @jax.jit
    def evaluate(params):
        def body(carry, batch):
            x, y, m = batch
            carry, logits = model.apply(params, carry, x)
            return carry, (cross_entropy(logits, y) * m).sum()

        _, sums = jax.lax.scan(body, model.initial_carry((streams,)), (xs, ys, ms))
        return sums.sum() / n

    return evaluate


def data_parallel_mesh(config: CharRNNConfig, devices: int | None = None) -> Any:
    """The data-parallel mesh of a run over ``devices`` (None: every device, across
    processes), or None when one device runs it all.

    Raises:
      UsageError: too many devices, or a batch that does not split evenly over them.
    """
    multi = len(jax.devices()) > 1 or jax.process_count() > 1
    if not (multi or (devices or 1) > 1):
        return None
    mesh = parallel.data_mesh(devices)
    if mesh.size == 1:
        return None
    if config.batch % mesh.size:
        raise UsageError(f"batch {config.batch} must divide evenly over {mesh.size} devices")
    return mesh


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_KIND = "jaxseq.charrnn"


def checkpoint_meta(
    config: CharRNNConfig, vocab: CharVocab, step: int, extra: dict | None = None
) -> dict:
    """The JSON metadata saved beside a char-RNN state: config, vocabulary and position."""
    return {
        "kind": CHECKPOINT_KIND,
        "config": dataclasses.asdict(config),
        "vocab": vocab.chars,
        "step": step,
        "data_position": step,
        **(extra or {}),
    }


def resume_vocab(meta: dict, config: CharRNNConfig, text: str) -> CharVocab:
    """The vocabulary a resume continues with, after checking the checkpoint fits this run.

    Args:
      meta: the checkpoint's metadata (``checkpoint.read_meta``).
      config: the settings of the run that continues it.
      text: the corpus it continues on.

    Raises:
      UsageError: another kind of checkpoint, other model shapes or batch, or a corpus
        with characters the saved vocabulary lacks.
    """
    if meta.get("kind") != CHECKPOINT_KIND:
        raise UsageError("cannot resume: the checkpoint is not a char-RNN checkpoint")
    saved = config_from_dict(meta["config"])
    names = (*config.model_fields(), "batch")
    diff = [
        (k, getattr(saved, k), getattr(config, k))
        for k in names
        if getattr(saved, k) != getattr(config, k)
    ]
    if diff:
        raise UsageError(
            "cannot resume: the checkpoint was trained with "
            + ", ".join(f"{k}={a} (now {b})" for k, a, b in diff)
        )
    vocab = CharVocab(meta["vocab"])
    unknown = sorted(set(text) - set(vocab.chars))
    if unknown:
        raise UsageError(
            f"cannot resume: the corpus has characters the checkpoint's vocabulary "
            f"lacks ({', '.join(map(repr, unknown[:5]))}); another corpus?"
        )
    return vocab


def load_for_sampling(path: str | os.PathLike) -> tuple[CharLM, Any, CharVocab, CharRNNConfig]:
    """Loads a run directory's (or file's) checkpoint: ``(model, params, vocab, config)``.

    The arrays come back on the default device, so a checkpoint written on a GPU samples on
    a CPU.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}")
    found = ckpt.find(path)
    if found is None:
        raise UsageError(f"no readable checkpoint in {path}")
    meta = ckpt.read_meta(found)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise UsageError(f"{found} is not a char-RNN checkpoint")
    config = config_from_dict(meta["config"])
    vocab = CharVocab(meta["vocab"])
    model = build_model(config, vocab.size)
    template = init_state(config, model, make_optimizer(config))
    state, _ = ckpt.load(found, template)
    return model, state.params, vocab, config


def config_from_dict(d: dict) -> CharRNNConfig:
    """A config from its saved ``asdict`` form; settings it lacks take their defaults
    (checkpoints written before a field existed still load)."""
    names = {f.name for f in dataclasses.fields(CharRNNConfig)}
    return CharRNNConfig(**{k: v for k, v in d.items() if k in names})
