"""The time loop: ``unroll`` runs one cell over a sequence, by one of three implementations.

* ``impl="scan"``: one ``jax.lax.scan`` of ``cell.step`` with the input projection hoisted
  out of the loop (``cell.project`` on the whole sequence, one matmul). This is the
  readable definition; JAX differentiates it in either mode.
* ``impl="fused"``: the cell's fused kernel (``jaxseq/_fused.py``, named by the tag
  ``cell.kernel`` that its factory sets): the same function with a hand-written backward
  pass that takes the weight gradients out of the time loop (faster training; reverse mode
  only).
* ``impl="associative"``: for a cell whose recurrence is linear in its carry (minGRU,
  minLSTM: ``cell.coefficients`` is set), ``h_t = a_t * h_{t-1} + b_t`` with ``(a, b)``
  computed from ``cell.project(xs)`` for the whole sequence, run as
  ``jaxseq.linear_recurrence``'s associative scan (``jaxseq/_linear.py``): ``O(log T)``
  depth instead of ``T`` sequential steps, plain JAX in both differentiation modes.
* ``impl="auto"`` (the default) picks "fused" when the cell has a kernel and the call is
  one the kernels handle (no ``seq_lengths``, a carry in the inputs' dtype; see
  ``_fused.unsupported``); "associative" when the cell has ``coefficients`` and
  ``_linear.associative_pays`` holds for the backend (not on CPU, where the scan was
  measured faster at every sequence length; elsewhere yes); else "scan". ``_choose_impl``
  is that rule.

``stack`` builds a multi-layer, optionally bidirectional network with dropout between
layers out of any ``Cell``; ``unroll_embedded`` is ``unroll`` on looked-up embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq._cells import Array, Carry, Cell, Params, PRNGKey
from jaxseq._fused import fused_unroll, fused_unroll_embedded, unsupported
from jaxseq._linear import associative_pays, linear_recurrence

IMPLS = ("auto", "scan", "fused", "associative")

FORWARD_MODE_HINT = (
    "the fused kernels define only reverse-mode derivatives (custom_vjp); "
    "for jax.jvp, jax.jacfwd or jax.hessian pass impl='scan'"
)


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


def _valid_steps(num_steps: int, seq_lengths: Array, xs_ndim: int) -> Array:
    """``(T, *batch)`` bool: whether step t is inside sequence b (``t < seq_lengths[b]``)."""
    steps = jnp.arange(num_steps).reshape((-1,) + (1,) * (xs_ndim - 2))
    return steps < jnp.asarray(seq_lengths)[None]


def scan_unroll(
    cell: Cell,
    params: Params,
    carry: Carry,
    zs: Array,
    *,
    reverse: bool = False,
    seq_lengths: Array | None = None,
) -> tuple[Carry, Array]:
    """``unroll(impl="scan")`` on projected inputs: ``lax.scan`` of ``cell.step`` over ``zs``.

    ``zs: (T, *batch, G*H)`` is ``cell.project(params, xs)``, computed by the caller for the
    whole sequence at once (the hoisted input product).
    """
    if seq_lengths is None:
        return jax.lax.scan(lambda c, z: cell.step(params, c, z), carry, zs, reverse=reverse)
    valid = _valid_steps(zs.shape[0], seq_lengths, zs.ndim)
    return jax.lax.scan(_masked_step(cell.step, params), carry, (zs, valid), reverse=reverse)


def associative_unroll(
    cell: Cell,
    params: Params,
    carry: Array,
    zs: Array,
    *,
    reverse: bool = False,
    seq_lengths: Array | None = None,
) -> tuple[Array, Array]:
    """``unroll(impl="associative")`` on projected inputs ``zs = cell.project(params, xs)``:
    ``linear_recurrence`` on ``cell.coefficients(params, zs)``.

    Steps at ``t >= seq_lengths`` get ``a = 1, b = 0``, the identity map, so the state
    passes through them unchanged (as the masked scan leaves its carry) and the last state
    of the run, ``hs[-1]`` (``hs[0]`` in reverse), is the last valid one; their outputs
    are then zeroed like the scan's.
    """
    a, b = cell.coefficients(params, zs)
    if seq_lengths is not None:
        valid = _valid_steps(zs.shape[0], seq_lengths, zs.ndim)[..., None]
        a, b = jnp.where(valid, a, 1.0), jnp.where(valid, b, 0.0)
    hs = linear_recurrence(a, b, carry, reverse=reverse, impl="associative")
    final = carry if zs.shape[0] == 0 else hs[0 if reverse else -1]
    if seq_lengths is not None:
        hs = jnp.where(valid, hs, jnp.zeros_like(hs))
    return final, hs


def _why_not_associative(cell: Cell, carry: Carry, xs_shape: tuple) -> str | None:
    """Why ``associative_unroll`` cannot run this call, or ``None`` when it can."""
    if cell.coefficients is None:
        return (
            f"the {cell.name!r} cell's recurrence is not linear in its carry "
            f"(cell.coefficients is None; minGRU and minLSTM have one)"
        )
    if len(xs_shape) < 2:
        return f"xs must be (T, *batch, F), got shape {xs_shape}"
    want = (*xs_shape[1:-1], cell.hidden_size)
    if not hasattr(carry, "shape") or tuple(carry.shape) != want:
        got = jax.tree.map(jnp.shape, carry)
        return f"the carry must be one array of shape {want}, got {got}"
    return None


def _choose_impl(
    impl: str,
    why_not_fused: Callable[[], str | None],
    why_not_associative: Callable[[], str | None],
) -> str:
    """Resolves ``impl`` to what runs: ``"scan"``, ``"fused"`` or ``"associative"``.

    ``why_not_*()`` say what stops each fast path (``None``: nothing). An explicit fast path
    that cannot run raises; ``"auto"`` takes the fused kernel where there is one, else the
    associative scan where the cell is linear and it pays on this backend
    (``associative_pays``: not on CPU), else the scan.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "scan":
        return "scan"
    if impl in ("fused", "associative"):
        reason = (why_not_fused if impl == "fused" else why_not_associative)()
        if reason is not None:
            raise ValueError(
                f"impl={impl!r} cannot run this call: {reason}; pass "
                f"impl='scan' (or 'auto', which falls back to it)"
            )
        return impl
    if why_not_fused() is None:
        return "fused"
    if why_not_associative() is None and associative_pays(jax.default_backend()):
        return "associative"
    return "scan"


