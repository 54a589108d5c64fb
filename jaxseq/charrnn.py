"""Char-RNN: training a character LM with truncated BPTT, evaluation, checkpoints.

Everything the training loop needs to know is in the frozen ``CharRNNConfig``; the data
position is a pure function of the step (sequential windows: ``step % windows``; random
windows: a NumPy generator seeded by ``(seed, step)``), so a checkpoint of (params,
optimizer state, carried hidden state, step, key) resumes to exactly the result of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import checkpoint as ckpt
from jaxseq import parallel
from jaxseq.data import CharVocab, train_val_split
from jaxseq.errors import UsageError
from jaxseq.models import CharLM, char_lm, count_params, cross_entropy
from jaxseq.sample import sample

PRESETS: dict[str, dict[str, Any]] = {
    # The default: about 10 minutes on a 2-core CPU.
    "default": {},
    # Larger and longer, for a GPU or a patient CPU.
    "large": dict(cell="lstm", layers=3, hidden=512, embed=128, dropout=0.2, batch=64, seq=256,
                  steps=20000, lr=2e-3, warmup=200, eval_every=1000, save_every=1000),
    # Seconds, for smoke tests and learners trying the flags.
    "tiny": dict(layers=1, hidden=64, embed=16, batch=16, seq=32, steps=200, eval_every=100,
                 save_every=100),
}


def _f(default, help, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class CharRNNConfig:
    """Every setting of a char-RNN run (each one is a command-line flag)."""

    cell: str = _f("gru", "recurrent cell", choices=("rnn", "lstm", "gru"))
    layers: int = _f(2, "number of stacked recurrent layers")
    hidden: int = _f(256, "units per layer")
    embed: int = _f(64, "character embedding width")
    input: str = _f("embedding", "feed learned embeddings or one-hot vectors",
                    choices=("embedding", "onehot"))
    dropout: float = _f(0.0, "dropout rate on embeddings, between and after layers")
    dtype: str = _f("float32", "compute dtype (bfloat16: mixed precision, f32 params)",
                    choices=("float32", "bfloat16"))
    steps: int = _f(1500, "training steps")
    batch: int = _f(64, "sequences per batch")
    seq: int = _f(100, "characters per truncated-BPTT window")
    windows: str = _f("sequential", "sequential: hidden state carries across consecutive "
                      "windows of each batch row (char-rnn); random: random windows, zero state",
                      choices=("sequential", "random"))
    lr: float = _f(3e-3, "peak learning rate (Adam)")
    schedule: str = _f("cosine", "learning-rate schedule after warm-up",
                       choices=("cosine", "constant"))
    warmup: int = _f(100, "linear warm-up steps")
    clip: float = _f(5.0, "clip gradients to this global norm (0: off)")
    seed: int = _f(0, "random seed (initialisation, dropout, random windows)")
    eval_every: int = _f(500, "steps between validation passes (and samples)")
    save_every: int = _f(500, "steps between checkpoints")
    log_every: int = _f(50, "steps between metrics.jsonl lines")
    sample_length: int = _f(200, "characters of the sample printed at each evaluation")
    nan_policy: str = _f("stop", "on a non-finite loss or gradient: stop (keep the last good "
                         "checkpoint) or skip the step", choices=("stop", "skip"))
    train_fraction: float = _f(0.9, "leading fraction of the corpus used for training")

    def validate(self) -> None:
        positive = ("layers", "hidden", "embed", "steps", "batch", "seq", "eval_every",
                    "save_every", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.sample_length < 0 or self.warmup < 0 or self.clip < 0:
            raise UsageError("--sample-length, --warmup and --clip must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not 0.0 < self.train_fraction < 1.0:
            raise UsageError(f"--train-fraction must be in (0, 1), got {self.train_fraction}")

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


def prepare_corpus(text: str, config: CharRNNConfig, vocab: Optional[CharVocab] = None) -> Corpus:
    """Encodes the text and splits it; checks that it holds at least one batch of windows."""
    vocab = vocab or CharVocab.from_text(text)
    ids = vocab.encode(text)
    train, val = train_val_split(ids, config.train_fraction)
    need = config.batch * (config.seq + 1) if config.windows == "sequential" else config.seq + 1
    if len(train) < need:
        raise UsageError(f"corpus too short: the training split has {len(train)} characters, "
                         f"--batch {config.batch} x (--seq {config.seq} + 1) needs {need}; "
                         f"use a longer text or smaller --batch/--seq")
    if len(val) < 2:
        raise UsageError(f"corpus too short: the validation split has {len(val)} characters")
    return Corpus(vocab, train, val)


def build_model(config: CharRNNConfig, vocab_size: int) -> CharLM:
    return char_lm(vocab_size, cell=config.cell, hidden=config.hidden, layers=config.layers,
                   embed=config.embed, dropout=config.dropout, input_mode=config.input,
                   compute_dtype=jnp.dtype(config.dtype))


def learning_rate(config: CharRNNConfig) -> optax.Schedule:
    if config.schedule == "constant":
        decay = optax.constant_schedule(config.lr)
    else:
        decay = optax.cosine_decay_schedule(config.lr, max(1, config.steps - config.warmup),
                                            alpha=0.05)
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


def batch_at(config: CharRNNConfig, train: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, bool]:
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
        chunk = streams[:, w * T: w * T + T + 1]
        return chunk[:, :-1].T.copy(), chunk[:, 1:].T.copy(), w == 0
    rng = np.random.default_rng([config.seed, step])
    starts = rng.integers(0, len(train) - T, size=B)
    idx = starts[:, None] + np.arange(T + 1)[None]
    chunk = train[idx]
    return chunk[:, :-1].T.copy(), chunk[:, 1:].T.copy(), True


# --------------------------------------------------------------------------- steps

def make_train_step(model: CharLM, optimizer, config: CharRNNConfig, *, impl: str = "auto",
                    mesh: Any = None) -> Callable:
    """The jitted ``(state, inputs, targets, reset) -> (state, metrics)``.

    Args:
      model, optimizer, config: the run's pieces (``build_model``, ``make_optimizer``).
      impl: the recurrent layers' implementation, ``"auto"``, ``"scan"`` or ``"fused"``
        (``jaxseq.unroll``).
      mesh: a data-parallel mesh (``parallel.data_mesh``) for a state placed by
        ``shard_state``: the fused layers split the batch over it under ``shard_map``, the
        new state keeps the old one's layout, and XLA sums the gradients across devices.

    A step whose loss or gradient is not finite changes nothing (``metrics['finite']`` is
    false); the caller then stops or skips.
    """

    def loss_fn(params, carry, inputs, targets, dropout_key):
        carry, logits = model.apply(params, carry, inputs, dropout_key=dropout_key, impl=impl,
                                    mesh=mesh)
        return cross_entropy(logits, targets).mean(), carry

    def train_step(state: TrainState, inputs, targets, reset):
        carry = jax.tree.map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), state.carry)
        dropout_key = (jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
                       if config.dropout > 0 else None)
        (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, carry, inputs, targets, dropout_key)
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
    state = TrainState(params=parallel.replicate(mesh, state.params),
                       opt_state=parallel.replicate(mesh, state.opt_state),
                       carry=parallel.shard_tree(mesh, state.carry, axis=0),
                       step=parallel.replicate(mesh, state.step),
                       key=parallel.replicate(mesh, state.key))
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


# --------------------------------------------------------------------------- run directory

def _meta(config: CharRNNConfig, vocab: CharVocab, step: int, extra: dict | None = None) -> dict:
    return {"kind": "jaxseq.charrnn", "config": dataclasses.asdict(config), "vocab": vocab.chars,
            "step": step, "data_position": step, **(extra or {})}


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
    if meta.get("kind") != "jaxseq.charrnn":
        raise UsageError(f"{found} is not a char-RNN checkpoint")
    config = config_from_dict(meta["config"])
    vocab = CharVocab(meta["vocab"])
    model = build_model(config, vocab.size)
    template = init_state(config, model, make_optimizer(config))
    state, _ = ckpt.load(found, template)
    return model, state.params, vocab, config


def config_from_dict(d: dict) -> CharRNNConfig:
    names = {f.name for f in dataclasses.fields(CharRNNConfig)}
    return CharRNNConfig(**{k: v for k, v in d.items() if k in names})


def _trim_metrics(path: pathlib.Path, step: int) -> None:
    """Drops metrics lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between steps (so a checkpoint can be saved)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user insists
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class RunResult(NamedTuple):
    state: TrainState
    vocab: CharVocab
    best_val: float
    history: list
    exit_code: int


