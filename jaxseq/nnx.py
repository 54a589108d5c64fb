"""jaxseq as Flax NNX modules, and nnx's own cells to and from jaxseq params.

Imported only on use (``import jaxseq.nnx``): it is the one module besides
``jaxseq/_linen.py`` that imports flax. Three modules, each an ``nnx.Module`` whose
``nnx.Param`` s hold exactly the fields of jaxseq's parameter pytrees (``w_ih``, ``w_hh``,
``b`` and, for a reset-after GRU, ``b_hn``), so ``nnx.split``/``nnx.merge``, ``nnx.state``,
``nnx.jit``, ``nnx.grad`` and ``nnx.Optimizer`` work as on any Flax module, and whose
forward pass is jaxseq's own function on those params (``jaxseq.unroll``, the fused kernels
included):

    >>> import jax.numpy as jnp, jaxseq, jaxseq.nnx
    >>> from flax import nnx
    >>> net = jaxseq.nnx.Stack(jaxseq.gru(32), 16, num_layers=2, rngs=nnx.Rngs(0))
    >>> carry, ys = net(jnp.ones((20, 4, 16)))          # (T, batch, F): time-major
    >>> ys.shape
    (20, 4, 32)

* ``Cell``: one jaxseq cell. ``cell(carry, x)`` is one step and ``initialize_carry`` the
  zero carry, the protocol of ``nnx.RNN``, so ``nnx.RNN(Cell(...))`` works;
  ``cell.unroll(xs)`` runs a whole sequence through ``jaxseq.unroll`` (faster: the input
  projection is one matmul and the fused kernel's backward pass applies).
* ``Stack``: ``jaxseq.stack`` (layers, bidirectional, dropout between layers drawn from
  ``nnx.Rngs``; ``model.eval()`` turns it off).
* ``CharLM``: ``jaxseq.models.char_lm``.

Every module's ``params`` property gives the plain jaxseq params, and every constructor
takes ``params=`` to wrap existing ones: the functional and the NNX form are the same
numbers.

Weights: ``to_flax_nnx`` builds nnx's own ``SimpleCell``/``LSTMCell``/
``OptimizedLSTMCell``/``GRUCell`` from jaxseq params, ``from_flax_nnx`` reads one (both
exact; see ``jaxseq._interop`` for the layouts and what an ``nnx.GRUCell`` without
``b_hn`` cannot hold).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxseq._cells import Array, make_cell
from jaxseq._cells import Cell as _FunctionalCell
from jaxseq._interop import NNX_HN_BIAS, _kind, from_flax_nnx, to_flax_nnx_state
from jaxseq._unroll import stack as _stack
from jaxseq._unroll import unroll as _unroll
from jaxseq.models import CharLMParams, char_lm

__all__ = ["CharLM", "Cell", "Stack", "from_flax_nnx", "to_flax_nnx"]


class Cell(nnx.RNNCellBase):
    """A jaxseq cell as an NNX module: one ``nnx.Param`` per field of its params.

    Attributes:
      cell: the functional jaxseq cell (``jaxseq.gru(64)``), static.
      in_features: F.
      w_ih, w_hh, b, b_hn: ``nnx.Param`` s with the cell's params' fields (``b_hn`` only
        for a reset-after GRU; minGRU and minLSTM have ``w_ih`` and ``b``).
      carry_dtype: dtype of ``initialize_carry``'s zeros.
      impl: ``unroll``'s default implementation (``"auto"``, ``"scan"``, ``"fused"``, ...).
    """

    def __init__(
        self,
        cell: _FunctionalCell,
        in_features: int,
        *,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
        carry_dtype=jnp.float32,
        impl: str = "auto",
    ):
        """Args:
        cell: the jaxseq cell.
        in_features: F, the input width.
        rngs: draws the initial params (its ``params`` stream) when ``params`` is None.
        params: existing params of ``cell`` to hold instead (e.g. from a converter).
        carry_dtype: dtype of the zero carry.
        impl: default ``impl`` of ``unroll``.
        """
        if params is None:
            if rngs is None:
                raise ValueError("pass rngs (to initialise the params) or params")
            params = cell.init(rngs.params(), in_features)
        self.cell = cell
        self.in_features = in_features
        self.carry_dtype = carry_dtype
        self.impl = impl
        self.param_type = type(params)
        for name, value in params._asdict().items():
            setattr(self, name, None if value is None else nnx.Param(jnp.asarray(value)))

    @property
    def params(self):
        """The jaxseq params (``GRUParams`` ...) that the ``nnx.Param`` s hold."""
        return self.param_type(
            **{
                name: None if getattr(self, name) is None else getattr(self, name)[...]
                for name in self.param_type._fields
            }
        )

    def __call__(self, carry, x: Array):
        """One step: ``(carry, x: (*batch, F)) -> (carry, y: (*batch, H))``."""
        return self.cell.apply(self.params, carry, x)

    def initialize_carry(self, input_shape: tuple[int, ...], rngs=None, carry_init=None):
        """The zero carry for one step's input of shape ``(*batch, F)`` (``nnx.RNN``'s
        protocol; ``rngs`` is unused, and ``carry_init``, when given, replaces the zeros
        for a one-array carry)."""
        batch = tuple(input_shape[:-1])
        carry = self.cell.initial_carry(batch, self.carry_dtype)
        if carry_init is not None:
            key = (
                rngs.carry()
                if isinstance(rngs, nnx.Rngs)
                else rngs()
                if rngs is not None
                else jax.random.key(0)
            )
            carry = jax.tree.map(lambda z: carry_init(key, z.shape, z.dtype), carry)
        return carry

    @property
    def num_feature_axes(self) -> int:
        return 1

    def unroll(
        self,
        xs: Array,
        carry=None,
        *,
        reverse: bool = False,
        seq_lengths: Array | None = None,
        impl: str | None = None,
    ):
        """``jaxseq.unroll`` over a time-major sequence.

        Args:
          xs: ``(T, *batch, F)``.
          carry: initial carry, leaves ``(*batch, H)``; zeros when None.
          reverse, seq_lengths: as ``jaxseq.unroll``.
          impl: overrides the module's ``impl``.

        Returns:
          ``(final_carry, ys: (T, *batch, H))``.
        """
        if carry is None:
            carry = self.cell.initial_carry(tuple(xs.shape[1:-1]), self.carry_dtype)
        return _unroll(
            self.cell,
            self.params,
            carry,
            xs,
            reverse=reverse,
            seq_lengths=seq_lengths,
            impl=impl or self.impl,
        )


def _dropout_key(module, rngs, deterministic: bool | None):
    """A dropout key, or None when dropout is off (rate 0, or deterministic)."""
    off = module.deterministic if deterministic is None else deterministic
    if module.dropout_rate == 0.0 or off:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if rngs is not None:  # an RngStream or a key
        return rngs() if callable(rngs) else rngs
    if module.rngs is None:
        raise ValueError(
            f"{type(module).__name__} has dropout {module.dropout_rate} but no "
            f"rngs: build it with rngs=, pass rngs= to the call, or call "
            f".eval() to turn dropout off"
        )
    return module.rngs()


class Stack(nnx.Module):
    """``jaxseq.stack`` as an NNX module: layers, bidirectional, dropout between layers.

    Attributes:
      network: the functional ``jaxseq.Stack``, static.
      layers: an ``nnx.List`` with one ``Cell`` per layer, or a ``(forward, backward)``
        ``nnx.List`` pair when bidirectional.
      deterministic: no dropout when True (``.eval()`` sets it, ``.train()`` clears it).
      rngs: the dropout stream (``rngs.dropout`` forked at construction), or None.
    """

    def __init__(
        self,
        cell: _FunctionalCell,
        in_features: int,
        num_layers: int = 1,
        *,
        bidirectional: bool = False,
        dropout: float = 0.0,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
        impl: str = "auto",
    ):
        """Args:
        cell: the jaxseq cell of every layer.
        in_features: F.
        num_layers, bidirectional, dropout: as ``jaxseq.stack``.
        rngs: initial params (``params`` stream) and dropout (``dropout`` stream).
        params: existing ``jaxseq.stack`` params to hold instead of new ones.
        impl: default ``impl`` of every layer's ``unroll``.
        """
        self.network = _stack(cell, num_layers, bidirectional=bidirectional, dropout=dropout)
        if params is None:
            if rngs is None:
                raise ValueError("pass rngs (to initialise the params) or params")
            params = self.network.init(rngs.params(), in_features)
        if len(params) != num_layers:
            raise ValueError(f"params has {len(params)} layers, num_layers={num_layers}")
        layers = []
        for layer, p in enumerate(params):
            size = in_features if layer == 0 else self.network.output_size
            if bidirectional:
                layers.append(nnx.List([Cell(cell, size, params=q, impl=impl) for q in p]))
            else:
                layers.append(Cell(cell, size, params=p, impl=impl))
        self.layers = nnx.List(layers)
        self.in_features = in_features
        self.dropout_rate = dropout
        self.deterministic = False
        self.impl = impl
        self.rngs = rngs.dropout.fork() if (rngs is not None and dropout > 0) else None

    @property
    def params(self) -> tuple:
        """The ``jaxseq.stack`` params: a tuple per layer (pairs when bidirectional)."""
        return tuple(
            tuple(c.params for c in layer) if isinstance(layer, nnx.List) else layer.params
            for layer in self.layers
        )

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return self.network.initial_carry(batch_shape, dtype)

    def __call__(
        self,
        xs: Array,
        carry=None,
        *,
        seq_lengths: Array | None = None,
        rngs=None,
        deterministic: bool | None = None,
        impl: str | None = None,
    ):
        """Runs every layer over a time-major sequence.

        Args:
          xs: ``(T, *batch, F)``.
          carry: initial carry (``initial_carry(batch)``); zeros when None.
          seq_lengths: optional ``(*batch,)`` lengths (``jaxseq.unroll``).
          rngs: dropout randomness for this call (an ``nnx.Rngs``, whose ``dropout``
            stream is used, a stream or a key); the module's own stream when None.
          deterministic: overrides the module's ``deterministic``.
          impl: overrides the module's ``impl``.

        Returns:
          ``(carry, ys: (T, *batch, output_size))``.
        """
        if carry is None:
            carry = self.initial_carry(tuple(xs.shape[1:-1]), xs.dtype)
        return self.network.apply(
            self.params,
            carry,
            xs,
            seq_lengths=seq_lengths,
            dropout_key=_dropout_key(self, rngs, deterministic),
            impl=impl or self.impl,
        )


class CharLM(nnx.Module):
    """``jaxseq.models.char_lm`` as an NNX module.

    Attributes:
      model: the functional ``jaxseq.models.CharLM``, static.
      embed: ``nnx.Param`` ``(V, E)``, or None with one-hot input.
      rnn: the recurrent ``Stack`` (its params; the forward pass is ``model.apply``, which
        reads the first layer through the embedding x input-projection table where that
        pays, as the functional model does).
      w_out, b_out: ``nnx.Param`` s ``(H, V)`` and ``(V,)``.
      deterministic, rngs: dropout switch and stream, as in ``Stack``.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        cell: str = "gru",
        hidden: int = 256,
        layers: int = 2,
        embed: int = 64,
        dropout: float = 0.0,
        input_mode: str = "embedding",
        compute_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
        params: CharLMParams | None = None,
        impl: str = "auto",
    ):
        """Args:
        vocab_size, cell, hidden, layers, embed, dropout, input_mode, compute_dtype: as
          ``jaxseq.models.char_lm``.
        rngs: initial params (``params`` stream) and dropout (``dropout`` stream).
        params: existing ``CharLMParams`` (e.g. from a char-RNN checkpoint).
        impl: default ``impl`` of the recurrent layers.
        """
        self.model = char_lm(
            vocab_size,
            cell=cell,
            hidden=hidden,
            layers=layers,
            embed=embed,
            dropout=dropout,
            input_mode=input_mode,
            compute_dtype=compute_dtype,
        )
        if params is None:
            if rngs is None:
                raise ValueError("pass rngs (to initialise the params) or params")
            params = self.model.init(rngs.params())
        in_size = embed if input_mode == "embedding" else vocab_size
        self.embed = None if params.embed is None else nnx.Param(jnp.asarray(params.embed))
        self.rnn = Stack(
            make_cell(cell, hidden), in_size, layers, dropout=dropout, params=params.rnn, impl=impl
        )
        self.w_out = nnx.Param(jnp.asarray(params.w_out))
        self.b_out = nnx.Param(jnp.asarray(params.b_out))
        self.dropout_rate = dropout
        self.deterministic = False
        self.impl = impl
        self.rngs = rngs.dropout.fork() if (rngs is not None and dropout > 0) else None

    @property
    def params(self) -> CharLMParams:
        """The functional model's ``CharLMParams``."""
        return CharLMParams(
            embed=None if self.embed is None else self.embed[...],
            rnn=self.rnn.params,
            w_out=self.w_out[...],
            b_out=self.b_out[...],
        )

    def initial_carry(self, batch_shape=(), dtype=None):
        return self.model.initial_carry(batch_shape, dtype or self.model.compute_dtype)

    def __call__(
        self,
        tokens: Array,
        carry=None,
        *,
        rngs=None,
        deterministic: bool | None = None,
        impl: str | None = None,
    ):
        """Next-character logits.

        Args:
          tokens: ``(T, *batch)`` integer ids, time-major.
          carry: the recurrent carry (``initial_carry(batch)``); zeros when None.
          rngs, deterministic, impl: as ``Stack.__call__``.

        Returns:
          ``(carry, logits: (T, *batch, V))``, float32.
        """
        if carry is None:
            carry = self.initial_carry(tuple(tokens.shape[1:]))
        return self.model.apply(
            self.params,
            carry,
            tokens,
            dropout_key=_dropout_key(self, rngs, deterministic),
            impl=impl or self.impl,
        )


