"""Each cell against the independent NumPy reference (tests/reference.py), biases non-zero."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
import reference

H, F, T = 5, 4, 6
BATCH = (3,)

FACTORIES = {
    "rnn_tanh": lambda h, **kw: jaxseq.rnn(h, **kw),
    "rnn_relu": lambda h, **kw: jaxseq.rnn(h, activation="relu", **kw),
    "lstm": lambda h, **kw: jaxseq.lstm(h, **kw),
    "gru_reset_after": lambda h, **kw: jaxseq.gru(h, reset_after=True, **kw),
    "gru_reset_before": lambda h, **kw: jaxseq.gru(h, reset_after=False, **kw),
}
PARAM_TYPES = {
    "rnn_tanh": jaxseq.RNNParams,
    "rnn_relu": jaxseq.RNNParams,
    "lstm": jaxseq.LSTMParams,
    "gru_reset_after": jaxseq.GRUParams,
    "gru_reset_before": jaxseq.GRUParams,
}
CELLS = list(FACTORIES)


def to_jaxseq(name, ref_params, dtype):
    """The reference's per-gate params as the jaxseq params NamedTuple of ``dtype``."""
    fields = {k: jnp.asarray(v, dtype) for k, v in reference.fused(name, ref_params).items()}
    if PARAM_TYPES[name] is jaxseq.GRUParams:
        fields.setdefault("b_hn", None)
    return PARAM_TYPES[name](**fields)


def random_carry(rng, name, batch, dtype):
    """A non-zero carry, as ``(jaxseq_carry, reference_carry)``."""
    h = 0.5 * rng.standard_normal((*batch, H))
    if name == "lstm":
        c = rng.standard_normal((*batch, H))
        return jaxseq.LSTMState(jnp.asarray(h, dtype), jnp.asarray(c, dtype)), (h, c)
    return jnp.asarray(h, dtype), h


def ref_carry_tree(name, carry):
    return jaxseq.LSTMState(*carry) if name == "lstm" else carry


def run_steps(cell, params, carry, xs):
    """``cell.apply`` over time in a Python loop, independent of ``unroll``."""
    ys = []
    for x in xs:
        carry, y = cell.apply(params, carry, x)
        ys.append(y)
    return carry, jnp.stack(ys)


def compare_with_reference(name, dtype, atol, seed=0):
    rng = np.random.default_rng(seed)
    ref_params = reference.random_params(rng, name, F, H)
    xs = rng.standard_normal((T, *BATCH, F))
    carry, ref_carry = random_carry(rng, name, BATCH, dtype)
    cell = FACTORIES[name](H)
    params = to_jaxseq(name, ref_params, dtype)

    got_carry, got_ys = run_steps(cell, params, carry, jnp.asarray(xs, dtype))
    want_carry, want_ys = reference.run(name, ref_params, ref_carry, xs)

    chex.assert_shape(got_ys, (T, *BATCH, H))
    chex.assert_type(got_ys, dtype)
    chex.assert_trees_all_close(got_ys, want_ys, atol=atol, rtol=0)
    chex.assert_trees_all_close(got_carry, ref_carry_tree(name, want_carry), atol=atol, rtol=0)


@pytest.mark.parametrize("name", CELLS)
def test_cell_matches_reference_float32(name):
    compare_with_reference(name, jnp.float32, atol=1e-5)


@pytest.mark.parametrize("name", CELLS)
def test_cell_matches_reference_float64(name):
    with jax.enable_x64(True):
        compare_with_reference(name, jnp.float64, atol=1e-10)


def test_float64_context_does_not_leak():
    with jax.enable_x64(True):
        assert jnp.asarray(1.0, jnp.float64).dtype == jnp.float64
    assert jnp.asarray(1.0).dtype == jnp.float32


