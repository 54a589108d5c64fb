"""Parity with flax.linen and PyTorch, the FlaxCell adapter, and the weight converters."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
import reference

H, F, T, B = 4, 3, 6, 3
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def normal(seed, shape, scale=1.0):
    """float32 N(0, scale²) test data (NumPy: eager jax.random would compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ------------------------------------------------------------------------ flax.linen


LINEN_CELLS = {
    "SimpleCell": (nn.SimpleCell, lambda: jaxseq.rnn(H)),
    "LSTMCell": (nn.LSTMCell, lambda: jaxseq.lstm(H)),
    "OptimizedLSTMCell": (nn.OptimizedLSTMCell, lambda: jaxseq.lstm(H)),
    "GRUCell": (nn.GRUCell, lambda: jaxseq.gru(H)),
}


@pytest.mark.parametrize("linen_name", list(LINEN_CELLS))
def test_linen_cell_parity(linen_name):
    linen_cls, make = LINEN_CELLS[linen_name]
    # Random non-zero biases: linen's default zero biases would hide a misplaced bias.
    linen_cell = linen_cls(features=H, bias_init=nn.initializers.normal(0.5))
    layer = nn.RNN(linen_cell, time_major=True, return_carry=True)
    xs = normal(1, (T, B, F))
    h0, c0 = normal(2, (B, H), 0.5), normal(3, (B, H))
    is_lstm = "LSTM" in linen_name
    linen_carry0 = (c0, h0) if is_lstm else h0
    variables = layer.init(jax.random.key(0), xs, initial_carry=linen_carry0)
    linen_carry, linen_ys = layer.apply(variables, xs, initial_carry=linen_carry0)

    cell = make()
    params = jaxseq.from_flax_linen_params(variables)
    assert np.any(np.asarray(params.b) != 0.0)
    carry0 = jaxseq.LSTMState(h0, c0) if is_lstm else h0
    carry, ys = jaxseq.unroll(cell, params, carry0, xs)
    chex.assert_trees_all_close(ys, linen_ys, atol=1e-5, rtol=0)
    want_carry = jaxseq.LSTMState(h=linen_carry[1], c=linen_carry[0]) if is_lstm else linen_carry
    chex.assert_trees_all_close(carry, want_carry, atol=1e-5, rtol=0)


def test_from_flax_linen_params_accepts_bare_cell_params_and_checks_names():
    cell = nn.GRUCell(features=H)
    variables = cell.init(jax.random.key(0), jnp.zeros((B, H)), jnp.zeros((B, F)))
    bare = jaxseq.from_flax_linen_params(variables["params"], cell_name="gru")
    wrapped = jaxseq.from_flax_linen_params(variables)
    chex.assert_trees_all_equal(bare, wrapped)
    chex.assert_shape(
        [bare.w_ih, bare.w_hh, bare.b, bare.b_hn], [(F, 3 * H), (H, 3 * H), (3 * H,), (H,)]
    )
    with pytest.raises(ValueError, match="cell_name='lstm'"):
        jaxseq.from_flax_linen_params(variables, cell_name="lstm")
    with pytest.raises(ValueError, match="match no supported cell"):
        jaxseq.from_flax_linen_params({"ir": {}, "hz": {}})
    broken = {k: dict(v) for k, v in variables["params"].items()}
    del broken["hn"]["bias"]
    with pytest.raises(ValueError, match="'hn'"):
        jaxseq.from_flax_linen_params(broken)


# -------------------------------------------------------------------------- FlaxCell


@pytest.mark.parametrize("cell_name", ["lstm", "gru_cho"])
def test_flax_cell_in_nn_rnn_equals_unroll(cell_name):
    cell = jaxseq.lstm(H) if cell_name == "lstm" else jaxseq.gru(H, reset_after=False)
    flax_cell = jaxseq.FlaxCell(cell)
    xs_bt = normal(1, (B, T, F))  # nn.RNN's default layout: (batch, time, F)
    xs = jnp.swapaxes(xs_bt, 0, 1)
    lengths = jnp.array([T, 2, 4])
    layer = nn.RNN(flax_cell, return_carry=True)
    variables = layer.init(jax.random.key(0), xs_bt)
    names = {"w_ih", "w_hh", "b"}
    assert set(variables["params"]["cell"]) == names
    params = flax_cell.to_jaxseq_params(variables["params"]["cell"])
    params = jax.tree.map(lambda a: a + normal(7, a.shape, 0.3), params)  # non-zero biases
    variables = {"params": {"cell": flax_cell.from_jaxseq_params(params)}}
    carry0 = jax.tree.map(lambda a: a + 0.5, cell.initial_carry((B,)))

    for reverse in (False, True):
        flax_carry, flax_ys = jax.jit(
            lambda v, x, c, reverse=reverse: layer.apply(
                v, x, initial_carry=c, seq_lengths=lengths, reverse=reverse, keep_order=True
            )
        )(variables, xs_bt, carry0)
        carry, ys = jaxseq.unroll(cell, params, carry0, xs, reverse=reverse, seq_lengths=lengths)
        chex.assert_trees_all_close(flax_carry, carry, atol=1e-5, rtol=0)
        for b, length in enumerate(lengths):  # linen leaves padding outputs unspecified
            chex.assert_trees_all_close(flax_ys[b, :length], ys[:length, b], atol=1e-5, rtol=0)


def test_flax_cell_initialize_carry_and_bidirectional():
    cell = jaxseq.gru(H)
    flax_cell = jaxseq.FlaxCell(cell)
    carry = flax_cell.initialize_carry(jax.random.key(0), (2, 5, F))
    chex.assert_shape(carry, (2, 5, H))
    assert flax_cell.num_feature_axes == 1
    lstm_carry = jaxseq.FlaxCell(jaxseq.lstm(H)).initialize_carry(jax.random.key(0), (2, F))
    assert isinstance(lstm_carry, jaxseq.LSTMState)
    chex.assert_shape([lstm_carry.h, lstm_carry.c], [(2, H), (2, H)])

    bi = nn.Bidirectional(nn.RNN(jaxseq.FlaxCell(cell)), nn.RNN(jaxseq.FlaxCell(cell)))
    xs_bt = normal(4, (B, T, F))
    variables = bi.init(jax.random.key(1), xs_bt)
    assert set(variables["params"]["forward_rnn"]["cell"]) == {"w_ih", "w_hh", "b", "b_hn"}
    ys_bt = bi.apply(variables, xs_bt)
    net = jaxseq.stack(cell, 1, bidirectional=True)
    to_jaxseq = lambda d: flax_cell.to_jaxseq_params(variables["params"][d]["cell"])
    params = ((to_jaxseq("forward_rnn"), to_jaxseq("backward_rnn")),)
    _, ys = net.apply(params, net.initial_carry((B,)), jnp.swapaxes(xs_bt, 0, 1))
    chex.assert_shape(ys_bt, (B, T, 2 * H))
    chex.assert_trees_all_close(jnp.swapaxes(ys, 0, 1), ys_bt, atol=1e-5, rtol=0)


# -------------------------------------------------- PyTorch state_dict (NumPy only)


@pytest.mark.parametrize("name", ["rnn_tanh", "lstm", "gru_reset_after"])
def test_from_torch_state_dict_matches_numpy_reference(name):
    """Runs without PyTorch: a state_dict laid out by the reference module."""
    rng = np.random.default_rng(0)
    p = reference.random_params(rng, name, F, H)
    sd = {k: v.astype(np.float32) for k, v in reference.torch_layout(name, p).items()}
    cell_name = name.split("_")[0]
    params, info = jaxseq.from_torch_state_dict(sd, cell_name)
    assert info == jaxseq.TorchRNNInfo(cell_name, F, H, 1, False, True)
    assert len(params) == 1
    xs = rng.standard_normal((T, B, F))
    cell = jaxseq.make_cell(cell_name, H)
    _, ys = jaxseq.unroll(cell, params[0], cell.initial_carry((B,)), jnp.asarray(xs, jnp.float32))
    zeros = np.zeros((B, H))
    _, want = reference.run(name, p, (zeros, zeros) if name == "lstm" else zeros, xs)
    chex.assert_trees_all_close(ys, want, atol=1e-5, rtol=0)


def random_state_dict(name, num_layers=2, bidirectional=True, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    G, D = GATES[name], 2 if bidirectional else 1
    sd = {}
    for layer in range(num_layers):
        for suffix in ("", "_reverse")[:D]:
            in_size = F if layer == 0 else D * H
            sd[f"weight_ih_l{layer}{suffix}"] = rng.standard_normal((G * H, in_size))
            sd[f"weight_hh_l{layer}{suffix}"] = rng.standard_normal((G * H, H))
            if bias:
                sd[f"bias_ih_l{layer}{suffix}"] = rng.standard_normal(G * H)
                sd[f"bias_hh_l{layer}{suffix}"] = rng.standard_normal(G * H)
    return sd


def test_from_torch_state_dict_layout_and_bias_sums():
    sd = random_state_dict("gru")
    params, info = jaxseq.from_torch_state_dict(
        sd, "gru", num_layers=2, bidirectional=True, dtype=jnp.float32
    )
    assert info == jaxseq.TorchRNNInfo("gru", F, H, 2, True, True)
    (fwd0, bwd0), (fwd1, _) = params
    np.testing.assert_allclose(bwd0.w_hh, sd["weight_hh_l0_reverse"].T, rtol=1e-6)
    chex.assert_shape(fwd1.w_ih, (2 * H, 3 * H))
    b_ih, b_hh = sd["bias_ih_l0"], sd["bias_hh_l0"]
    np.testing.assert_allclose(fwd0.b[: 2 * H], b_ih[: 2 * H] + b_hh[: 2 * H], rtol=1e-6)
    np.testing.assert_allclose(fwd0.b[2 * H :], b_ih[2 * H :], rtol=1e-6)
    np.testing.assert_allclose(fwd0.b_hn, b_hh[2 * H :], rtol=1e-6)
    chex.assert_type(fwd0.w_ih, jnp.float32)

    no_bias, info = jaxseq.from_torch_state_dict(random_state_dict("lstm", bias=False), "lstm")
    assert not info.bias
    assert all(not np.any(np.asarray(p.b)) for pair in no_bias for p in pair)

    prefixed = {"encoder." + k: v for k, v in random_state_dict("rnn", 1, False).items()}
    prefixed["decoder.weight"] = np.zeros((2, 2))
    params, info = jaxseq.from_torch_state_dict(prefixed, "rnn", prefix="encoder.")
    assert info.num_layers == 1 and not info.bidirectional
    assert isinstance(params[0], jaxseq.RNNParams)


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "missing .*weight_hh_l1"),
        ("partial_bias", "missing .*bias_hh_l1_reverse"),
        ("shape", r"weight_hh_l0 has shape \(12, 5\)"),
        ("num_layers", "num_layers=3"),
        ("bidirectional", "bidirectional=False"),
        ("unknown_key", "unexpected state_dict keys .*'foo'"),
        ("proj_size", "proj_size"),
        ("wrong_cell", "shape"),
        ("bad_name", "unknown cell"),
        ("empty", "no recurrent weights"),
    ],
)
def test_from_torch_state_dict_errors(case, match):
    sd, name, kwargs = random_state_dict("lstm"), "lstm", {}
    if case == "missing":
        sd = _without(sd, "weight_hh_l1")
    elif case == "partial_bias":
        sd = _without(sd, "bias_hh_l1_reverse")
    elif case == "shape":
        sd["weight_hh_l0"] = np.zeros((4 * H - 4, H + 1))
    elif case == "num_layers":
        kwargs = dict(num_layers=3)
    elif case == "bidirectional":
        kwargs = dict(bidirectional=False)
    elif case == "unknown_key":
        sd["foo"] = np.zeros(3)
    elif case == "proj_size":
        sd["weight_hr_l0"] = np.zeros((2, H))
    elif case == "wrong_cell":
        name = "gru"  # an LSTM's 4H = 16 rows cannot be split into 3 gates
    elif case == "bad_name":
        name = "transformer"
    elif case == "empty":
        sd = {}
    with pytest.raises(ValueError, match=match):
        jaxseq.from_torch_state_dict(sd, name, **kwargs)