def _forward_mode_hint(run: Callable) -> Any:
    """Calls ``run()``; JAX's error for forward mode through a custom_vjp gains the fix."""
    try:
        return run()
    except TypeError as e:
        if "forward-mode" in str(e):
            raise TypeError(f"{e} ({FORWARD_MODE_HINT})") from e
        raise


def unroll(
    cell: Cell,
    params: Params,
    carry: Carry,
    xs: Array,
    *,
    reverse: bool = False,
    seq_lengths: Array | None = None,
    impl: str = "auto",
    mesh: Any = None,
) -> tuple[Carry, Array]:
    """Runs ``cell`` over a time-major sequence.

    Args:
      cell: the cell.
      params: its parameters.
      carry: the initial carry, leaves ``(*batch, H)`` (``cell.initial_carry(batch)``, or
        the final carry of the previous window for truncated BPTT).
      xs: ``(T, *batch, F)`` inputs.
      reverse: run from the last valid step to the first.
      seq_lengths: optional ``(*batch,)`` integer lengths. Steps at ``t >= length`` leave the
        carry untouched and output zeros, so the returned carry is the last valid one; with
        ``reverse`` each sequence starts at its own last valid step. Runs as "scan" or
        "associative" (not "fused").
      impl: ``"scan"``, ``"fused"``, ``"associative"`` or ``"auto"`` (module docstring).
        "fused" and "associative" raise a ``ValueError`` saying why when the call is not
        one they handle.
      mesh: a ``jax.sharding.Mesh`` for data parallelism: the fused layer then runs under
        ``shard_map`` with batch rows split over the mesh's first axis (the scan and the
        associative scan leave the layout to XLA). ``None``: one device, or XLA's own
        propagation.

    Returns:
      ``(final_carry, ys)`` with ``ys: (T, *batch, H)``.
    """
    batch, in_size = tuple(xs.shape[1:-1]), xs.shape[-1]

    def why_not() -> str | None:
        if seq_lengths is not None:
            return "seq_lengths is given (the kernels run whole sequences)"
        if xs.ndim < 2 or xs.shape[0] == 0:
            return f"xs must be (T > 0, *batch, F), got shape {xs.shape}"
        return unsupported(cell, params, carry, xs.dtype, batch, in_size, mesh)

    chosen = _choose_impl(impl, why_not, lambda: _why_not_associative(cell, carry, xs.shape))
    if chosen == "fused":
        return _forward_mode_hint(
            lambda: fused_unroll(cell, params, carry, xs, reverse=reverse, mesh=mesh)
        )
    run = associative_unroll if chosen == "associative" else scan_unroll
    return run(
        cell, params, carry, cell.project(params, xs), reverse=reverse, seq_lengths=seq_lengths
    )