def train(
    config: CharRNNConfig,
    text: str,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    sample_printer: Optional[Callable[[str], None]] = None,
    step_callback: Optional[Callable[[int, dict], None]] = None,
    devices: Optional[int] = None,
) -> RunResult:
    """Trains (or resumes) a char-RNN run in ``out_dir``.

    Writes ``checkpoint.npz`` every ``save_every`` steps, at the end and on SIGINT/SIGTERM,
    and ``metrics.jsonl`` (one JSON record per log or evaluation). Returns the final state;
    ``exit_code`` is 0 when done, 130/143 after an interrupt, 3 after a non-finite step.

    ``devices`` (default: every device, across processes after
    ``parallel.initialize_distributed``) shards each batch over a data-parallel mesh; the
    global batch, and so the result, does not depend on it. Only process 0 writes files.
    """
    config.validate()
    main_process = parallel.is_main_process()
    if not main_process:
        progress, log = False, (lambda s: None)
    out = pathlib.Path(out_dir)
    metrics_path = out / "metrics.jsonl"
    start_state = None
    vocab = None
    if resume:
        found = ckpt.find(out) if out.exists() else None
        if found is None:
            log(f"no checkpoint in {out} yet: starting from the beginning")
        else:
            meta = ckpt.read_meta(found)
            saved = config_from_dict(meta["config"])
            if saved.model_fields() != config.model_fields() or saved.batch != config.batch:
                diff = {k: (v, getattr(config, k)) for k, v in dataclasses.asdict(saved).items()
                        if k in (*config.model_fields(), "batch") and v != getattr(config, k)}
                raise UsageError(f"cannot resume {out}: its checkpoint was trained with "
                                 + ", ".join(f"--{k} {a} (now {b})" for k, (a, b) in diff.items()))
            vocab = CharVocab(meta["vocab"])
            start_state = found
    elif main_process and out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"run directory {out} already exists; pass --resume to continue it "
                         f"or --overwrite to start again")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if main_process:  # only process 0 writes; others may share the directory
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to run directory {out}: {e.strerror}") from None

    if vocab is not None:
        unknown = sorted(set(text) - set(vocab.chars))
        if unknown:
            raise UsageError(f"cannot resume {out}: the corpus has characters its vocabulary "
                             f"lacks ({', '.join(map(repr, unknown[:5]))}); another corpus?")
    corpus = prepare_corpus(text, config, vocab)
    vocab = corpus.vocab
    model = build_model(config, vocab.size)
    optimizer = make_optimizer(config)
    state = init_state(config, model, optimizer)
    if start_state is not None:
        state, meta = ckpt.load(start_state, state)
        _trim_metrics(metrics_path, int(state.step))
        log(f"resumed from {start_state} at step {int(state.step)}")
    elif overwrite and main_process:
        for name in ("metrics.jsonl", ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME):
            (out / name).unlink(missing_ok=True)

    multi = len(jax.devices()) > 1 or jax.process_count() > 1
    mesh = parallel.data_mesh(devices) if (multi or (devices or 1) > 1) else None
    if mesh is not None and mesh.size > 1:
        if config.batch % mesh.size:
            raise UsageError(f"--batch {config.batch} must divide evenly over {mesh.size} devices")
        state, put_batch = shard_state(mesh, state)
        train_step = make_train_step(model, optimizer, config, mesh=mesh)
    else:
        mesh, put_batch = None, jnp.asarray
        train_step = make_train_step(model, optimizer, config)
    evaluate = make_evaluator(model, corpus.val, seq=config.seq)
    n_params = count_params(state.params)
    log(f"{config.cell} {config.layers}x{config.hidden}, {n_params:,} parameters, vocabulary "
        f"{vocab.size}, {len(corpus.train):,} train / {len(corpus.val):,} validation characters"
        + (f"; {parallel.describe(mesh)}" if mesh is not None else ""))

    def save(st: TrainState, extra=None):
        host = parallel.to_host(st)  # every process takes part in gathering shards
        if main_process:
            ckpt.save(out, host, _meta(config, vocab, int(host.step), extra))
        parallel.sync("checkpoint saved")

    def write_metrics(record: dict):
        if main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def print_sample(params, step):
        if config.sample_length == 0 or not main_process:
            return
        prime_char = "\n" if "\n" in vocab.index else vocab.chars[0]
        key = jax.random.fold_in(jax.random.key(config.seed + 1), step)
        ids = sample(model, params, key, jnp.asarray(vocab.encode(prime_char)),
                     length=config.sample_length, temperature=0.8)
        sample_printer(f"--- sample at step {step} ---\n{vocab.decode(np.asarray(ids[0]))}\n---")

    from tqdm.auto import tqdm

    sample_printer = sample_printer or tqdm.write
    history, best_val = [], math.inf
    chars_per_step = config.batch * config.seq
    step = int(state.step)
    bar = tqdm(total=config.steps, initial=step, disable=not progress, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    exit_code, loss_sum, loss_n, t_last, step_last = 0, 0.0, 0, time.perf_counter(), step
    with _StopSignals() as signals:
        try:
            while step < config.steps:
                inputs, targets, reset = batch_at(config, corpus.train, step)
                new_state, m = train_step(state, put_batch(inputs), put_batch(targets), reset)
                m = parallel.to_local(m)
                if not bool(m["finite"]):
                    if config.nan_policy == "stop":
                        state = new_state._replace(step=new_state.step - 1)  # unchanged
                        found = ckpt.find(out)
                        kept = (f"last good checkpoint (step {ckpt.read_meta(found)['step']}) "
                                f"kept in {out}" if found else "no checkpoint was saved yet")
                        log(f"error: non-finite loss or gradient at step {step + 1} (loss "
                            f"{float(m['loss'])}); stopped, {kept}; try a lower --lr or "
                            f"--nan-policy skip")
                        exit_code = 3
                        break
                    log(f"warning: skipped step {step + 1}: non-finite loss or gradient")
                state, step = new_state, step + 1
                loss = float(m["loss"])
                if math.isfinite(loss):
                    loss_sum, loss_n = loss_sum + loss, loss_n + 1
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    now = time.perf_counter()
                    cps = chars_per_step * (step - step_last) / max(now - t_last, 1e-9)
                    record = {"step": step, "train_loss": loss_sum / max(loss_n, 1),
                              "chars_per_s": cps, "lr": float(learning_rate(config)(step - 1))}
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", chars_s=f"{cps:,.0f}")
                    write_metrics(record)
                    loss_sum, loss_n, t_last, step_last = 0.0, 0, now, step
                if step % config.eval_every == 0 or step == config.steps:
                    val = float(evaluate(parallel.to_local(state.params)))
                    best_val = min(best_val, val)
                    rec = {"step": step, "val_loss": val, "val_bpc": val / math.log(2),
                           "chars_seen": step * chars_per_step}
                    history.append(rec)
                    write_metrics(rec)
                    if main_process:
                        bar.write(f"step {step}: validation {val:.4f} nats, "
                                  f"{val / math.log(2):.4f} bits/char", file=sys.stderr)
                    print_sample(parallel.to_local(state.params), step)
                    t_last = time.perf_counter()  # keep eval time out of chars/s
                if step % config.save_every == 0 or step == config.steps:
                    save(state)
                if step_callback is not None:
                    step_callback(step, m)
                if signals.received is not None:
                    save(state)
                    name = "SIGINT" if signals.received == signal.SIGINT else "SIGTERM"
                    log(f"{name}: saved checkpoint at step {step} in {out}; resume with "
                        f"--out {out} --resume")
                    exit_code = 130 if signals.received == signal.SIGINT else 143
                    break
        except KeyboardInterrupt:
            save(state)
            log(f"interrupted: saved checkpoint at step {step} in {out}; resume with "
                f"--out {out} --resume")
            exit_code = 130
        finally:
            bar.close()
    return RunResult(state, vocab, best_val, history, exit_code)
