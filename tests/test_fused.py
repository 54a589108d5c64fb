"""The fused kernels (jaxseq/_fused.py): same values and gradients as plain scan autodiff."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxseq
from jaxseq import _fused

H, F, T = 4, 3, 5

CELLS = {
    "rnn_tanh": lambda: jaxseq.rnn(H),
    "rnn_relu": lambda: jaxseq.rnn(H, activation="relu"),
    "lstm": lambda: jaxseq.lstm(H),
    "gru": lambda: jaxseq.gru(H, reset_after=True),
    "gru_cho": lambda: jaxseq.gru(H, reset_after=False),
}


def randomize(tree, key, scale=0.5):
    """Every leaf (biases included) replaced by N(0, scale²) noise of its shape and dtype."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def setup(name, batch=(2,), key=0, dtype=jnp.float32, steps=T):
    cell = CELLS[name]()
    k_p, k_c, k_x, k_w = jax.random.split(jax.random.key(key), 4)
    params = jax.tree.map(lambda a: a.astype(dtype), randomize(cell.init(k_p, F), k_p))
    carry = randomize(cell.initial_carry(batch, dtype), k_c)
    xs = jax.random.normal(k_x, (steps, *batch, F), dtype)
    weights = jax.random.normal(k_w, (steps, *batch, H), dtype)
    return cell, params, carry, xs, weights


def make_loss(cell, weights, reverse):
    def loss(params, carry, xs):
        final, ys = jaxseq.unroll(cell, params, carry, xs, reverse=reverse)
        # sin() makes the carry's cotangent depend on its value; weights make ys's non-uniform
        return jnp.sum(weights * ys) + sum(jnp.sum(jnp.sin(l)) for l in jax.tree.leaves(final))
    return loss


def grads(loss, args, fused):
    with _fused.use_fused(fused):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_each_builtin_cell_gets_its_kernel(name):
    """Recognised by code, and the kernel's own step computes the cell's step(project(x))."""
    cell, params, carry, _, _ = setup(name)
    assert _fused.builtin_kind(cell, params) == name
    assert _fused.probe_matches(_fused.KERNELS[name], cell, params, carry)
    others = [k for k in _fused.KERNELS.values() if k.name != name]
    # the probe can fail: every other kernel disagrees with this cell (or cannot run on it)
    for other in others:
        try:
            matched = _fused.probe_matches(other, cell, params, carry)
        except Exception:
            matched = False
        assert not matched, other.name


@pytest.mark.parametrize("name,reverse", [
    ("rnn_tanh", False), ("rnn_relu", True), ("lstm", True), ("gru", False), ("gru_cho", True)])
def test_float64_gradients_are_exact(name, reverse):
    """Numerical differentiation of the fused path (float64), first and second order."""
    with jax.enable_x64(True):
        cell, params, carry, xs, weights = setup(name, (2,), key=1, dtype=jnp.float64)
        loss = make_loss(cell, weights, reverse)
        with _fused.use_fused(True):
            # the fused kernel really is what is differentiated here
            assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(params, carry, xs))
            check_grads(jax.jit(loss), (params, carry, xs), order=2 if name == "lstm" else 1,
                        modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,batch,reverse", [
    ("rnn_tanh", (3,), False), ("rnn_relu", (), True), ("lstm", (3,), False),
    ("lstm", (2, 3), True), ("gru", (2, 3), False), ("gru", (3,), True),
    ("gru_cho", (3,), False), ("gru_cho", (2, 3), True)])
