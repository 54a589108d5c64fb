"""A character language model: embedding (or one-hot) -> stacked recurrent cell -> dense.

    >>> model = char_lm(vocab_size=65, cell="gru", hidden=256, layers=2)
    >>> params = model.init(jax.random.key(0))
    >>> carry = model.initial_carry((32,))
    >>> carry, logits = model.apply(params, carry, tokens)   # tokens: (T, 32) int

Tokens are time-major ``(T, *batch)`` like every jaxseq sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq._cells import Array, PRNGKey, make_cell
from jaxseq._unroll import Stack, stack, unroll_embedded


def table_pays(vocab_size: int, embed: int, tokens: int) -> bool:
    """Whether the first layer should read the ``(V, G*H)`` product table (``unroll_embedded``).

    Multiply-adds per ``G*H`` output column of a training step (forward and backward):

    * projecting the ``N = T*B`` embedded inputs: ``N*E`` forward, ``2*N*E`` backward
      (``dxs`` and ``dW_ih``);
    * the product table: ``V*E`` forward, ``N*V`` backward (the gradient of the table is a
      one-hot ``(V, N) x (N, G*H)`` matmul) plus ``2*V*E`` (``dW_ih`` and ``dtable``).

    The table wins when ``3*V*E + N*V < 3*N*E``: a character vocabulary (V=65, E=64, N in
    the thousands) does, a word vocabulary (V in the tens of thousands) never does, so the
    dense one-hot backward is never built over one.
    """
    V, E, N = vocab_size, embed, tokens
    return 3 * V * E + N * V < 3 * N * E


class CharLMParams(NamedTuple):
    embed: Array | None  # (V, E); None with one-hot input
    rnn: Any  # the Stack's params: a tuple with one entry per layer
    w_out: Array  # (H, V)
    b_out: Array  # (V,)


class CharLM(NamedTuple):
    """Pure functions of a character LM.

    Attributes:
      init: ``key -> CharLMParams``.
      apply: ``(params, carry, tokens: (T, *batch) int, *, dropout_key=None, impl="auto",
        mesh=None) -> (carry, logits: (T, *batch, V))``; ``impl`` and ``mesh`` go to every
        layer's ``unroll`` (see ``jaxseq.unroll``).
      initial_carry: ``(batch_shape, dtype=float32) -> carry``.
      network: the recurrent ``Stack``.
      vocab_size: V.
      input_mode: ``"embedding"`` or ``"onehot"``.
      compute_dtype: dtype of the recurrent and decoder computation (parameters stay in
        their own dtype; bfloat16 here is mixed precision).
    """

    init: Callable[[PRNGKey], CharLMParams]
    apply: Callable[..., tuple[Any, Array]]
    initial_carry: Callable[..., Any]
    network: Stack
    vocab_size: int
    input_mode: str
    compute_dtype: Any


def char_lm(
    vocab_size: int,
    *,
    cell: str = "gru",
    hidden: int = 256,
    layers: int = 2,
    embed: int = 64,
    dropout: float = 0.0,
    input_mode: str = "embedding",
    compute_dtype=jnp.float32,
) -> CharLM:
    """Builds a character LM.

    Args:
      vocab_size: V, the number of distinct characters.
      cell: any name of ``jaxseq.make_cell``: ``"rnn"``, ``"lstm"``, ``"gru"``, ``"mingru"``
        or ``"minlstm"``.
      hidden: H, units per layer.
      layers: number of stacked recurrent layers.
      embed: E, embedding width (ignored with one-hot input, where the width is V).
      dropout: inverted-dropout rate on the embedding and between and after layers
        (training only).
      input_mode: ``"embedding"`` (learned table) or ``"onehot"`` (the lecture's one-hot
        vectors fed straight into the first layer).
      compute_dtype: ``jnp.float32`` or ``jnp.bfloat16`` (mixed precision).

    With an embedding and no active dropout, ``apply`` runs the embedding and the first
    layer's input projection as one lookup in their ``(V, G*H)`` product
    (``jaxseq.unroll_embedded``) when ``table_pays`` says it costs fewer FLOPs: the same
    function and gradients as embedding then ``network.apply``.
    """
    if input_mode not in ("embedding", "onehot"):
        raise ValueError(f"input_mode must be 'embedding' or 'onehot', got {input_mode!r}")
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden", hidden),
        ("layers", layers),
        ("embed", embed),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    network = stack(make_cell(cell, hidden), layers, dropout=dropout)
    # Layers 2.. of `network` on their own, for the path whose first layer is a table lookup.
    upper = stack(network.cell, layers - 1) if layers > 1 else None
    in_size = embed if input_mode == "embedding" else vocab_size

    def init(key: PRNGKey) -> CharLMParams:
        k_embed, k_rnn, k_out = jax.random.split(key, 3)
        table = (
            jax.random.normal(k_embed, (vocab_size, embed), jnp.float32)
            if input_mode == "embedding"
            else None
        )
        limit = 1.0 / math.sqrt(hidden)
        return CharLMParams(
            embed=table,
            rnn=network.init(k_rnn, in_size),
            w_out=jax.random.uniform(k_out, (hidden, vocab_size), jnp.float32, -limit, limit),
            b_out=jnp.zeros((vocab_size,), jnp.float32),
        )

    def _dropout(key, x):
        keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
        return jnp.where(keep, x / (1.0 - dropout), 0.0).astype(x.dtype)

    def apply(
        params: CharLMParams, carry, tokens: Array, *, dropout_key=None, impl="auto", mesh=None
    ):
        use_dropout = dropout > 0.0 and dropout_key is not None
        k_in, k_rnn, k_out = jax.random.split(dropout_key, 3) if use_dropout else (None, None, None)
        rnn_params = jax.tree.map(lambda p: p.astype(compute_dtype), params.rnn)
        if (
            input_mode == "embedding"
            and not use_dropout
            and table_pays(vocab_size, embed, tokens.size)
        ):
            # 1.11x and 1.26x faster GRU training steps at H=256 and 512 (charlm.md).
            first, hs = unroll_embedded(
                network.cell,
                rnn_params[0],
                carry[0],
                params.embed.astype(compute_dtype),
                tokens,
                impl=impl,
                mesh=mesh,
            )
            rest = ()
            if upper is not None:
                rest, hs = upper.apply(rnn_params[1:], carry[1:], hs, impl=impl, mesh=mesh)
            carry = (first, *rest)
        else:
            if input_mode == "embedding":
                xs = params.embed.astype(compute_dtype)[tokens]
                if use_dropout:
                    xs = _dropout(k_in, xs)
            else:
                xs = jax.nn.one_hot(tokens, vocab_size, dtype=compute_dtype)
            carry, hs = network.apply(
                rnn_params, carry, xs, dropout_key=k_rnn, impl=impl, mesh=mesh
            )
        if use_dropout:
            hs = _dropout(k_out, hs)
        logits = hs @ params.w_out.astype(compute_dtype) + params.b_out.astype(compute_dtype)
        return carry, logits.astype(jnp.float32)

    def initial_carry(batch_shape=(), dtype=compute_dtype):
        return network.initial_carry(batch_shape, dtype)

    return CharLM(init, apply, initial_carry, network, vocab_size, input_mode, compute_dtype)


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-position negative log-likelihood in nats: ``(…, V), (…) -> (…)``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
