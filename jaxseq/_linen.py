"""``FlaxCell``: a jaxseq cell as a ``flax.linen`` recurrent cell.

Kept apart from the rest of the library because it is the one piece that needs
``flax.linen``: ``import jaxseq`` does not import this module, ``jaxseq.FlaxCell`` does
(``jaxseq.__getattr__``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxseq._cells import Array, Cell, PRNGKey
from jaxseq._interop import _PARAM_TYPES


class FlaxCell(nn.RNNCellBase):
    """A jaxseq ``Cell`` as a ``flax.linen`` recurrent cell, for use inside ``nn.RNN``.

    The jaxseq cell's ``init`` creates the parameters (one linen param per field of the
    cell's params NamedTuple, named ``w_ih``, ``w_hh``, ``b`` and, for a reset-after GRU,
    ``b_hn``) and its ``apply`` computes each step, so the numbers are exactly those of
    ``jaxseq.unroll`` with the same params::

        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxseq
        >>> from jaxseq import FlaxCell
        >>> layer = nn.RNN(FlaxCell(jaxseq.gru(16)))
        >>> xs = jnp.ones((4, 10, 8))                   # (batch, time, F)
        >>> variables = layer.init(jax.random.key(0), xs)
        >>> layer.apply(variables, xs).shape
        (4, 10, 16)

    ``nn.RNN`` calls ``apply`` once per step, so the input projection is not hoisted out of
    the loop as in ``jaxseq.unroll``; use the adapter to combine with linen code, and
    ``jaxseq.unroll`` where speed matters.

    Attributes:
      cell: the jaxseq cell, e.g. ``jaxseq.lstm(128)``.
      carry_dtype: dtype of the zero carry made by ``initialize_carry``.
    """

    cell: Cell
    carry_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, inputs: Array):
        """One step.

        Args:
          carry: the jaxseq carry, leaves ``(*batch, H)`` (``LSTMState(h, c)`` for an LSTM).
          inputs: ``(*batch, F)``.

        Returns:
          ``(new_carry, y)`` with ``y: (*batch, H)``.
        """
        params = self._params(inputs.shape[-1])
        return self.cell.apply(params, carry, inputs)

    def _params(self, input_size: int):
        template = jax.eval_shape(lambda key: self.cell.init(key, input_size), jax.random.key(0))
        fields = {}
        for name, shape in template._asdict().items():
            if shape is None:
                fields[name] = None
                continue
            # Each field is drawn from its own call of the cell's init: the fields are
            # independent, and each keeps the distribution that init gives it.
            fields[name] = self.param(
                name, lambda key, n=name: getattr(self.cell.init(key, input_size), n)
            )
        return type(template)(**fields)

    @nn.nowrap
    def initialize_carry(self, rng: PRNGKey, input_shape: tuple[int, ...]):
        """The zero carry for inputs of shape ``input_shape = (*batch, F)``.

        Args:
          rng: unused (the carry is zeros); part of linen's interface.
          input_shape: ``(*batch, F)``, the shape of one step's input.

        Returns:
          ``cell.initial_carry(batch)``, leaves ``(*batch, H)``.
        """
        del rng
        return self.cell.initial_carry(tuple(input_shape[:-1]), self.carry_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1

    @nn.nowrap
    def to_jaxseq_params(self, params: Mapping[str, Any]):
        """The jaxseq params held in this module's linen params.

        Args:
          params: this cell's own param dict (``variables["params"]["cell"]`` when the
            cell sits in ``nn.RNN``), with entries ``w_ih``, ``w_hh``, ``b`` (and ``b_hn``).

        Returns:
          The cell's params NamedTuple (``RNNParams``, ``LSTMParams`` or ``GRUParams``),
          usable with ``jaxseq.unroll(cell, ...)``.
        """
        params = dict(params)
        if self.cell.name not in _PARAM_TYPES:
            raise ValueError(
                f"to_jaxseq_params knows the rnn, lstm and gru cells, not {self.cell.name!r}"
            )
        param_type = _PARAM_TYPES[self.cell.name]
        return param_type(**{name: params.get(name) for name in param_type._fields})

    @nn.nowrap
    def from_jaxseq_params(self, params) -> dict[str, Array]:
        """The inverse of ``to_jaxseq_params``: a linen param dict for this cell.

        Args:
          params: the cell's params NamedTuple.

        Returns:
          ``{"w_ih": ..., "w_hh": ..., "b": ...}`` (and ``"b_hn"`` where it is not None).
        """
        return {k: v for k, v in params._asdict().items() if v is not None}
