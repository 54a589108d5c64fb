"""jaxseq.nnx: the NNX modules against the functional ones, and nnx's own cells both ways."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxseq
import jaxseq.nnx as jnnx
from jaxseq.models import char_lm, cross_entropy

H, F, T, B = 4, 3, 6, 3


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def noisy(params, seed=7, scale=0.3):
    """Every leaf, biases included, moved off its initial value."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([a + normal(seed + i, a.shape, scale) for i, a in enumerate(leaves)])


# ------------------------------------------------------------- nnx's own cells, both ways


class GRUCellWithHnBias(nnx.GRUCell):
    """nnx.GRUCell with the ``hn_bias`` of google/flax#5595 (issue #5594), for a Flax that
    lacks it: the PR's parameter (its own ``(H,)`` Param, outside the fused ``dense_h``) and
    its equation ``n = tanh(x W_in + b_in + r * (h W_hn + b_hn))``. Where the installed
    GRUCell already has ``hn_bias`` the tests use the real class instead."""

    def __init__(self, in_features, hidden_features, *, bias_init=None, rngs, **kwargs):
        bias_init = bias_init or nnx.initializers.zeros_init()
        super().__init__(in_features, hidden_features, bias_init=bias_init, rngs=rngs, **kwargs)
        self.hn_bias = nnx.Param(bias_init(rngs.params(), (hidden_features,)))

    def __call__(self, carry, inputs):
        xr, xz, xn = jnp.split(self.dense_i(inputs), 3, axis=-1)
        hr, hz, hn = jnp.split(self.dense_h(carry), 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * (hn + self.hn_bias[...]))
        h = (1.0 - z) * n + z * carry
        return h, h


_REAL_HN_BIAS = hasattr(nnx.GRUCell(F, H, rngs=nnx.Rngs(0)), jaxseq._interop.NNX_HN_BIAS)

NNX_CELLS = {
    "SimpleCell": (nnx.SimpleCell, lambda: jaxseq.rnn(H)),
    "LSTMCell": (nnx.LSTMCell, lambda: jaxseq.lstm(H)),
    "OptimizedLSTMCell": (nnx.OptimizedLSTMCell, lambda: jaxseq.lstm(H)),
    "GRUCell": (nnx.GRUCell, lambda: jaxseq.gru(H)),
    "GRUCell+hn_bias": (nnx.GRUCell if _REAL_HN_BIAS else GRUCellWithHnBias, lambda: jaxseq.gru(H)),
}


def run_nnx_cell(module, xs, carry0):
    """The peer's own forward pass: nnx.RNN over the cell, time-major."""
    layer = nnx.RNN(module, time_major=True, return_carry=True)
    return layer(xs, initial_carry=carry0)


@pytest.mark.parametrize("nnx_name", list(NNX_CELLS))
def test_nnx_cell_parity_and_round_trip(nnx_name):
    cls, make = NNX_CELLS[nnx_name]
    # Random non-zero biases: the default zeros would hide a misplaced or missing bias.
    module = cls(F, H, bias_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(0))
    xs = normal(1, (T, B, F))
    h0, c0 = normal(2, (B, H), 0.5), normal(3, (B, H))
    is_lstm = "LSTM" in nnx_name
    nnx_carry, nnx_ys = run_nnx_cell(module, xs, (c0, h0) if is_lstm else h0)

    cell = make()
    params = jaxseq.from_flax_nnx(module)
    assert np.any(np.asarray(params.b) != 0.0)
    if nnx_name == "GRUCell" and not _REAL_HN_BIAS:
        assert not np.any(np.asarray(params.b_hn))  # flax#5594: the cell has none
    if nnx_name == "GRUCell+hn_bias":
        assert np.any(np.asarray(params.b_hn) != 0.0)
    carry0 = jaxseq.LSTMState(h0, c0) if is_lstm else h0
    carry, ys = jaxseq.unroll(cell, params, carry0, xs)
    chex.assert_trees_all_close(ys, nnx_ys, atol=1e-5, rtol=0)
    want = jaxseq.LSTMState(h=nnx_carry[1], c=nnx_carry[0]) if is_lstm else nnx_carry
    chex.assert_trees_all_close(carry, want, atol=1e-5, rtol=0)

    # Out again: into a fresh module of the same class, exactly the same numbers.
    target = nnx_name.split("+")[0]
    if cls is GRUCellWithHnBias:
        fresh = cls(F, H, rngs=nnx.Rngs(9))
        state = nnx.state(fresh, nnx.Param)
        nnx.replace_by_pure_dict(
            state, jaxseq.to_flax_nnx_state(params, cell, target, hn_bias=True)
        )
        nnx.update(fresh, state)
    else:
        fresh = jaxseq.to_flax_nnx(params, cell, target=target)
        assert type(fresh) is cls
    chex.assert_trees_all_equal(jaxseq.from_flax_nnx(fresh), params)
    _, fresh_ys = run_nnx_cell(fresh, xs, (c0, h0) if is_lstm else h0)
    chex.assert_trees_all_close(fresh_ys, nnx_ys, atol=1e-6, rtol=0)


