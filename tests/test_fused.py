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
        treedef, [scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
    )


def setup(name, batch=(2,), key=0, dtype=jnp.float32, steps=T):
    cell = CELLS[name]()
    k_p, k_c, k_x, k_w = jax.random.split(jax.random.key(key), 4)
    params = jax.tree.map(lambda a: a.astype(dtype), randomize(cell.init(k_p, F), k_p))
    carry = randomize(cell.initial_carry(batch, dtype), k_c)
    xs = jax.random.normal(k_x, (steps, *batch, F), dtype)
    weights = jax.random.normal(k_w, (steps, *batch, H), dtype)
    return cell, params, carry, xs, weights


def make_loss(cell, weights, reverse, impl="fused"):
    def loss(params, carry, xs):
        final, ys = jaxseq.unroll(cell, params, carry, xs, reverse=reverse, impl=impl)
        # sin() makes the carry's cotangent depend on its value; weights make ys's non-uniform
        return jnp.sum(weights * ys) + sum(jnp.sum(jnp.sin(l)) for l in jax.tree.leaves(final))

    return loss


def grads(loss, args):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)


def kernel_matches(kernel, cell, params, carry) -> bool:
    """Whether ``kernel.step`` computes the cell's ``step(project(x))`` on random inputs."""
    x = jax.random.normal(jax.random.key(99), (3, F))
    carry = jax.tree.map(lambda l: jnp.broadcast_to(l[:1], (3, H)), carry)
    want, _ = cell.step(params, carry, cell.project(params, x))
    got = kernel.step(params, carry, x)
    return jax.tree.structure(want) == jax.tree.structure(got) and all(
        np.allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))
    )


@pytest.mark.parametrize("name", sorted(CELLS))
def test_each_builtin_cell_is_tagged_with_the_kernel_that_computes_it(name):
    """The factory's tag names a kernel whose step is the cell's step(project(x)), and no
    other kernel computes this cell (the comparison can fail)."""
    cell, params, carry, _, _ = setup(name)
    assert cell.kernel == name
    assert kernel_matches(_fused.KERNELS[name], cell, params, carry)
    for other in _fused.KERNELS.values():
        if other.name != name:
            try:
                matched = kernel_matches(other, cell, params, carry)
            except Exception:  # wrong parameter layout for that kernel
                matched = False
            assert not matched, other.name


@pytest.mark.parametrize(
    "name,reverse",
    [("rnn_tanh", False), ("rnn_relu", True), ("lstm", True), ("gru", False), ("gru_cho", True)],
)
def test_float64_gradients_are_exact(name, reverse):
    """Numerical differentiation of the fused path (float64), first and second order."""
    with jax.enable_x64(True):
        cell, params, carry, xs, weights = setup(name, (2,), key=1, dtype=jnp.float64)
        loss = make_loss(cell, weights, reverse)
        # the fused kernel really is what is differentiated here
        assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(params, carry, xs))
        check_grads(
            jax.jit(loss),
            (params, carry, xs),
            order=2 if name == "lstm" else 1,
            modes=("rev",),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize(
    "name,batch,reverse",
    [
        ("rnn_tanh", (3,), False),
        ("rnn_relu", (), True),
        ("lstm", (3,), False),
        ("lstm", (2, 3), True),
        ("gru", (2, 3), False),
        ("gru", (3,), True),
        ("gru_cho", (3,), False),
        ("gru_cho", (2, 3), True),
    ],
)
def test_float32_matches_plain_scan(name, reverse, batch):
    """Values and gradients equal those of plain lax.scan autodiff, within float32 rounding."""
    cell, params, carry, xs, weights = setup(name, batch, key=2)
    (v_fused, g_fused) = grads(make_loss(cell, weights, reverse), (params, carry, xs))
    (v_plain, g_plain) = grads(make_loss(cell, weights, reverse, "scan"), (params, carry, xs))
    np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_fused, g_plain, rtol=2e-5, atol=2e-5)
    f_carry, f_ys = jaxseq.unroll(cell, params, carry, xs, reverse=reverse, impl="fused")
    r_carry, r_ys = jaxseq.reference_unroll(cell, params, carry, xs, reverse=reverse)
    chex.assert_trees_all_close((f_carry, f_ys), (r_carry, r_ys), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 6])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_every_length_matches_plain_scan(name, steps):
    """Lengths below, at and between multiples of the two steps a forward-loop iteration
    runs (an odd length runs its first step before the loop), both directions."""
    cell, params, carry, xs, weights = setup(name, (3,), key=12, steps=steps)
    for reverse in (False, True):
        (v_fused, g_fused) = grads(make_loss(cell, weights, reverse), (params, carry, xs))
        (v_plain, g_plain) = grads(make_loss(cell, weights, reverse, "scan"), (params, carry, xs))
        np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(g_fused, g_plain, rtol=2e-5, atol=2e-5)