# ------------------------------------------------------------------ PyTorch parity


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def torch_module(torch, name, **kwargs):
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[name]
    torch.manual_seed(0)
    module = cls(F, H, batch_first=False, **kwargs)
    with torch.no_grad():
        for p in module.parameters():  # every parameter, biases too, clearly non-zero
            p.normal_(0.0, 0.5)
    return module


def torch_initial_state(torch, name, num_layers, D):
    """Random ``h0`` (and ``c0``) as torch tensors and as a jaxseq stack carry."""
    rng = np.random.default_rng(1)
    h0 = (0.5 * rng.standard_normal((num_layers * D, B, H))).astype(np.float32)
    c0 = rng.standard_normal((num_layers * D, B, H)).astype(np.float32)

    def one(layer, d):
        i = layer * D + d
        return (
            jaxseq.LSTMState(jnp.asarray(h0[i]), jnp.asarray(c0[i]))
            if name == "lstm"
            else jnp.asarray(h0[i])
        )

    carry = tuple(
        tuple(one(l, d) for d in range(D)) if D == 2 else one(l, 0) for l in range(num_layers)
    )
    state = (torch.from_numpy(h0), torch.from_numpy(c0)) if name == "lstm" else torch.from_numpy(h0)
    return state, carry


def assert_final_state_matches(name, carry, state, num_layers, D):
    h_n = state[0] if name == "lstm" else state
    for layer in range(num_layers):
        for d in range(D):
            c = carry[layer][d] if D == 2 else carry[layer]
            want = h_n[layer * D + d].detach().numpy()
            np.testing.assert_allclose(c.h if name == "lstm" else c, want, atol=1e-5, rtol=0)
            if name == "lstm":
                np.testing.assert_allclose(
                    c.c, state[1][layer * D + d].detach().numpy(), atol=1e-5, rtol=0
                )


