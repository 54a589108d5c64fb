"""The elementwise linear recurrence ``h_t = a_t * h_{t-1} + b_t``, sequential or parallel.

Cells whose gates do not read ``h_{t-1}`` (minGRU, minLSTM: ``jaxseq._cells``) compute
``a_t`` and ``b_t`` for the whole sequence from the inputs alone; what is left of the time
loop is this recurrence, which an associative scan evaluates in ``O(log T)`` depth
(Blelloch 1990; Martin & Cundy 2018; Feng et al. 2024). This module is a leaf: it imports
nothing from the rest of jaxseq.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLS = ("auto", "scan", "associative")


def associative_pays(backend: str) -> bool:
    """Whether ``impl="auto"`` runs the associative form on ``backend`` (``"cpu"``, ...).

    Not on CPU: measured on the 2-core development machine (forward and backward of a
    2-layer minGRU stack, H=256, B*T=8192, medians of 11-15 interleaved runs, two runs),
    the sequential scan was faster at every length: 417-448 / 472-478 / 478-515 ms against
    556-668 / 561-597 / 580-644 ms at T = 128 / 512 / 2048 (the scan took 0.62x-0.85x the
    associative form's time), and it compiled in 1.4-2.7 s against 8-16 s. The recurrence
    alone is one memory-bound pass for the scan, with no per-step cost worth saving on a
    CPU, where the associative scan makes several strided passes per level and its
    autodiff backward is 4-8x the scan's. On accelerators a sequential loop pays a fixed
    cost per step and the ``O(log T)`` depth is what Feng et al. (2024) report as the
    speed-up; that is not measured in jaxseq yet, so a GPU or TPU run should confirm it.
    """
    return backend != "cpu"


def _combine(earlier: tuple[Array, Array], later: tuple[Array, Array]) -> tuple[Array, Array]:
    """Composes two affine maps ``h -> a*h + b``: first ``earlier``, then ``later``."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def linear_recurrence(
    a: Array, b: Array, h0: Array, *, reverse: bool = False, impl: str = "auto"
) -> Array:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (elementwise), ``h_{-1} = h0``.

    ``impl="associative"`` folds ``h0`` into the first step (``b_0 <- a_0*h0 + b_0``) and
    runs ``jax.lax.associative_scan`` over the pairs ``(a_t, b_t)`` with the composition of
    affine maps ``(a1, b1) ∘ (a2, b2) = (a1*a2, a2*b1 + b2)``: ``O(T)`` work in
    ``O(log T)`` depth. ``impl="scan"`` is the sequential ``lax.scan`` that defines it.
    Both are plain JAX, differentiable in either mode.

    Numerics (why not the log-space form). For gates ``a`` in (0, 1) and bounded ``b``
    every partial result of the associative scan is itself a coefficient of the exact
    solution: ``a1*a2`` is a product of gates, which can only shrink, and underflows to 0
    exactly when the true product is below float32's range, where it no longer matters
    next to ``b``; ``a2*b1 + b2`` is a partial sum ``sum_k (prod_{j>k} a_j) b_k`` of the
    solution, bounded by ``max|b| / (1 - max a)``. Nothing overflows and no intermediate
    grows beyond the solution's own bound, so the rounding error is that of a
    (tree-ordered) sum of products, as for the sequential scan. Measured against a float64 loop
    (``tests/test_mincells.py``), gates ``a = σ(N(0, 2²))``, ``b ~ N(0, 1)``, H=32, B=4:
    max |err| / max |h| was 1.0e-7 (T = 1,024) and 1.2e-7 (T = 16,384) in float32, about
    one ulp and the same as the sequential scan's, and 3.6e-16 in float64.

    The log-space form of Heinsen (2023), ``log h_t = a*_t + logcumsumexp(log b_t - a*_t)``
    with ``a*_t = sum_{k<=t} log a_k``, needs ``b > 0`` (the ``g(x)`` candidate of Feng et
    al. exists for it), costs a log and an exp per element, and loses accuracy of its own:
    ``a*_t`` grows like ``t``, so ``log b - a*`` carries an absolute error of about ``t``
    ulps of that sum (measured on the same data with positive ``b``: 1.0e-4 at T = 1,024
    and 1.9e-3 at T = 16,384 in float32, against 1.2e-7). It pays where there is no
    associative scan primitive (it is two cumulative sums); JAX has one.

    Args:
      a: ``(T, *batch, H)`` multiplicative coefficients (the gates).
      b: ``(T, *batch, H)`` additive coefficients.
      h0: ``(*batch, H)`` the state before the first step (before the last with
        ``reverse``); anything that broadcasts to ``a.shape[1:]``.
      reverse: run from ``t = T-1`` down to 0: ``h_t = a_t * h_{t+1} + b_t``,
        ``h_T = h0``.
      impl: ``"scan"``, ``"associative"`` or ``"auto"`` (the scan on CPU, the associative
        form elsewhere: ``associative_pays``).

    Returns:
      ``hs: (T, *batch, H)``, every ``h_t``, in the dtype of ``a * h0 + b``; the final
      state is ``hs[-1]`` (``hs[0]`` with ``reverse``).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    a, b, h0 = jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0)
    if a.ndim < 1 or a.shape != b.shape:
        raise ValueError(
            f"a and b must be (T, *batch, H) of one shape, got {a.shape} and {b.shape}"
        )
    try:
        jnp.broadcast_shapes(h0.shape, a.shape[1:])
    except ValueError:
        raise ValueError(
            f"h0 {h0.shape} does not broadcast to a's step shape {a.shape[1:]}"
        ) from None
    dtype = jnp.result_type(a, b, h0)
    a, b = a.astype(dtype), b.astype(dtype)
    h0 = jnp.broadcast_to(h0.astype(dtype), a.shape[1:])
    T = a.shape[0]
    if T == 0:
        return jnp.zeros(a.shape, dtype)
    if impl == "auto":
        impl = "associative" if associative_pays(jax.default_backend()) else "scan"

    if impl == "scan":

        def step(h, ab):
            a_t, b_t = ab
            h = a_t * h + b_t
            return h, h

        return jax.lax.scan(step, h0, (a, b), reverse=reverse)[1]

    first = T - 1 if reverse else 0
    b = b.at[first].set(a[first] * h0 + b[first])
    _, hs = jax.lax.associative_scan(_combine, (a, b), reverse=reverse)
    return hs
