"""Interoperability: weights from PyTorch or flax.linen as jaxseq params.

Two independent pieces (the third, ``FlaxCell``, which runs a jaxseq cell inside
``flax.linen.RNN``, lives in ``jaxseq/_linen.py`` so that only its users import linen):

* ``from_torch_state_dict`` converts the ``state_dict`` of a ``torch.nn.RNN``,
  ``torch.nn.LSTM`` or ``torch.nn.GRU`` (as NumPy arrays) into the params of
  ``jaxseq.stack(...)``. PyTorch itself is never imported here.
* ``from_flax_linen_params`` converts the params of linen's ``SimpleCell``, ``LSTMCell``,
  ``OptimizedLSTMCell`` or ``GRUCell`` into the params of the matching jaxseq cell. It
  reads nested dicts only; flax is never imported here.

All conversions are exact re-arrangements (transposes, concatenations, and the sum of the
two biases that PyTorch keeps separately where they only ever appear added together).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxseq._cells import GRUParams, LSTMParams, RNNParams

_PARAM_TYPES = {"rnn": RNNParams, "lstm": LSTMParams, "gru": GRUParams}
_NUM_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


# --------------------------------------------------------------------------------------
# PyTorch state_dict -> jaxseq.stack params
# --------------------------------------------------------------------------------------


class TorchRNNInfo(NamedTuple):
    """What ``from_torch_state_dict`` read from a PyTorch recurrent layer's state_dict.

    Attributes:
      cell_name: ``"rnn"``, ``"lstm"`` or ``"gru"``.
      input_size: F of the first layer.
      hidden_size: H.
      num_layers: number of layers.
      bidirectional: whether ``*_reverse`` weights were present.
      bias: whether the layer had biases (``bias=False`` in PyTorch gives zeros here).
    """

    cell_name: str
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    bias: bool


_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    cell_name: str,
    *,
    num_layers: int | None = None,
    bidirectional: bool | None = None,
    prefix: str = "",
    dtype: Any = None,
) -> tuple[tuple, TorchRNNInfo]:
    """Converts a PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` state_dict to jaxseq params.

    PyTorch stores each matrix ``(out, in)`` with the gates stacked along rows in the same
    order as jaxseq (LSTM ``i, f, g, o``; GRU ``r, z, n``), so every matrix is transposed
    to jaxseq's ``(in, out)``. The two biases are summed into ``b`` wherever they only
    appear added together; for the GRU, whose PyTorch form is the reset-after one,
    ``b = [b_ir + b_hr, b_iz + b_hz, b_in]`` and ``b_hn`` is kept apart because it sits
    inside ``r * (.)``. Without biases (``bias=False``) ``b`` and ``b_hn`` are zeros.

    The layout of the result is that of ``jaxseq.stack(cell, num_layers,
    bidirectional=...).init``, so with ``params, info = from_torch_state_dict(sd, "lstm")``::

        net = jaxseq.stack(jaxseq.lstm(info.hidden_size), info.num_layers,
                           bidirectional=info.bidirectional)
        carry, ys = net.apply(params, net.initial_carry((B,)), xs)   # xs: (T, B, F)

    reproduces ``torch.nn.LSTM(..., batch_first=False)`` (PyTorch's ``h_n[2*l + d]`` is
    ``carry[l][d].h``, or ``carry[l].h`` unidirectionally). A ``nn.RNN`` built with
    ``nonlinearity="relu"`` needs ``jaxseq.rnn(H, activation="relu")``: the state_dict
    does not record it. LSTMs with ``proj_size > 0`` are not supported.

    Args:
      state_dict: key -> array (NumPy, or anything ``np.asarray`` accepts, e.g.
        ``{k: v.numpy() for k, v in module.state_dict().items()}``). Keys are
        ``weight_ih_l{k}`` ``(G*H, F_k)``, ``weight_hh_l{k}`` ``(G*H, H)``, ``bias_ih_l{k}``
        and ``bias_hh_l{k}`` ``(G*H,)``, with a ``_reverse`` suffix for the backward
        direction; G is 1, 4, 3 for rnn, lstm, gru; ``F_k`` is F for layer 0 and
        ``H * directions`` after it.
      cell_name: ``"rnn"``, ``"lstm"`` or ``"gru"``.
      num_layers: expected number of layers; inferred when None.
      bidirectional: expected direction count; inferred when None.
      prefix: only keys starting with it are read, with it removed (e.g. ``"encoder."``
        for a recurrent layer inside a larger module's state_dict); others are ignored.
      dtype: dtype of the returned arrays; None keeps each array's own.

    Returns:
      ``(params, info)``: ``params`` a tuple with one entry per layer, each the cell's
      params NamedTuple or, when bidirectional, a ``(forward, backward)`` pair; ``info`` a
      ``TorchRNNInfo``.

    Raises:
      ValueError: unknown ``cell_name``, unexpected or missing keys, a layer with only some
        of its biases, shapes that do not fit together, or ``num_layers``/``bidirectional``
        that disagree with the keys.
    """
    if cell_name not in _NUM_GATES:
        raise ValueError(f"unknown cell {cell_name!r}; choose from {', '.join(_NUM_GATES)}")
    gates = _NUM_GATES[cell_name]
    arrays: dict[tuple[str, int, int], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        match = _TORCH_KEY.match(key[len(prefix):])
        if match is None:
            unexpected.append(key)
            continue
        kind, layer, reverse = match.group(1), int(match.group(2)), match.group(3) is not None
        arrays[(kind, layer, int(reverse))] = np.asarray(value)
    if unexpected:
        hint = (" (an LSTM with proj_size > 0 is not supported)"
                if any("weight_hr" in k for k in unexpected) else "")
        raise ValueError(f"unexpected state_dict keys {sorted(unexpected)}{hint}")
    if not arrays:
        raise ValueError(f"no recurrent weights found in the state_dict (prefix {prefix!r})")

    found_layers = 1 + max(layer for _, layer, _ in arrays)
    found_bidirectional = any(d == 1 for _, _, d in arrays)
    if num_layers is not None and num_layers != found_layers:
        raise ValueError(f"num_layers={num_layers} but the state_dict has {found_layers} layers")
    if bidirectional is not None and bidirectional != found_bidirectional:
        raise ValueError(f"bidirectional={bidirectional} but the state_dict "
                         f"{'has' if found_bidirectional else 'has no'} *_reverse weights")
    directions = 2 if found_bidirectional else 1
    has_bias = any(kind.startswith("bias") for kind, _, _ in arrays)
    kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if has_bias else ())
    expected = {(k, l, d) for k in kinds for l in range(found_layers) for d in range(directions)}
    if expected != set(arrays):
        name = lambda k, l, d: f"{prefix}{k}_l{l}{'_reverse' if d else ''}"
        missing = sorted(name(*t) for t in expected - set(arrays))
        extra = sorted(name(*t) for t in set(arrays) - expected)
        raise ValueError(f"inconsistent state_dict: missing {missing}, unexpected {extra}")

    w0 = arrays[("weight_ih", 0, 0)]
    if w0.ndim != 2 or w0.shape[0] % gates:
        raise ValueError(f"{prefix}weight_ih_l0 has shape {w0.shape}; a {cell_name} needs "
                         f"({gates}*hidden_size, input_size)")
    H, F = w0.shape[0] // gates, w0.shape[1]
    cast = (lambda a: jnp.asarray(a, dtype)) if dtype is not None else jnp.asarray

    def get(kind, layer, d, shape):
        a = arrays[(kind, layer, d)]
        if a.shape != shape:
            raise ValueError(f"{prefix}{kind}_l{layer}{'_reverse' if d else ''} has shape "
                             f"{a.shape}, expected {shape} for a {cell_name} with "
                             f"hidden_size={H}")
        return a

    layers = []
    for layer in range(found_layers):
        in_size = F if layer == 0 else H * directions
        pair = []
        for d in range(directions):
            w_ih = get("weight_ih", layer, d, (gates * H, in_size)).T
            w_hh = get("weight_hh", layer, d, (gates * H, H)).T
            if has_bias:
                b_ih = get("bias_ih", layer, d, (gates * H,))
                b_hh = get("bias_hh", layer, d, (gates * H,))
            else:
                b_ih = b_hh = np.zeros((gates * H,), w_ih.dtype)
            if cell_name == "gru":
                b = np.concatenate([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]])
                params = GRUParams(cast(w_ih), cast(w_hh), cast(b), cast(b_hh[2 * H:]))
            else:
                params = _PARAM_TYPES[cell_name](cast(w_ih), cast(w_hh), cast(b_ih + b_hh))
            pair.append(params)
        layers.append(tuple(pair) if found_bidirectional else pair[0])
    info = TorchRNNInfo(cell_name, F, H, found_layers, found_bidirectional, has_bias)
    return tuple(layers), info


# --------------------------------------------------------------------------------------
# flax.linen cell params -> jaxseq cell params
# --------------------------------------------------------------------------------------

_LINEN_LAYOUTS = {
    "rnn": {"i", "h"},
    "lstm": {"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"},
    "gru": {"ir", "iz", "in", "hr", "hz", "hn"},
}


def from_flax_linen_params(params: Mapping[str, Any], cell_name: str | None = None):
    """Converts linen ``SimpleCell``/``LSTMCell``/``OptimizedLSTMCell``/``GRUCell`` params.

    linen keeps one ``Dense`` per gate and side, with kernels ``(in, H)`` already in
    jaxseq's orientation; the kernels are concatenated in jaxseq's gate order and the
    biases mapped as follows:

    * ``SimpleCell`` (``h' = tanh(x W_i + b_i + h W_h)``): ``b = i.bias``.
      ``residual=True`` and activations other than tanh have no jaxseq counterpart
      beyond ``jaxseq.rnn(H, activation="relu")``.
    * ``LSTMCell``/``OptimizedLSTMCell`` (biases on the recurrent side only):
      ``b = [hi.bias, hf.bias, hg.bias, ho.bias]``. Use ``jaxseq.lstm(H)``.
    * ``GRUCell`` (reset-after; input biases on ``ir, iz, in``, recurrent bias on ``hn``):
      ``b = [ir.bias, iz.bias, in.bias]``, ``b_hn = hn.bias``. Use
      ``jaxseq.gru(H, reset_after=True)``.

    Args:
      params: the cell's params: ``{"i": {"kernel": (F, H), "bias": (H,)}, ...}``; a
        ``{"params": ...}`` variables dict, or the ``{"cell": ...}`` params of an
        ``nn.RNN`` around the cell, is unwrapped first.
      cell_name: ``"rnn"``, ``"lstm"`` or ``"gru"`` to check against; inferred from the
        submodule names when None.

    Returns:
      ``RNNParams``, ``LSTMParams`` or ``GRUParams``.

    Raises:
      ValueError: the names do not match any supported cell (or not ``cell_name``), or a
        kernel or bias is missing or of the wrong shape.
    """
    params = dict(params)
    for wrapper in ("params", "cell"):
        if set(params) == {wrapper}:
            params = dict(params[wrapper])
    names = set(params)
    found = next((n for n, layout in _LINEN_LAYOUTS.items() if layout == names), None)
    if found is None:
        raise ValueError(f"linen params with submodules {sorted(names)} match no supported "
                         "cell (SimpleCell: i, h; LSTMCell: ii..ho; GRUCell: ir..hn)")
    if cell_name is not None and cell_name != found:
        raise ValueError(f"cell_name={cell_name!r} but the params are those of a {found}")

    def dense(name, bias):
        sub = dict(params[name])
        if "kernel" not in sub or (bias and "bias" not in sub):
            raise ValueError(f"linen submodule {name!r} lacks its "
                             f"{'kernel and bias' if bias else 'kernel'}: has {sorted(sub)}")
        return jnp.asarray(sub["kernel"]), (jnp.asarray(sub["bias"]) if bias else None)

    if found == "rnn":
        w_ih, b = dense("i", True)
        w_hh, _ = dense("h", False)
        out = RNNParams(w_ih, w_hh, b)
    elif found == "lstm":
        gates = "ifgo"
        w_ih = jnp.concatenate([dense("i" + g, False)[0] for g in gates], axis=1)
        hs = [dense("h" + g, True) for g in gates]
        out = LSTMParams(w_ih, jnp.concatenate([w for w, _ in hs], axis=1),
                         jnp.concatenate([b for _, b in hs]))
    else:
        xs = [dense("i" + g, True) for g in "rzn"]
        w_hh = jnp.concatenate([dense("h" + g, False)[0] for g in "rzn"], axis=1)
        _, b_hn = dense("hn", True)
        out = GRUParams(jnp.concatenate([w for w, _ in xs], axis=1), w_hh,
                        jnp.concatenate([b for _, b in xs]), b_hn)
    H = out.w_hh.shape[0]
    G = _NUM_GATES[found]
    if out.w_hh.shape != (H, G * H) or out.w_ih.shape[1] != G * H or out.b.shape != (G * H,):
        raise ValueError(f"linen {found} params have inconsistent shapes: w_ih "
                         f"{out.w_ih.shape}, w_hh {out.w_hh.shape}, b {out.b.shape}")
    return out