def test_second_order_matches_plain_scan_float64():
    """Reverse over reverse (a Hessian-vector product) through the GRU kernel."""
    with jax.enable_x64(True):
        cell, params, carry, xs, weights = setup("gru", (2,), key=3, dtype=jnp.float64)
        tangent = randomize(params, jax.random.key(4))

        def hvp(params, impl):  # grad of <grad loss, tangent>: reverse mode twice
            loss = make_loss(cell, weights, False, impl)

            def directional(p):
                g = jax.grad(loss)(p, carry, xs)
                return sum(
                    jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(tangent))
                )

            return jax.grad(directional)(params)

        fused = jax.jit(hvp, static_argnums=1)(params, "fused")
        plain = jax.jit(hvp, static_argnums=1)(params, "scan")
        chex.assert_trees_all_close(fused, plain, rtol=1e-9, atol=1e-9)


def test_train_step_gradients_match_plain_scan_two_layers():
    """A two-layer char LM: every parameter's gradient agrees with plain scan autodiff."""
    from jaxseq.models import char_lm, cross_entropy

    for cell in ("lstm",):
        model = char_lm(11, cell=cell, hidden=8, layers=2, embed=5)
        params = randomize(model.init(jax.random.key(5)), jax.random.key(6))
        tokens = jax.random.randint(jax.random.key(7), (9, 3), 0, 11)

        def loss(params, impl):
            _, logits = model.apply(params, model.initial_carry((3,)), tokens[:-1], impl=impl)
            return cross_entropy(logits, tokens[1:]).mean()

        g_fused = jax.jit(jax.grad(loss), static_argnums=1)(params, "fused")
        g_plain = jax.jit(jax.grad(loss), static_argnums=1)(params, "scan")
        chex.assert_trees_all_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


def test_bfloat16_runs_fused_and_stays_close_to_float32():
    cell, params, carry, xs, weights = setup("lstm", (4,), key=8)
    loss = make_loss(cell, weights, False)
    to_bf16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    args16 = (params, to_bf16(carry), xs.astype(jnp.bfloat16))  # f32 params, bf16 compute

    def loss16(params, carry, xs):
        cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        return make_loss(cell, weights.astype(jnp.bfloat16), False)(cast, carry, xs).astype(
            jnp.float32
        )

    assert "custom_vjp_call" in str(jax.make_jaxpr(loss16)(*args16))
    v16, g16 = grads(loss16, args16)
    v32, g32 = grads(loss, (params, carry, xs))
    assert g16[0].w_hh.dtype == jnp.float32
    np.testing.assert_allclose(v16, v32, rtol=0.05, atol=0.05)
    for a, b in zip(jax.tree.leaves(g16[0]), jax.tree.leaves(g32[0])):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.1, atol=0.1)


def test_a_cell_without_a_kernel_tag_runs_as_scan_and_refuses_fused():
    """A cell whose step was replaced (an LSTM without its output gate) drops the tag:
    "auto" runs its own step by scan, "fused" says why it cannot run."""
    base = jaxseq.lstm(H)

    def step(params, carry, z):
        z = z + carry.h @ params.w_hh
        i, f, g, _ = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jaxseq.LSTMState(h=jnp.tanh(c), c=c), jnp.tanh(c)

    cell = base._replace(
        step=step, apply=lambda p, c, x: step(p, c, base.project(p, x)), kernel=None
    )
    params = randomize(cell.init(jax.random.key(9), F), jax.random.key(10))
    carry = cell.initial_carry((2,))
    xs = jax.random.normal(jax.random.key(11), (T, 2, F))
    got = jaxseq.unroll(cell, params, carry, xs)
    want = jaxseq.reference_unroll(cell, params, carry, xs)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    assert "custom_vjp_call" not in str(
        jax.make_jaxpr(lambda p: jaxseq.unroll(cell, p, carry, xs))(params)
    )
    with pytest.raises(ValueError, match="no fused kernel.*impl='scan'"):
        jaxseq.unroll(cell, params, carry, xs, impl="fused")


def test_auto_falls_back_where_the_kernels_cannot_run_and_fused_says_why():
    cell, params, carry, xs, _ = setup("gru", (2,))
    trace = lambda f: str(jax.make_jaxpr(f)(params))
    lengths = jnp.array([T, 2])
    cases = {  # call -> what "fused" must name
        "seq_lengths": lambda p, impl: jaxseq.unroll(
            cell, p, carry, xs, seq_lengths=lengths, impl=impl
        ),
        "carry must be": lambda p, impl: jaxseq.unroll(
            cell, p, carry.astype(jnp.bfloat16), xs, impl=impl
        ),
        "b_hn": lambda p, impl: jaxseq.unroll(cell, p._replace(b_hn=None), carry, xs, impl=impl),
    }
    for reason, call in cases.items():
        if reason == "seq_lengths":  # the others fail in the scan too (dtype, missing bias)
            assert "custom_vjp_call" not in trace(lambda p: call(p, "auto"))
        with pytest.raises(ValueError, match=reason):
            call(params, "fused")
    assert "custom_vjp_call" in trace(lambda p: jaxseq.unroll(cell, p, carry, xs))
    with pytest.raises(ValueError, match="impl must be one of"):
        jaxseq.unroll(cell, params, carry, xs, impl="cudnn")