def test_float32_matches_plain_scan(name, reverse, batch):
    """Values and gradients equal those of plain lax.scan autodiff, within float32 rounding."""
    cell, params, carry, xs, weights = setup(name, batch, key=2)
    loss = make_loss(cell, weights, reverse)
    (v_fused, g_fused) = grads(loss, (params, carry, xs), fused=True)
    (v_plain, g_plain) = grads(loss, (params, carry, xs), fused=False)
    np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_fused, g_plain, rtol=2e-5, atol=2e-5)
    with _fused.use_fused(True):
        f_carry, f_ys = jaxseq.unroll(cell, params, carry, xs, reverse=reverse)
    r_carry, r_ys = jaxseq.reference_unroll(cell, params, carry, xs, reverse=reverse)
    chex.assert_trees_all_close((f_carry, f_ys), (r_carry, r_ys), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 6])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_every_length_matches_plain_scan(name, steps):
    """Lengths below, at and between multiples of the two steps a forward-loop iteration
    runs (an odd length runs its first step before the loop), both directions."""
    cell, params, carry, xs, weights = setup(name, (3,), key=12, steps=steps)
    for reverse in (False, True):
        loss = make_loss(cell, weights, reverse)
        (v_fused, g_fused) = grads(loss, (params, carry, xs), fused=True)
        (v_plain, g_plain) = grads(loss, (params, carry, xs), fused=False)
        np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(g_fused, g_plain, rtol=2e-5, atol=2e-5)


def test_second_order_matches_plain_scan_float64():
    """Reverse over reverse (a Hessian-vector product) through the GRU kernel."""
    with jax.enable_x64(True):
        cell, params, carry, xs, weights = setup("gru", (2,), key=3, dtype=jnp.float64)
        loss = make_loss(cell, weights, False)
        tangent = randomize(params, jax.random.key(4))

        def hvp(params):  # grad of <grad loss, tangent>: reverse mode twice
            def directional(p):
                g = jax.grad(loss)(p, carry, xs)
                return sum(jnp.vdot(a, b) for a, b in
                           zip(jax.tree.leaves(g), jax.tree.leaves(tangent)))
            return jax.grad(directional)(params)

        with _fused.use_fused(True):
            fused = jax.jit(hvp)(params)
        with _fused.use_fused(False):
            plain = jax.jit(hvp)(params)
        chex.assert_trees_all_close(fused, plain, rtol=1e-9, atol=1e-9)


def test_train_step_gradients_match_plain_scan_two_layers():
    """A two-layer char LM: every parameter's gradient agrees with plain scan autodiff."""
    from jaxseq.models import char_lm, cross_entropy
    for cell in ("lstm",):
        model = char_lm(11, cell=cell, hidden=8, layers=2, embed=5)
        params = randomize(model.init(jax.random.key(5)), jax.random.key(6))
        tokens = jax.random.randint(jax.random.key(7), (9, 3), 0, 11)

        def loss(params):
            _, logits = model.apply(params, model.initial_carry((3,)), tokens[:-1])
            return cross_entropy(logits, tokens[1:]).mean()

        with _fused.use_fused(True):
            g_fused = jax.jit(jax.grad(loss))(params)
        with _fused.use_fused(False):
            g_plain = jax.jit(jax.grad(loss))(params)
        chex.assert_trees_all_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


def test_bfloat16_runs_fused_and_stays_close_to_float32():
    cell, params, carry, xs, weights = setup("lstm", (4,), key=8)
    loss = make_loss(cell, weights, False)
    to_bf16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    args16 = (params, to_bf16(carry), xs.astype(jnp.bfloat16))  # f32 params, bf16 compute

    def loss16(params, carry, xs):
        cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        return make_loss(cell, weights.astype(jnp.bfloat16), False)(cast, carry, xs).astype(
            jnp.float32)

    with _fused.use_fused(True):
        assert "custom_vjp_call" in str(jax.make_jaxpr(loss16)(*args16))
    v16, g16 = grads(loss16, args16, fused=True)
    v32, g32 = grads(loss, (params, carry, xs), fused=True)
    assert g16[0].w_hh.dtype == jnp.float32
    np.testing.assert_allclose(v16, v32, rtol=0.05, atol=0.05)
    for a, b in zip(jax.tree.leaves(g16[0]), jax.tree.leaves(g32[0])):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.1, atol=0.1)