def unroll_embedded(
    cell: Cell,
    params: Params,
    carry: Carry,
    table: Array,
    tokens: Array,
    *,
    reverse: bool = False,
    impl: str = "auto",
    mesh: Any = None,
) -> tuple[Carry, Array]:
    """``unroll(cell, params, carry, table[tokens])``, projecting the table, not the inputs.

    An embedding followed by the input projection of the first layer is a lookup in the
    ``(V, G*H)`` product ``cell.project(params, table)``: every implementation computes that
    product and gathers its rows instead of projecting all ``T*B`` embedded inputs (the
    fused path with its own gather and backward pass, ``_fused.fused_unroll_embedded``).
    The result and gradients equal ``unroll`` on ``table[tokens]``. Whether the product
    pays is the caller's choice (``jaxseq.models.char_lm`` compares the FLOPs of both).

    Args:
      cell: the first layer's cell.
      params: its parameters (``w_ih: (E, G*H)``).
      carry: initial carry, leaves ``(*batch, H)``.
      table: ``(V, E)`` embedding table, already in the compute dtype.
      tokens: ``(T, *batch)`` integer ids.
      reverse, impl, mesh: as ``unroll``.

    Returns:
      ``(final_carry, ys)`` with ``ys: (T, *batch, H)``.
    """
    batch = tuple(tokens.shape[1:])

    def why_not() -> str | None:
        if tokens.shape[0] == 0:
            return "tokens must be (T > 0, *batch)"
        return unsupported(cell, params, carry, table.dtype, batch, table.shape[-1], mesh)

    xs_shape = (*tokens.shape, table.shape[-1])
    chosen = _choose_impl(impl, why_not, lambda: _why_not_associative(cell, carry, xs_shape))
    if chosen == "fused":
        return _forward_mode_hint(
            lambda: fused_unroll_embedded(
                cell, params, carry, table, tokens, reverse=reverse, mesh=mesh
            )
        )
    # project(table)[tokens] == project(table[tokens]): the input product of the V table
    # rows, then a gather, instead of the product of all T*B looked-up rows.
    run = associative_unroll if chosen == "associative" else scan_unroll
    return run(cell, params, carry, cell.project(params, table)[tokens], reverse=reverse)


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
        impl="auto", mesh=None) -> (carry, ys: (T, *batch, output_size))``. Dropout between
        layers is applied only when ``dropout_key`` is given (training); ``impl`` and
        ``mesh`` are passed to every layer's ``unroll``.
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
    """Stacks ``num_layers`` layers of ``cell``, each one ``unroll`` (two if bidirectional).

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

    def apply(params, carry, xs, *, seq_lengths=None, dropout_key=None, impl="auto", mesh=None):
        run = lambda p, c, x, reverse=False: unroll(
            cell, p, c, x, reverse=reverse, seq_lengths=seq_lengths, impl=impl, mesh=mesh
        )
        new_carry = []
        keys = (
            jax.random.split(dropout_key, num_layers)
            if dropout_key is not None
            else [None] * num_layers
        )
        for layer in range(num_layers):
            if bidirectional:
                (pf, pb), (cf, cb) = params[layer], carry[layer]
                cf, yf = run(pf, cf, xs)
                cb, yb = run(pb, cb, xs, reverse=True)
                new_carry.append((cf, cb))
                xs = jnp.concatenate([yf, yb], axis=-1)
            else:
                c, xs = run(params[layer], carry[layer], xs)
                new_carry.append(c)
            if dropout > 0.0 and keys[layer] is not None and layer < num_layers - 1:
                keep = jax.random.bernoulli(keys[layer], 1.0 - dropout, xs.shape)
                xs = jnp.where(keep, xs / (1.0 - dropout), 0.0).astype(xs.dtype)
        return tuple(new_carry), xs

    return Stack(init, apply, initial_carry, cell, num_layers, bidirectional, dropout, out)