def to_flax_nnx(
    params, cell: _FunctionalCell, *, target: str | None = None, rngs: nnx.Rngs | None = None
) -> nnx.Module:
    """nnx's own cell (``nnx.SimpleCell``, ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``)
    holding ``params``, computing exactly the jaxseq cell's function.

    The cell is built with the params' sizes and dtype (and ``activation_fn=nnx.relu`` for
    a relu ``jaxseq.rnn``), then its params replaced by ``to_flax_nnx_state``'s. Whether the
    installed ``nnx.GRUCell`` has ``hn_bias`` (google/flax#5595) is read off the module;
    without it, a GRU with a non-zero ``b_hn`` raises (flax issue #5594), as does the Cho
    GRU (``reset_after=False``), which nnx cannot express at all.

    Args:
      params: ``RNNParams``, ``LSTMParams`` or ``GRUParams``.
      cell: the jaxseq cell.
      target: the nnx class name; None picks ``SimpleCell``, ``LSTMCell`` or ``GRUCell``.
      rngs: passed to the constructor (its draws are overwritten); ``nnx.Rngs(0)`` if None.

    Returns:
      The nnx cell module; its carry is ``(c, h)`` for the LSTMs (jaxseq's
      ``LSTMState(h, c)`` reversed) and ``h`` otherwise.
    """
    name = _kind(cell, params, "flax.nnx")
    target = target or {"rnn": "SimpleCell", "lstm": "LSTMCell", "gru": "GRUCell"}[name]
    to_flax_nnx_state(params, cell, target, hn_bias=True)  # checks the target and the cell
    F, H = params.w_ih.shape[0], params.w_hh.shape[0]
    kwargs = {"activation_fn": nnx.relu} if cell.kernel == "rnn_relu" else {}
    module = getattr(nnx, target)(
        F,
        H,
        param_dtype=params.w_ih.dtype,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
        **kwargs,
    )
    state = nnx.state(module, nnx.Param)
    pure = to_flax_nnx_state(params, cell, target, hn_bias=hasattr(module, NNX_HN_BIAS))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
    return module