def test_unknown_cell_falls_back_to_plain_scan():
    """A cell that calls itself "lstm" but computes something else gets no kernel."""
    base = jaxseq.lstm(H)

    def step(params, carry, z):  # an LSTM without the output gate
        z = z + carry.h @ params.w_hh
        i, f, g, _ = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jaxseq.LSTMState(h=jnp.tanh(c), c=c), jnp.tanh(c)

    cell = base._replace(step=step, apply=lambda p, c, x: step(p, c, base.project(p, x)))
    params = randomize(cell.init(jax.random.key(9), F), jax.random.key(10))
    carry = cell.initial_carry((2,))
    xs = jax.random.normal(jax.random.key(11), (T, 2, F))
    assert _fused.builtin_kind(cell, params) is None
    got = jaxseq.unroll(cell, params, carry, xs)
    want = jaxseq.reference_unroll(cell, params, carry, xs)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(
        lambda p: jaxseq.unroll(cell, p, carry, xs))(params))


def test_mixed_carry_dtype_and_seq_lengths_fall_back():
    cell, params, carry, xs, _ = setup("gru", (2,))
    # GRU params that do not fit the cell's convention are left to the plain path
    assert _fused.builtin_kind(cell, params._replace(b_hn=None)) is None
    assert _fused.fused_unroll(cell, params, carry.astype(jnp.bfloat16), xs, False) is None
    jaxpr = str(jax.make_jaxpr(lambda p: jaxseq.unroll(
        cell, p, carry, xs, seq_lengths=jnp.array([T, 2])))(params))
    assert "custom_vjp_call" not in jaxpr


def test_use_fused_switch_is_scoped():
    cell, params, carry, xs, _ = setup("rnn_tanh")
    trace = lambda: str(jax.make_jaxpr(lambda p: jaxseq.unroll(cell, p, carry, xs))(params))
    assert _fused.fused_enabled()
    with _fused.use_fused(False):
        assert not _fused.fused_enabled() and "custom_vjp_call" not in trace()
        with _fused.use_fused(True):
            assert "custom_vjp_call" in trace()
        assert not _fused.fused_enabled()
    assert _fused.fused_enabled() and "custom_vjp_call" in trace()


def test_program_size_does_not_grow_with_sequence_length():
    """The train step is loops, not unrolled steps: same number of HLO ops for T=16 and T=64
    (both large enough for char_lm's table-lookup first layer)."""
    from jaxseq.models import char_lm, cross_entropy

    model = char_lm(7, cell="lstm", hidden=8, layers=2, embed=8)
    params = model.init(jax.random.key(0))

    def hlo_ops(steps):
        tokens = jnp.zeros((steps, 2), jnp.int32)

        def loss(params):
            _, logits = model.apply(params, model.initial_carry((2,)), tokens)
            return cross_entropy(logits, tokens).mean()

        text = jax.jit(jax.grad(loss)).lower(params).as_text()
        return sum(1 for line in text.splitlines() if " = " in line)

    assert hlo_ops(16) == hlo_ops(64)


@pytest.mark.parametrize("name,reverse", [("lstm", False), ("gru", True), ("rnn_tanh", False),
                                          ("gru_cho", True)])
def test_unroll_embedded_equals_unroll_on_looked_up_inputs(name, reverse):
    """The product-table path gives unroll's values and (float64) gradients exactly."""
    with jax.enable_x64(True):
        cell, params, carry, _, weights = setup(name, (3,), key=12, dtype=jnp.float64)
        table = jax.random.normal(jax.random.key(13), (11, F), jnp.float64)
        tokens = jax.random.randint(jax.random.key(14), (T, 3), 0, 11)

        def loss(unroll_fn, params, carry, table):
            final, ys = unroll_fn(params, carry, table)
            return jnp.sum(weights * ys) + sum(jnp.sum(jnp.sin(l)) for l in jax.tree.leaves(final))

        embedded = lambda p, c, t: _fused.unroll_embedded(cell, p, c, t, tokens, reverse=reverse)
        looked_up = lambda p, c, t: jaxseq.unroll(cell, p, c, t[tokens], reverse=reverse)
        assert "custom_vjp_call" in str(jax.make_jaxpr(
            lambda *a: loss(embedded, *a))(params, carry, table))
        got = jax.value_and_grad(lambda *a: loss(embedded, *a), argnums=(0, 1, 2))(
            params, carry, table)
        with _fused.use_fused(False):
            want = jax.value_and_grad(lambda *a: loss(looked_up, *a), argnums=(0, 1, 2))(
                params, carry, table)
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-10)
