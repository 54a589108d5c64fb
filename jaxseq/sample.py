"""Sampling from a character LM as a pure function of (params, key, prime, ...).

The prime is read in one ``unroll`` and the whole generation is one jitted ``lax.scan``;
``num`` samples are drawn at once as a batch. The same key gives the same text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxseq._cells import Array, PRNGKey
from jaxseq.models import CharLM


def filter_logits(logits: Array, temperature, top_k: int) -> Array:
    """Scales ``(…, V)`` logits by ``1/temperature`` and keeps only the ``top_k`` largest
    (``top_k=0`` keeps all). Ties at the k-th value are all kept."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("model", "length", "num", "top_k"))
def sample(
    model: CharLM,
    params,
    key: PRNGKey,
    prime: Array,
    *,
    length: int,
    num: int = 1,
    temperature: float | Array = 1.0,
    top_k: int = 0,
) -> Array:
    """Draws ``num`` continuations of ``prime``.

    Args:
      model: the ``CharLM``.
      params: its parameters.
      key: a PRNG key; the result is a deterministic function of it.
      prime: ``(P,)`` int token ids, ``P >= 1``, read before generating.
      length: number of tokens to generate after the prime.
      num: number of samples, generated as one batch.
      temperature: > 0; lower is more conservative.
      top_k: sample only among the k most likely tokens (0: all).

    Returns:
      ``(num, length)`` int32 token ids (the prime not included).
    """
    prime = jnp.broadcast_to(prime[:, None], (prime.shape[0], num))
    carry = model.initial_carry((num,))
    carry, logits = model.apply(params, carry, prime)

    def body(state, step_key):
        carry, last_logits = state
        token = jax.random.categorical(step_key, filter_logits(last_logits, temperature, top_k))
        carry, logits = model.apply(params, carry, token[None])
        return (carry, logits[0]), token.astype(jnp.int32)

    _, tokens = jax.lax.scan(body, (carry, logits[-1]), jax.random.split(key, length))
    return tokens.T
