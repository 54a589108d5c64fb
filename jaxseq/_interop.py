"""Interoperability: jaxseq params to and from PyTorch, flax.linen, flax.nnx and equinox.

Every conversion is an exact re-arrangement (transposes, concatenations, and the sum of
the two biases that PyTorch keeps separately where they only ever appear added together),
so a round trip jaxseq -> peer -> jaxseq gives back the same numbers. None of the peers is
imported here: the converters read and write nested dicts of arrays (NumPy or JAX), or
read the arrays off a module object by attribute.

In:

* ``from_torch_state_dict``: a ``torch.nn.RNN``/``LSTM``/``GRU`` state_dict (multi-layer,
  bidirectional) -> ``jaxseq.stack`` params.
* ``from_flax_linen_params``: linen ``SimpleCell``/``LSTMCell``/``OptimizedLSTMCell``/
  ``GRUCell`` params -> cell params.
* ``from_flax_nnx``: an ``nnx.SimpleCell``/``LSTMCell``/``OptimizedLSTMCell``/``GRUCell``
  (the module, or its ``nnx.state``) -> cell params.
* ``from_equinox``: an ``equinox.nn.LSTMCell``/``GRUCell`` (or its arrays) -> cell params.

Out (a clear ``ValueError`` naming what the target cannot hold, e.g. the reset-before GRU
of Cho et al., ``reset_after=False``, which none of these frameworks has):

* ``to_torch_state_dict``: ``jaxseq.stack`` params -> a state_dict that
  ``torch.nn.RNN/LSTM/GRU.load_state_dict`` accepts.
* ``to_flax_linen_params``, ``to_flax_nnx_state``, ``to_equinox_arrays``: cell params ->
  the peer's parameter tree (``jaxseq.nnx.to_flax_nnx`` builds the nnx module itself).

The third piece, ``FlaxCell`` (a jaxseq cell inside ``flax.linen.RNN``), lives in
``jaxseq/_linen.py`` and the NNX modules in ``jaxseq/nnx.py``, so that only their users
import flax.
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


def _torch_arrays(state_dict: Mapping[str, Any], prefix: str) -> dict:
    """``{(kind, layer, reverse): array}`` from the keys under ``prefix``; other keys raise."""
    arrays: dict[tuple[str, int, int], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        match = _TORCH_KEY.match(key[len(prefix) :])
        if match is None:
            unexpected.append(key)
            continue
        kind, layer, reverse = match.group(1), int(match.group(2)), match.group(3) is not None
        arrays[(kind, layer, int(reverse))] = np.asarray(value)
    if unexpected:
        hint = (
            " (an LSTM with proj_size > 0 is not supported)"
            if any("weight_hr" in k for k in unexpected)
            else ""
        )
        raise ValueError(f"unexpected state_dict keys {sorted(unexpected)}{hint}")
    if not arrays:
        raise ValueError(f"no recurrent weights found in the state_dict (prefix {prefix!r})")
    return arrays


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
    arrays = _torch_arrays(state_dict, prefix)

    found_layers = 1 + max(layer for _, layer, _ in arrays)
    found_bidirectional = any(d == 1 for _, _, d in arrays)
    if num_layers is not None and num_layers != found_layers:
        raise ValueError(f"num_layers={num_layers} but the state_dict has {found_layers} layers")
    if bidirectional is not None and bidirectional != found_bidirectional:
        raise ValueError(
            f"bidirectional={bidirectional} but the state_dict "
            f"{'has' if found_bidirectional else 'has no'} *_reverse weights"
        )
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
        raise ValueError(
            f"{prefix}weight_ih_l0 has shape {w0.shape}; a {cell_name} needs "
            f"({gates}*hidden_size, input_size)"
        )
    H, F = w0.shape[0] // gates, w0.shape[1]
    cast = (lambda a: jnp.asarray(a, dtype)) if dtype is not None else jnp.asarray

    def get(kind, layer, d, shape):
        a = arrays[(kind, layer, d)]
        if a.shape != shape:
            raise ValueError(
                f"{prefix}{kind}_l{layer}{'_reverse' if d else ''} has shape "
                f"{a.shape}, expected {shape} for a {cell_name} with "
                f"hidden_size={H}"
            )
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
                b = np.concatenate([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]])
                params = GRUParams(cast(w_ih), cast(w_hh), cast(b), cast(b_hh[2 * H :]))
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
        raise ValueError(
            f"linen params with submodules {sorted(names)} match no supported "
            "cell (SimpleCell: i, h; LSTMCell: ii..ho; GRUCell: ir..hn)"
        )
    if cell_name is not None and cell_name != found:
        raise ValueError(f"cell_name={cell_name!r} but the params are those of a {found}")

    def dense(name, bias):
        sub = dict(params[name])
        if "kernel" not in sub or (bias and "bias" not in sub):
            raise ValueError(
                f"linen submodule {name!r} lacks its "
                f"{'kernel and bias' if bias else 'kernel'}: has {sorted(sub)}"
            )
        return jnp.asarray(sub["kernel"]), (jnp.asarray(sub["bias"]) if bias else None)

    if found == "rnn":
        w_ih, b = dense("i", True)
        w_hh, _ = dense("h", False)
        out = RNNParams(w_ih, w_hh, b)
    elif found == "lstm":
        gates = "ifgo"
        w_ih = jnp.concatenate([dense("i" + g, False)[0] for g in gates], axis=1)
        hs = [dense("h" + g, True) for g in gates]
        out = LSTMParams(
            w_ih, jnp.concatenate([w for w, _ in hs], axis=1), jnp.concatenate([b for _, b in hs])
        )
    else:
        xs = [dense("i" + g, True) for g in "rzn"]
        w_hh = jnp.concatenate([dense("h" + g, False)[0] for g in "rzn"], axis=1)
        _, b_hn = dense("hn", True)
        out = GRUParams(
            jnp.concatenate([w for w, _ in xs], axis=1),
            w_hh,
            jnp.concatenate([b for _, b in xs]),
            b_hn,
        )
    H = out.w_hh.shape[0]
    G = _NUM_GATES[found]
    if out.w_hh.shape != (H, G * H) or out.w_ih.shape[1] != G * H or out.b.shape != (G * H,):
        raise ValueError(
            f"linen {found} params have inconsistent shapes: w_ih "
            f"{out.w_ih.shape}, w_hh {out.w_hh.shape}, b {out.b.shape}"
        )
    return out


# --------------------------------------------------------------------------------------
# shared by the converters below
# --------------------------------------------------------------------------------------

_CELL_PARAMS = (RNNParams, LSTMParams, GRUParams)


def _is_cell_params(x) -> bool:
    return isinstance(x, _CELL_PARAMS)


def _kind(cell, params, target: str) -> str:
    """``"rnn"``, ``"lstm"`` or ``"gru"``: the cell, checked to be one ``target`` can hold."""
    name = getattr(cell, "name", None)
    if name not in _NUM_GATES:
        raise ValueError(
            f"{target} has no counterpart of the {name!r} cell; only jaxseq's "
            f"rnn, lstm and gru cells convert"
        )
    if name == "gru" and (
        cell.kernel == "gru_cho" or (isinstance(params, GRUParams) and params.b_hn is None)
    ):
        raise ValueError(
            f"{target} cannot express jaxseq.gru(H, reset_after=False), the reset-before GRU "
            f"of Cho et al. 2014 (r multiplies h before W_hn); its GRU is the reset-after "
            f"form (cuDNN/PyTorch), jaxseq.gru(H, reset_after=True)"
        )
    if not isinstance(params, _PARAM_TYPES[name]):
        raise ValueError(
            f"params must be a {_PARAM_TYPES[name].__name__} for the {name!r} "
            f"cell, got {type(params).__name__}"
        )
    return name


def _np(a) -> np.ndarray:
    """A NumPy array from an array, or from an nnx ``Variable`` (its value)."""
    if hasattr(a, "get_value"):
        return np.asarray(a.get_value())
    return np.asarray(getattr(a, "value", a))


def _plain(tree) -> Any:
    """Nested mappings (dicts, ``nnx.State``) as nested dicts with NumPy leaves."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return _np(tree)


