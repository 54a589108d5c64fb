"""An independent NumPy reference for every jaxseq cell, written from the published equations.

Nothing here imports jaxseq. Parameters are kept the way the papers write them: one
``(H, F)`` input matrix ``W_x*``, one ``(H, H)`` recurrent matrix ``W_h*`` and two biases
``b_x*``, ``b_h*`` per gate, applied as ``W x`` to column vectors (here ``x @ W.T`` so that
any leading batch axes work). ``fused`` lays them out the way jaxseq documents its fused
params, so a test that compares the two checks the gate order and orientation as well as
the arithmetic. Everything runs in float64 NumPy.

Cells and their gates (``CELL_GATES``):

* ``rnn_tanh``, ``rnn_relu``: Elman, ``h' = act(W_x x + b_x + W_h h + b_h)``.
* ``lstm``: gates ``i, f, g, o``; ``c' = f c + i g``, ``h' = o tanh(c')``.
* ``gru_reset_after``: cuDNN/PyTorch, ``n = tanh(W_xn x + b_xn + r (W_hn h + b_hn))``,
  ``h' = (1 - z) n + z h``.
* ``gru_reset_before``: Cho et al. 2014, ``h~ = tanh(W_xn x + b_xn + W_hn (r h) + b_hn)``,
  ``h' = (1 - z) h + z h~``.
"""

from __future__ import annotations

import numpy as np

CELL_GATES = {
    "rnn_tanh": "n",
    "rnn_relu": "n",
    "lstm": "ifgo",
    "gru_reset_after": "rzn",
    "gru_reset_before": "rzn",
}


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def random_params(
    rng: np.random.Generator, cell: str, input_size: int, hidden: int, scale: float = 0.5
) -> dict[str, np.ndarray]:
    """Per-gate float64 params with every entry (biases included) drawn from N(0, scale²).

    Returns:
      ``{"W_x<g>": (H, F), "W_h<g>": (H, H), "b_x<g>": (H,), "b_h<g>": (H,)}`` for each
      gate ``g`` of ``CELL_GATES[cell]``.
    """
    p = {}
    for g in CELL_GATES[cell]:
        p["W_x" + g] = scale * rng.standard_normal((hidden, input_size))
        p["W_h" + g] = scale * rng.standard_normal((hidden, hidden))
        p["b_x" + g] = scale * rng.standard_normal(hidden)
        p["b_h" + g] = scale * rng.standard_normal(hidden)
    return p


def _lin(p, side: str, g: str, v: np.ndarray) -> np.ndarray:
    return v @ p[f"W_{side}{g}"].T + p[f"b_{side}{g}"]


def step(cell: str, p: dict, carry, x: np.ndarray):
    """One step of ``cell``.

    Args:
      cell: a key of ``CELL_GATES``.
      p: params from ``random_params``.
      carry: ``h: (*batch, H)``, or ``(h, c)`` for the LSTM.
      x: ``(*batch, F)``.

    Returns:
      ``(new_carry, y)`` with ``y = h'``.
    """
    if cell in ("rnn_tanh", "rnn_relu"):
        pre = _lin(p, "x", "n", x) + _lin(p, "h", "n", carry)
        h = np.tanh(pre) if cell == "rnn_tanh" else np.maximum(pre, 0.0)
        return h, h
    if cell == "lstm":
        h, c = carry
        i = sigmoid(_lin(p, "x", "i", x) + _lin(p, "h", "i", h))
        f = sigmoid(_lin(p, "x", "f", x) + _lin(p, "h", "f", h))
        g = np.tanh(_lin(p, "x", "g", x) + _lin(p, "h", "g", h))
        o = sigmoid(_lin(p, "x", "o", x) + _lin(p, "h", "o", h))
        c = f * c + i * g
        h = o * np.tanh(c)
        return (h, c), h
    h = carry
    r = sigmoid(_lin(p, "x", "r", x) + _lin(p, "h", "r", h))
    z = sigmoid(_lin(p, "x", "z", x) + _lin(p, "h", "z", h))
    if cell == "gru_reset_after":
        n = np.tanh(_lin(p, "x", "n", x) + r * _lin(p, "h", "n", h))
        h = (1.0 - z) * n + z * h
    elif cell == "gru_reset_before":
        candidate = np.tanh(_lin(p, "x", "n", x) + _lin(p, "h", "n", r * h))
        h = (1.0 - z) * h + z * candidate
    else:
        raise ValueError(cell)
    return h, h


def run(cell: str, p: dict, carry, xs: np.ndarray, reverse: bool = False):
    """Python loop of ``step`` over ``xs: (T, *batch, F)``; returns ``(carry, ys)``."""
    T = xs.shape[0]
    ys = [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        carry, ys[t] = step(cell, p, carry, xs[t])
    return carry, np.stack(ys)


def fused(cell: str, p: dict) -> dict[str, np.ndarray]:
    """The jaxseq layout of ``p``, as documented: ``(in, out)`` matrices, gate blocks side
    by side in ``CELL_GATES`` order, biases summed into ``b`` except the reset-after GRU's
    ``b_hn``, which sits inside ``r * (.)`` and is kept apart (its input-side ``b_xn``
    stays in ``b``).

    Returns:
      ``{"w_ih": (F, G*H), "w_hh": (H, G*H), "b": (G*H,)}``, plus ``"b_hn": (H,)`` for
      ``gru_reset_after``.
    """
    gates = CELL_GATES[cell]
    out = {
        "w_ih": np.concatenate([p["W_x" + g].T for g in gates], axis=1),
        "w_hh": np.concatenate([p["W_h" + g].T for g in gates], axis=1),
    }
    if cell == "gru_reset_after":
        out["b"] = np.concatenate([p["b_xr"] + p["b_hr"], p["b_xz"] + p["b_hz"], p["b_xn"]])
        out["b_hn"] = p["b_hn"]
    else:
        out["b"] = np.concatenate([p["b_x" + g] + p["b_h" + g] for g in gates])
    return out


def torch_layout(cell: str, p: dict) -> dict[str, np.ndarray]:
    """``p`` as one layer of a PyTorch state_dict: ``(G*H, in)`` matrices, gates stacked
    on rows, two biases (only meaningful for the cells PyTorch has: rnn_*, lstm and
    gru_reset_after)."""
    gates = CELL_GATES[cell]
    return {
        "weight_ih_l0": np.concatenate([p["W_x" + g] for g in gates], axis=0),
        "weight_hh_l0": np.concatenate([p["W_h" + g] for g in gates], axis=0),
        "bias_ih_l0": np.concatenate([p["b_x" + g] for g in gates]),
        "bias_hh_l0": np.concatenate([p["b_h" + g] for g in gates]),
    }
