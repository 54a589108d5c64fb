"""Recurrent cells as pure functions over explicit parameter pytrees.

A cell is a ``Cell`` of pure functions (the optax pattern: a NamedTuple built by a
factory that closes over hyperparameters). ``apply(params, carry, x) -> (carry, y)`` is
exactly ``jax.lax.scan``'s body signature. Features live on the last axis and every
leading axis is batch.

Every cell splits its step in two so that ``unroll`` can hoist work out of the time loop:

* ``project(params, xs)`` is the input-to-hidden product ``xs @ W_ih + b`` for any number
  of leading axes (a whole sequence at once, as one large matmul);
* ``step(params, carry, z)`` is the rest of the recurrence, given the projected input ``z``.

``apply(params, carry, x) == step(params, carry, project(params, x))``.

Gate matrices are fused: an LSTM holds one ``(F, 4H)`` input matrix and one ``(H, 4H)``
recurrent matrix, gate order ``i, f, g, o`` (PyTorch's); a GRU holds ``(F, 3H)`` and
``(H, 3H)``, gate order ``r, z, n``. Weights are stored ``(in, out)`` so that ``x @ W``.

minGRU and minLSTM (Feng et al. 2024) have no recurrent matrix: their gates read only
``x``, so their ``step`` is ``h = a * h + b`` with ``(a, b)`` a function of ``z`` alone, which
``Cell.coefficients`` computes for a whole sequence (``unroll(impl="associative")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PRNGKey = jax.Array
Params = Any
Carry = Any


class Cell(NamedTuple):
    """A recurrent cell as pure functions.

    Attributes:
      init: ``(key, input_size) -> params``.
      apply: ``(params, carry, x: (*batch, F)) -> (carry, y: (*batch, H))``.
      initial_carry: ``(batch_shape, dtype=float32) -> carry`` of zeros.
      project: ``(params, xs: (..., F)) -> zs: (..., G*H)``, the hoistable input product.
      step: ``(params, carry, z: (*batch, G*H)) -> (carry, y)``.
      hidden_size: H.
      name: ``"rnn"``, ``"lstm"``, ``"gru"``, ``"mingru"`` or ``"minlstm"``.
      num_gates: G, the number of H-wide blocks in the fused matrices.
      kernel: the name of the fused kernel in ``jaxseq._fused.KERNELS`` that computes
        exactly this cell's equations (``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"``, ``"gru"``,
        ``"gru_cho"``), set by the factory; ``None`` for a cell that has none. A cell whose
        ``step`` or ``project`` is replaced must also drop its tag
        (``cell._replace(step=..., kernel=None)``): ``unroll(impl="auto")`` trusts it.
      coefficients: for a cell whose recurrence is linear in its carry ``h`` (minGRU,
        minLSTM), ``(params, zs: (T, *batch, G*H)) -> (a, b)``, both ``(T, *batch, H)``, with
        ``step(params, h, zs[t]) == (a[t]*h + b[t],) * 2``; ``unroll(impl="associative")``
        runs ``jaxseq.linear_recurrence`` on them. ``None`` for every other cell; like
        ``kernel``, a cell whose ``step`` or ``project`` is replaced must drop it.
    """

    init: Callable[[PRNGKey, int], Params]
    apply: Callable[[Params, Carry, Array], tuple[Carry, Array]]
    initial_carry: Callable[..., Carry]
    project: Callable[[Params, Array], Array]
    step: Callable[[Params, Carry, Array], tuple[Carry, Array]]
    hidden_size: int
    name: str
    num_gates: int
    kernel: str | None = None
    coefficients: Callable[[Params, Array], tuple[Array, Array]] | None = None


class RNNParams(NamedTuple):
    w_ih: Array  # (F, H)
    w_hh: Array  # (H, H)
    b: Array  # (H,)  = b_ih + b_hh of the two-bias formulation


class LSTMParams(NamedTuple):
    w_ih: Array  # (F, 4H), gate blocks i, f, g, o
    w_hh: Array  # (H, 4H)
    b: Array  # (4H,)  forget block initialised to forget_bias


class LSTMState(NamedTuple):
    """The LSTM carry, named so that (h, c) versus (c, h) is never a question."""

    h: Array  # (*batch, H) hidden state, also the output
    c: Array  # (*batch, H) cell state


class MinParams(NamedTuple):
    """minGRU's and minLSTM's parameters: no recurrent matrix, the gates see only x."""

    w_ih: Array  # (F, G*H), gate blocks z, h̃ (minGRU) or f, i, h̃ (minLSTM)
    b: Array  # (G*H,)


class GRUParams(NamedTuple):
    w_ih: Array  # (F, 3H), gate blocks r, z, n
    w_hh: Array  # (H, 3H)
    b: Array  # (3H,)  input-side bias (b_ir + b_hr, b_iz + b_hz, b_in)
    b_hn: Array | None  # (H,) recurrent bias of n, inside r * (.); None when reset_after=False


def _glorot_uniform(key: PRNGKey, fan_in: int, fan_out: int, dtype) -> Array:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_in, fan_out), dtype, -limit, limit)


def _orthogonal_blocks(key: PRNGKey, hidden: int, blocks: int, dtype) -> Array:
    """``(H, blocks*H)``: an independent orthogonal ``(H, H)`` matrix per gate."""
    init = jax.nn.initializers.orthogonal()
    keys = jax.random.split(key, blocks)
    # The QR behind orthogonal() has no bfloat16/float16 kernel (LAPACK on CPU), so draw in
    # at least float32 and cast.
    draw_dtype = jnp.promote_types(dtype, jnp.float32)
    return jnp.concatenate(
        [init(k, (hidden, hidden), draw_dtype).astype(dtype) for k in keys], axis=1
    )


def _zeros_carry(hidden: int) -> Callable[..., Array]:
    def initial_carry(batch_shape: tuple[int, ...] = (), dtype=jnp.float32) -> Array:
        return jnp.zeros((*tuple(batch_shape), hidden), dtype)

    return initial_carry


def _project(params, xs: Array) -> Array:
    return xs @ params.w_ih.astype(xs.dtype) + params.b.astype(xs.dtype)


def _check_sizes(hidden_size: int) -> None:
    if not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")


def rnn(hidden_size: int, *, activation: str = "tanh", param_dtype=jnp.float32) -> Cell:
    """The vanilla (Elman) recurrent cell.

    Equations (``x_t: (*batch, F)``, ``h_t: (*batch, H)``)::

        h_t = act(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh)

    with ``act`` tanh (default) or relu; the two biases are stored summed as ``b``.
    The carry is ``h``; the output is ``h_t``.

    Args:
      hidden_size: H.
      activation: ``"tanh"`` or ``"relu"``.
      param_dtype: dtype of the parameters made by ``init``.
    """
    _check_sizes(hidden_size)
    acts = {"tanh": jnp.tanh, "relu": jax.nn.relu}
    if activation not in acts:
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    act = acts[activation]
    H = hidden_size

    def init(key: PRNGKey, input_size: int) -> RNNParams:
        k_ih, k_hh = jax.random.split(key)
        return RNNParams(
            w_ih=_glorot_uniform(k_ih, input_size, H, param_dtype),
            w_hh=_orthogonal_blocks(k_hh, H, 1, param_dtype),
            b=jnp.zeros((H,), param_dtype),
        )

    def step(params: RNNParams, h: Array, z: Array) -> tuple[Array, Array]:
        h = act(z + h @ params.w_hh.astype(z.dtype))
        return h, h

    def apply(params: RNNParams, h: Array, x: Array) -> tuple[Array, Array]:
        return step(params, h, _project(params, x))

    return Cell(
        init, apply, _zeros_carry(H), _project, step, H, "rnn", 1, kernel=f"rnn_{activation}"
    )


def lstm(hidden_size: int, *, forget_bias: float = 1.0, param_dtype=jnp.float32) -> Cell:
    """The LSTM cell (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al.).

    Equations, ``[h, x] W`` written as ``x W_i* + h W_h*`` on fused matrices::

        i_t  = σ(x_t W_ii + h_{t-1} W_hi + b_i)        input gate
        f_t  = σ(x_t W_if + h_{t-1} W_hf + b_f)        forget gate
        C̃_t = tanh(x_t W_ig + h_{t-1} W_hg + b_g)     candidate
        o_t  = σ(x_t W_io + h_{t-1} W_ho + b_o)        output gate
        C_t  = f_t * C_{t-1} + i_t * C̃_t
        h_t  = o_t * tanh(C_t)

    The carry is ``LSTMState(h, c)`` with both ``(*batch, H)``; the output is ``h_t``.
    ``b_f`` starts at ``forget_bias`` (1.0, Gers et al. 2000; Jozefowicz et al. 2015).

    Args:
      hidden_size: H.
      forget_bias: initial value of the forget-gate bias.
      param_dtype: dtype of the parameters made by ``init``.
    """
    _check_sizes(hidden_size)
    H = hidden_size

    def init(key: PRNGKey, input_size: int) -> LSTMParams:
        k_ih, k_hh = jax.random.split(key)
        b = jnp.zeros((4 * H,), param_dtype).at[H : 2 * H].set(forget_bias)
        return LSTMParams(
            w_ih=_glorot_uniform(k_ih, input_size, 4 * H, param_dtype),
            w_hh=_orthogonal_blocks(k_hh, H, 4, param_dtype),
            b=b,
        )

    def initial_carry(batch_shape: tuple[int, ...] = (), dtype=jnp.float32) -> LSTMState:
        zeros = jnp.zeros((*tuple(batch_shape), H), dtype)
        return LSTMState(h=zeros, c=zeros)

    def step(params: LSTMParams, carry: LSTMState, z: Array) -> tuple[LSTMState, Array]:
        z = z + carry.h @ params.w_hh.astype(z.dtype)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return LSTMState(h=h, c=c), h

    def apply(params: LSTMParams, carry: LSTMState, x: Array) -> tuple[LSTMState, Array]:
        return step(params, carry, _project(params, x))

    return Cell(init, apply, initial_carry, _project, step, H, "lstm", 4, kernel="lstm")


def gru(hidden_size: int, *, reset_after: bool = True, param_dtype=jnp.float32) -> Cell:
    """The GRU cell in either published convention.

    ``reset_after=True`` (cuDNN, PyTorch, Keras v3, flax.linen ``GRUCell``)::

        r_t = σ(x_t W_ir + h_{t-1} W_hr + b_r)
        z_t = σ(x_t W_iz + h_{t-1} W_hz + b_z)
        n_t = tanh(x_t W_in + b_in + r_t * (h_{t-1} W_hn + b_hn))
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    ``reset_after=False`` (Cho et al. 2014, the lecture's form)::

        r_t = σ(W_r · [h_{t-1}, x_t] + b_r)
        z_t = σ(W_z · [h_{t-1}, x_t] + b_z)
        h̃_t = tanh(W · [r_t * h_{t-1}, x_t] + b)
        h_t = (1 - z_t) * h_{t-1} + z_t * h̃_t

    Note that ``z`` plays opposite roles in the two: it keeps the old state after the reset
    in PyTorch's form and admits the new candidate in Cho's. The carry is ``h``
    ``(*batch, H)``; the output is ``h_t``.

    Args:
      hidden_size: H.
      reset_after: which convention (see above).
      param_dtype: dtype of the parameters made by ``init``.
    """
    _check_sizes(hidden_size)
    H = hidden_size

    def init(key: PRNGKey, input_size: int) -> GRUParams:
        k_ih, k_hh = jax.random.split(key)
        return GRUParams(
            w_ih=_glorot_uniform(k_ih, input_size, 3 * H, param_dtype),
            w_hh=_orthogonal_blocks(k_hh, H, 3, param_dtype),
            b=jnp.zeros((3 * H,), param_dtype),
            b_hn=jnp.zeros((H,), param_dtype) if reset_after else None,
        )

    if reset_after:

        def step(params: GRUParams, h: Array, zx: Array) -> tuple[Array, Array]:
            zh = h @ params.w_hh.astype(zx.dtype)
            xr, xz, xn = jnp.split(zx, 3, axis=-1)
            hr, hz, hn = jnp.split(zh, 3, axis=-1)
            r = jax.nn.sigmoid(xr + hr)
            z = jax.nn.sigmoid(xz + hz)
            n = jnp.tanh(xn + r * (hn + params.b_hn.astype(zx.dtype)))
            h = (1.0 - z) * n + z * h
            return h, h
    else:

        def step(params: GRUParams, h: Array, zx: Array) -> tuple[Array, Array]:
            w_hh = params.w_hh.astype(zx.dtype)
            zh = h @ w_hh[:, : 2 * H]
            xr, xz, xn = jnp.split(zx, 3, axis=-1)
            hr, hz = jnp.split(zh, 2, axis=-1)
            r = jax.nn.sigmoid(xr + hr)
            z = jax.nn.sigmoid(xz + hz)
            candidate = jnp.tanh(xn + (r * h) @ w_hh[:, 2 * H :])
            h = (1.0 - z) * h + z * candidate
            return h, h

    def apply(params: GRUParams, h: Array, x: Array) -> tuple[Array, Array]:
        return step(params, h, _project(params, x))

    return Cell(
        init,
        apply,
        _zeros_carry(H),
        _project,
        step,
        H,
        "gru",
        3,
        kernel="gru" if reset_after else "gru_cho",
    )


# ------------------------------------------------------------------ minimal (linear) cells
#
# Feng, Tung, Ahmed, Bengio & Hajimirsadeghi (2024), "Were RNNs All We Needed?"
# (arXiv:2410.01201): gates that read only x_t make the recurrence h_t = a_t*h_{t-1} + b_t
# elementwise, with a_t, b_t from one (T*B, F) x (F, G*H) matmul for the whole sequence,
# so unroll can run it as an associative scan (jaxseq/_linear.py). Their ``step`` is the
# readable per-step form; ``coefficients`` gives (a, b) for the whole sequence.
#
# The candidate h̃ is the paper's plain ``Linear(x)`` (its Algorithms 1-4), not the
# ``g(x) = x + 0.5 if x >= 0 else σ(x)`` of its log-space variant: g exists only to keep h̃
# positive so that log h̃ is real, and jaxseq's associative scan works on (a, b) directly
# (``linear_recurrence`` says why it does not take logs), so no sign constraint is needed.


def _min_init(hidden: int, gates: int, param_dtype) -> Callable[[PRNGKey, int], MinParams]:
    def init(key: PRNGKey, input_size: int) -> MinParams:
        return MinParams(
            w_ih=_glorot_uniform(key, input_size, gates * hidden, param_dtype),
            b=jnp.zeros((gates * hidden,), param_dtype),
        )

    return init


def mingru(hidden_size: int, *, param_dtype=jnp.float32) -> Cell:
    """minGRU (Feng et al. 2024, arXiv:2410.01201): a GRU whose gates do not read h.

    Equations, with ``Linear(x) = x W + b`` on the fused ``(F, 2H)`` matrix, blocks ``z, h̃``::

        z_t  = σ(x_t W_z + b_z)                    update gate
        h̃_t = x_t W_h + b_h                       candidate (no tanh, no reset gate)
        h_t  = (1 - z_t) * h_{t-1} + z_t * h̃_t

    so ``h_t = a_t * h_{t-1} + b_t`` with ``a_t = 1 - z_t``, ``b_t = z_t * h̃_t``
    (``coefficients``). There is no recurrent matrix; the carry is ``h`` ``(*batch, H)``
    and the output is ``h_t``. ``h̃`` is the plain linear map (see the note above the
    factory: the paper's ``g(x)`` matters only to its log-space scan). No fused kernel:
    ``unroll`` runs it as a scan or an associative scan.

    Args:
      hidden_size: H.
      param_dtype: dtype of the parameters made by ``init``.
    """
    _check_sizes(hidden_size)
    H = hidden_size

    def gates(zs: Array) -> tuple[Array, Array]:
        z, candidate = jnp.split(zs, 2, axis=-1)
        return jax.nn.sigmoid(z), candidate

    def coefficients(params: MinParams, zs: Array) -> tuple[Array, Array]:
        z, candidate = gates(zs)
        return 1.0 - z, z * candidate

    def step(params: MinParams, h: Array, zx: Array) -> tuple[Array, Array]:
        z, candidate = gates(zx)
        h = (1.0 - z) * h + z * candidate
        return h, h

    def apply(params: MinParams, h: Array, x: Array) -> tuple[Array, Array]:
        return step(params, h, _project(params, x))

    return Cell(
        _min_init(H, 2, param_dtype),
        apply,
        _zeros_carry(H),
        _project,
        step,
        H,
        "mingru",
        2,
        kernel=None,
        coefficients=coefficients,
    )


def minlstm(hidden_size: int, *, param_dtype=jnp.float32) -> Cell:
    """minLSTM (Feng et al. 2024, arXiv:2410.01201): an LSTM whose gates do not read h.

    Equations, on the fused ``(F, 3H)`` matrix with blocks ``f, i, h̃``::

        f_t  = σ(x_t W_f + b_f)                    forget gate
        i_t  = σ(x_t W_i + b_i)                    input gate
        h̃_t = x_t W_h + b_h                       candidate
        f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)    normalised: f' + i' = 1
        h_t  = f'_t * h_{t-1} + i'_t * h̃_t

    so ``a_t = f'_t`` and ``b_t = i'_t * h̃_t`` (``coefficients``). The normalisation keeps
    the scale of ``h`` independent of ``t`` and drops the output gate and cell state: the
    carry is ``h`` ``(*batch, H)`` and the output is ``h_t``. It is computed as
    ``f'_t = σ(log f_t - log i_t)`` with ``log σ(u) = -softplus(-u)`` (the paper's code does
    the same), the same number without the 0/0 of two underflowed sigmoids. The candidate
    is the plain linear map, as in ``mingru``. No fused kernel.

    Args:
      hidden_size: H.
      param_dtype: dtype of the parameters made by ``init``.
    """
    _check_sizes(hidden_size)
    H = hidden_size

    def gates(zs: Array) -> tuple[Array, Array, Array]:
        """``(f', i', h̃)``: the normalised forget and input gates and the candidate."""
        f, i, candidate = jnp.split(zs, 3, axis=-1)
        log_ratio = jax.nn.softplus(-i) - jax.nn.softplus(-f)  # log f - log i
        return jax.nn.sigmoid(log_ratio), jax.nn.sigmoid(-log_ratio), candidate

    def coefficients(params: MinParams, zs: Array) -> tuple[Array, Array]:
        forget, admit, candidate = gates(zs)
        return forget, admit * candidate

    def step(params: MinParams, h: Array, zx: Array) -> tuple[Array, Array]:
        forget, admit, candidate = gates(zx)
        h = forget * h + admit * candidate
        return h, h

    def apply(params: MinParams, h: Array, x: Array) -> tuple[Array, Array]:
        return step(params, h, _project(params, x))

    return Cell(
        _min_init(H, 3, param_dtype),
        apply,
        _zeros_carry(H),
        _project,
        step,
        H,
        "minlstm",
        3,
        kernel=None,
        coefficients=coefficients,
    )


CELLS = {"rnn": rnn, "lstm": lstm, "gru": gru, "mingru": mingru, "minlstm": minlstm}


def make_cell(name: str, hidden_size: int, **kwargs) -> Cell:
    """``make_cell("gru", 256)``: a cell by name (``rnn``, ``lstm``, ``gru``, ``mingru``,
    ``minlstm``)."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; choose from {', '.join(CELLS)}")
    return CELLS[name](hidden_size, **kwargs)
