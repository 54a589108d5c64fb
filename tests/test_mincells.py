"""minGRU, minLSTM and ``linear_recurrence``: NumPy references, float64 accuracy, gradients.

The references below are written from the equations of Feng et al. (2024), per gate with
separate matrices, independently of ``jaxseq._cells`` (which fuses them).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxseq
import jaxseq.models
import jaxseq.sample
from jaxseq._linear import associative_pays

H, F, T = 5, 4, 6
NUM_GATES = {"mingru": 2, "minlstm": 3}
UNROLL_IMPLS = ("scan", "associative", "auto")


# ------------------------------------------------------------------ NumPy references


def sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def random_gates(rng, name):
    """Per-gate weights ``(F, H)`` and biases ``(H,)``, biases clearly non-zero."""
    gates = ("z", "h") if name == "mingru" else ("f", "i", "h")
    return {g: (0.6 * rng.standard_normal((F, H)), rng.uniform(-1.5, 1.5, H)) for g in gates}


def reference_step(name, p, h, x):
    linear = {g: x @ w + b for g, (w, b) in p.items()}
    if name == "mingru":
        z = sigmoid(linear["z"])
        return (1.0 - z) * h + z * linear["h"]
    f, i = sigmoid(linear["f"]), sigmoid(linear["i"])
    return f / (f + i) * h + i / (f + i) * linear["h"]


def reference_run(name, p, h, xs, reverse=False):
    ys = np.zeros((*xs.shape[:-1], H))
    for t in range(len(xs) - 1, -1, -1) if reverse else range(len(xs)):
        h = reference_step(name, p, h, xs[t])
        ys[t] = h
    return h, ys


def fused_params(name, p, dtype):
    """The per-gate reference params as jaxseq's ``MinParams`` (blocks in gate order)."""
    return jaxseq._cells.MinParams(
        w_ih=jnp.asarray(np.concatenate([w for w, _ in p.values()], 1), dtype),
        b=jnp.asarray(np.concatenate([b for _, b in p.values()]), dtype),
    )


def setup(name, batch, seed=0, dtype=jnp.float32, num_steps=T):
    rng = np.random.default_rng(seed)
    p = random_gates(rng, name)
    h0 = rng.standard_normal((*batch, H))
    xs = rng.standard_normal((num_steps, *batch, F))
    cell = jaxseq.make_cell(name, H)
    return cell, p, fused_params(name, p, dtype), h0, xs


def sequential(a, b, h0, reverse=False):
    """``h_t = a_t h_{t-1} + b_t`` as a float64 Python loop."""
    hs, h = np.zeros(a.shape), np.asarray(h0, np.float64)
    for t in range(len(a) - 1, -1, -1) if reverse else range(len(a)):
        h = a[t] * h + b[t]
        hs[t] = h
    return hs


# ------------------------------------------------------------------------- the cells


@pytest.mark.parametrize("name", list(NUM_GATES))
def test_cell_structure(name):
    cell = jaxseq.make_cell(name, H)
    params = cell.init(jax.random.key(0), F)
    G = NUM_GATES[name]
    assert (cell.name, cell.num_gates, cell.kernel) == (name, G, None)
    assert cell.coefficients is not None and set(params._fields) == {"w_ih", "b"}
    chex.assert_shape((params.w_ih, params.b), ((F, G * H), (G * H,)))


@pytest.mark.parametrize("name", list(NUM_GATES))
@pytest.mark.parametrize("reverse", [False, True])
def test_apply_and_unroll_match_numpy_reference(name, reverse):
    batch = (2, 3)
    cell, p, params, h0, xs = setup(name, batch, seed=1)
    want_h, want_ys = reference_run(name, p, h0, xs, reverse=reverse)
    carry, x32 = jnp.asarray(h0, jnp.float32), jnp.asarray(xs, jnp.float32)
    got = {"apply loop": jaxseq.reference_unroll(cell, params, carry, x32, reverse=reverse)}
    for impl in UNROLL_IMPLS:
        got[impl] = jax.jit(functools.partial(jaxseq.unroll, cell, reverse=reverse, impl=impl))(
            params, carry, x32
        )
    for how, (h, ys) in got.items():
        chex.assert_shape(ys, (T, *batch, H))
        np.testing.assert_allclose(ys, want_ys, atol=2e-6, rtol=0, err_msg=how)
        np.testing.assert_allclose(h, want_h, atol=2e-6, rtol=0, err_msg=how)