@pytest.mark.parametrize(
    "name,bidirectional,packed",
    [
        ("rnn", False, False),
        ("rnn", True, True),
        ("lstm", False, False),
        ("lstm", True, True),
        ("gru", False, True),
        ("gru", True, False),
    ],
)
def test_torch_parity(torch, name, bidirectional, packed):
    """Two layers, time-major; ``packed`` uses PackedSequence against ``seq_lengths``."""
    L, D = 2, 2 if bidirectional else 1
    module = torch_module(torch, name, num_layers=L, bidirectional=bidirectional)
    xs = np.array(normal(5, (T, B, F)))
    lengths = np.array([T, 3, 1])
    state0, carry0 = torch_initial_state(torch, name, L, D)
    with torch.no_grad():
        inputs = torch.from_numpy(xs)
        if packed:
            inputs = torch.nn.utils.rnn.pack_padded_sequence(
                inputs, torch.from_numpy(lengths), enforce_sorted=False
            )
        out, state = module(inputs, state0)
        if packed:
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)

    sd = {k: v.numpy() for k, v in module.state_dict().items()}
    params, info = jaxseq.from_torch_state_dict(sd, name)
    assert info == jaxseq.TorchRNNInfo(name, F, H, L, bidirectional, True)
    net = jaxseq.stack(jaxseq.make_cell(name, H), L, bidirectional=bidirectional)
    carry, ys = jax.jit(net.apply)(
        params, carry0, jnp.asarray(xs), seq_lengths=jnp.asarray(lengths) if packed else None
    )
    chex.assert_shape(ys, (T, B, D * H))
    np.testing.assert_allclose(ys, out.numpy(), atol=1e-5, rtol=0)
    assert_final_state_matches(name, carry, state, L, D)