# --------------------------------------------------------------------------------------
# jaxseq.stack params -> PyTorch state_dict
# --------------------------------------------------------------------------------------


def to_torch_state_dict(params, cell, *, prefix: str = "", as_numpy: bool = False) -> dict:
    """The ``state_dict`` of ``torch.nn.RNN``/``LSTM``/``GRU`` that computes these params.

    The inverse of ``from_torch_state_dict``: every matrix is transposed to PyTorch's
    ``(out, in)``, gate order unchanged (LSTM ``i, f, g, o``; GRU ``r, z, n``). jaxseq keeps
    the summed bias ``b`` (``b_ih + b_hh``) because the two only ever appear added; it goes
    out whole in ``bias_ih`` with zeros in ``bias_hh``, which PyTorch adds back to the same
    number, so the module computes exactly jaxseq's function. The GRU's ``b_hn``, which sits
    inside ``r * (.)``, goes to the ``n`` block of ``bias_hh``:
    ``bias_ih = b = [b_r, b_z, b_in]``, ``bias_hh = [0, 0, b_hn]``.

    Load it with ``module.load_state_dict(sd)`` into a module built as
    ``torch.nn.GRU(F, H, num_layers, bidirectional=..., batch_first=...)`` (the layout of
    the input does not change the weights); a ``jaxseq.rnn(H, activation="relu")`` needs
    ``torch.nn.RNN(..., nonlinearity="relu")``, which the state_dict does not record.
    bfloat16 params come out as bfloat16 tensors (float32 NumPy arrays with ``as_numpy``).

    Args:
      params: the params of ``jaxseq.stack(cell, num_layers, bidirectional=...)``: a tuple
        with one entry per layer, each the cell's params or a ``(forward, backward)`` pair;
        a single cell's params stand for one layer.
      cell: the jaxseq ``Cell`` (``rnn``, ``lstm`` or ``gru`` with ``reset_after=True``), or
        the ``Stack`` (whose layer count and directions are then checked too).
      prefix: put before every key (e.g. ``"rnn."`` for a submodule named ``rnn``).
      as_numpy: return NumPy arrays instead of ``torch.Tensor`` s (PyTorch is imported
        only when this is False, which ``load_state_dict`` needs).

    Returns:
      ``{prefix + "weight_ih_l0": (G*H, F), "weight_hh_l0": (G*H, H), "bias_ih_l0": (G*H,),
      "bias_hh_l0": (G*H,), ..., "*_reverse" ...}`` in PyTorch's own key order.

    Raises:
      ValueError: a cell PyTorch has no counterpart of (Cho's GRU, minGRU, minLSTM),
        params of another cell, layers whose shapes do not chain, or a ``Stack`` whose
        configuration disagrees with the params.
      ImportError: PyTorch is not installed and ``as_numpy`` is False.
    """
    stack_info = cell if hasattr(cell, "num_layers") and hasattr(cell, "cell") else None
    if stack_info is not None:
        cell = stack_info.cell
    layers = (params,) if _is_cell_params(params) else tuple(params)
    if not layers:
        raise ValueError("params holds no layers")
    pairs = [(layer,) if _is_cell_params(layer) else tuple(layer) for layer in layers]
    directions = len(pairs[0])
    if directions not in (1, 2) or any(len(p) != directions for p in pairs):
        raise ValueError(
            f"every layer must be the cell's params or a (forward, backward) "
            f"pair, got {[len(p) for p in pairs]} entries per layer"
        )
    if stack_info is not None and (stack_info.num_layers, stack_info.bidirectional) != (
        len(pairs),
        directions == 2,
    ):
        raise ValueError(
            f"the Stack has {stack_info.num_layers} layers, bidirectional="
            f"{stack_info.bidirectional}, but params has {len(pairs)} layers "
            f"with {directions} direction(s)"
        )
    name = _kind(cell, pairs[0][0], "PyTorch")
    G = _NUM_GATES[name]
    H = _np(pairs[0][0].w_hh).shape[0]
    F = _np(pairs[0][0].w_ih).shape[0]
    sd: dict[str, np.ndarray] = {}
    for layer, pair in enumerate(pairs):
        in_size = F if layer == 0 else H * directions
        for d, p in enumerate(pair):
            _kind(cell, p, "PyTorch")
            w_ih, w_hh, b = _np(p.w_ih), _np(p.w_hh), _np(p.b)
            where = f"layer {layer}{' (backward)' if d else ''}"
            if w_ih.shape != (in_size, G * H) or w_hh.shape != (H, G * H) or b.shape != (G * H,):
                raise ValueError(
                    f"{where}: w_ih {w_ih.shape}, w_hh {w_hh.shape}, b {b.shape}; "
                    f"expected ({in_size}, {G * H}), ({H}, {G * H}), ({G * H},)"
                )
            if name == "gru":
                b_hh = np.concatenate([np.zeros((2 * H,), b.dtype), _np(p.b_hn)])
            else:
                b_hh = np.zeros_like(b)
            suffix = f"_l{layer}{'_reverse' if d else ''}"
            sd[f"{prefix}weight_ih{suffix}"] = np.ascontiguousarray(w_ih.T)
            sd[f"{prefix}weight_hh{suffix}"] = np.ascontiguousarray(w_hh.T)
            sd[f"{prefix}bias_ih{suffix}"] = b
            sd[f"{prefix}bias_hh{suffix}"] = b_hh
    if as_numpy:
        return {
            k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in sd.items()
        }
    try:
        import torch
    except ImportError as e:  # torch is optional: jaxseq never needs it otherwise
        raise ImportError(
            "to_torch_state_dict needs PyTorch for tensors (pip install torch), "
            "or pass as_numpy=True"
        ) from e

    def tensor(a: np.ndarray):
        if a.dtype.name == "bfloat16":  # NumPy has no bfloat16 for torch.from_numpy
            return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(a))

    return {k: tensor(v) for k, v in sd.items()}


