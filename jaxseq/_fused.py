"""Fused recurrent layers: time loops with a hand-written backward pass.

Differentiating ``lax.scan`` over a cell step makes JAX accumulate the recurrent weight
gradient inside the reverse loop: two small matmuls per step (``dz @ W_hh^T`` and
``h_{t-1}^T dz``) plus a running sum. A fused layer is one ``jax.custom_vjp`` over the
whole of ``unroll`` (input projection included) that does what cuDNN does instead:

* the input projection ``xs @ W_ih`` is one ``(T*B, F) x (F, G*H)`` matmul; the bias is
  added inside the loop, fused with the gate arithmetic;
* the forward loop saves what the backward needs (the gate activations, and the cell
  state for an LSTM), so the backward recomputes no sigmoid from pre-activations;
* the backward loop keeps only ``dz_t @ W_hh^T`` and elementwise work and stacks the
  pre-activation gradients ``dz_t``;
* after the loop ``dW_hh = sum_t h_{t-1}^T dz_t``, ``dW_ih = sum_t x_t^T dz_t`` and
  ``dxs = dz @ W_ih^T`` are ONE large matmul each, and ``db`` one matrix-vector product.

This module is a leaf under ``_cells.py``: it never imports the time loop. ``unroll``
(``_unroll.py``) runs a fused layer when asked with ``impl="fused"``, or with
``impl="auto"`` when the cell's factory tagged it with a kernel (``Cell.kernel``, one of
``KERNELS``) and ``unsupported(...)`` finds nothing in the way; otherwise it runs the
readable ``lax.scan`` of ``cell.step``.

Mixed precision works as in the scan: the layer computes in the dtype of ``xs`` (the
parameters are cast to it, and their gradients flow back through the cast); the weight
gradient matmuls accumulate in float32.

The layers support reverse-mode differentiation to any order (their backward pass is plain
JAX); forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not defined for a
``custom_vjp``, so code that needs it passes ``impl="scan"``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxseq._cells import Array, Carry, Cell, LSTMState, Params

# ----------------------------------------------------------------------------- helpers
#
# Layouts: a layer is ``_projection`` (``zs = xs @ W_ih`` for ``xs: (T, B, F)``, ONE
# ``(T*B, F) x (F, G*H)`` matmul, without the bias) followed by a cell's ``_*_core`` loop over
# ``zs``, which adds the bias inside the loop where it costs nothing and carries ``(B, H)``.
# Weights are ``(in, out)`` as in the cells.
#
# The time loops (``_rewrite_loop``) are ``fori_loop``s over buffers in their carry rather
# than ``scan`` outputs: the forward writes the gate activations of step t over the
# pre-activations of step t in the buffer that holds ``zs``, and the backward writes ``dz_t``
# over the activations of step t, so no fresh ``(T, B, G*H)`` buffer is allocated and
# zero-filled for them (on XLA:CPU zero-filling and first-touch page faults of such a buffer
# cost as much as the gate arithmetic of the whole loop). Every slice a step reads is read at
# the end of the step before, so the gate arithmetic works on small arrays.


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _at(buf: Array, t) -> Array:
    return jax.lax.dynamic_index_in_dim(buf, t, 0, keepdims=False)


def _put(buf: Array, value: Array, t) -> Array:
    return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), t, 0)


def _prev(buf: Array, t, first: Array, reverse: bool) -> Array:
    """The carry that entered step t, read from the stacked outputs ``buf`` (or ``first``)."""
    T = buf.shape[0]
    if reverse:
        return jnp.where(t + 1 < T, _at(buf, jnp.minimum(t + 1, T - 1)), first)
    return jnp.where(t > 0, _at(buf, jnp.maximum(t - 1, 0)), first)


def _shift(ys: Array, first: Array, reverse: bool) -> Array:
    """The carries that entered each step: ``(T, B, H)`` from outputs ``ys`` and ``first``."""
    if reverse:
        return jnp.concatenate([ys[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], ys[:-1]], axis=0)


def _rewrite_loop(
    T: int,
    reverse: bool,
    body: Callable,
    carry,
    bufs: tuple,
    fetch: Callable = lambda t: (),
    unroll: int = 1,
):
    """A time loop that replaces ``bufs[k][t]`` by what ``body`` computes from it, in place.

    ``body(t, carry, olds, got) -> (carry, news)`` with ``olds[k] = bufs[k][t]``,
    ``got = fetch(t)`` (slices of read-only arrays) and ``news[k]`` written over ``olds[k]``.
    Each step's slices are read at the end of the step before (after that step's write):

    * read and write then touch a buffer in an order XLA can see, so it updates the buffer
      in place instead of copying all of it every step (which it does when the read at
      step t is fused into the consumers of the write at step t);
    * the step's arithmetic reads small arrays: a dynamic slice of a ``(T, B, X)`` array
      fused into the gate arithmetic made a GRU H=256 forward step about 1.5x slower on
      XLA:CPU (``benchmarks/charlm.md``).

    ``unroll`` steps run in each loop iteration: XLA:CPU pays a fixed cost to run a loop
    body, which the steps share. The forward loops use 2; the backward loops 1 (with 2, XLA
    copies their rewritten buffers every iteration and a GRU backward ran 3.5x slower). The
    first ``T % unroll`` steps run before the loop (run after it, their writes made XLA
    copy a whole buffer once).

    Returns:
      ``(carry, bufs)`` after the last step.
    """
    order = (lambda i: T - 1 - i) if reverse else (lambda i: i)

    def step(i, state):
        carry, bufs, olds, got = state
        t = order(i)
        carry, news = body(t, carry, olds, got)
        bufs = tuple(_put(b, n, t) for b, n in zip(bufs, news))
        t_next = order(jnp.minimum(i + 1, T - 1))
        return carry, bufs, tuple(_at(b, t_next) for b in bufs), fetch(t_next)

    rest = T % unroll  # these steps run first, outside the loop

    def steps(j, state):
        for k in range(unroll):
            state = step(rest + unroll * j + k, state)
        return state

    first = order(0)
    state = (carry, tuple(bufs), tuple(_at(b, first) for b in bufs), fetch(first))
    for i in range(rest):
        state = step(i, state)
    state = jax.lax.fori_loop(0, T // unroll, steps, state)
    return state[0], state[1]


def _forward_loop(reverse: bool, step: Callable, carry, zs: Array, save: bool, extras: int):
    """The forward time loop of a gated layer over its projected inputs ``zs: (T, B, G*H)``.

    ``step(carry, z_t) -> (carry, y_t, acts_t, extra_t)`` is one step: ``y_t: (B, H)`` the
    output, ``acts_t: (B, G*H)`` the gate activations and ``extra_t`` a tuple of ``extras``
    more ``(B, H)`` arrays for the backward pass. With ``save`` the activations overwrite
    the pre-activations in the buffer of ``zs`` and the extras fill buffers of their own.

    Returns:
      ``(carry, ys, acts, extras)``; ``acts`` is ``None`` and ``extras`` empty without
      ``save``.
    """
    T, B, _ = zs.shape
    ys = jnp.zeros((T, B, jax.tree.leaves(carry)[0].shape[-1]), zs.dtype)

    def body(t, carry, olds, got):
        carry, y, acts, extra = step(carry, olds[0] if save else got[0])
        return carry, ((acts, y, *extra) if save else (y,))

    if save:
        bufs = (zs, ys) + tuple(jnp.zeros_like(ys) for _ in range(extras))
        carry, (acts, ys, *extra) = _rewrite_loop(T, reverse, body, carry, bufs, unroll=2)
        return carry, ys, acts, tuple(extra)
    carry, (ys,) = _rewrite_loop(
        T, reverse, body, carry, (ys,), fetch=lambda t: (_at(zs, t),), unroll=2
    )
    return carry, ys, None, ()


def _dot(a: Array, b: Array) -> Array:
    return jnp.dot(a, b, preferred_element_type=a.dtype)


def _dot_wt(dz: Array, w: Array) -> Array:
    """``dz @ w^T`` for the backward loops: ``dz: (B, G*H)``, ``w: (H, G*H)`` -> ``(B, H)``."""
    return jax.lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=dz.dtype)


def _project(xs: Array, w_ih: Array) -> Array:
    """``(T, B, F) @ (F, G*H) -> (T, B, G*H)`` as one 2-D matmul (no bias)."""
    T, B, F = xs.shape
    return _dot(xs.reshape(T * B, F), w_ih).reshape(T, B, w_ih.shape[1])


def _weight_grad(hs: Array, dzs: Array, dtype) -> Array:
    """``sum_t hs_t^T dzs_t`` as one ``(H, T*B) x (T*B, G*H)`` matmul, accumulated in f32.

    The contraction runs over the leading axis of both operands, which XLA:CPU executes
    without transposing the (large) ``dzs`` first.
    """
    h2 = hs.reshape(-1, hs.shape[-1])
    d2 = dzs.reshape(-1, dzs.shape[-1])
    dw = jax.lax.dot_general(
        h2, d2, (((0,), (0,)), ((), ())), preferred_element_type=_acc_dtype(dtype)
    )
    return dw.astype(dtype)


def _bias_grad(dzs: Array, dtype) -> Array:
    """``sum_t,b dzs`` as a matrix-vector product (XLA:CPU may lower the equivalent
    reduction to a slow reduce-window over the ``(T*B, G*H)`` gradient)."""
    d2 = dzs.reshape(-1, dzs.shape[-1])
    ones = jnp.ones((d2.shape[0],), d2.dtype)
    return jnp.dot(ones, d2, preferred_element_type=_acc_dtype(d2.dtype)).astype(dtype)


@jax.custom_vjp
def _projection(xs: Array, w_ih: Array) -> Array:
    """``xs @ W_ih`` for ``xs: (T, B, F)``, with a backward pass of two plain 2-D matmuls.

    Autodiff of the same product contracts over two axes and lets XLA:CPU transpose the
    large ``dzs`` before a slow matmul; here ``dW_ih`` contracts over the leading axis.
    """
    return _project(xs, w_ih)


def _projection_fwd(xs, w_ih):
    return _project(xs, w_ih), (xs, w_ih)


def _projection_bwd(res, dzs):
    xs, w_ih = res
    T, B, F = xs.shape
    dxs = jax.lax.dot_general(
        dzs.reshape(T * B, -1), w_ih, (((1,), (1,)), ((), ())), preferred_element_type=xs.dtype
    ).reshape(xs.shape)
    return dxs, _weight_grad(xs, dzs, w_ih.dtype)


_projection.defvjp(_projection_fwd, _projection_bwd)


def _blocks(a: Array, n: int) -> list[Array]:
    H = a.shape[-1] // n
    return [a[..., k * H : (k + 1) * H] for k in range(n)]


# ----------------------------------------------------------------------------- vanilla RNN


def _rnn_cell(act: str, w_hh, b, h, zx):
    pre = zx + b + _dot(h, w_hh)
    return jnp.tanh(pre) if act == "tanh" else jax.nn.relu(pre)


def _rnn_forward(act, reverse, b, w_hh, h0, zs):
    def body(t, h, olds, got):
        h = _rnn_cell(act, w_hh, b, h, olds[0])
        return h, (h,)  # the outputs overwrite the pre-activations

    h, (ys,) = _rewrite_loop(zs.shape[0], reverse, body, h0, (zs,), unroll=2)
    return h, ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rnn_core(act, reverse, b, w_hh, h0, zs):
    """The vanilla RNN over projected inputs ``zs: (T, B, H)`` (``x_t W_ih``, no bias).

    Forward, with ``act`` tanh or relu::

        h_t = act(zs_t + b + h_{t-1} W_hh)

    Backward (BPTT), ``dy_t`` the cotangent of output t and ``dh_T`` that of the final carry;
    from t = T-1 down to 0 (up, with ``reverse``)::

        dh_t  = dy_t + dz_{t+1} W_hh^T        (dz_T W_hh^T := dh_T)
        dz_t  = dh_t * (1 - h_t^2)            tanh'(.) written with the saved output h_t
              = dh_t * [h_t > 0]              for relu

    The gradient of ``h_t`` flows back through ``tanh'`` and ``W_hh^T`` once per step:
    this product is what vanishes or explodes over long spans. After the loop, as single
    matmuls: ``dW_hh = sum_t h_{t-1}^T dz_t``, ``db = sum_t dz_t``, ``dh0 = dz_0 W_hh^T``,
    and ``dzs = dz`` (``_projection`` turns it into ``dW_ih`` and ``dxs``).

    Held to autodiff of the scan by ``tests/test_fused.py`` (``test_float32_matches_plain_scan``,
    ``test_every_length_matches_plain_scan``; float64 finite differences in
    ``test_float64_gradients_are_exact``).
    """
    return _rnn_forward(act, reverse, b, w_hh, h0, zs)


def _rnn_core_fwd(act, reverse, b, w_hh, h0, zs):
    hT, ys = _rnn_forward(act, reverse, b, w_hh, h0, zs)
    return (hT, ys), (w_hh, h0, ys)


def _rnn_core_bwd(act, reverse, res, cts):
    w_hh, h0, ys = res
    dhT, dys = cts

    def body(t, dh_next, olds, got):
        (dy,), (y,) = olds, got
        dh = dy + dh_next
        dz = dh * (1.0 - y * y) if act == "tanh" else jnp.where(y > 0, dh, 0.0).astype(dh.dtype)
        return _dot_wt(dz, w_hh), (dz,)  # dz_t overwrites dy_t

    fetch = lambda t: (_at(ys, t),)
    dh0, (dzs,) = _rewrite_loop(ys.shape[0], not reverse, body, dhT, (dys,), fetch)
    dw_hh = _weight_grad(_shift(ys, h0, reverse), dzs, w_hh.dtype)
    return _bias_grad(dzs, w_hh.dtype), dw_hh, dh0, dzs


_rnn_core.defvjp(_rnn_core_fwd, _rnn_core_bwd)


# ----------------------------------------------------------------------------- LSTM


def _lstm_acts(pre: Array) -> list[Array]:
    """The four gates from ``pre: (B, 4H)``: sigmoid for i, f, o and tanh for g.

    One elementwise pass over the contiguous ``(B, 4H)`` array, using
    ``sigmoid(x) = (1 + tanh(x / 2)) / 2``, is faster on XLA:CPU than four passes over
    column slices.
    """
    H = pre.shape[-1] // 4
    half = jnp.full((H,), 0.5, pre.dtype)
    scale = jnp.concatenate([half, half, jnp.ones((H,), pre.dtype), half])
    return _blocks(scale * jnp.tanh(scale * pre) + (1.0 - scale), 4)


def _lstm_cell(w_hh, b, h, c, zx):
    i, f, g, o = _lstm_acts(zx + b + _dot(h, w_hh))
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return h, c, (i, f, g, o)


def _lstm_forward(reverse, b, w_hh, h0, c0, zs, save: bool):
    def step(carry, z):
        h, c, gates = _lstm_cell(w_hh, b, *carry, z)
        return (h, c), h, jnp.concatenate(gates, axis=-1), (c,)

    carry, ys, acts, extra = _forward_loop(reverse, step, (h0, c0), zs, save, extras=1)
    return carry, ys, acts, (extra[0] if save else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm_core(reverse, b, w_hh, h0, c0, zs):
    """The LSTM over projected inputs ``zs: (T, B, 4H)``, gate blocks i, f, g, o.

    Forward (``jaxseq.lstm``'s equations; ``g`` is the candidate C̃)::

        i, f, g, o = σ, σ, tanh, σ of (zs_t + b + h_{t-1} W_hh)
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)

    Backward (BPTT), from the last step to the first, with the saved gate activations and
    cell states::

        dh_t = dy_t + dh_{t+1 -> t}                    (dh_T from the final carry)
        dc_t = dc_{t+1} * f_{t+1} + dh_t * o * (1 - tanh(c_t)^2)
        d i  = dc_t * g * i (1 - i)        d f = dc_t * c_{t-1} * f (1 - f)
        d g  = dc_t * i * (1 - g^2)        d o = dh_t * tanh(c_t) * o (1 - o)
        dz_t = [d i, d f, d g, d o]
        dh_{t-1} (from step t) = dz_t W_hh^T

    ``dc_t * f`` is the cell state's own path back in time: through the forget gate, with no
    matrix and no squashing, which is why the LSTM's gradient survives long spans where
    the vanilla RNN's vanishes. After the loop: ``dW_hh = sum_t h_{t-1}^T dz_t``,
    ``db = sum_t dz_t``, ``dzs = dz``.

    Held to autodiff of the scan by ``tests/test_fused.py`` (``test_float32_matches_plain_scan``,
    ``test_every_length_matches_plain_scan``; float64 finite differences in
    ``test_float64_gradients_are_exact``).
    """
    carry, ys, _, _ = _lstm_forward(reverse, b, w_hh, h0, c0, zs, save=False)
    return carry, ys


def _lstm_core_fwd(reverse, b, w_hh, h0, c0, zs):
    carry, ys, acts, cs = _lstm_forward(reverse, b, w_hh, h0, c0, zs, save=True)
    return (carry, ys), (w_hh, h0, c0, ys, cs, acts)


def _lstm_core_bwd(reverse, res, cts):
    w_hh, h0, c0, ys, cs, acts = res
    (dhT, dcT), dys = cts

    def body(t, carry, olds, got):
        dh_next, dc_next = carry
        i, f, g, o = _blocks(olds[0], 4)
        dy, c, c_prev = got
        dh = dy + dh_next
        tc = jnp.tanh(c)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate(
            [
                dc * g * i * (1.0 - i),
                dc * c_prev * f * (1.0 - f),
                dc * i * (1.0 - g * g),
                dh * tc * o * (1.0 - o),
            ],
            axis=-1,
        )
        return (_dot_wt(dz, w_hh), dc * f), (dz,)  # dz_t overwrites the activations

    fetch = lambda t: (_at(dys, t), _at(cs, t), _prev(cs, t, c0, reverse))
    (dh0, dc0), (dzs,) = _rewrite_loop(ys.shape[0], not reverse, body, (dhT, dcT), (acts,), fetch)
    dw_hh = _weight_grad(_shift(ys, h0, reverse), dzs, w_hh.dtype)
    return _bias_grad(dzs, w_hh.dtype), dw_hh, dh0, dc0, dzs


_lstm_core.defvjp(_lstm_core_fwd, _lstm_core_bwd)


# ----------------------------------------------------------------------------- GRU, reset after


def _gru_cell(w_hh, b, b_hn, h, zx):
    xr, xz, xn = _blocks(zx + b, 3)
    hr, hz, hn = _blocks(_dot(h, w_hh), 3)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    hn = hn + b_hn
    n = jnp.tanh(xn + r * hn)
    return n + z * (h - n), (r, z, n, hn)


def _gru_forward(reverse, b, w_hh, b_hn, h0, zs, save: bool):
    def step(h, z):
        h, (r, gate_z, n, hn) = _gru_cell(w_hh, b, b_hn, h, z)
        return h, h, jnp.concatenate([r, gate_z, n], axis=-1), (hn,)

    h, ys, acts, extra = _forward_loop(reverse, step, h0, zs, save, extras=1)
    return h, ys, acts, (extra[0] if save else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gru_core(reverse, b, w_hh, b_hn, h0, zs):
    """The GRU, reset after the product (PyTorch/cuDNN), over ``zs: (T, B, 3H)``, blocks r, z, n.

    Forward, ``x* = zs_t + b`` and ``h* = h_{t-1} W_hh`` split in blocks::

        r = σ(xr + hr)     z = σ(xz + hz)     hn = h_{t-1} W_hn + b_hn
        n = tanh(xn + r * hn)
        h_t = (1 - z) * n + z * h_{t-1}

    Backward (BPTT), from the last step to the first, with the saved r, z, n and hn::

        dh_t = dy_t + dh_{t+1 -> t}
        dn   = dh_t * (1 - z) * (1 - n^2)                  (pre-activation of n)
        dr   = dn * hn * r (1 - r)
        dz   = dh_t * (h_{t-1} - n) * z (1 - z)
        dhn  = dn * r                                      (gradient of h_{t-1} W_hn + b_hn)
        dh_{t-1} (from step t) = dh_t * z + [dr, dz, dhn] W_hh^T

    The input side's gradient is ``dzs_t = [dr, dz, dn]``; the recurrent side's is
    ``[dr, dz, dhn]``, so after the loop ``dW_hh = [sum_t h_{t-1}^T [dr, dz],
    sum_t h_{t-1}^T dhn]``, ``db_hn = sum_t dhn`` and ``db = sum_t dzs_t``.

    Held to autodiff of the scan by ``tests/test_fused.py`` (``test_float32_matches_plain_scan``,
    ``test_every_length_matches_plain_scan``; float64 finite differences in
    ``test_float64_gradients_are_exact``).
    """
    h, ys, _, _ = _gru_forward(reverse, b, w_hh, b_hn, h0, zs, save=False)
    return h, ys


def _gru_core_fwd(reverse, b, w_hh, b_hn, h0, zs):
    h, ys, acts, hns = _gru_forward(reverse, b, w_hh, b_hn, h0, zs, save=True)
    return (h, ys), (w_hh, h0, ys, acts, hns)


def _gru_core_bwd(reverse, res, cts):
    w_hh, h0, ys, acts, hns = res
    dhT, dys = cts
    H = h0.shape[-1]

    def body(t, dh_next, olds, got):
        r, z, n = _blocks(olds[0], 3)
        hn, (dy, h_prev) = olds[1], got
        dh = dy + dh_next
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dr = dn * hn * r * (1.0 - r)
        dz = dh * (h_prev - n) * z * (1.0 - z)
        dhn = dn * r
        dh_prev = dh * z + _dot_wt(jnp.concatenate([dr, dz, dhn], axis=-1), w_hh)
        # dzs_t (input side) overwrites the activations, d(h W_hn)_t overwrites hn_t.
        return dh_prev, (jnp.concatenate([dr, dz, dn], axis=-1), dhn)

    fetch = lambda t: (_at(dys, t), _prev(ys, t, h0, reverse))
    dh0, (dzs, dhns) = _rewrite_loop(ys.shape[0], not reverse, body, dhT, (acts, hns), fetch)
    h_prev = _shift(ys, h0, reverse)
    dw_hh = jnp.concatenate(
        [
            _weight_grad(h_prev, dzs[..., : 2 * H], w_hh.dtype),
            _weight_grad(h_prev, dhns, w_hh.dtype),
        ],
        axis=1,
    )
    db_hn = jnp.sum(dhns, axis=(0, 1), dtype=_acc_dtype(dhns.dtype)).astype(w_hh.dtype)
    return _bias_grad(dzs, w_hh.dtype), dw_hh, db_hn, dh0, dzs


_gru_core.defvjp(_gru_core_fwd, _gru_core_bwd)


# ----------------------------------------------------------------------------- GRU, Cho et al.


def _gru_cho_cell(w_hh, b, h, zx):
    H = h.shape[-1]
    xr, xz, xn = _blocks(zx + b, 3)
    hr, hz = _blocks(_dot(h, w_hh[:, : 2 * H]), 2)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    cand = jnp.tanh(xn + _dot(r * h, w_hh[:, 2 * H :]))
    return h + z * (cand - h), (r, z, cand)


def _gru_cho_forward(reverse, b, w_hh, h0, zs, save: bool):
    def step(h, z):
        h, gates = _gru_cho_cell(w_hh, b, h, z)
        return h, h, jnp.concatenate(gates, axis=-1), ()

    h, ys, acts, _ = _forward_loop(reverse, step, h0, zs, save, extras=0)
    return h, ys, acts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gru_cho_core(reverse, b, w_hh, h0, zs):
    """The GRU of Cho et al. 2014 (reset before the product) over ``zs: (T, B, 3H)``.

    Forward, ``x* = zs_t + b`` split in blocks r, z, n and ``W_hh = [W_rz | W_n]``::

        [r, z] = σ([xr, xz] + h_{t-1} W_rz)
        h̃ = tanh(xn + (r * h_{t-1}) W_n)          (``cand`` in the code)
        h_t = (1 - z) * h_{t-1} + z * h̃

    Backward (BPTT), from the last step to the first, with the saved r, z and h̃::

        dh_t = dy_t + dh_{t+1 -> t}
        dn   = dh_t * z * (1 - h̃^2)                      (pre-activation of h̃)
        drh  = dn W_n^T                                   (gradient of r * h_{t-1})
        dr   = drh * h_{t-1} * r (1 - r)
        dz   = dh_t * (h̃ - h_{t-1}) * z (1 - z)
        dh_{t-1} (from step t) = dh_t * (1 - z) + drh * r + [dr, dz] W_rz^T

    After the loop: ``dW_rz = sum_t h_{t-1}^T [dr, dz]``,
    ``dW_n = sum_t (r * h_{t-1})^T dn`` and ``db = sum_t [dr, dz, dn]``.

    Held to autodiff of the scan by ``tests/test_fused.py`` (``test_float32_matches_plain_scan``,
    ``test_every_length_matches_plain_scan``; float64 finite differences in
    ``test_float64_gradients_are_exact``).
    """
    h, ys, _ = _gru_cho_forward(reverse, b, w_hh, h0, zs, save=False)
    return h, ys


def _gru_cho_core_fwd(reverse, b, w_hh, h0, zs):
    h, ys, acts = _gru_cho_forward(reverse, b, w_hh, h0, zs, save=True)
    return (h, ys), (w_hh, h0, ys, acts)


def _gru_cho_core_bwd(reverse, res, cts):
    w_hh, h0, ys, acts = res
    dhT, dys = cts
    H = h0.shape[-1]
    w_rz, w_n = w_hh[:, : 2 * H], w_hh[:, 2 * H :]

    def body(t, dh_next, olds, got):
        r, z, cand = _blocks(olds[0], 3)
        dy, (h_prev,) = olds[1], got
        dh = dy + dh_next
        dn = dh * z * (1.0 - cand * cand)
        drh = _dot_wt(dn, w_n)
        dr = drh * h_prev * r * (1.0 - r)
        dz = dh * (cand - h_prev) * z * (1.0 - z)
        drz = jnp.concatenate([dr, dz], axis=-1)
        dh_prev = dh * (1.0 - z) + drh * r + _dot_wt(drz, w_rz)
        # dz_t overwrites the activations; r_t * h_{t-1} (for dW_n) overwrites dy_t.
        return dh_prev, (jnp.concatenate([drz, dn], axis=-1), r * h_prev)

    fetch = lambda t: (_prev(ys, t, h0, reverse),)
    dh0, (dzs, rhs) = _rewrite_loop(ys.shape[0], not reverse, body, dhT, (acts, dys), fetch)
    dw_hh = jnp.concatenate(
        [
            _weight_grad(_shift(ys, h0, reverse), dzs[..., : 2 * H], w_hh.dtype),
            _weight_grad(rhs, dzs[..., 2 * H :], w_hh.dtype),
        ],
        axis=1,
    )
    return _bias_grad(dzs, w_hh.dtype), dw_hh, dh0, dzs


_gru_cho_core.defvjp(_gru_cho_core_fwd, _gru_cho_core_bwd)


# ----------------------------------------------------------------------------- rows


@jax.custom_vjp
def _rows(table: Array, ids: Array) -> Array:
    """``table[ids]`` for in-range ``ids: (N,)``; the gradient of ``table`` is ``onehot^T g``.

    Forward, a gather (on XLA:CPU 8x faster than the equivalent one-hot matmul for a
    ``(65, 768)`` table and 8,192 ids); backward, one matmul with the one-hot rows rather
    than the scatter-add that autodiff of a gather gives.
    """
    return jnp.take(table, ids, axis=0, mode="clip")


def _rows_fwd(table, ids):
    return _rows(table, ids), (ids, table.shape[0])


def _rows_bwd(res, g):
    ids, V = res
    onehot = jax.nn.one_hot(ids, V, dtype=g.dtype)
    dtable = jax.lax.dot_general(
        onehot, g, (((0,), (0,)), ((), ())), preferred_element_type=_acc_dtype(g.dtype)
    ).astype(g.dtype)
    return dtable, None


_rows.defvjp(_rows_fwd, _rows_bwd)


# ----------------------------------------------------------------------------- dispatch


class Kernel(NamedTuple):
    """How one built-in recurrence maps onto a fused layer.

    ``step(params, carry, x)`` is one step computed by the kernel's own cell function (the
    one its loops use); ``tests/test_fused.py`` checks it against the cell's
    ``step(project(x))`` for every tagged cell. ``run(params, carry, zs, reverse)`` is the
    fused loop over the bias-free projected inputs ``zs: (T, B, G*H)``. Both take params
    already cast to the compute dtype.
    """

    name: str
    step: Callable[[Params, Carry, Array], Carry]
    run: Callable[[Params, Carry, Array, bool], tuple[Carry, Array]]


def _one(p, x: Array) -> Array:
    """The bias-free projection of a single step ``x: (B, F)``, as the layers compute it."""
    return _project(x[None], p.w_ih)[0]


def _rnn_kernel(act: str) -> Kernel:
    return Kernel(
        name=f"rnn_{act}",
        step=lambda p, h, x: _rnn_cell(act, p.w_hh, p.b, h, _one(p, x)),
        run=lambda p, h, zs, rev: _rnn_core(act, rev, p.b, p.w_hh, h, zs),
    )


def _lstm_run(p, carry, zs, rev):
    (h, c), ys = _lstm_core(rev, p.b, p.w_hh, carry.h, carry.c, zs)
    return LSTMState(h=h, c=c), ys


KERNELS = {
    k.name: k
    for k in (
        _rnn_kernel("tanh"),
        _rnn_kernel("relu"),
        Kernel(
            name="lstm",
            step=lambda p, s, x: LSTMState(*_lstm_cell(p.w_hh, p.b, s.h, s.c, _one(p, x))[:2]),
            run=_lstm_run,
        ),
        Kernel(
            name="gru",
            step=lambda p, h, x: _gru_cell(p.w_hh, p.b, p.b_hn, h, _one(p, x))[0],
            run=lambda p, h, zs, rev: _gru_core(rev, p.b, p.w_hh, p.b_hn, h, zs),
        ),
        Kernel(
            name="gru_cho",
            step=lambda p, h, x: _gru_cho_cell(p.w_hh, p.b, h, _one(p, x))[0],
            run=lambda p, h, zs, rev: _gru_cho_core(rev, p.b, p.w_hh, h, zs),
        ),
    )
}


def unsupported(
    cell: Cell, params: Params, carry: Carry, dtype, batch: tuple, in_size: int, mesh=None
) -> str | None:
    """Why a fused layer cannot run this call, or ``None`` when it can.

    The reasons are the kernels' limits: a cell without a ``kernel`` tag, integer inputs, a
    carry whose dtype or shape differs from the inputs' (mixed-precision carries run as a
    plain scan), an empty batch, parameters not laid out as the tag says, or a batch that
    does not split evenly over ``mesh``.
    """
    if cell.kernel is None:
        return f"the {cell.name!r} cell has no fused kernel (its kernel tag is None)"
    if cell.kernel not in KERNELS:
        return f"unknown kernel tag {cell.kernel!r}; known: {', '.join(KERNELS)}"
    if not jnp.issubdtype(dtype, jnp.floating):
        return f"the inputs are {jnp.dtype(dtype).name}, not floating point"
    leaves, H = jax.tree.leaves(carry), cell.hidden_size
    if not leaves or any(l.dtype != dtype or tuple(l.shape) != (*batch, H) for l in leaves):
        return (
            f"the carry must be {jnp.dtype(dtype).name} of shape {(*batch, H)} like the "
            f"inputs, got {[(l.dtype.name, tuple(l.shape)) for l in leaves]}"
        )
    if math.prod(batch) == 0:
        return "the batch is empty"
    w_ih = getattr(params, "w_ih", None)
    if w_ih is None or w_ih.ndim != 2 or w_ih.shape[0] != in_size:
        return f"params.w_ih must be ({in_size}, G*H) for the {cell.kernel!r} kernel"
    if cell.kernel == "gru" and getattr(params, "b_hn", None) is None:
        return "the 'gru' kernel needs params.b_hn (reset_after=True parameters)"
    if mesh is not None and batch and batch[0] % mesh.size:
        return f"batch {batch[0]} does not split evenly over the mesh's {mesh.size} devices"
    return None


def _run(
    kernel: Kernel,
    cell: Cell,
    params,
    carry,
    zs_of,
    data,
    data_specs,
    T,
    batch,
    dtype,
    reverse,
    mesh,
):
    """The fused layer on ``data`` (``zs_of(params, B, data)`` gives its projected inputs).

    With a ``mesh`` of several devices it runs under ``shard_map``: batch rows split over
    the mesh's first axis, parameters replicated (their gradients summed over devices by
    the ``shard_map`` transpose). Left to XLA's sharding propagation, a fused layer on a
    batch-sharded input is not split: XLA gathers the whole batch onto every device before
    the time loop (the loop buffers are reshaped in ways propagation does not follow).
    """
    H = cell.hidden_size
    cast = jax.tree.map(lambda a: a.astype(dtype), params)

    def layer(cast, carry, data):
        local = tuple(jax.tree.leaves(carry)[0].shape[:-1])  # this device's batch
        B = math.prod(local)
        flat_carry = jax.tree.map(lambda l: l.reshape(B, H), carry)
        new_carry, ys = kernel.run(cast, flat_carry, zs_of(cast, B, data), reverse)
        new_carry = jax.tree.map(lambda l: l.reshape(*local, H), new_carry)
        return new_carry, ys.reshape(T, *local, H)

    if mesh is None or mesh.size == 1 or not batch:
        return layer(cast, carry, data)
    rows = P(mesh.axis_names[0])
    # check_vma=False: the loops start their carries from replicated values (zeros, the
    # read-only buffers they prefetch), which per-device type checking would reject.
    # Gradients of the replicated parameters are still summed over devices (the
    # 4-device tests match one device to 1e-5).
    sharded = jax.shard_map(
        layer,
        mesh=mesh,
        in_specs=(P(), jax.tree.map(lambda _: rows, carry), data_specs(rows)),
        out_specs=(jax.tree.map(lambda _: rows, carry), P(None, *rows)),
        check_vma=False,
    )
    return sharded(cast, carry, data)


def fused_unroll(
    cell: Cell, params: Params, carry: Carry, xs: Array, *, reverse: bool, mesh=None
) -> tuple[Carry, Array]:
    """``unroll`` by the fused layer named by ``cell.kernel``.

    The caller has checked ``unsupported(...)`` is ``None``.

    Args:
      cell: a cell with a kernel tag.
      params: its parameters.
      carry: initial carry, leaves ``(*batch, H)``.
      xs: ``(T, *batch, F)`` inputs (the layer does the input projection itself).
      reverse: run from the last step to the first.
      mesh: optional data-parallel mesh (see ``_run``).

    Returns:
      ``(final_carry, ys)`` with ``ys: (T, *batch, H)``.
    """
    T, batch = xs.shape[0], tuple(xs.shape[1:-1])
    zs_of = lambda p, B, xs: _projection(xs.reshape(T, B, xs.shape[-1]), p.w_ih)
    specs = lambda rows: P(None, *rows)  # xs: (T, batch, F)
    return _run(
        KERNELS[cell.kernel],
        cell,
        params,
        carry,
        zs_of,
        xs,
        specs,
        T,
        batch,
        xs.dtype,
        reverse,
        mesh,
    )


def fused_unroll_embedded(
    cell: Cell,
    params: Params,
    carry: Carry,
    table: Array,
    tokens: Array,
    *,
    reverse: bool,
    mesh=None,
) -> tuple[Carry, Array]:
    """``fused_unroll`` on ``table[tokens]``, projecting the table instead of the inputs.

    ``zs = (table @ W_ih)[tokens]``: the ``(V, G*H)`` product is one ``V x E x G*H``
    matmul and its rows are gathered (``_rows``); in the backward pass the gradient of the
    product is a ``V x T*B x G*H`` matmul with one-hot rows, and ``dW_ih`` and ``dtable``
    follow from it by two small matmuls. ``jaxseq.unroll_embedded`` decides when this pays.

    Args:
      cell, params, carry, reverse, mesh: as ``fused_unroll``.
      table: ``(V, E)`` embedding table in the compute dtype.
      tokens: ``(T, *batch)`` integer ids.
    """
    T, batch = tokens.shape[0], tuple(tokens.shape[1:])

    def zs_of(p, B, data):
        table, tokens = data
        product = _dot(table, p.w_ih)  # (V, G*H)
        return _rows(product, tokens.reshape(T * B)).reshape(T, B, -1)

    specs = lambda rows: (P(), P(None, *rows))  # table, tokens: (T, batch)
    return _run(
        KERNELS[cell.kernel],
        cell,
        params,
        carry,
        zs_of,
        (table, tokens),
        specs,
        T,
        batch,
        table.dtype,
        reverse,
        mesh,
    )
