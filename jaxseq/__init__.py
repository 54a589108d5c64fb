"""jaxseq: pure-functional recurrent sequence models in JAX.

Cells are pure functions over explicit parameter pytrees; ``unroll`` runs one over time,
as a ``lax.scan`` with the input projection hoisted out of the loop (``impl="scan"``) or as
the cell's fused kernel with a hand-written backward pass (``impl="fused"``; ``"auto"``
picks it when the cell has one); ``stack`` builds deep and bidirectional networks.

    >>> import jax, jax.numpy as jnp, jaxseq
    >>> cell = jaxseq.lstm(32)
    >>> params = cell.init(jax.random.key(0), 8)
    >>> xs = jnp.ones((20, 4, 8))                  # (T, batch, F)
    >>> carry, ys = jaxseq.unroll(cell, params, cell.initial_carry((4,)), xs)
    >>> ys.shape
    (20, 4, 32)
"""

from jaxseq._cells import (
    CELLS,
    Cell,
    GRUParams,
    LSTMParams,
    LSTMState,
    RNNParams,
    gru,
    lstm,
    make_cell,
    mingru,
    minlstm,
    rnn,
)
from jaxseq._interop import (
    TorchRNNInfo,
    from_equinox,
    from_flax_linen_params,
    from_flax_nnx,
    from_torch_state_dict,
    to_equinox_arrays,
    to_flax_linen_params,
    to_flax_nnx_state,
    to_torch_state_dict,
)
from jaxseq._linear import linear_recurrence
from jaxseq._unroll import IMPLS, Stack, reference_unroll, stack, unroll, unroll_embedded
from jaxseq.errors import UsageError

__version__ = "0.1.0"

__all__ = [
    "CELLS",
    "Cell",
    "GRUParams",
    "LSTMParams",
    "LSTMState",
    "RNNParams",
    "Stack",
    "UsageError",
    "gru",
    "lstm",
    "make_cell",
    "reference_unroll",
    "rnn",
    "stack",
    "unroll",
]
__all__ += ["FlaxCell", "TorchRNNInfo", "from_flax_linen_params", "from_torch_state_dict"]
__all__ += ["IMPLS", "unroll_embedded"]
__all__ += ["linear_recurrence", "mingru", "minlstm"]
__all__ += [
    "from_equinox",
    "from_flax_nnx",
    "to_equinox_arrays",
    "to_flax_linen_params",
    "to_flax_nnx",
    "to_flax_nnx_state",
    "to_torch_state_dict",
]


def __getattr__(name: str):
    # PEP 562: FlaxCell needs flax.linen, so it is imported on first use, not with jaxseq.
    if name == "FlaxCell":
        from jaxseq._linen import FlaxCell

        return FlaxCell
    # jaxseq.nnx (the NNX modules) and to_flax_nnx need flax.nnx: imported on first use too.
    if name in ("nnx", "to_flax_nnx"):
        import importlib

        module = importlib.import_module("jaxseq.nnx")
        return module if name == "nnx" else module.to_flax_nnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
