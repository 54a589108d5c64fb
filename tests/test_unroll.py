"""``unroll`` and ``stack``: against the Python-loop twin, masking, retracing, gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import jaxseq

H, F, T = 4, 3, 5

FACTORIES = {
    "rnn": lambda h, **kw: jaxseq.rnn(h, **kw),
    "lstm": lambda h, **kw: jaxseq.lstm(h, **kw),
    "gru": lambda h, **kw: jaxseq.gru(h, reset_after=True, **kw),
    "gru_cho": lambda h, **kw: jaxseq.gru(h, reset_after=False, **kw),
}


# Test data comes from NumPy: every eager jax.random call of a new shape would compile.


def randomize(tree, seed, scale=0.5, dtype=None):
    """Replaces every leaf (biases included) with N(0, scale²) noise of its shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda l: jnp.asarray(scale * rng.standard_normal(l.shape), dtype or l.dtype), tree
    )


def setup(name, batch, key=0, dtype=jnp.float32):
    """A cell with random params, a random non-zero carry and inputs ``(T, *batch, F)``."""
    cell = FACTORIES[name](H)
    shapes = jax.eval_shape(lambda k: cell.init(k, F), jax.random.key(0))
    params = randomize(shapes, key, dtype=dtype)
    carry = randomize(jax.eval_shape(lambda: cell.initial_carry(batch)), key + 1000, dtype=dtype)
    xs = jnp.asarray(np.random.default_rng(key + 2000).standard_normal((T, *batch, F)), dtype)
    return cell, params, carry, xs


class UnrollTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        ("rnn", (), False),
        ("gru", (2, 3), False),
        ("gru_cho", (2,), True),
        ("lstm", (2, 3), True),
    )
    def test_unroll_matches_reference_unroll(self, name, batch, reverse):
        cell, params, carry, xs = setup(name, batch)
        run = self.variant(functools.partial(jaxseq.unroll, cell, reverse=reverse))
        got_carry, got_ys = run(params, carry, xs)
        want_carry, want_ys = jaxseq.reference_unroll(cell, params, carry, xs, reverse=reverse)
        chex.assert_shape(got_ys, (T, *batch, H))
        chex.assert_trees_all_equal_shapes_and_dtypes(got_carry, carry)
        chex.assert_trees_all_close(got_ys, want_ys, atol=1e-5, rtol=0)
        chex.assert_trees_all_close(got_carry, want_carry, atol=1e-5, rtol=0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("lstm", False), ("gru", True))
    def test_seq_lengths_match_truncated_sequences(self, name, reverse):
        lengths = np.array([T, 2, 0, 3])
        cell, params, carry, xs = setup(name, (len(lengths),), key=1)
        run = self.variant(functools.partial(jaxseq.unroll, cell, reverse=reverse))
        got_carry, got_ys = run(params, carry, xs, seq_lengths=jnp.asarray(lengths))
        chex.assert_shape(got_ys, (T, len(lengths), H))
        for b, length in enumerate(lengths):
            carry_b = jax.tree.map(lambda a: a[b], carry)
            if length == 0:  # nothing to run: the initial carry comes back
                want_carry, want_ys = carry_b, jnp.zeros((0, H))
            else:  # the Python loop over the valid prefix alone (reversed when reverse)
                want_carry, want_ys = jaxseq.reference_unroll(
                    cell, params, carry_b, xs[:length, b], reverse=reverse
                )
            chex.assert_trees_all_close(
                jax.tree.map(lambda a: a[b], got_carry), want_carry, atol=1e-6, rtol=0
            )
            chex.assert_trees_all_close(got_ys[:length, b], want_ys, atol=1e-6, rtol=0)
            # Padding outputs are exactly zero, not merely small.
            assert np.all(np.asarray(got_ys[length:, b]) == 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_seq_lengths_with_two_batch_axes(self):
        lengths = np.array([[1, T], [4, 0]])
        cell, params, carry, xs = setup("rnn", (2, 2), key=2)
        got_carry, got_ys = self.variant(functools.partial(jaxseq.unroll, cell))(
            params, carry, xs, seq_lengths=lengths
        )
        for i in range(2):
            for j in range(2):
                L = lengths[i, j]
                want_carry, want_ys = (
                    jaxseq.reference_unroll(cell, params, carry[i, j], xs[:L, i, j])
                    if L
                    else (carry[i, j], jnp.zeros((0, H)))
                )
                np.testing.assert_allclose(got_carry[i, j], want_carry, atol=1e-6)
                np.testing.assert_allclose(got_ys[:L, i, j], want_ys, atol=1e-6)
                assert np.all(np.asarray(got_ys[L:, i, j]) == 0.0)


def test_full_lengths_equal_no_mask():
    cell, params, carry, xs = setup("gru", (3,), key=3)
    run = functools.partial(jaxseq.unroll, cell, reverse=True)
    chex.assert_trees_all_close(
        run(params, carry, xs, seq_lengths=jnp.full((3,), T)),
        run(params, carry, xs),
        atol=1e-6,
        rtol=0,
    )


def test_windows_chain_like_truncated_bptt():
    """Unrolling two windows, the second from the first's final carry, equals one unroll."""
    cell, params, carry, xs = setup("lstm", (2,), key=4)
    carry_a, ys_a = jaxseq.unroll(cell, params, carry, xs[:2])
    carry_b, ys_b = jaxseq.unroll(cell, params, carry_a, xs[2:])
    carry_full, ys_full = jaxseq.unroll(cell, params, carry, xs)
    chex.assert_trees_all_close(
        (carry_b, jnp.concatenate([ys_a, ys_b])), (carry_full, ys_full), atol=1e-6, rtol=0
    )


def test_jitted_unroll_traces_once():
    chex.clear_trace_counter()
    cell, params, carry, xs = setup("lstm", (2,), key=5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, carry, xs, lengths):
        return jaxseq.unroll(cell, params, carry, xs, seq_lengths=lengths)

    first = run(params, carry, xs, jnp.array([T, 2]))
    _, _, carry2, xs2 = setup("lstm", (2,), key=6)
    second = run(randomize(params, 7), carry2, xs2, jnp.array([1, 3]))
    assert not np.allclose(first[1], second[1])
    # A new shape must retrace, which the counter reports: the check above can fail.
    with pytest.raises(AssertionError):
        run(params, carry, xs[:3], jnp.array([3, 2]))


@pytest.mark.parametrize("name,order", [("rnn", 1), ("lstm", 1), ("gru", 2), ("gru_cho", 1)])
def test_gradients_through_unroll_float64(name, order):
    with jax.enable_x64(True):
        cell, params, carry, xs = setup(name, (2,), key=8, dtype=jnp.float64)
        weights = jnp.asarray(np.random.default_rng(9).standard_normal((T, 2, H)))

        def loss(params, carry, xs):
            final, ys = jaxseq.unroll(cell, params, carry, xs)
            return jnp.sum(weights * ys) + sum(jnp.sum(l**2) for l in jax.tree.leaves(final))

        # jit keeps the many evaluations of check_grads cheap; it does not change the maths.
        # Finite differences of finite differences (order 2) are less exact; a wrong
        # gradient is off by O(1), far beyond either bound.
        tol = 1e-5 if order == 1 else 1e-4
        check_grads(
            jax.jit(loss), (params, carry, xs), order=order, modes=("rev",), atol=tol, rtol=tol
        )


def test_gradients_with_seq_lengths_and_reverse_float64():
    with jax.enable_x64(True):
        cell, params, carry, xs = setup("lstm", (3,), key=10, dtype=jnp.float64)
        lengths = jnp.array([T, 3, 1])

        def loss(params, xs):
            final, ys = jaxseq.unroll(cell, params, carry, xs, reverse=True, seq_lengths=lengths)
            return jnp.sum(jnp.sin(ys)) + jnp.sum(final.c)

        check_grads(jax.jit(loss), (params, xs), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
        # Inputs past each sequence's end cannot influence anything.
        g = jax.grad(loss, argnums=1)(params, xs)
        assert np.all(np.asarray(g[3:, 1]) == 0.0) and np.all(np.asarray(g[1:, 2]) == 0.0)
        assert np.all(np.abs(np.asarray(g[:3, 1])) > 0.0)


# ------------------------------------------------------------------------------- stack


@pytest.mark.parametrize(
    "num_layers,bidirectional,batch",
    [(1, False, (2,)), (3, False, (2, 3)), (2, True, (2,)), (2, True, ())],
)
def test_stack_shapes(num_layers, bidirectional, batch):
    net = jaxseq.stack(jaxseq.lstm(H), num_layers, bidirectional=bidirectional)
    params = net.init(jax.random.key(0), F)
    D = 2 if bidirectional else 1
    assert net.output_size == D * H and len(params) == num_layers
    for layer, p in enumerate(params):
        pairs = p if bidirectional else (p,)
        assert len(pairs) == D
        for q in pairs:
            chex.assert_shape(q.w_ih, (F if layer == 0 else D * H, 4 * H))
    carry = net.initial_carry(batch)
    new_carry, ys = jax.jit(net.apply)(params, carry, jnp.ones((T, *batch, F)))
    chex.assert_shape(ys, (T, *batch, D * H))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_carry, carry)
    chex.assert_tree_all_finite((new_carry, ys))


def test_stack_is_composition_of_unrolls():
    """Two bidirectional layers equal forward and reversed unrolls, concatenated, twice."""
    cell = jaxseq.gru(H)
    net = jaxseq.stack(cell, 2, bidirectional=True)
    params = randomize(jax.eval_shape(lambda k: net.init(k, F), jax.random.key(1)), 2)
    carry = randomize(net.initial_carry((2,)), 3)
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((T, 2, F)), jnp.float32)
    lengths = jnp.array([T, 3])
    got_carry, got_ys = net.apply(params, carry, xs, seq_lengths=lengths)
    inputs, want_carry = xs, []
    for (pf, pb), (cf, cb) in zip(params, carry):
        cf, yf = jaxseq.reference_unroll(cell, pf, cf, inputs)
        cb, yb = jaxseq.reference_unroll(cell, pb, cb, inputs, reverse=True)
        want_carry.append((cf, cb))
        inputs = jnp.concatenate([yf, yb], axis=-1)
    # Sequence 0 is unpadded, so the plain loop is its reference.
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[0], got_carry),
        jax.tree.map(lambda a: a[0], tuple(want_carry)),
        atol=1e-5,
        rtol=0,
    )
    chex.assert_trees_all_close(got_ys[:, 0], inputs[:, 0], atol=1e-5, rtol=0)
    assert np.all(np.asarray(got_ys[3:, 1]) == 0.0)