def test_impl_is_explicit_per_call():
    """No hidden state: the same function traced with each impl gets what it asked for."""
    cell, params, carry, xs, _ = setup("rnn_tanh")
    trace = lambda impl: str(
        jax.make_jaxpr(lambda p: jaxseq.unroll(cell, p, carry, xs, impl=impl))(params)
    )
    assert "custom_vjp_call" in trace("auto") and "custom_vjp_call" in trace("fused")
    assert "custom_vjp_call" not in trace("scan")
    assert "custom_vjp_call" in trace("auto")


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_forward_mode_runs_with_scan_and_fused_names_the_fix(name):
    """jax.jvp and jax.hessian through impl="scan" agree with finite differences; through
    the fused kernel forward mode fails with an error that says to pass impl="scan"."""
    with jax.enable_x64(True):
        cell, params, carry, xs, weights = setup(name, (2,), key=15, dtype=jnp.float64)
        loss = make_loss(cell, weights, False, impl="scan")
        check_grads(
            lambda x: loss(params, carry, x), (xs,), order=2, modes=("fwd",), atol=1e-5, rtol=1e-5
        )
        hess = jax.hessian(lambda x: loss(params, carry, x))(xs)
        flat = hess.reshape(xs.size, xs.size)
        np.testing.assert_allclose(flat, flat.T, atol=1e-8)  # symmetric
        # its action on a direction is the change of the (reverse-mode) gradient
        d, eps = jax.random.normal(jax.random.key(16), xs.shape, jnp.float64), 1e-6
        g = jax.grad(lambda x: loss(params, carry, x))
        np.testing.assert_allclose(
            flat @ d.ravel(),
            ((g(xs + eps * d) - g(xs - eps * d)) / (2 * eps)).ravel(),
            rtol=1e-5,
            atol=1e-6,
        )
        fused = make_loss(cell, weights, False, impl="fused")
        with pytest.raises(TypeError, match="impl='scan'"):
            jax.jvp(lambda x: fused(params, carry, x), (xs,), (xs,))


def test_mesh_that_does_not_divide_the_batch_is_refused():
    cell, params, carry, xs, _ = setup("gru", (3,))
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    chex.assert_trees_all_close(
        jaxseq.unroll(cell, params, carry, xs, impl="fused", mesh=one),
        jaxseq.unroll(cell, params, carry, xs, impl="scan"),
        rtol=1e-5,
        atol=1e-5,
    )

    class TwoDeviceMesh:  # only its size is read before the refusal
        size = 2
        axis_names = ("data",)

    with pytest.raises(ValueError, match="does not split evenly"):
        jaxseq.unroll(cell, params, carry, xs, impl="fused", mesh=TwoDeviceMesh())


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


@pytest.mark.parametrize(
    "name,reverse", [("lstm", False), ("gru", True), ("rnn_tanh", False), ("gru_cho", True)]
)
def test_unroll_embedded_equals_unroll_on_looked_up_inputs(name, reverse):
    """The product-table path gives unroll's values and (float64) gradients exactly."""
    with jax.enable_x64(True):
        cell, params, carry, _, weights = setup(name, (3,), key=12, dtype=jnp.float64)
        table = jax.random.normal(jax.random.key(13), (11, F), jnp.float64)
        tokens = jax.random.randint(jax.random.key(14), (T, 3), 0, 11)

        def loss(unroll_fn, params, carry, table):
            final, ys = unroll_fn(params, carry, table)
            return jnp.sum(weights * ys) + sum(jnp.sum(jnp.sin(l)) for l in jax.tree.leaves(final))

        embedded = lambda p, c, t: jaxseq.unroll_embedded(
            cell, p, c, t, tokens, reverse=reverse, impl="fused"
        )
        looked_up = lambda p, c, t: jaxseq.unroll(
            cell, p, c, t[tokens], reverse=reverse, impl="scan"
        )
        assert "custom_vjp_call" in str(
            jax.make_jaxpr(lambda *a: loss(embedded, *a))(params, carry, table)
        )
        got = jax.value_and_grad(lambda *a: loss(embedded, *a), argnums=(0, 1, 2))(
            params, carry, table
        )
        want = jax.value_and_grad(lambda *a: loss(looked_up, *a), argnums=(0, 1, 2))(
            params, carry, table
        )
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-10)