# --------------------------------------------------------------------------------------
# jaxseq cell params -> flax.linen cell params
# --------------------------------------------------------------------------------------

_LINEN_TARGETS = {
    "rnn": ("SimpleCell",),
    "lstm": ("LSTMCell", "OptimizedLSTMCell"),
    "gru": ("GRUCell",),
}


def _check_target(name: str, target: str | None, framework: str) -> str:
    allowed = _LINEN_TARGETS[name]
    if target is None:
        return allowed[0]
    if target not in allowed:
        raise ValueError(
            f"target={target!r} cannot hold a jaxseq {name} cell in {framework}; "
            f"use {' or '.join(map(repr, allowed))}"
        )
    return target


def to_flax_linen_params(params, cell, target: str | None = None) -> dict:
    """The params of the flax.linen cell that computes these jaxseq params.

    The inverse of ``from_flax_linen_params``: the fused matrices are cut into linen's one
    ``Dense`` per gate and side. linen's LSTM has biases on the recurrent side only (flax
    issue #3746) and its GRU has no ``b_hr``, ``b_hz`` (only ``b_ir``, ``b_iz``, ``b_in``
    and ``b_hn``), which is exactly what jaxseq's summed bias needs: ``b``'s blocks go to
    ``hi, hf, hg, ho`` (LSTM) or ``ir, iz, in`` (GRU) and ``b_hn`` to ``hn``. linen cannot
    express the Cho GRU (``reset_after=False``).

    Args:
      params: ``RNNParams``, ``LSTMParams`` or ``GRUParams``.
      cell: the jaxseq ``Cell`` they belong to.
      target: ``"SimpleCell"`` (rnn), ``"LSTMCell"`` or ``"OptimizedLSTMCell"`` (lstm; the
        two share one param layout), ``"GRUCell"`` (gru); None picks the first.

    Returns:
      The cell's own param dict, e.g. for a GRU ``{"ir": {"kernel": (F, H), "bias": (H,)},
      ..., "hn": {"kernel": (H, H), "bias": (H,)}}``; wrap it as ``{"params": d}`` for the
      bare cell or ``{"params": {"cell": d}}`` for ``nn.RNN(cell)``. A relu
      ``jaxseq.rnn`` needs ``nn.SimpleCell(H, activation_fn=nn.relu)``.

    Raises:
      ValueError: a cell linen cannot express, or a ``target`` that does not fit the cell.
    """
    name = _kind(cell, params, "flax.linen")
    _check_target(name, target, "flax.linen")
    H = params.w_hh.shape[0]
    w_ih, w_hh, b = jnp.asarray(params.w_ih), jnp.asarray(params.w_hh), jnp.asarray(params.b)
    block = lambda a, k: a[..., k * H : (k + 1) * H]
    if name == "rnn":
        return {"i": {"kernel": w_ih, "bias": b}, "h": {"kernel": w_hh}}
    if name == "lstm":
        out = {}
        for k, g in enumerate("ifgo"):
            out["i" + g] = {"kernel": block(w_ih, k)}
            out["h" + g] = {"kernel": block(w_hh, k), "bias": block(b, k)}
        return out
    out = {}
    for k, g in enumerate("rzn"):
        out["i" + g] = {"kernel": block(w_ih, k), "bias": block(b, k)}
        out["h" + g] = {"kernel": block(w_hh, k)}
    out["hn"]["bias"] = jnp.asarray(params.b_hn)
    return out


