"""Measurements behind the lecture's claims about RNN, LSTM and GRU (and minGRU, minLSTM):
gradients through time.

Plain functions, so that the experiment scripts stay thin (the recall task and the budget
race that train models are in ``experiments/_race.py``):

* **Gradients through time.** ``loss_state_gradients`` measures how the gradient of the
  loss at the last step with respect to the recurrent state ``k`` steps earlier shrinks
  (or grows) with ``k``; ``state_jacobian_norms`` measures the Frobenius norm of the
  Jacobian ``∂h_T/∂s_{T-k}``. Both add a zero perturbation ``ε_t`` to the state after
  every step inside the scan and differentiate with respect to the ``ε``'s: one backward
  pass then yields ``∂L/∂s_t`` for every ``t`` at once. They work for any cell, minGRU and
  minLSTM included.
* **The linear cells in closed form.** For minGRU and minLSTM, ``h_t = a_t * h_{t-1} + b_t``
  with ``a_t`` a function of ``x_t`` alone, so ``∂h_t/∂h_{t-1} = diag(a_t)`` and
  ``∂h_T/∂h_{T-k} = diag(a_T * ... * a_{T-k+1})``: no recurrent matrix and no ``tanh'``
  between steps, only a product of gates in (0, 1). ``gate_product_norms`` computes its
  Frobenius norm from ``cell.coefficients`` without a backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq._cells import Array, Cell, Params
from jaxseq._unroll import unroll
from jaxseq.errors import UsageError
from jaxseq.models import CharLM, cross_entropy


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


def gate_product_norms(cell: Cell, params: Params, xs: Array, *, burn_in: int = 0) -> Array:
    """``state_jacobian_norms`` in closed form for a cell linear in its carry.

    For minGRU and minLSTM (``cell.coefficients`` is set) the Jacobian of the last state
    with respect to the state ``k`` steps earlier is diagonal,
    ``∂h_T/∂h_{T-k} = diag(a_T * a_{T-1} * ... * a_{T-k+1})`` (``a = 1 - z`` for minGRU,
    the normalised forget gate ``f'`` for minLSTM), so its Frobenius norm is the Euclidean
    norm of that product of gates. It depends on the inputs only, not on the state.

    Args:
      cell: a cell with ``coefficients``.
      params: its parameters.
      xs: ``(burn_in + K, B, F)`` inputs, as in ``state_jacobian_norms``.
      burn_in: steps before the ``K`` measured ones (they do not enter the product).

    Returns:
      ``(K, B)``; row ``k`` is ``k`` steps before the last (row 0 is ``√H``).
    """
    if cell.coefficients is None:
        raise ValueError(
            f"the {cell.name!r} cell is not linear in its carry (cell.coefficients is None)"
        )
    a, _ = cell.coefficients(params, cell.project(params, xs[burn_in:]))  # (K, B, H)
    products = jnp.cumprod(a[::-1], axis=0)[:-1]  # row k-1: a_T * ... * a_{T-k+1}
    products = jnp.concatenate([jnp.ones_like(a[:1]), products], axis=0)
    return jnp.sqrt(jnp.sum(jnp.square(products), axis=-1))


@functools.partial(
    jax.jit, static_argnames=("cell", "burn_in", "input_mode", "vocab_size", "jacobian_examples")
)
def _char_lm_profile(
    cell,
    rnn_params,
    embed,
    w_out,
    b_out,
    tokens,
    *,
    burn_in,
    input_mode,
    vocab_size,
    jacobian_examples,
):
    inputs = tokens[:-1]
    xs = (
        embed[inputs]
        if input_mode == "embedding"
        else jax.nn.one_hot(inputs, vocab_size, dtype=w_out.dtype)
    )
    readout = lambda h: h @ w_out + b_out
    profile = loss_state_gradients(cell, rnn_params, xs, tokens[-1], readout, burn_in=burn_in)
    out = {"state": profile.state, "hidden": profile.hidden}
    if jacobian_examples:
        out["jacobian"] = state_jacobian_norms(
            cell, rnn_params, xs[:, :jacobian_examples], burn_in=burn_in
        )
    return out


def char_lm_gradients(
    model: CharLM, params, tokens: Array, *, burn_in: int = 0, jacobian_examples: int = 0
) -> dict[str, np.ndarray]:
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
        out = _char_lm_profile(
            model.network.cell,
            p64.rnn[0],
            p64.embed,
            p64.w_out,
            p64.b_out,
            jnp.asarray(tokens),
            burn_in=burn_in,
            input_mode=model.input_mode,
            vocab_size=model.vocab_size,
            jacobian_examples=jacobian_examples,
        )
        return {k: np.asarray(v) for k, v in out.items()}


def text_windows(ids: np.ndarray, length: int, count: int, seed: int) -> np.ndarray:
    """``(length, count)`` int32 windows of ``ids`` at random offsets (a seeded generator)."""
    if len(ids) < length:
        raise UsageError(f"text too short: {len(ids)} characters, a window needs {length}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length + 1, size=count)
    return np.stack([ids[s : s + length] for s in starts], axis=1).astype(np.int32)


def steps_to_fall(norms: np.ndarray, factor: float) -> int | None:
    """The first ``k`` at which the profile ``norms: (K,)`` is below ``norms[0] / factor``."""
    below = np.nonzero(norms < norms[0] / factor)[0]
    return int(below[0]) if len(below) else None
