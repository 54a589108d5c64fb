"""Measurements behind the lecture's claims about RNN, LSTM and GRU.

Three tools, each a plain function so that the experiment scripts stay thin:

* **Gradients through time.** ``loss_state_gradients`` measures how the gradient of the
  loss at the last step with respect to the recurrent state ``k`` steps earlier shrinks
  (or grows) with ``k``; ``state_jacobian_norms`` measures the Frobenius norm of the
  Jacobian ``∂h_T/∂s_{T-k}``. Both add a zero perturbation ``ε_t`` to the state after
  every step inside the scan and differentiate with respect to the ``ε``'s: one backward
  pass then yields ``∂L/∂s_t`` for every ``t`` at once.
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
import functools
import math
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq._cells import Array, Cell, Params
from jaxseq._unroll import unroll
from jaxseq.charrnn import (CharRNNConfig, batch_at, build_model, init_state, make_evaluator,
                            make_optimizer, make_train_step, prepare_corpus)
from jaxseq.data import CharVocab
from jaxseq.errors import UsageError
from jaxseq.models import CharLM, char_lm, count_params, cross_entropy
from jaxseq.sample import sample


def hidden_of(carry: Any) -> Array:
    """The hidden state ``h`` of a carry: the carry itself, or ``carry.h`` for an LSTM."""
    return getattr(carry, "h", carry)


def _leaf_norms(tree: Any, feature_axes: tuple[int, ...]) -> Array:
    """Euclidean norm over ``feature_axes`` of every leaf together."""
    squares = [jnp.sum(jnp.square(leaf), axis=feature_axes) for leaf in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares))


def _perturbed_final_carry(cell: Cell, params: Params, carry: Any, zs: Array, eps: Any) -> Any:
    """Runs ``cell.step`` over projected inputs ``zs: (T, ...)`` adding ``eps[t]`` to the carry
    after step ``t``; the gradient with respect to ``eps[t]`` is the gradient with respect
    to the state ``s_t``."""

    def body(c, inputs):
        z, e = inputs
        c, _ = cell.step(params, c, z)
        return jax.tree.map(jnp.add, c, e), None

    final, _ = jax.lax.scan(body, carry, (zs, eps))
    return final


def _warm_start(cell: Cell, params: Params, xs: Array, burn_in: int) -> tuple[Any, Array]:
    """The carry after ``burn_in`` unperturbed steps (no gradient), and the remaining inputs."""
    batch_shape = xs.shape[1:-1]
    carry = cell.initial_carry(batch_shape, xs.dtype)
    if burn_in:
        carry, _ = unroll(cell, params, carry, xs[:burn_in])
        carry = jax.lax.stop_gradient(carry)
    return carry, xs[burn_in:]


class GradientProfile(NamedTuple):
    """Per-example gradient norms, indexed by steps back from the last step.

    Attributes:
      state: ``(K, B)``: ``‖∂L_T/∂s_{T-k}‖`` for ``k = 0 .. K-1``, where ``s`` is the whole
        recurrent state (``h``; ``(h, c)`` together for an LSTM) and ``L_T`` the loss of
        example ``b`` at its last step.
      hidden: ``(K, B)``: the same for the ``h`` part of the state alone.
    """

    state: Array
    hidden: Array


def loss_state_gradients(
    cell: Cell,
    params: Params,
    xs: Array,
    targets: Array,
    readout: Callable[[Array], Array],
    *,
    burn_in: int = 0,
) -> GradientProfile:
    """Norms of the gradient of the last step's loss with respect to every earlier state.

    Args:
      cell: the cell.
      params: its parameters.
      xs: ``(burn_in + K, B, F)`` inputs; the first ``burn_in`` steps only warm the state up
        (no gradient flows into them), the remaining ``K`` are measured.
      targets: ``(B,)`` int, the class the last step should predict.
      readout: ``h: (B, H) -> logits: (B, V)``.
      burn_in: see ``xs``.

    Returns:
      A ``GradientProfile`` with ``(K, B)`` arrays; row ``k`` is ``k`` steps before the last
      (row 0 is the state that the loss reads directly).
    """
    carry, xs = _warm_start(cell, params, xs, burn_in)
    zs = cell.project(params, xs)
    eps = jax.tree.map(lambda c: jnp.zeros((xs.shape[0], *c.shape), c.dtype), carry)

    def loss(eps):
        final = _perturbed_final_carry(cell, params, carry, zs, eps)
        # Each example's loss reads only its own states, so the gradient of the sum holds
        # every example's own gradient.
        return cross_entropy(readout(hidden_of(final)), targets).sum()

    grads = jax.grad(loss)(eps)
    state = _leaf_norms(grads, (-1,))[::-1]
    hidden = _leaf_norms(hidden_of(grads), (-1,))[::-1]
    return GradientProfile(state=state, hidden=hidden)


def state_jacobian_norms(cell: Cell, params: Params, xs: Array, *, burn_in: int = 0) -> Array:
    """Frobenius norms ``‖∂h_T/∂s_{T-k}‖_F`` of the Jacobian of the last hidden state.

    The whole ``(H, K, state)`` Jacobian of one example is built by reverse mode (H
    backward passes, batched), one example at a time to bound memory.

    Args:
      cell: the cell.
      params: its parameters.
      xs: ``(burn_in + K, B, F)`` inputs, as in ``loss_state_gradients``.
      burn_in: unmeasured warm-up steps.

    Returns:
      ``(K, B)``; row ``k`` is ``k`` steps before the last (row 0 is ``√H``: the identity).
    """
    carry, xs = _warm_start(cell, params, xs, burn_in)
    zs = cell.project(params, xs)  # (K, B, G*H)

    def one_example(inputs):
        carry_b, zs_b = inputs  # leaves (H,), zs_b (K, G*H)
        eps = jax.tree.map(lambda c: jnp.zeros((zs_b.shape[0], *c.shape), c.dtype), carry_b)
        last_hidden = lambda e: hidden_of(_perturbed_final_carry(cell, params, carry_b, zs_b, e))
        jac = jax.jacrev(last_hidden)(eps)  # leaves (H, K, H)
        return _leaf_norms(jac, (0, 2))  # (K,)

    per_example = jax.lax.map(one_example, (carry, jnp.swapaxes(zs, 0, 1)))  # (B, K)
    return per_example.T[::-1]


@functools.partial(jax.jit, static_argnames=("cell", "burn_in", "input_mode", "vocab_size",
                                             "jacobian_examples"))
def _char_lm_profile(cell, rnn_params, embed, w_out, b_out, tokens, *, burn_in, input_mode,
                     vocab_size, jacobian_examples):
    inputs = tokens[:-1]
    xs = (embed[inputs] if input_mode == "embedding"
          else jax.nn.one_hot(inputs, vocab_size, dtype=w_out.dtype))
    readout = lambda h: h @ w_out + b_out
    profile = loss_state_gradients(cell, rnn_params, xs, tokens[-1], readout, burn_in=burn_in)
    out = {"state": profile.state, "hidden": profile.hidden}
    if jacobian_examples:
        out["jacobian"] = state_jacobian_norms(cell, rnn_params, xs[:, :jacobian_examples],
                                               burn_in=burn_in)
    return out


def char_lm_gradients(model: CharLM, params, tokens: Array, *, burn_in: int = 0,
                      jacobian_examples: int = 0) -> dict[str, np.ndarray]:
    """Both measurements on a one-layer char LM, computed in float64.

    Float64 because a tanh RNN's gradient 200 steps back can lie below float32's smallest
    normal number (about 1e-38).

    Args:
      model: a ``CharLM`` with one recurrent layer.
      params: its ``CharLMParams``.
      tokens: ``(burn_in + K + 1, B)`` int windows of text; the last step's loss predicts
        ``tokens[-1]`` from ``tokens[:-1]``.
      burn_in: warm-up steps before the ``K`` measured ones.
      jacobian_examples: how many of the ``B`` windows also get the (costlier) Jacobian norm;
        0 skips it.

    Returns:
      ``{"state": (K, B), "hidden": (K, B)}`` loss-gradient norms and, when asked,
      ``"jacobian": (K, jacobian_examples)``, as float64 NumPy arrays; row ``k`` is ``k``
      steps back.
    """
    if model.network.num_layers != 1 or model.network.bidirectional:
        raise ValueError("char_lm_gradients measures one unidirectional layer")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] < burn_in + 2:
        raise ValueError(f"tokens must be (burn_in + K + 1, B) with K >= 1, got {tokens.shape}")
    jacobian_examples = min(jacobian_examples, tokens.shape[1])
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        out = _char_lm_profile(model.network.cell, p64.rnn[0], p64.embed, p64.w_out, p64.b_out,
                               jnp.asarray(tokens), burn_in=burn_in,
                               input_mode=model.input_mode, vocab_size=model.vocab_size,
                               jacobian_examples=jacobian_examples)
        return {k: np.asarray(v) for k, v in out.items()}


def text_windows(ids: np.ndarray, length: int, count: int, seed: int) -> np.ndarray:
    """``(length, count)`` int32 windows of ``ids`` at random offsets (a seeded generator)."""
    if len(ids) < length:
        raise UsageError(f"text too short: {len(ids)} characters, a window needs {length}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length + 1, size=count)
    return np.stack([ids[s:s + length] for s in starts], axis=1).astype(np.int32)


def steps_to_fall(norms: np.ndarray, factor: float) -> Optional[int]:
    """The first ``k`` at which the profile ``norms: (K,)`` is below ``norms[0] / factor``."""
    below = np.nonzero(norms < norms[0] / factor)[0]
    return int(below[0]) if len(below) else None


# --------------------------------------------------------------------------- recall task

def recall_batch(rng: np.random.Generator, batch: int, gap: int, *, num_symbols: int = 4,
                 num_noise: int = 4) -> tuple[np.ndarray, np.ndarray]:
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


def train_recall(cell: str, gap: int, *, hidden: int = 64, embed: int = 16, steps: int = 300,
                 batch: int = 32, lr: float = 3e-3, clip: float = 1.0, num_symbols: int = 4,
                 num_noise: int = 4, eval_size: int = 1024, seed: int = 0) -> RecallResult:
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
        tokens, targets = recall_batch(rng, batch, gap, num_symbols=num_symbols,
                                       num_noise=num_noise)
        params, opt_state = train_step(params, opt_state, tokens, targets)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    tokens, targets = recall_batch(np.random.default_rng([seed, gap, 2]), eval_size, gap,
                                   num_symbols=num_symbols, num_noise=num_noise)
    loss, accuracy = jax.jit(loss_fn)(params, tokens, targets)
    return RecallResult(cell, gap, float(accuracy), float(loss), seconds)


# --------------------------------------------------------------------------- budgeted runs

class Budget(NamedTuple):
    """When a run stops: at ``chars`` characters seen or ``seconds`` of training, whichever
    comes first (``None``: no limit of that kind; at least one must be set)."""

    chars: Optional[int] = None
    seconds: Optional[float] = None

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
        self.history.append({"step": self.steps, "chars": self.chars,
                             "seconds": self.seconds, "val_loss": val})

    def result(self) -> RaceResult:
        finite = [h["val_loss"] for h in self.history if math.isfinite(h["val_loss"])]
        return RaceResult(self.label, self.config, self.model, self.state.params, self.n_params,
                          self.steps, self.chars, self.seconds, self.history,
                          min(finite) if finite else math.inf, self.diverged)


def race(
    configs: Sequence[CharRNNConfig],
    text: str,
    budget: Budget,
    *,
    labels: Optional[Sequence[str]] = None,
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
        log(f"{r.label}: {r.n_params:,} parameters, initial validation "
            f"{r.history[0]['val_loss']:.4f} nats")

    from tqdm.auto import tqdm

    scale = 100  # the bar counts percent of each run's budget, summed over the runs
    bar = tqdm(total=scale * len(runners), disable=not progress, unit="%", file=sys.stderr,
               dynamic_ncols=True, desc=f"budget of {len(runners)} runs")
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


def hidden_for_param_count(config: CharRNNConfig, vocab_size: int, target: int) -> int:
    """The hidden size that brings a model of ``config`` closest to ``target`` parameters
    (the smaller one on a tie)."""
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    count = lambda hidden: count_model_params(dataclasses.replace(config, hidden=hidden),
                                              vocab_size)

    lo, hi = 1, 1
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # count(lo) < target <= count(hi), parameter counts grow with H
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda h: (abs(count(h) - target), h))


def sample_text(model: CharLM, params, vocab: CharVocab, *, length: int, seed: int = 0,
                temperature: float = 0.8, prime: str = "\n") -> str:
    """``length`` characters generated after ``prime`` (which is not included)."""
    ids = sample(model, params, jax.random.key(seed), jnp.asarray(vocab.encode(prime)),
                 length=length, temperature=temperature)
    return vocab.decode(np.asarray(ids[0]))
