"""The runs behind compare and vanishing: a synthetic recall task and the budget race.

* **A synthetic long-range task.** ``recall_batch`` makes sequences whose first token is
  a symbol to remember, followed by ``gap`` noise tokens; the model must name the symbol
  after the last one. ``train_recall`` trains one cell on it and reports accuracy.
* **Budgeted training.** ``race`` trains several char-RNN configurations side by side,
  one step of each in turn, until each has seen the same number of characters or spent
  the same training wall-clock (load on a shared machine then hits every run alike), and
  records validation loss against characters and seconds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq.charrnn import (
    CharRNNConfig,
    batch_at,
    build_model,
    init_state,
    make_evaluator,
    make_optimizer,
    make_train_step,
    prepare_corpus,
)
from jaxseq.data import CharVocab
from jaxseq.errors import UsageError
from jaxseq.models import CharLM, char_lm, count_params, cross_entropy
from jaxseq.sample import sample

# --------------------------------------------------------------------------- recall task


def recall_batch(
    rng: np.random.Generator, batch: int, gap: int, *, num_symbols: int = 4, num_noise: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Sequences for the recall task: remember the first token across ``gap`` noise tokens.

    Token ids ``0 .. num_symbols-1`` are the symbols to remember and
    ``num_symbols .. num_symbols+num_noise-1`` are noise. Each sequence is one symbol
    followed by ``gap`` noise tokens; the target, predicted after the last token, is the
    symbol, seen ``gap`` steps earlier. Chance accuracy is ``1 / num_symbols``.

    Returns:
      ``(tokens: (gap + 1, batch) int32, targets: (batch,) int32)``.
    """
    symbols = rng.integers(0, num_symbols, size=batch)
    noise = rng.integers(num_symbols, num_symbols + num_noise, size=(gap, batch))
    tokens = np.concatenate([symbols[None], noise], axis=0).astype(np.int32)
    return tokens, symbols.astype(np.int32)


class RecallResult(NamedTuple):
    cell: str
    gap: int
    accuracy: float  # on held-out sequences
    loss: float  # held-out cross-entropy in nats
    seconds: float  # training time