# --------------------------------------------------------------------------------------
# flax.nnx cells <-> jaxseq cell params
# --------------------------------------------------------------------------------------

# The name PR google/flax#5595 gives nnx.GRUCell's missing b_hn (issue #5594); a Flax whose
# GRUCell has it carries it in the state under this key.
NNX_HN_BIAS = "hn_bias"
_NNX_LSTM = {"ii", "if_", "ig", "io", "hi", "hf", "hg", "ho"}


def from_flax_nnx(cell_or_state, cell_name: str | None = None):
    """Converts an ``nnx.SimpleCell``/``LSTMCell``/``OptimizedLSTMCell``/``GRUCell``.

    nnx fuses differently from linen: ``SimpleCell``, ``OptimizedLSTMCell`` and
    ``GRUCell`` hold one ``dense_i`` and one ``dense_h`` (kernels ``(in, G*H)`` in jaxseq's
    orientation and gate order), ``LSTMCell`` one ``Linear`` per gate and side
    (``ii, if_, ig, io, hi, hf, hg, ho``). Biases:

    * ``SimpleCell``: ``b = dense_i.bias``. Use ``jaxseq.rnn(H)`` (or
      ``activation="relu"`` for a cell built with ``activation_fn=nnx.relu``);
      ``residual=True`` has no jaxseq counterpart and raises.
    * ``LSTMCell``/``OptimizedLSTMCell`` (recurrent-side biases only):
      ``b = [hi.bias, hf.bias, hg.bias, ho.bias]`` or ``dense_h.bias``. Use ``jaxseq.lstm``.
    * ``GRUCell``: ``b = dense_i.bias``; ``b_hn`` is the cell's ``hn_bias`` where the Flax
      version has one (google/flax#5595), else zeros: that GRUCell computes
      ``n = tanh(x W_in + b_in + r * (h W_hn))`` (flax issue #5594), which is jaxseq's GRU
      with ``b_hn = 0``. Use ``jaxseq.gru(H)``.

    Args:
      cell_or_state: the nnx cell module, or its params state (``nnx.state(cell,
        nnx.Param)``, ``nnx.to_pure_dict`` of it, or any nested dict of arrays).
      cell_name: ``"rnn"``, ``"lstm"`` or ``"gru"`` to check against; inferred when None.

    Returns:
      ``RNNParams``, ``LSTMParams`` or ``GRUParams`` (NumPy-backed JAX arrays).

    Raises:
      ValueError: a layout that is none of the four cells, shapes that do not fit,
        ``residual=True``, or a cell other than ``cell_name``.
    """
    state = cell_or_state
    if not hasattr(state, "items"):
        # A module: flax is already imported by whoever built it.
        from flax import nnx

        if getattr(state, "residual", False):
            raise ValueError(
                "nnx.SimpleCell(residual=True) adds h inside the activation; "
                "jaxseq.rnn has no such term"
            )
        state = nnx.state(state, nnx.Param)
    tree = _plain(state)
    names = set(tree)

    def get(path):
        node = tree
        for key in path:
            if not hasattr(node, "items") or key not in node:
                raise ValueError(f"nnx cell state lacks {'/'.join(path)}; it has {sorted(tree)}")
            node = node[key]
        return jnp.asarray(node)

    if names == _NNX_LSTM:
        found = "lstm"
        w_ih = jnp.concatenate([get(("i" + g, "kernel")) for g in ("i", "f_", "g", "o")], 1)
        w_hh = jnp.concatenate([get(("h" + g, "kernel")) for g in "ifgo"], 1)
        out = LSTMParams(w_ih, w_hh, jnp.concatenate([get(("h" + g, "bias")) for g in "ifgo"]))
    elif names in ({"dense_i", "dense_h"}, {"dense_i", "dense_h", NNX_HN_BIAS}):
        w_hh = get(("dense_h", "kernel"))
        H = w_hh.shape[0]
        G = w_hh.shape[1] // H if w_hh.ndim == 2 and H else 0
        found = {1: "rnn", 4: "lstm", 3: "gru"}.get(G)
        if found is None or w_hh.shape[1] != G * H:
            raise ValueError(
                f"nnx dense_h kernel has shape {tuple(w_hh.shape)}: not (H, H) "
                f"(SimpleCell), (H, 3H) (GRUCell) or (H, 4H) (OptimizedLSTMCell)"
            )
        w_ih = get(("dense_i", "kernel"))
        if found == "rnn":
            out = RNNParams(w_ih, w_hh, get(("dense_i", "bias")))
        elif found == "lstm":
            out = LSTMParams(w_ih, w_hh, get(("dense_h", "bias")))
        else:
            b_hn = get((NNX_HN_BIAS,)) if NNX_HN_BIAS in names else jnp.zeros((H,), w_hh.dtype)
            out = GRUParams(w_ih, w_hh, get(("dense_i", "bias")), b_hn)
    else:
        raise ValueError(
            f"nnx cell state with entries {sorted(names)} matches no supported "
            f"cell (SimpleCell, OptimizedLSTMCell, GRUCell: dense_i, dense_h; "
            f"LSTMCell: ii..ho)"
        )
    if cell_name is not None and cell_name != found:
        raise ValueError(f"cell_name={cell_name!r} but the state is that of a {found}")
    H, G = out.w_hh.shape[0], _NUM_GATES[found]
    if (
        out.w_hh.shape != (H, G * H)
        or out.w_ih.ndim != 2
        or out.w_ih.shape[1] != G * H
        or out.b.shape != (G * H,)
        or (found == "gru" and out.b_hn.shape != (H,))
    ):
        raise ValueError(
            f"nnx {found} state has inconsistent shapes: w_ih "
            f"{out.w_ih.shape}, w_hh {out.w_hh.shape}, b {out.b.shape}"
        )
    return out


