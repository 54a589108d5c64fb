"""The time loop: one ``jax.lax.scan`` per layer, with the input projection hoisted.

``unroll`` runs one cell over a time-major sequence; ``stack`` builds a multi-layer,
optionally bidirectional network with dropout between layers out of any ``Cell``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxseq._cells import Array, Carry, Cell, Params, PRNGKey
from jaxseq._fused import fused_unroll


def _masked_step(step: Callable, params: Params) -> Callable:
    """A scan body that leaves carry and zeroes output where ``t >= seq_length``."""

    def body(carry, inputs):
        z, valid = inputs  # valid: (*batch,) bool
        new_carry, y = step(params, carry, z)
        keep = lambda new, old: jnp.where(valid[..., None], new, old)
        new_carry = jax.tree.map(keep, new_carry, carry)
        y = jnp.where(valid[..., None], y, jnp.zeros_like(y))
        return new_carry, y

    return body


def unroll(
    cell: Cell,
    params: Params,
    carry: Carry,
    xs: Array,
    *,
    reverse: bool = False,
    seq_lengths: Optional[Array] = None,
) -> tuple[Carry, Array]:
    """Runs ``cell`` over a time-major sequence.

    The input-to-hidden product for all T steps is one matmul outside the loop; the scan
    body holds only the recurrent product and the gate arithmetic.

    Args:
      cell: the cell.
      params: its parameters.
      carry: the initial carry, leaves ``(*batch, H)`` (``cell.initial_carry(batch)``, or
        the final carry of the previous window for truncated BPTT).
      xs: ``(T, *batch, F)`` inputs.
      reverse: run from the last valid step to the first.
      seq_lengths: optional ``(*batch,)`` integer lengths. Steps at ``t >= length`` leave the
        carry untouched and output zeros, so the returned carry is the last valid one; with
        ``reverse`` each sequence starts at its own last valid step.

    Returns:
      ``(final_carry, ys)`` with ``ys: (T, *batch, H)``.
    """
    if seq_lengths is None:
        # The built-in cells run as fused kernels whose backward pass takes the weight
        # gradients out of the time loop (jaxseq/_fused.py); other cells use plain scan.
        fused = fused_unroll(cell, params, carry, xs, reverse)
        if fused is not None:
            return fused
    zs = cell.project(params, xs)
    if seq_lengths is None:
        return jax.lax.scan(lambda c, z: cell.step(params, c, z), carry, zs, reverse=reverse)
    steps = jnp.arange(xs.shape[0]).reshape((-1,) + (1,) * (xs.ndim - 2))
    valid = steps < jnp.asarray(seq_lengths)[None]
    return jax.lax.scan(_masked_step(cell.step, params), carry, (zs, valid), reverse=reverse)


def reference_unroll(
    cell: Cell, params: Params, carry: Carry, xs: Array, *, reverse: bool = False
) -> tuple[Carry, Array]:
    """A plain Python loop over ``cell.apply``: the twin that tests compare ``unroll`` with."""
    order = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    ys = [None] * xs.shape[0]
    for t in order:
        carry, ys[t] = cell.apply(params, carry, xs[t])
    return carry, jnp.stack(ys)


class Stack(NamedTuple):
    """A multi-layer (optionally bidirectional) recurrent network as pure functions.

    Attributes:
      init: ``(key, input_size) -> params``: a tuple with one entry per layer, each the
        cell's params or, when bidirectional, a ``(forward, backward)`` pair.
      apply: ``(params, carry, xs: (T, *batch, F), *, seq_lengths=None, dropout_key=None)
        -> (carry, ys: (T, *batch, output_size))``. Dropout between layers is applied only
        when ``dropout_key`` is given (training).
      initial_carry: ``(batch_shape, dtype=float32) -> carry`` (tuple per layer, pairs when
        bidirectional).
      cell, num_layers, bidirectional, dropout: the configuration.
      output_size: H, or 2H when bidirectional.
    """

    init: Callable[[PRNGKey, int], Any]
    apply: Callable[..., tuple[Any, Array]]
    initial_carry: Callable[..., Any]
    cell: Cell
    num_layers: int
    bidirectional: bool
    dropout: float
    output_size: int


def stack(
    cell: Cell, num_layers: int = 1, *, bidirectional: bool = False, dropout: float = 0.0
) -> Stack:
    """Stacks ``num_layers`` layers of ``cell``, each one ``lax.scan`` (two if bidirectional).

    Args:
      cell: the cell used in every layer.
      num_layers: how many layers.
      bidirectional: each layer runs forward and backward and concatenates the outputs.
      dropout: rate of inverted dropout on the outputs of every layer but the last.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    directions = 2 if bidirectional else 1
    out = cell.hidden_size * directions

    def init(key: PRNGKey, input_size: int):
        keys = jax.random.split(key, (num_layers, directions))
        layers = []
        for layer in range(num_layers):
            size = input_size if layer == 0 else out
            pair = tuple(cell.init(keys[layer, d], size) for d in range(directions))
            layers.append(pair if bidirectional else pair[0])
        return tuple(layers)

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        one = lambda: cell.initial_carry(batch_shape, dtype)
        return tuple((one(), one()) if bidirectional else one() for _ in range(num_layers))

    def apply(params, carry, xs, *, seq_lengths=None, dropout_key=None):
        new_carry = []
        keys = (jax.random.split(dropout_key, num_layers) if dropout_key is not None
                else [None] * num_layers)
        for layer in range(num_layers):
            if bidirectional:
                (pf, pb), (cf, cb) = params[layer], carry[layer]
                cf, yf = unroll(cell, pf, cf, xs, seq_lengths=seq_lengths)
                cb, yb = unroll(cell, pb, cb, xs, reverse=True, seq_lengths=seq_lengths)
                new_carry.append((cf, cb))
                xs = jnp.concatenate([yf, yb], axis=-1)
            else:
                c, xs = unroll(cell, params[layer], carry[layer], xs, seq_lengths=seq_lengths)
                new_carry.append(c)
            if dropout > 0.0 and keys[layer] is not None and layer < num_layers - 1:
                keep = jax.random.bernoulli(keys[layer], 1.0 - dropout, xs.shape)
                xs = jnp.where(keep, xs / (1.0 - dropout), 0.0).astype(xs.dtype)
        return tuple(new_carry), xs

    return Stack(init, apply, initial_carry, cell, num_layers, bidirectional, dropout, out)
