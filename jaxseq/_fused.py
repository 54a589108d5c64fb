"""Fused recurrent kernels: time loops with a hand-written backward pass.

Differentiating ``lax.scan`` over a cell step makes JAX accumulate the recurrent weight
gradient inside the reverse loop: two small matmuls per step (``dz @ W_hh^T`` and
``h_{t-1}^T dz``) plus a running sum. The kernels here are ``jax.custom_vjp`` scans that do
what cuDNN does instead:

* the forward scan saves what the backward needs (the gate activations), so the backward
  recomputes no transcendental functions from pre-activations;
* the backward scan keeps only ``dz_t @ W_hh^T`` and elementwise work inside the loop and
  stacks the pre-activation gradients ``dz_t``;
* after the loop, ``dW_hh = sum_t h_{t-1}^T dz_t`` is ONE large matmul over the stacked
  ``(T*B, H) x (T*B, G*H)``, and ``dz`` itself is the gradient of the hoisted input
  projection, whose own backward (``dxs``, ``dW_ih``) is also one large matmul each.

``unroll`` calls ``fused_unroll``, which recognises the built-in cells (vanilla RNN with
tanh or relu, LSTM, GRU in both conventions) by checking each kernel's step against the
cell's own ``step`` on a random probe, and returns ``None`` (plain ``lax.scan``) for
anything else: custom cells, a carry whose dtype differs from the inputs', or when the
kernels are switched off with ``use_fused(False)``.

The kernels support reverse-mode differentiation to any order (the backward pass is plain
JAX); forward-mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a ``custom_vjp``, so
code that needs it runs under ``with jaxseq.use_fused(False):``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq._cells import Array, Carry, Cell, LSTMState, Params

_state = threading.local()


def fused_enabled() -> bool:
    """Whether ``unroll`` may use the fused kernels (default: yes)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def use_fused(enabled: bool = True):
    """Context manager that switches the fused kernels on or off for code traced inside it.

    The choice is made when a function is traced, so wrap the first call of a jitted
    function (or the ``jax.jit`` trace) in it::

        with jaxseq.use_fused(False):   # plain lax.scan autodiff, e.g. for jax.jvp
            jax.jvp(f, primals, tangents)
    """
    previous = fused_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


# ----------------------------------------------------------------------------- helpers


def _shift(ys: Array, first: Array, reverse: bool) -> Array:
    """The carries that entered each step: ``(T, B, H)`` from outputs ``ys`` and ``first``."""
    if reverse:
        return jnp.concatenate([ys[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], ys[:-1]], axis=0)


def _weight_grad(hs: Array, dzs: Array, dtype) -> Array:
    """``sum_t hs_t^T dzs_t`` as one ``(H, T*B) x (T*B, G*H)`` matmul, accumulated in f32."""
    h2 = hs.reshape(-1, hs.shape[-1])
    d2 = dzs.reshape(-1, dzs.shape[-1])
    acc = jnp.promote_types(dtype, jnp.float32)
    dw = jax.lax.dot_general(h2, d2, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return dw.astype(dtype)


def _recurrent(h: Array, w: Array) -> Array:
    return jnp.dot(h, w, preferred_element_type=h.dtype)


def _recurrent_t(dz: Array, w: Array) -> Array:
    """``dz @ w^T`` without materialising the transpose."""
    return jax.lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=dz.dtype)


# ----------------------------------------------------------------------------- vanilla RNN


def _rnn_step(act: str, w: Array, h: Array, z: Array) -> Array:
    pre = z + _recurrent(h, w)
    return jnp.tanh(pre) if act == "tanh" else jax.nn.relu(pre)