def to_flax_nnx_state(params, cell, target: str | None = None, *, hn_bias: bool = False) -> dict:
    """The params state (a nested dict of arrays) of the nnx cell that computes ``params``.

    The inverse of ``from_flax_nnx``; ``jaxseq.nnx.to_flax_nnx`` builds the module and
    loads this into it. nnx's LSTM cells, like linen's, bias the recurrent side only, which
    holds jaxseq's summed ``b`` exactly. An ``nnx.GRUCell`` without ``hn_bias`` (flax
    0.12, issue #5594) holds a jaxseq GRU only when ``b_hn`` is zero; otherwise this raises.

    Args:
      params: ``RNNParams``, ``LSTMParams`` or ``GRUParams``.
      cell: the jaxseq ``Cell`` they belong to.
      target: ``"SimpleCell"`` (rnn), ``"LSTMCell"`` or ``"OptimizedLSTMCell"`` (lstm),
        ``"GRUCell"`` (gru); None picks ``SimpleCell``, ``LSTMCell``, ``GRUCell``.
      hn_bias: whether the target ``GRUCell`` has the ``hn_bias`` parameter (flax#5595).

    Returns:
      e.g. ``{"dense_i": {"kernel": (F, 3H), "bias": (3H,)}, "dense_h": {"kernel":
      (H, 3H)}}`` (plus ``"hn_bias": (H,)`` with ``hn_bias=True``) for a GRU, ready for
      ``nnx.replace_by_pure_dict``.

    Raises:
      ValueError: a cell nnx cannot express (Cho's GRU; a non-zero ``b_hn`` into a
        ``GRUCell`` without ``hn_bias``), or a ``target`` that does not fit the cell.
    """
    name = _kind(cell, params, "flax.nnx")
    target = _check_target(name, target, "flax.nnx")
    H = params.w_hh.shape[0]
    w_ih, w_hh, b = jnp.asarray(params.w_ih), jnp.asarray(params.w_hh), jnp.asarray(params.b)
    if target == "LSTMCell":
        block = lambda a, k: a[..., k * H : (k + 1) * H]
        out = {}
        for k, g in enumerate(("i", "f_", "g", "o")):
            out["i" + g] = {"kernel": block(w_ih, k)}
            out["h" + g[0]] = {"kernel": block(w_hh, k), "bias": block(b, k)}
        return out
    if target == "OptimizedLSTMCell":
        return {"dense_i": {"kernel": w_ih}, "dense_h": {"kernel": w_hh, "bias": b}}
    out = {"dense_i": {"kernel": w_ih, "bias": b}, "dense_h": {"kernel": w_hh}}
    if name == "gru":
        if hn_bias:
            out[NNX_HN_BIAS] = jnp.asarray(params.b_hn)
        elif np.any(_np(params.b_hn) != 0):
            raise ValueError(
                "this nnx.GRUCell has no b_hn (the recurrent bias of the candidate n, inside "
                "r * (h W_hn + b_hn); flax issue #5594), and these params have a non-zero "
                "b_hn, so it cannot compute them; use a Flax whose GRUCell has hn_bias, "
                "jaxseq.nnx.Cell, or flax.linen.GRUCell (which has b_hn)"
            )
    return out