def train_recall(
    cell: str,
    gap: int,
    *,
    hidden: int = 64,
    embed: int = 16,
    steps: int = 300,
    batch: int = 32,
    lr: float = 3e-3,
    clip: float = 1.0,
    num_symbols: int = 4,
    num_noise: int = 4,
    eval_size: int = 1024,
    seed: int = 0,
) -> RecallResult:
    """Trains one cell on ``recall_batch`` sequences of one gap and measures its accuracy.

    The model is a one-layer ``char_lm`` (embedding, cell, dense); only the last step's
    output is trained and scored. Every step draws fresh sequences, so accuracy on the
    held-out set (another generator) measures the rule, not memorised examples.
    """
    model = char_lm(num_symbols + num_noise, cell=cell, hidden=hidden, layers=1, embed=embed)
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr))
    params = model.init(jax.random.key(seed))
    opt_state = optimizer.init(params)

    def loss_fn(params, tokens, targets):
        _, logits = model.apply(params, model.initial_carry((tokens.shape[1],)), tokens)
        last = logits[-1]
        return cross_entropy(last, targets).mean(), jnp.mean(jnp.argmax(last, -1) == targets)

    @jax.jit
    def train_step(params, opt_state, tokens, targets):
        grads = jax.grad(lambda p: loss_fn(p, tokens, targets)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng([seed, gap, 1])
    start = time.perf_counter()
    for _ in range(steps):
        tokens, targets = recall_batch(
            rng, batch, gap, num_symbols=num_symbols, num_noise=num_noise
        )
        params, opt_state = train_step(params, opt_state, tokens, targets)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    tokens, targets = recall_batch(
        np.random.default_rng([seed, gap, 2]),
        eval_size,
        gap,
        num_symbols=num_symbols,
        num_noise=num_noise,
    )
    loss, accuracy = jax.jit(loss_fn)(params, tokens, targets)
    return RecallResult(cell, gap, float(accuracy), float(loss), seconds)


# --------------------------------------------------------------------------- budgeted runs


class Budget(NamedTuple):
    """When a run stops: at ``chars`` characters seen or ``seconds`` of training, whichever
    comes first (``None``: no limit of that kind; at least one must be set)."""

    chars: int | None = None
    seconds: float | None = None

    def validate(self) -> None:
        if self.chars is None and self.seconds is None:
            raise UsageError("a budget needs --budget-chars or --budget-seconds")
        if self.chars is not None and self.chars <= 0:
            raise UsageError(f"--budget-chars must be positive, got {self.chars}")
        if self.seconds is not None and not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise UsageError(f"--budget-seconds must be positive, got {self.seconds}")

    def fraction(self, chars: int, seconds: float) -> float:
        """How much of the budget ``chars`` characters in ``seconds`` have used (1 = spent)."""
        parts = []
        if self.chars is not None:
            parts.append(chars / self.chars)
        if self.seconds is not None:
            parts.append(seconds / self.seconds)
        return max(parts)

    def describe(self) -> str:
        parts = []
        if self.chars is not None:
            parts.append(f"{self.chars:,} characters")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s of training")
        return " or ".join(parts) + (", whichever first" if len(parts) == 2 else "")


class RaceResult(NamedTuple):
    """One budgeted run.

    Attributes:
      label: the name given to ``race``.
      config: its ``CharRNNConfig``.
      model: the ``CharLM``.
      params: the trained parameters.
      n_params: number of parameters.
      steps, chars, seconds: training steps, characters seen and training wall-clock
        (evaluation and compilation excluded).
      history: ``[{"chars", "seconds", "step", "val_loss"}]``, starting at step 0.
      best_val: the lowest validation loss in nats per character.
      diverged: the run stopped at a non-finite loss or gradient.
    """

    label: str
    config: CharRNNConfig
    model: CharLM
    params: Any
    n_params: int
    steps: int
    chars: int
    seconds: float
    history: list
    best_val: float
    diverged: bool


class _Runner:
    """Mutable bookkeeping of one run inside ``race``."""

    def __init__(self, label, config, text, vocab, val_chars):
        self.label, self.config = label, config
        corpus = prepare_corpus(text, config, vocab)
        self.train_ids = corpus.train
        val = corpus.val[:val_chars] if val_chars else corpus.val
        self.model = build_model(config, vocab.size)
        optimizer = make_optimizer(config)
        self.state = init_state(config, self.model, optimizer)
        self.train_step = make_train_step(self.model, optimizer, config)
        self.evaluate = make_evaluator(self.model, val, seq=config.seq)
        self.n_params = count_params(self.state.params)
        self.steps = self.chars = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.done = self.diverged = False
        self.next_eval = 1

    def compile(self):
        inputs, targets, reset = batch_at(self.config, self.train_ids, 0)
        jax.block_until_ready(self.train_step(self.state, inputs, targets, reset))
        jax.block_until_ready(self.evaluate(self.state.params))

    def record(self):
        val = float(self.evaluate(self.state.params))
        self.history.append(
            {"step": self.steps, "chars": self.chars, "seconds": self.seconds, "val_loss": val}
        )

    def result(self) -> RaceResult:
        finite = [h["val_loss"] for h in self.history if math.isfinite(h["val_loss"])]
        return RaceResult(
            self.label,
            self.config,
            self.model,
            self.state.params,
            self.n_params,
            self.steps,
            self.chars,
            self.seconds,
            self.history,
            min(finite) if finite else math.inf,
            self.diverged,
        )


def race(
    configs: Sequence[CharRNNConfig],
    text: str,
    budget: Budget,
    *,
    labels: Sequence[str] | None = None,
    eval_points: int = 10,
    val_chars: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[RaceResult]:
    """Trains every configuration under the same budget, one step of each in turn.

    Each step is timed on its own (to completion), so ``seconds`` counts only training; the
    runs share the machine's noise because their steps interleave. Validation runs at the
    start and each time a run has spent another ``1/eval_points`` of its budget.

    Args:
      configs: one ``CharRNNConfig`` per run (``schedule="constant"`` suits budgets that are
        not a number of steps).
      text: the corpus; every run shares one vocabulary and one train/validation split.
      budget: the ``Budget`` of every run.
      labels: names of the runs (default: the cell names).
      eval_points: validations per run after the initial one.
      val_chars: validate on the first ``val_chars`` characters of the split (0: all).
      progress: show a tqdm bar.
      log: where one-line messages go.

    Returns:
      One ``RaceResult`` per configuration, in order.
    """
    budget.validate()
    if eval_points <= 0:
        raise UsageError(f"eval_points must be positive, got {eval_points}")
    labels = list(labels or [c.cell for c in configs])
    vocab = CharVocab.from_text(text)
    runners = [_Runner(l, c, text, vocab, val_chars) for l, c in zip(labels, configs)]
    for r in runners:
        r.compile()
        r.record()
        log(
            f"{r.label}: {r.n_params:,} parameters, initial validation "
            f"{r.history[0]['val_loss']:.4f} nats"
        )

    from tqdm.auto import tqdm

    scale = 100  # the bar counts percent of each run's budget, summed over the runs
    bar = tqdm(
        total=scale * len(runners),
        disable=not progress,
        unit="%",
        file=sys.stderr,
        dynamic_ncols=True,
        desc=f"budget of {len(runners)} runs",
    )
    shown = [0] * len(runners)
    while not all(r.done for r in runners):
        for i, r in enumerate(runners):
            if r.done:
                continue
            inputs, targets, reset = batch_at(r.config, r.train_ids, r.steps)
            start = time.perf_counter()
            new_state, metrics = r.train_step(r.state, inputs, targets, reset)
            finite = bool(metrics["finite"])
            r.seconds += time.perf_counter() - start
            if not finite:
                log(f"{r.label}: non-finite loss or gradient at step {r.steps + 1}; stopped")
                r.diverged = r.done = True
                r.record()
                continue
            r.state, r.steps = new_state, r.steps + 1
            r.chars += r.config.batch * r.config.seq
            used = budget.fraction(r.chars, r.seconds)
            if used >= 1.0:
                r.done = True
            if r.done or used >= r.next_eval / eval_points:
                r.record()
                r.next_eval = math.floor(used * eval_points) + 1
            tick = min(scale, int(used * scale))
            bar.update(tick - shown[i])
            shown[i] = tick
    bar.close()
    return [r.result() for r in runners]


def count_model_params(config: CharRNNConfig, vocab_size: int) -> int:
    """Parameters of ``build_model(config, vocab_size)``, counted from shapes alone."""
    model = build_model(config, vocab_size)
    return count_params(jax.eval_shape(model.init, jax.random.key(0)))


def hidden_for_param_count(
    config: CharRNNConfig,
    vocab_size: int,
    target: int,
    *,
    resize: Callable[[CharRNNConfig, int], CharRNNConfig] = (
        lambda c, hidden: dataclasses.replace(c, hidden=hidden)
    ),
) -> int:
    """The hidden size that brings a model of ``config`` closest to ``target`` parameters
    (the smaller one on a tie). ``resize(config, hidden)`` is the model of that size (by
    default only ``hidden`` changes; the benchmarks also set ``embed=hidden``)."""
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    count = lambda hidden: count_model_params(resize(config, hidden), vocab_size)

    lo, hi = 1, 1
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # count(lo) < target <= count(hi), parameter counts grow with H
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda h: (abs(count(h) - target), h))


def sample_text(
    model: CharLM,
    params,
    vocab: CharVocab,
    *,
    length: int,
    seed: int = 0,
    temperature: float = 0.8,
    prime: str = "\n",
) -> str:
    """``length`` characters generated after ``prime`` (which is not included)."""
    ids = sample(
        model,
        params,
        jax.random.key(seed),
        jnp.asarray(vocab.encode(prime)),
        length=length,
        temperature=temperature,
    )
    return vocab.decode(np.asarray(ids[0]))