def _rnn_scan(act, reverse, w, h0, zs):
    def body(h, z):
        h = _rnn_step(act, w, h, z)
        return h, h
    return jax.lax.scan(body, h0, zs, reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rnn(act, reverse, w, h0, zs):
    return _rnn_scan(act, reverse, w, h0, zs)


def _rnn_fwd(act, reverse, w, h0, zs):
    hT, ys = _rnn_scan(act, reverse, w, h0, zs)
    return (hT, ys), (w, h0, ys)


def _rnn_bwd(act, reverse, res, cts):
    w, h0, ys = res
    dhT, dys = cts

    def body(dh_next, inputs):
        dy, y = inputs
        dh = dy + dh_next
        dz = dh * (1.0 - y * y) if act == "tanh" else jnp.where(y > 0, dh, jnp.zeros_like(dh))
        return _recurrent_t(dz, w), dz

    dh0, dzs = jax.lax.scan(body, dhT, (dys, ys), reverse=not reverse)
    dw = _weight_grad(_shift(ys, h0, reverse), dzs, w.dtype)
    return dw, dh0, dzs


_rnn.defvjp(_rnn_fwd, _rnn_bwd)


# ----------------------------------------------------------------------------- LSTM


def _lstm_gates(w, h, c, z):
    H = h.shape[-1]
    z = z + _recurrent(h, w)
    i = jax.nn.sigmoid(z[..., :H])
    f = jax.nn.sigmoid(z[..., H:2 * H])
    g = jnp.tanh(z[..., 2 * H:3 * H])
    o = jax.nn.sigmoid(z[..., 3 * H:])
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return h, c, (i, f, g, o)


def _lstm_scan(reverse, w, h0, c0, zs, save: bool):
    def body(carry, z):
        h, c = carry
        h_new, c_new, gates = _lstm_gates(w, h, c, z)
        out = (h_new, c_new, jnp.concatenate(gates, axis=-1)) if save else h_new
        return (h_new, c_new), out
    return jax.lax.scan(body, (h0, c0), zs, reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm(reverse, w, h0, c0, zs):
    (h, c), ys = _lstm_scan(reverse, w, h0, c0, zs, save=False)
    return (h, c), ys


def _lstm_fwd(reverse, w, h0, c0, zs):
    (h, c), (ys, cs, acts) = _lstm_scan(reverse, w, h0, c0, zs, save=True)
    return ((h, c), ys), (w, h0, c0, ys, cs, acts)


def _lstm_bwd(reverse, res, cts):
    w, h0, c0, ys, cs, acts = res
    (dhT, dcT), dys = cts
    H = h0.shape[-1]
    c_prev = _shift(cs, c0, reverse)

    def body(carry, inputs):
        dh_next, dc_next = carry
        dy, a, c, cp = inputs
        i, f, g, o = a[..., :H], a[..., H:2 * H], a[..., 2 * H:3 * H], a[..., 3 * H:]
        dh = dy + dh_next
        tc = jnp.tanh(c)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate([
            dc * g * i * (1.0 - i),
            dc * cp * f * (1.0 - f),
            dc * i * (1.0 - g * g),
            dh * tc * o * (1.0 - o),
        ], axis=-1)
        return (_recurrent_t(dz, w), dc * f), dz

    (dh0, dc0), dzs = jax.lax.scan(body, (dhT, dcT), (dys, acts, cs, c_prev),
                                   reverse=not reverse)
    dw = _weight_grad(_shift(ys, h0, reverse), dzs, w.dtype)
    return dw, dh0, dc0, dzs


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


# ----------------------------------------------------------------------------- GRU, reset after


def _gru_gates(w, b_hn, h, zx):
    H = h.shape[-1]
    zh = _recurrent(h, w)
    r = jax.nn.sigmoid(zx[..., :H] + zh[..., :H])
    u = jax.nn.sigmoid(zx[..., H:2 * H] + zh[..., H:2 * H])
    hn = zh[..., 2 * H:] + b_hn
    n = jnp.tanh(zx[..., 2 * H:] + r * hn)
    h = (1.0 - u) * n + u * h
    return h, (r, u, n, hn)


def _gru_scan(reverse, w, b_hn, h0, zs, save: bool):
    def body(h, z):
        h_new, gates = _gru_gates(w, b_hn, h, z)
        return h_new, ((h_new, jnp.concatenate(gates, axis=-1)) if save else h_new)
    return jax.lax.scan(body, h0, zs, reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gru(reverse, w, b_hn, h0, zs):
    return _gru_scan(reverse, w, b_hn, h0, zs, save=False)


def _gru_fwd(reverse, w, b_hn, h0, zs):
    hT, (ys, acts) = _gru_scan(reverse, w, b_hn, h0, zs, save=True)
    return (hT, ys), (w, h0, ys, acts)


def _gru_bwd(reverse, res, cts):
    w, h0, ys, acts = res
    dhT, dys = cts
    H = h0.shape[-1]
    h_prev = _shift(ys, h0, reverse)

    def body(dh_next, inputs):
        dy, a, hp = inputs
        r, u, n, hn = a[..., :H], a[..., H:2 * H], a[..., 2 * H:3 * H], a[..., 3 * H:]
        dh = dy + dh_next
        dn = dh * (1.0 - u) * (1.0 - n * n)
        dr = dn * hn * r * (1.0 - r)
        du = dh * (hp - n) * u * (1.0 - u)
        dzx = jnp.concatenate([dr, du, dn], axis=-1)
        dzh = jnp.concatenate([dr, du, dn * r], axis=-1)
        return dh * u + _recurrent_t(dzh, w), (dzx, dzh)

    dh0, (dzxs, dzhs) = jax.lax.scan(body, dhT, (dys, acts, h_prev), reverse=not reverse)
    dw = _weight_grad(h_prev, dzhs, w.dtype)
    acc = jnp.promote_types(w.dtype, jnp.float32)
    db_hn = jnp.sum(dzhs[..., 2 * H:], axis=(0, 1), dtype=acc).astype(w.dtype)
    return dw, db_hn, dh0, dzxs


_gru.defvjp(_gru_fwd, _gru_bwd)


# ----------------------------------------------------------------------------- GRU, Cho et al.


def _gru_cho_gates(w, h, zx):
    H = h.shape[-1]
    zh = _recurrent(h, w[:, :2 * H])
    r = jax.nn.sigmoid(zx[..., :H] + zh[..., :H])
    u = jax.nn.sigmoid(zx[..., H:2 * H] + zh[..., H:])
    cand = jnp.tanh(zx[..., 2 * H:] + _recurrent(r * h, w[:, 2 * H:]))
    h = (1.0 - u) * h + u * cand
    return h, (r, u, cand)


def _gru_cho_scan(reverse, w, h0, zs, save: bool):
    def body(h, z):
        h_new, gates = _gru_cho_gates(w, h, z)
        return h_new, ((h_new, jnp.concatenate(gates, axis=-1)) if save else h_new)
    return jax.lax.scan(body, h0, zs, reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gru_cho(reverse, w, h0, zs):
    return _gru_cho_scan(reverse, w, h0, zs, save=False)


def _gru_cho_fwd(reverse, w, h0, zs):
    hT, (ys, acts) = _gru_cho_scan(reverse, w, h0, zs, save=True)
    return (hT, ys), (w, h0, ys, acts)


def _gru_cho_bwd(reverse, res, cts):
    w, h0, ys, acts = res
    dhT, dys = cts
    H = h0.shape[-1]
    h_prev = _shift(ys, h0, reverse)
    w_rz, w_n = w[:, :2 * H], w[:, 2 * H:]

    def body(dh_next, inputs):
        dy, a, hp = inputs
        r, u, cand = a[..., :H], a[..., H:2 * H], a[..., 2 * H:]
        dh = dy + dh_next
        dn = dh * u * (1.0 - cand * cand)
        drh = _recurrent_t(dn, w_n)
        dr = drh * hp * r * (1.0 - r)
        du = dh * (cand - hp) * u * (1.0 - u)
        drz = jnp.concatenate([dr, du], axis=-1)
        dh_prev = dh * (1.0 - u) + drh * r + _recurrent_t(drz, w_rz)
        return dh_prev, jnp.concatenate([drz, dn], axis=-1)

    dh0, dzs = jax.lax.scan(body, dhT, (dys, acts, h_prev), reverse=not reverse)
    rh_prev = acts[..., :H] * h_prev
    dw = jnp.concatenate([_weight_grad(h_prev, dzs[..., :2 * H], w.dtype),
                          _weight_grad(rh_prev, dzs[..., 2 * H:], w.dtype)], axis=1)
    return dw, dh0, dzs


_gru_cho.defvjp(_gru_cho_fwd, _gru_cho_bwd)


# ----------------------------------------------------------------------------- dispatch


class _Kernel(NamedTuple):
    """How one recurrence maps onto a fused scan.

    ``step(params, carry, z)`` is the kernel's own single step, checked against the cell's;
    ``run(params, carry, zs, reverse)`` is the fused unroll over ``(T, B, G*H)``.
    """

    name: str
    matches: Callable[[Cell, Params], bool]
    step: Callable[[Params, Carry, Array], Carry]
    run: Callable[[Params, Carry, Array, bool], tuple[Carry, Array]]


def _w(params, dtype):
    return params.w_hh.astype(dtype)


def _rnn_kernel(act: str) -> _Kernel:
    return _Kernel(
        name=f"rnn_{act}",
        matches=lambda cell, p: cell.name == "rnn" and cell.num_gates == 1,
        step=lambda p, h, z: _rnn_step(act, _w(p, z.dtype), h, z),
        run=lambda p, h, zs, rev: _rnn(act, rev, _w(p, zs.dtype), h, zs),
    )


def _lstm_run(p, carry, zs, rev):
    (h, c), ys = _lstm(rev, _w(p, zs.dtype), carry.h, carry.c, zs)
    return LSTMState(h=h, c=c), ys


_KERNELS = (
    _rnn_kernel("tanh"),
    _rnn_kernel("relu"),
    _Kernel(
        name="lstm",
        matches=lambda cell, p: cell.name == "lstm" and cell.num_gates == 4,
        step=lambda p, carry, z: LSTMState(*_lstm_gates(_w(p, z.dtype), carry.h, carry.c, z)[:2]),
        run=_lstm_run,
    ),
    _Kernel(
        name="gru",
        matches=lambda cell, p: (cell.name == "gru" and cell.num_gates == 3
                                 and getattr(p, "b_hn", None) is not None),
        step=lambda p, h, z: _gru_gates(_w(p, z.dtype), p.b_hn.astype(z.dtype), h, z)[0],
        run=lambda p, h, zs, rev: _gru(rev, _w(p, zs.dtype), p.b_hn.astype(zs.dtype), h, zs),
    ),
    _Kernel(
        name="gru_cho",
        matches=lambda cell, p: (cell.name == "gru" and cell.num_gates == 3
                                 and hasattr(p, "b_hn") and p.b_hn is None),
        step=lambda p, h, z: _gru_cho_gates(_w(p, z.dtype), h, z)[0],
        run=lambda p, h, zs, rev: _gru_cho(rev, _w(p, zs.dtype), h, zs),
    ),
)

# cell.step -> {params structure: kernel or None}; weak so that cells can be collected.
_recognised: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def _probe_matches(kernel: _Kernel, cell: Cell, params: Params, carry: Carry) -> bool:
    """Runs the kernel's step and the cell's on random float32 inputs; equal means same maths."""
    rng = np.random.default_rng(0)
    batch, H, G = 3, cell.hidden_size, cell.num_gates
    draw = lambda shape: jnp.asarray(rng.normal(0.0, 0.7, shape).astype(np.float32))
    with jax.ensure_compile_time_eval():
        p = jax.tree.map(lambda a: draw(a.shape), params)
        c = jax.tree.map(lambda a: draw((batch, H)), carry)
        z = draw((batch, G * H))
        try:
            want, _ = cell.step(p, c, z)
            got = kernel.step(p, c, z)
        except Exception:  # a different structure: not this kernel's recurrence
            return False
        if jax.tree.structure(want) != jax.tree.structure(got):
            return False
        return all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
                   for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))


def _kernel_for(cell: Cell, params: Params, carry: Carry) -> Optional[_Kernel]:
    structure = (jax.tree.structure(params),
                 tuple(tuple(a.shape) for a in jax.tree.leaves(params)),
                 jax.tree.structure(carry))
    try:
        cache = _recognised.setdefault(cell.step, {})
    except TypeError:  # not weak-referenceable: decide every time
        cache = {}
    if structure not in cache:
        cache[structure] = next(
            (k for k in _KERNELS if k.matches(cell, params) and
             _probe_matches(k, cell, params, carry)), None)
    return cache[structure]


def fused_unroll(
    cell: Cell, params: Params, carry: Carry, zs: Array, reverse: bool
) -> Optional[tuple[Carry, Array]]:
    """``unroll`` over already projected inputs with a fused kernel, or ``None`` if none fits.

    Args:
      cell: the cell.
      params: its parameters.
      carry: initial carry, leaves ``(*batch, H)``.
      zs: ``(T, *batch, G*H)``, the output of ``cell.project``.
      reverse: run from the last step to the first.

    Returns:
      ``(final_carry, ys)`` with ``ys: (T, *batch, H)``, or ``None`` when no kernel applies
      (then the caller runs the plain scan).
    """
    if not fused_enabled() or zs.ndim < 2 or zs.shape[0] == 0:
        return None
    if not jnp.issubdtype(zs.dtype, jnp.floating):
        return None
    leaves = jax.tree.leaves(carry)
    batch = zs.shape[1:-1]
    H = cell.hidden_size
    if not leaves or any(l.dtype != zs.dtype or tuple(l.shape) != (*batch, H) for l in leaves):
        return None
    kernel = _kernel_for(cell, params, carry)
    if kernel is None:
        return None
    T, B = zs.shape[0], math.prod(batch)
    flat_carry = jax.tree.map(lambda l: l.reshape(B, H), carry)
    new_carry, ys = kernel.run(params, flat_carry, zs.reshape(T, B, zs.shape[-1]), reverse)
    new_carry = jax.tree.map(lambda l: l.reshape(*batch, H), new_carry)
    return new_carry, ys.reshape(T, *batch, H)