# --------------------------------------------------------------------------------------
# equinox cells <-> jaxseq cell params
# --------------------------------------------------------------------------------------


def from_equinox(cell_or_arrays, cell_name: str | None = None):
    """Converts an ``equinox.nn.LSTMCell`` or ``equinox.nn.GRUCell`` (equinox is not needed).

    equinox stores PyTorch's orientation, ``weight_ih: (G*H, F)``, ``weight_hh: (G*H, H)``,
    and gate order (LSTM ``i, f, g, o``; GRU ``r, z, n``); the matrices are transposed. Its
    LSTM has one ``bias: (4H,)``, jaxseq's ``b``; its GRU has ``bias: (3H,)``, exactly
    jaxseq's ``b = [b_r, b_z, b_in]``, and ``bias_n: (H,)``, jaxseq's ``b_hn`` (which is why
    its bias shapes differ from PyTorch's ``bias_ih``/``bias_hh``, equinox issue #1003:
    both hold the same function). ``use_bias=False`` (``bias is None``) gives zeros.

    Args:
      cell_or_arrays: the equinox cell (its attributes are read), or a mapping with
        ``weight_ih``, ``weight_hh``, ``bias`` and, for a GRU, ``bias_n``.
      cell_name: ``"lstm"`` or ``"gru"`` to check against; inferred from the shapes.

    Returns:
      ``LSTMParams`` (use ``jaxseq.lstm(H)``) or ``GRUParams`` (``jaxseq.gru(H)``). The
      equinox LSTM carry ``(h, c)`` is ``jaxseq.LSTMState(h, c)``.

    Raises:
      ValueError: missing weights, or shapes of neither cell.
    """
    if isinstance(cell_or_arrays, Mapping):
        get = lambda k: cell_or_arrays.get(k)
    else:
        get = lambda k: getattr(cell_or_arrays, k, None)
    if get("weight_ih") is None or get("weight_hh") is None:
        raise ValueError("an equinox cell needs weight_ih and weight_hh")
    w_ih, w_hh = _np(get("weight_ih")), _np(get("weight_hh"))
    H = w_hh.shape[-1] if w_hh.ndim == 2 else 0
    G = w_hh.shape[0] // H if H else 0
    found = {4: "lstm", 3: "gru"}.get(G)
    if found is None or w_hh.shape[0] != G * H or w_ih.ndim != 2 or w_ih.shape[0] != G * H:
        raise ValueError(
            f"equinox weight_ih {w_ih.shape}, weight_hh {w_hh.shape} are those of "
            f"neither an LSTMCell (4H rows) nor a GRUCell (3H rows)"
        )
    if cell_name is not None and cell_name != found:
        raise ValueError(f"cell_name={cell_name!r} but the arrays are those of a {found}")
    bias = get("bias")
    b = jnp.asarray(_np(bias)) if bias is not None else jnp.zeros((G * H,), w_hh.dtype)
    if b.shape != (G * H,):
        raise ValueError(f"equinox bias has shape {b.shape}, expected ({G * H},)")
    if found == "lstm":
        return LSTMParams(jnp.asarray(w_ih.T), jnp.asarray(w_hh.T), b)
    bias_n = get("bias_n")
    b_hn = jnp.asarray(_np(bias_n)) if bias_n is not None else jnp.zeros((H,), w_hh.dtype)
    if b_hn.shape != (H,):
        raise ValueError(f"equinox bias_n has shape {b_hn.shape}, expected ({H},)")
    return GRUParams(jnp.asarray(w_ih.T), jnp.asarray(w_hh.T), b, b_hn)