@pytest.mark.parametrize("name", list(NUM_GATES))
def test_step_is_the_linear_recurrence_of_its_coefficients(name):
    cell, _, params, h0, xs = setup(name, (3,), seed=2)
    zs = cell.project(params, jnp.asarray(xs, jnp.float32))
    a, b = cell.coefficients(params, zs)
    chex.assert_shape((a, b), ((T, 3, H),) * 2)
    assert np.all((np.asarray(a) > 0) & (np.asarray(a) < 1))
    h = jnp.asarray(h0, jnp.float32)
    for t in range(T):
        new_h, y = cell.step(params, h, zs[t])
        np.testing.assert_allclose(new_h, a[t] * h + b[t], atol=1e-6, rtol=0)
        chex.assert_trees_all_equal(new_h, y)
        h = new_h


def test_minlstm_normalised_gates_survive_underflow():
    """Both sigmoids underflow at -200: f/(f+i) is 0/0, the log-space ratio is 1/2."""
    cell = jaxseq.minlstm(2)
    zs = jnp.array([[-200.0, -200.0, -200.0, -200.0, 3.0, -1.0]])
    a, b = cell.coefficients(None, zs)
    np.testing.assert_allclose(a, [[0.5, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(b, [[1.5, -0.5]], rtol=1e-6)


@pytest.mark.parametrize("name", list(NUM_GATES))
@pytest.mark.parametrize("reverse", [False, True])
def test_seq_lengths_associative_matches_masked_scan(name, reverse):
    lengths = jnp.array([T, 2, 0, 4])
    cell, _, params, h0, xs = setup(name, (4,), seed=3)
    carry, xs = jnp.asarray(h0, jnp.float32), jnp.asarray(xs, jnp.float32)
    run = lambda impl: jax.jit(functools.partial(jaxseq.unroll, cell, reverse=reverse, impl=impl))(
        params, carry, xs, seq_lengths=lengths
    )
    want_h, want_ys = run("scan")
    got_h, got_ys = run("associative")
    np.testing.assert_allclose(got_ys, want_ys, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_h, want_h, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got_h[2], carry[2])  # length 0: the carry comes back
    assert np.all(np.asarray(got_ys[2:, 1]) == 0.0)  # padding outputs exactly zero


@pytest.mark.parametrize("name,reverse", [("mingru", False), ("minlstm", True)])
def test_gradients_float64_associative_equal_scan(name, reverse):
    with jax.enable_x64(True):
        lengths = jnp.array([T, 3])
        cell, _, params, h0, xs = setup(name, (2,), seed=4, dtype=jnp.float64)
        weights = jnp.asarray(np.random.default_rng(5).standard_normal((T, 2, H)))

        def loss(params, carry, xs, impl):
            final, ys = jaxseq.unroll(
                cell, params, carry, xs, impl=impl, reverse=reverse, seq_lengths=lengths
            )
            return jnp.sum(weights * jnp.sin(ys)) + jnp.sum(final**2)

        args = (params, jnp.asarray(h0), jnp.asarray(xs))
        if not reverse:  # once against finite differences; the scan's own are in test_unroll
            check_grads(
                jax.jit(functools.partial(loss, impl="associative")),
                args,
                order=1,
                modes=("rev",),
                atol=1e-6,
                rtol=1e-6,
            )
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
        got, want = grad(*args, "associative"), grad(*args, "scan")
        chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)
        # Inputs past a sequence's end cannot influence anything.
        g_xs = np.asarray(got[2])
        assert np.all(g_xs[3:, 1] == 0.0) and np.all(g_xs[:3, 1] != 0.0)


def test_impl_errors_and_auto_choice():
    gru = jaxseq.gru(H)
    xs = jnp.zeros((T, 2, F))
    with pytest.raises(ValueError, match="impl='associative'.*'gru' cell.*not linear"):
        jaxseq.unroll(
            gru, gru.init(jax.random.key(0), F), gru.initial_carry((2,)), xs, impl="associative"
        )
    cell = jaxseq.mingru(H)
    params = cell.init(jax.random.key(0), F)
    with pytest.raises(ValueError, match="impl='fused'.*no fused kernel"):
        jaxseq.unroll(cell, params, cell.initial_carry((2,)), xs, impl="fused")
    with pytest.raises(ValueError, match="carry must be one array of shape"):
        jaxseq.unroll(cell, params, cell.initial_carry((3,)), xs, impl="associative")
    with pytest.raises(ValueError, match="impl must be one of"):
        jaxseq.unroll(cell, params, cell.initial_carry((2,)), xs, impl="parallel")
    # What "auto" runs is visible in the program: a scan on CPU, none elsewhere.
    assert not associative_pays("cpu") and associative_pays("gpu")
    program = lambda impl: str(
        jax.make_jaxpr(functools.partial(jaxseq.unroll, cell, impl=impl))(
            params, cell.initial_carry((2,)), xs
        )
    )
    assert "scan[" in program("scan") and "scan[" not in program("associative")
    assert ("scan[" in program("auto")) == (not associative_pays(jax.default_backend()))


def test_unroll_embedded_associative():
    cell = jaxseq.minlstm(H)
    params = cell.init(jax.random.key(1), F)
    table = jnp.asarray(np.random.default_rng(6).standard_normal((7, F)), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 7, (T, 2)))
    carry = jnp.ones((2, H))
    got = jax.jit(
        functools.partial(jaxseq.unroll_embedded, cell, reverse=True, impl="associative")
    )(params, carry, table, tokens)
    want = jax.jit(functools.partial(jaxseq.unroll, cell, reverse=True, impl="scan"))(
        params, carry, table[tokens]
    )
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=0)