@pytest.mark.parametrize("variant", ["relu", "no_bias"])
def test_torch_parity_relu_and_no_bias(torch, variant):
    name = "rnn" if variant == "relu" else "gru"
    kwargs = dict(nonlinearity="relu") if variant == "relu" else dict(bias=False)
    module = torch_module(torch, name, **kwargs)
    xs = np.array(normal(6, (T, B, F)))
    with torch.no_grad():
        out, h_n = module(torch.from_numpy(xs))
    params, info = jaxseq.from_torch_state_dict(
        {k: v.numpy() for k, v in module.state_dict().items()}, name
    )
    assert info.bias == (variant != "no_bias")
    cell = jaxseq.rnn(H, activation="relu") if variant == "relu" else jaxseq.gru(H)
    carry, ys = jaxseq.unroll(cell, params[0], cell.initial_carry((B,)), jnp.asarray(xs))
    np.testing.assert_allclose(ys, out.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(carry, h_n[0].numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------ jaxseq -> PyTorch (out)


def random_stack_params(name, num_layers=2, bidirectional=True, seed=0, **cell_kwargs):
    """``jaxseq.stack`` params with every leaf, biases included, clearly non-zero."""
    cell = jaxseq.make_cell(name, H, **cell_kwargs)
    net = jaxseq.stack(cell, num_layers, bidirectional=bidirectional)
    params = net.init(jax.random.key(seed), F)
    leaves, treedef = jax.tree.flatten(params)
    params = treedef.unflatten([a + normal(seed + i, a.shape, 0.5) for i, a in enumerate(leaves)])
    return cell, net, params


def test_to_torch_state_dict_round_trip_without_torch():
    for name in ("rnn", "lstm", "gru"):
        cell, net, params = random_stack_params(name)
        sd = jaxseq.to_torch_state_dict(params, net, as_numpy=True)
        assert list(sd)[:4] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
        assert all(isinstance(v, np.ndarray) for v in sd.values())
        back, info = jaxseq.from_torch_state_dict(sd, name)
        assert info == jaxseq.TorchRNNInfo(name, F, H, 2, True, True)
        chex.assert_trees_all_equal(back, params)  # exact: b + 0 is b
    one = jaxseq.to_torch_state_dict(params[0][1], cell, prefix="rnn.", as_numpy=True)
    assert set(one) == {f"rnn.{k}_l0" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    np.testing.assert_array_equal(one["rnn.bias_hh_l0"][: 2 * H], 0.0)
    np.testing.assert_array_equal(one["rnn.bias_hh_l0"][2 * H :], params[0][1].b_hn)


@pytest.mark.parametrize(
    "case,match",
    [
        ("cho", r"reset_after=False.*Cho"),
        ("mingru", "no counterpart of the 'mingru' cell"),
        ("stack", "the Stack has 3 layers"),
        ("wrong_params", "params must be a LSTMParams"),
        ("shapes", r"layer 1: w_ih \(5, 12\)"),
    ],
)
def test_to_torch_state_dict_errors(case, match):
    cell, net, params = random_stack_params("gru", bidirectional=False)
    target = cell
    if case == "cho":
        target = jaxseq.gru(H, reset_after=False)
        params = jaxseq.stack(target, 2).init(jax.random.key(0), F)
    elif case == "mingru":
        target = jaxseq.mingru(H)
        params = jaxseq.stack(target, 2).init(jax.random.key(0), F)
    elif case == "stack":
        target = jaxseq.stack(cell, 3)
    elif case == "wrong_params":
        target = jaxseq.lstm(H)
    elif case == "shapes":
        params = (params[0], params[1]._replace(w_ih=jnp.zeros((5, 3 * H))))
    with pytest.raises(ValueError, match=match):
        jaxseq.to_torch_state_dict(params, target, as_numpy=True)


@pytest.mark.parametrize(
    "name,bidirectional",
    [("rnn", True), ("lstm", True), ("gru", False), ("gru", True), ("rnn_relu", False)],
)
def test_to_torch_state_dict_loads_into_torch_and_matches(torch, name, bidirectional):
    cell_name, kwargs = ("rnn", dict(activation="relu")) if name == "rnn_relu" else (name, {})
    L, D = 2, 2 if bidirectional else 1
    cell, net, params = random_stack_params(cell_name, L, bidirectional, **kwargs)
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell_name]
    extra = dict(nonlinearity="relu") if name == "rnn_relu" else {}
    module = cls(F, H, num_layers=L, bidirectional=bidirectional, **extra)
    module.load_state_dict(jaxseq.to_torch_state_dict(params, net))  # strict: every key
    xs = np.array(normal(5, (T, B, F)))
    state0, carry0 = torch_initial_state(torch, cell_name, L, D)
    with torch.no_grad():
        out, state = module(torch.from_numpy(xs), state0)
    carry, ys = net.apply(params, carry0, jnp.asarray(xs))
    np.testing.assert_allclose(ys, out.numpy(), atol=1e-5, rtol=0)
    assert_final_state_matches(cell_name, carry, state, L, D)
    # And back: the state_dict torch now holds gives the params again, exactly.
    back, _ = jaxseq.from_torch_state_dict(
        {k: v.numpy() for k, v in module.state_dict().items()}, cell_name
    )
    chex.assert_trees_all_equal(back, params)


# ------------------------------------------------------------ jaxseq -> linen (out)


@pytest.mark.parametrize("linen_name", list(LINEN_CELLS))
def test_to_flax_linen_params_runs_in_linen_and_round_trips(linen_name):
    linen_cls, make = LINEN_CELLS[linen_name]
    cell = make()
    params = jax.tree.map(lambda a: a + normal(3, a.shape, 0.5), cell.init(jax.random.key(0), F))
    linen_params = jaxseq.to_flax_linen_params(params, cell, target=linen_name)
    layer = nn.RNN(linen_cls(features=H), time_major=True)
    xs = normal(1, (T, B, F))
    template = layer.init(jax.random.key(1), xs)
    assert jax.tree.structure(template["params"]["cell"]) == jax.tree.structure(linen_params)
    linen_ys = layer.apply({"params": {"cell": linen_params}}, xs)
    _, ys = jaxseq.unroll(cell, params, cell.initial_carry((B,)), xs)
    chex.assert_trees_all_close(ys, linen_ys, atol=1e-5, rtol=0)
    chex.assert_trees_all_equal(jaxseq.from_flax_linen_params(linen_params), params)


def test_to_flax_linen_params_errors():
    cho = jaxseq.gru(H, reset_after=False)
    with pytest.raises(ValueError, match=r"flax.linen cannot express .*reset_after=False"):
        jaxseq.to_flax_linen_params(cho.init(jax.random.key(0), F), cho)
    lstm = jaxseq.lstm(H)
    with pytest.raises(ValueError, match="target='GRUCell' cannot hold a jaxseq lstm"):
        jaxseq.to_flax_linen_params(lstm.init(jax.random.key(0), F), lstm, "GRUCell")


# ------------------------------------------------------------ equinox (in and out)


def test_equinox_arrays_round_trip_without_equinox():
    for cell in (jaxseq.lstm(H), jaxseq.gru(H)):
        params = jax.tree.map(
            lambda a: a + normal(4, a.shape, 0.5), cell.init(jax.random.key(0), F)
        )
        arrays = jaxseq.to_equinox_arrays(params, cell)
        chex.assert_shape(arrays["weight_ih"], (cell.num_gates * H, F))
        chex.assert_trees_all_equal(jaxseq.from_equinox(arrays, cell_name=cell.name), params)
    no_bias = jaxseq.from_equinox(
        {
            "weight_ih": np.ones((3 * H, F), np.float32),
            "weight_hh": np.ones((3 * H, H), np.float32),
            "bias": None,
            "bias_n": None,
        }
    )
    assert not np.any(np.asarray(no_bias.b)) and not np.any(np.asarray(no_bias.b_hn))
    with pytest.raises(ValueError, match="neither an LSTMCell"):
        jaxseq.from_equinox({"weight_ih": np.ones((2 * H, F)), "weight_hh": np.ones((2 * H, H))})
    rnn = jaxseq.rnn(H)
    with pytest.raises(ValueError, match="no vanilla"):
        jaxseq.to_equinox_arrays(rnn.init(jax.random.key(0), F), rnn)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_equinox_parity_and_round_trip(name):
    eqx = pytest.importorskip("equinox", reason="equinox parity tests need equinox")
    cls = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}[name]
    eqx_cell = cls(F, H, key=jax.random.key(0))  # equinox draws non-zero biases
    assert np.any(np.asarray(eqx_cell.bias) != 0.0)
    xs = normal(1, (T, B, F))
    h0, c0 = normal(2, (B, H), 0.5), normal(3, (B, H))
    eqx_carry0 = (h0, c0) if name == "lstm" else h0

    def run_eqx(module):
        def one_sequence(carry, xs_b):  # equinox cells are unbatched: scan, then vmap
            def step(c, x):
                c = module(x, c)
                return c, (c[0] if name == "lstm" else c)

            return jax.lax.scan(step, carry, xs_b)

        return jax.vmap(one_sequence, in_axes=(0, 1), out_axes=(0, 1))(eqx_carry0, xs)

    eqx_carry, eqx_ys = run_eqx(eqx_cell)
    cell = jaxseq.make_cell(name, H)
    params = jaxseq.from_equinox(eqx_cell)
    carry0 = jaxseq.LSTMState(h0, c0) if name == "lstm" else h0
    carry, ys = jaxseq.unroll(cell, params, carry0, xs)
    chex.assert_trees_all_close(ys, eqx_ys, atol=1e-5, rtol=0)
    want = jaxseq.LSTMState(*eqx_carry) if name == "lstm" else eqx_carry
    chex.assert_trees_all_close(carry, want, atol=1e-5, rtol=0)

    arrays = jaxseq.to_equinox_arrays(params, cell)
    names = sorted(arrays)
    fresh = eqx.tree_at(
        lambda c: [getattr(c, n) for n in names],
        cls(F, H, key=jax.random.key(9)),
        [arrays[n] for n in names],
    )
    chex.assert_trees_all_equal(jaxseq.from_equinox(fresh), params)
    chex.assert_trees_all_close(run_eqx(fresh)[1], eqx_ys, atol=1e-6, rtol=0)