def to_equinox_arrays(params, cell) -> dict:
    """The arrays of the ``equinox.nn.LSTMCell``/``GRUCell`` that computes ``params``.

    The inverse of ``from_equinox``. Put them into a cell built with the same sizes (and
    ``use_bias=True``) with ``equinox.tree_at``::

        arrays = jaxseq.to_equinox_arrays(params, jaxseq.gru(H))
        names = ("weight_ih", "weight_hh", "bias", "bias_n")
        eqx_cell = eqx.tree_at(lambda c: [getattr(c, n) for n in names], eqx_cell,
                               [arrays[n] for n in names])

    Args:
      params: ``LSTMParams`` or ``GRUParams``.
      cell: the jaxseq ``Cell`` (``lstm``, or ``gru`` with ``reset_after=True``).

    Returns:
      ``{"weight_ih": (G*H, F), "weight_hh": (G*H, H), "bias": (G*H,)}`` plus
      ``"bias_n": (H,)`` for a GRU.

    Raises:
      ValueError: equinox has no vanilla RNN cell and no Cho GRU.
    """
    name = _kind(cell, params, "equinox")
    if name == "rnn":
        raise ValueError("equinox has no vanilla (Elman) RNN cell to hold a jaxseq rnn")
    out = {
        "weight_ih": jnp.asarray(params.w_ih).T,
        "weight_hh": jnp.asarray(params.w_hh).T,
        "bias": jnp.asarray(params.b),
    }
    if name == "gru":
        out["bias_n"] = jnp.asarray(params.b_hn)
    return out