def test_stack_dropout():
    net = jaxseq.stack(jaxseq.rnn(H), 3, dropout=0.5)
    params = net.init(jax.random.key(0), F)
    carry = net.initial_carry((2,))
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((T, 2, F)), jnp.float32)
    apply = jax.jit(net.apply)
    plain = apply(params, carry, xs)
    # Without a key dropout is off: deterministic and equal to a dropout-free stack.
    chex.assert_trees_all_equal(plain, apply(params, carry, xs))
    no_dropout = jaxseq.stack(jaxseq.rnn(H), 3).apply(params, carry, xs)
    chex.assert_trees_all_close(plain, no_dropout, atol=1e-6, rtol=0)
    a = apply(params, carry, xs, dropout_key=jax.random.key(2))
    b = apply(params, carry, xs, dropout_key=jax.random.key(2))
    c = apply(params, carry, xs, dropout_key=jax.random.key(3))
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a[1], plain[1], atol=1e-3)
    assert not np.allclose(a[1], c[1], atol=1e-3)


def test_stack_dropout_skips_the_last_layer():
    """With one layer there is no between-layer output to drop: a key changes nothing."""
    net = jaxseq.stack(jaxseq.gru(H), 1, dropout=0.9)
    params = net.init(jax.random.key(0), F)
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((T, 2, F)), jnp.float32)
    chex.assert_trees_all_equal(
        net.apply(params, net.initial_carry((2,)), xs, dropout_key=jax.random.key(5)),
        net.apply(params, net.initial_carry((2,)), xs),
    )


@pytest.mark.parametrize("kwargs", [dict(num_layers=0), dict(dropout=1.0), dict(dropout=-0.1)])
def test_stack_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        jaxseq.stack(jaxseq.rnn(H), **kwargs)


def test_impls_name_every_implementation():
    assert jaxseq.IMPLS == ("auto", "scan", "fused", "associative")
    cell, params, carry, xs = setup("lstm", (2,), key=11)
    with pytest.raises(ValueError, match="impl='associative'.*'lstm' cell.*not linear"):
        jaxseq.unroll(cell, params, carry, xs, impl="associative")