def test_nnx_relu_simple_cell_and_state_input():
    cell = jaxseq.rnn(H, activation="relu")
    params = noisy(cell.init(jax.random.key(0), F))
    module = jaxseq.to_flax_nnx(params, cell)
    assert module.activation_fn is nnx.relu
    xs = normal(4, (T, B, F))
    _, nnx_ys = run_nnx_cell(module, xs, jnp.zeros((B, H)))
    _, ys = jaxseq.unroll(cell, params, cell.initial_carry((B,)), xs)
    chex.assert_trees_all_close(ys, nnx_ys, atol=1e-5, rtol=0)
    # The state, a pure dict of it, and the module all convert the same way.
    state = nnx.state(module, nnx.Param)
    for source in (state, nnx.to_pure_dict(state)):
        chex.assert_trees_all_equal(jaxseq.from_flax_nnx(source, cell_name="rnn"), params)


def test_to_flax_nnx_errors_name_what_the_target_cannot_hold():
    gru = jaxseq.gru(H)
    params = noisy(gru.init(jax.random.key(0), F))  # b_hn non-zero
    if not _REAL_HN_BIAS:
        with pytest.raises(ValueError, match=r"no b_hn .*flax issue #5594"):
            jaxseq.to_flax_nnx(params, gru)
        # A zero b_hn is one such a GRUCell does hold, exactly.
        zero = params._replace(b_hn=jnp.zeros((H,)))
        chex.assert_trees_all_equal(jaxseq.from_flax_nnx(jaxseq.to_flax_nnx(zero, gru)), zero)
    cho = jaxseq.gru(H, reset_after=False)
    with pytest.raises(ValueError, match=r"reset_after=False.*Cho"):
        jaxseq.to_flax_nnx(cho.init(jax.random.key(0), F), cho)
    mingru = jaxseq.mingru(H)
    with pytest.raises(ValueError, match="no counterpart of the 'mingru' cell"):
        jaxseq.to_flax_nnx_state(mingru.init(jax.random.key(0), F), mingru)
    lstm = jaxseq.lstm(H)
    with pytest.raises(ValueError, match="target='GRUCell' cannot hold a jaxseq lstm"):
        jaxseq.to_flax_nnx(lstm.init(jax.random.key(0), F), lstm, target="GRUCell")
    with pytest.raises(ValueError, match="cell_name='lstm'"):
        jaxseq.from_flax_nnx(nnx.GRUCell(F, H, rngs=nnx.Rngs(0)), cell_name="lstm")
    with pytest.raises(ValueError, match="residual"):
        jaxseq.from_flax_nnx(nnx.SimpleCell(F, H, residual=True, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="matches no supported cell"):
        jaxseq.from_flax_nnx({"dense_i": {}, "other": {}})


# ------------------------------------------------------------------ jaxseq's NNX modules


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_cell_module_in_nnx_rnn_equals_unroll(name):
    cell = jaxseq.make_cell(name, H)
    module = jnnx.Cell(cell, F, rngs=nnx.Rngs(0))
    params = noisy(module.params)
    module = jnnx.Cell(cell, F, params=params)
    assert set(nnx.to_pure_dict(nnx.state(module, nnx.Param))) == {
        k for k, v in params._asdict().items() if v is not None
    }
    xs_bt = normal(1, (B, T, F))  # nnx.RNN's default layout: (batch, time, F)
    xs = jnp.swapaxes(xs_bt, 0, 1)
    lengths = jnp.array([T, 2, 4])
    carry0 = jax.tree.map(lambda a: a + 0.5, cell.initial_carry((B,)))
    layer = nnx.RNN(module, return_carry=True)
    nnx_carry, nnx_ys = nnx.jit(lambda m, x, c: m(x, initial_carry=c, seq_lengths=lengths))(
        layer, xs_bt, carry0
    )
    carry, ys = jaxseq.unroll(cell, params, carry0, xs, seq_lengths=lengths)
    chex.assert_trees_all_close(nnx_carry, carry, atol=1e-5, rtol=0)
    for b, length in enumerate(lengths):  # nnx.RNN leaves padding outputs unspecified
        chex.assert_trees_all_close(nnx_ys[b, :length], ys[:length, b], atol=1e-5, rtol=0)
    carry, ys = module.unroll(xs, carry0)
    want = jaxseq.unroll(cell, params, carry0, xs)
    chex.assert_trees_all_close((carry, ys), want, atol=1e-6, rtol=0)
    chex.assert_shape(module.initialize_carry((2, 5, F)), (2, 5, H)) if name == "gru" else None


def test_stack_module_equals_the_functional_stack_and_splits():
    cell = jaxseq.gru(H)
    net = jnnx.Stack(cell, F, 2, bidirectional=True, dropout=0.5, rngs=nnx.Rngs(0))
    params = noisy(net.params)
    net = jnnx.Stack(
        cell, F, 2, bidirectional=True, dropout=0.5, params=params, rngs=nnx.Rngs(dropout=3)
    )
    functional = jaxseq.stack(cell, 2, bidirectional=True, dropout=0.5)
    xs = normal(2, (T, B, F))
    carry0 = functional.initial_carry((B,))
    key = jax.random.key(5)
    run = nnx.jit(lambda net, xs, carry, key: net(xs, carry, rngs=key))
    apply = jax.jit(functional.apply)
    # Dropout drawn from a given key is the functional stack's with that key.
    got = run(net, xs, carry0, key)
    chex.assert_trees_all_close(got, apply(params, carry0, xs, dropout_key=key), atol=1e-6, rtol=0)
    # From the module's own stream (None: no key given): a fresh mask each call; none
    # after eval().
    _, a = run(net, xs, carry0, None)
    _, b = run(net, xs, carry0, None)
    assert not np.allclose(a, b)
    net.eval()
    chex.assert_trees_all_close(
        run(net, xs, carry0, None), apply(params, carry0, xs), atol=1e-6, rtol=0
    )
    # nnx.split / nnx.merge keep the jaxseq params and the behaviour.
    graphdef, state = nnx.split(net)
    pure = nnx.to_pure_dict(state)
    chex.assert_trees_all_equal(pure["layers"][1][0]["w_ih"], params[1][0].w_ih)
    merged = nnx.merge(graphdef, state)
    chex.assert_trees_all_equal(merged.params, net.params)
    with pytest.raises(ValueError, match="no rngs"):
        jnnx.Stack(cell, F, 1, bidirectional=True, dropout=0.5, params=params[:1])(xs)


def test_charlm_nnx_train_step_equals_the_functional_step_and_traces_once():
    """One Adam step through nnx.jit + nnx.Optimizer lands on the functional step's params."""
    V = 11
    kwargs = dict(cell="lstm", hidden=8, layers=2, embed=6)
    model = jnnx.CharLM(V, rngs=nnx.Rngs(0), **kwargs)
    params = noisy(model.params)
    model = jnnx.CharLM(V, params=params, **kwargs)
    functional = char_lm(V, **kwargs)
    tx = optax.adam(1e-2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (T + 1, B)), jnp.int32)
    inputs, targets = tokens[:-1], tokens[1:]

    def loss(p):
        _, logits = functional.apply(p, functional.initial_carry((B,)), inputs)
        return cross_entropy(logits, targets).mean()

    @jax.jit
    def functional_step(params):
        updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
        return optax.apply_updates(params, updates), loss(params)

    want, want_loss = functional_step(params)

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, inputs, targets):
        traces.append(1)

        def loss_fn(model):
            _, logits = model(inputs)
            return cross_entropy(logits, targets).mean()

        value, g = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, g)
        return value

    first = step(model, optimizer, inputs, targets)
    np.testing.assert_allclose(first, want_loss, rtol=1e-6)
    chex.assert_trees_all_close(model.params, want, atol=1e-6, rtol=0)
    step(model, optimizer, inputs, targets)
    assert len(traces) == 1
    assert int(optimizer.step[...]) == 2


@pytest.mark.slow
def test_nnx_is_imported_on_use_only():
    import subprocess
    import sys

    code = (
        "import sys, jaxseq; before = 'flax' in sys.modules\n"
        "cls = jaxseq.nnx.CharLM\n"
        "print(before, 'flax.nnx' in sys.modules, cls.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == ["False", "True", "jaxseq.nnx"]