def test_bidirectional_stack_runs_both_impls():
    net = jaxseq.stack(jaxseq.mingru(H), 2, bidirectional=True)
    params = net.init(jax.random.key(2), F)
    params = jax.tree.map(lambda l: l + 0.1, params)  # non-zero biases
    carry = net.initial_carry((3,))
    xs = jnp.asarray(np.random.default_rng(8).standard_normal((T, 3, F)), jnp.float32)
    lengths = jnp.array([T, 1, 4])
    runs = {
        impl: jax.jit(functools.partial(net.apply, impl=impl))(
            params, carry, xs, seq_lengths=lengths
        )
        for impl in ("scan", "associative")
    }
    chex.assert_shape(runs["associative"][1], (T, 3, 2 * H))
    chex.assert_trees_all_equal_shapes_and_dtypes(runs["associative"][0], carry)
    chex.assert_trees_all_close(runs["associative"], runs["scan"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------- linear_recurrence

# Measured max |err| / max |h| against the float64 loop at T = 16,384 (both impls):
# 1.2e-7 in float32 and 3.6e-16 in float64 (the _linear.py docstring has the details).
F32_BOUND, F64_BOUND = 1e-6, 2e-15


@pytest.fixture(scope="module")
def long_sequence():
    rng = np.random.default_rng(9)
    a = sigmoid(2.0 * rng.standard_normal((16384, 4, 32)))
    b = rng.standard_normal(a.shape)
    h0 = rng.standard_normal(a.shape[1:])
    return a, b, h0, sequential(a, b, h0)


@pytest.mark.parametrize("impl", ["scan", "associative"])
def test_linear_recurrence_against_float64_loop(long_sequence, impl):
    a, b, h0, want = long_sequence
    scale = np.abs(want).max()
    run = jax.jit(functools.partial(jaxseq.linear_recurrence, impl=impl))
    got32 = run(*(jnp.asarray(v, jnp.float32) for v in (a, b, h0)))
    assert got32.dtype == jnp.float32
    assert np.abs(np.asarray(got32, np.float64) - want).max() / scale < F32_BOUND
    with jax.enable_x64(True):
        got64 = run(jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0))
        assert got64.dtype == jnp.float64
        assert np.abs(np.asarray(got64) - want).max() / scale < F64_BOUND


def test_linear_recurrence_gradients_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(10)
        a = jnp.asarray(sigmoid(rng.standard_normal((9, 2, 3))))
        b, h0 = jnp.asarray(rng.standard_normal((9, 2, 3))), jnp.asarray(rng.standard_normal(3))
        for reverse in (False, True):
            f = {
                impl: functools.partial(jaxseq.linear_recurrence, impl=impl, reverse=reverse)
                for impl in ("scan", "associative")
            }
            if not reverse:  # plain JAX: forward mode works too, unlike a custom_vjp
                check_grads(
                    jax.jit(f["associative"]),
                    (a, b, h0),
                    order=1,
                    modes=("fwd", "rev"),
                    atol=1e-6,
                    rtol=1e-6,
                )
            cotangent = jnp.asarray(rng.standard_normal((9, 2, 3)))
            vjp = {
                k: jax.jit(lambda *args, g=g: jax.vjp(g, *args[:3])[1](args[3]))(
                    a, b, h0, cotangent
                )
                for k, g in f.items()
            }
            chex.assert_trees_all_close(vjp["associative"], vjp["scan"], atol=1e-13, rtol=1e-13)


def test_linear_recurrence_edge_cases():
    empty = jaxseq.linear_recurrence(
        jnp.zeros((0, 2, 3)), jnp.zeros((0, 2, 3)), jnp.ones((2, 3)), impl="associative"
    )
    chex.assert_shape(empty, (0, 2, 3))
    with pytest.raises(ValueError, match="a and b"):
        jaxseq.linear_recurrence(jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.zeros(3))
    with pytest.raises(ValueError, match="h0"):
        jaxseq.linear_recurrence(jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="impl"):
        jaxseq.linear_recurrence(jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.zeros(3), impl="fused")


# ---------------------------------------------------------------- language model use


def test_char_lm_overfits_and_samples():
    V, steps = 8, 120
    model = jaxseq.models.char_lm(V, cell="mingru", hidden=32, layers=1, embed=16)
    params = model.init(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(11).integers(0, V, (17, 4)))
    optimizer = optax.adam(2e-2)

    def loss_fn(params):
        _, logits = model.apply(params, model.initial_carry((4,)), tokens[:-1], impl="associative")
        return jnp.mean(jaxseq.models.cross_entropy(logits, tokens[1:]))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    chex.clear_trace_counter()
    opt_state = optimizer.init(params)
    first = None
    for _ in range(steps):
        params, opt_state, loss = train_step(params, opt_state)
        first = float(loss) if first is None else first
    assert first > 0.9 * np.log(V)  # starts near chance: ln 8 = 2.08 nats
    assert float(loss) < 0.5, (first, float(loss))  # 64 random tokens memorised
    draw = functools.partial(
        jaxseq.sample.sample, model, params, jax.random.key(1), tokens[:3, 0], length=12, num=2
    )
    samples = draw()
    chex.assert_shape(samples, (2, 12))
    assert samples.dtype == jnp.int32
    assert np.all((np.asarray(samples) >= 0) & (np.asarray(samples) < V))
    chex.assert_trees_all_equal(samples, draw())


def test_two_layer_minlstm_char_lm_samples():
    model = jaxseq.models.char_lm(6, cell="minlstm", hidden=8, layers=2, embed=4)
    params = model.init(jax.random.key(2))
    samples = jaxseq.sample.sample(
        model, params, jax.random.key(3), jnp.array([1, 2]), length=5, num=3
    )
    chex.assert_shape(samples, (3, 5))
    assert np.all((np.asarray(samples) >= 0) & (np.asarray(samples) < 6))