@pytest.mark.parametrize("name", ["lstm", "gru_reset_after", "gru_reset_before"])
def test_reference_comparison_detects_swapped_gates(name):
    """The comparison is sensitive to the fused layout: swapping two gate blocks of the
    recurrent matrix (or, for the GRU, the r and z input blocks) must break it."""
    rng = np.random.default_rng(1)
    ref_params = reference.random_params(rng, name, F, H)
    xs = rng.standard_normal((T, *BATCH, F))
    _, ref_carry = random_carry(rng, name, BATCH, jnp.float32)
    carry, _ = random_carry(np.random.default_rng(1), name, BATCH, jnp.float32)
    params = to_jaxseq(name, ref_params, jnp.float32)
    blocks = jnp.split(params.w_ih, len(reference.CELL_GATES[name]), axis=1)
    blocks[0], blocks[1] = blocks[1], blocks[0]
    swapped = params._replace(w_ih=jnp.concatenate(blocks, axis=1))
    _, want_ys = reference.run(name, ref_params, ref_carry, xs)
    _, got_ys = run_steps(FACTORIES[name](H), swapped, carry, jnp.asarray(xs, jnp.float32))
    assert np.max(np.abs(np.asarray(got_ys) - want_ys)) > 1e-3


def test_gru_conventions_differ():
    """The two GRU references (and cells) really are different functions."""
    rng = np.random.default_rng(2)
    p = reference.random_params(rng, "gru_reset_after", F, H)
    h = rng.standard_normal((2, H))
    x = rng.standard_normal((2, F))
    after, _ = reference.step("gru_reset_after", p, h, x)
    before, _ = reference.step("gru_reset_before", p, h, x)
    assert np.max(np.abs(after - before)) > 1e-2


@pytest.mark.parametrize("name", CELLS)
def test_apply_is_step_of_project(name):
    cell = FACTORIES[name](H)
    params = cell.init(jax.random.key(0), F)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, F)), jnp.float32)
    carry, _ = random_carry(rng, name, (2,), jnp.float32)
    chex.assert_trees_all_close(
        cell.apply(params, carry, x),
        cell.step(params, carry, cell.project(params, x)),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("name", CELLS)
def test_init_shapes_and_carry(name):
    cell = FACTORIES[name](H)
    params = cell.init(jax.random.key(0), F)
    G = len(reference.CELL_GATES[name])
    assert cell.num_gates == G and cell.hidden_size == H
    chex.assert_shape([params.w_ih, params.w_hh, params.b], [(F, G * H), (H, G * H), (G * H,)])
    if name == "gru_reset_after":
        chex.assert_shape(params.b_hn, (H,))
    if name == "gru_reset_before":
        assert params.b_hn is None
    for batch in [(), (2,), (2, 3)]:
        carry = cell.initial_carry(batch)
        chex.assert_tree_shape_suffix(carry, (H,))
        chex.assert_tree_shape_prefix(carry, batch)
        assert all(l.shape == (*batch, H) for l in jax.tree.leaves(carry))
        assert all(not np.any(np.asarray(l)) for l in jax.tree.leaves(carry))
    if name == "lstm":
        np.testing.assert_array_equal(params.b[H : 2 * H], 1.0)
        np.testing.assert_array_equal(params.b[:H], 0.0)


def test_init_is_deterministic_in_the_key_and_respects_param_dtype():
    cell = jaxseq.gru(H, param_dtype=jnp.bfloat16)
    a, b = cell.init(jax.random.key(5), F), cell.init(jax.random.key(5), F)
    chex.assert_trees_all_equal(a, b)
    chex.assert_type([a.w_ih, a.w_hh, a.b, a.b_hn], jnp.bfloat16)
    c = cell.init(jax.random.key(6), F)
    assert not np.array_equal(np.asarray(a.w_ih, np.float32), np.asarray(c.w_ih, np.float32))


def test_recurrent_init_is_orthogonal_per_gate():
    params = jaxseq.lstm(H).init(jax.random.key(0), F)
    for block in jnp.split(params.w_hh, 4, axis=1):
        np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_hidden_size_is_rejected(bad):
    with pytest.raises(ValueError, match="hidden_size"):
        jaxseq.lstm(bad)


def test_make_cell_and_bad_names():
    assert jaxseq.make_cell("gru", 4, reset_after=False).name == "gru"
    for name in ("mingru", "minlstm"):  # tests/test_mincells.py holds them to the equations
        assert jaxseq.make_cell(name, 4).name == name and name in jaxseq.CELLS
    with pytest.raises(ValueError, match="unknown cell"):
        jaxseq.make_cell("transformer", 4)
    with pytest.raises(ValueError, match="activation"):
        jaxseq.rnn(4, activation="sigmoid")


@pytest.mark.parametrize("name", CELLS)
def test_recurrent_cells_have_no_linear_coefficients(name):
    """Only a cell whose step is ``a * h + b`` may offer ``coefficients`` to unroll."""
    assert FACTORIES[name](H).coefficients is None
