"""Gradient-through-time measurements (jaxseq.analysis), the recall task, and the CLI.

The measurements are checked against independent computations: hand-written backprop and
explicit Jacobian products for the tanh RNN, central finite differences through the NumPy
reference cells (tests/reference.py) for the LSTM and GRU.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
import reference
from experiments import _cli, _race
from experiments import vanishing as cli
from jaxseq import analysis
from jaxseq._cells import MinParams
from jaxseq.models import char_lm

H, F, V = 4, 3, 5

CELLS = {
    "rnn_tanh": (lambda: jaxseq.rnn(H), jaxseq.RNNParams),
    "lstm": (lambda: jaxseq.lstm(H), jaxseq.LSTMParams),
    "gru_reset_after": (lambda: jaxseq.gru(H, reset_after=True), jaxseq.GRUParams),
    "gru_reset_before": (lambda: jaxseq.gru(H, reset_after=False), jaxseq.GRUParams),
}


def setup(name, rng, T, B, scale=0.5):
    """The cell, its params as a function of nothing (call it where float64 is on), the
    reference params, inputs, readout and targets."""
    ref = reference.random_params(rng, name, F, H, scale=scale)
    factory, params_type = CELLS[name]

    def params():
        fields = {k: jnp.asarray(v, jnp.float64) for k, v in reference.fused(name, ref).items()}
        if params_type is jaxseq.GRUParams:
            fields.setdefault("b_hn", None)
        return params_type(**fields)

    xs = rng.standard_normal((T, B, F))
    w_out = rng.standard_normal((H, V))
    b_out = rng.standard_normal(V)
    targets = rng.integers(0, V, size=B)
    return factory(), params, ref, xs, w_out, b_out, targets


def np_loss(h, w_out, b_out, targets):
    logits = h @ w_out + b_out
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]  # (B,)


def measure(cell, params, xs, w_out, b_out, targets, burn_in=0):
    with jax.enable_x64(True):
        readout = lambda h: h @ jnp.asarray(w_out) + jnp.asarray(b_out)
        prof = analysis.loss_state_gradients(
            cell, params(), jnp.asarray(xs), jnp.asarray(targets), readout, burn_in=burn_in
        )
        return np.asarray(prof.state), np.asarray(prof.hidden)


def test_tanh_rnn_gradients_match_hand_written_backprop():
    rng = np.random.default_rng(0)
    T, B, burn = 12, 3, 3
    cell, params, ref, xs, w_out, b_out, targets = setup("rnn_tanh", rng, T, B)
    state, hidden = measure(cell, params, xs, w_out, b_out, targets, burn_in=burn)
    assert state.shape == hidden.shape == (T - burn, B)

    hs, h = [], np.zeros((B, H))
    for t in range(T):
        h, _ = reference.step("rnn_tanh", ref, h, xs[t])
        hs.append(h)
    logits = hs[-1] @ w_out + b_out
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    g = (probs - np.eye(V)[targets]) @ w_out.T  # dL/dh_T
    expected = [np.linalg.norm(g, axis=-1)]
    for t in range(T - 1, burn, -1):  # from dL/dh_t to dL/dh_{t-1}
        g = (g * (1.0 - hs[t] ** 2)) @ ref["W_hn"]
        expected.append(np.linalg.norm(g, axis=-1))
    np.testing.assert_allclose(state, np.stack(expected), rtol=1e-10)
    np.testing.assert_allclose(hidden, state, rtol=1e-12)  # the RNN's state is h


@pytest.mark.parametrize("name", ["lstm", "gru_reset_after", "gru_reset_before"])
def test_gated_gradients_match_finite_differences(name):
    rng = np.random.default_rng(1)
    T, B = 7, 2
    cell, params, ref, xs, w_out, b_out, targets = setup(name, rng, T, B)
    state, hidden = measure(cell, params, xs, w_out, b_out, targets)
    is_lstm = name == "lstm"

    def states():
        carry = (np.zeros((B, H)), np.zeros((B, H))) if is_lstm else np.zeros((B, H))
        out = []
        for t in range(T):
            carry, _ = reference.step(name, ref, carry, xs[t])
            out.append(carry)
        return out

    def loss_from(t, carry):  # the loss when the state after step t is ``carry``
        for u in range(t + 1, T):
            carry, _ = reference.step(name, ref, carry, xs[u])
        return np_loss(carry[0] if is_lstm else carry, w_out, b_out, targets)

    traj, delta = states(), 1e-6
    for k in (0, 1, 3, T - 1):
        t = T - 1 - k
        flat = np.concatenate(traj[t], -1) if is_lstm else traj[t]  # (B, S)
        grad = np.zeros_like(flat)
        for j in range(flat.shape[1]):
            bump = np.zeros_like(flat)
            bump[:, j] = delta
            split = lambda v: (v[:, :H], v[:, H:]) if is_lstm else v
            up, down = loss_from(t, split(flat + bump)), loss_from(t, split(flat - bump))
            grad[:, j] = (up - down) / (2 * delta)
        np.testing.assert_allclose(state[k], np.linalg.norm(grad, axis=-1), rtol=1e-6)
        np.testing.assert_allclose(hidden[k], np.linalg.norm(grad[:, :H], axis=-1), rtol=1e-6)


def test_jacobian_norm_matches_explicit_product():
    rng = np.random.default_rng(2)
    T, B = 9, 2
    cell, params, ref, xs, *_ = setup("rnn_tanh", rng, T, B, scale=0.8)
    with jax.enable_x64(True):
        measured = np.asarray(analysis.state_jacobian_norms(cell, params(), jnp.asarray(xs)))
    assert measured.shape == (T, B)
    hs, h = [], np.zeros((B, H))
    for t in range(T):
        h, _ = reference.step("rnn_tanh", ref, h, xs[t])
        hs.append(h)
    for b in range(B):
        jac = np.eye(H)
        expected = [np.linalg.norm(jac)]
        for t in range(T - 1, 0, -1):  # ∂h_T/∂h_{t-1} = ∂h_T/∂h_t · diag(1 - h_t²) W_h
            jac = jac @ np.diag(1.0 - hs[t][b] ** 2) @ ref["W_hn"]
            expected.append(np.linalg.norm(jac))
        np.testing.assert_allclose(measured[:, b], expected, rtol=1e-10)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_min_cells_jacobian_is_the_product_of_their_gates(name):
    """Autodiff through the cell's step (state_jacobian_norms) against the closed form
    ∂h_T/∂h_(T-k) = diag(a_T ... a_(T-k+1)) written here from the equations in NumPy."""
    rng = np.random.default_rng(4)
    T, B, burn = 10, 3, 2
    cell = jaxseq.make_cell(name, H)
    G = cell.num_gates
    w = rng.standard_normal((F, G * H))
    bias = rng.standard_normal(G * H)  # non-zero biases
    xs = rng.standard_normal((T, B, F))
    z = xs @ w + bias
    sig = lambda u: 1.0 / (1.0 + np.exp(-u))
    if name == "mingru":
        a = 1.0 - sig(z[..., :H])
    else:
        f, i = sig(z[..., :H]), sig(z[..., H : 2 * H])
        a = f / (f + i)
    a = a[burn:]
    expected = [np.full(B, math.sqrt(H))]
    for k in range(1, T - burn):
        expected.append(np.linalg.norm(np.prod(a[T - burn - k :], axis=0), axis=-1))
    with jax.enable_x64(True):
        params = MinParams(w_ih=jnp.asarray(w), b=jnp.asarray(bias))
        measured = analysis.state_jacobian_norms(cell, params, jnp.asarray(xs), burn_in=burn)
        closed = analysis.gate_product_norms(cell, params, jnp.asarray(xs), burn_in=burn)
    np.testing.assert_allclose(np.asarray(measured), np.array(expected), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(closed), np.array(expected), rtol=1e-10)
    with pytest.raises(ValueError, match="not linear in its carry"):
        analysis.gate_product_norms(jaxseq.gru(H), None, jnp.asarray(xs))


def _small_recurrent(model, scale, seed=0):
    params = model.init(jax.random.key(seed))
    layer = params.rnn[0]
    return params._replace(rnn=(layer._replace(w_hh=scale * layer.w_hh),))


def test_tanh_rnn_vanishes_and_lstm_with_forget_bias_one_falls_less():
    vocab, steps, scale = 12, 50, 0.5
    tokens = np.random.default_rng(3).integers(0, vocab, size=(steps + 2, 8))
    rnn = char_lm(vocab, cell="rnn", hidden=16, layers=1, embed=8)
    lstm = char_lm(vocab, cell="lstm", hidden=16, layers=1, embed=8)  # forget bias 1
    # The orthogonal recurrent matrix times 0.5 has spectral norm 0.5, and |tanh'| <= 1, so
    # every step back multiplies the tanh RNN's gradient norm by at most 0.5.
    g_rnn = analysis.char_lm_gradients(rnn, _small_recurrent(rnn, scale), tokens)["state"]
    lstm_params = _small_recurrent(lstm, scale)
    np.testing.assert_array_equal(lstm_params.rnn[0].b[16:32], 1.0)  # the forget block
    g_lstm = analysis.char_lm_gradients(lstm, lstm_params, tokens)["state"]
    assert g_rnn.shape == (steps + 1, 8)
    rnn_fall = g_rnn[steps] / g_rnn[0]
    lstm_fall = g_lstm[steps] / g_lstm[0]
    assert np.all(rnn_fall <= scale**steps * (1 + 1e-9))  # at least 1e15 over 50 steps
    assert np.all(rnn_fall > 0)
    # The LSTM's cell state decays by its forget gate, sigmoid(~1) ~ 0.73, not by 0.5.
    assert np.median(lstm_fall) > 1e4 * np.median(rnn_fall)
    assert np.min(lstm_fall) > np.max(rnn_fall)


def test_char_lm_gradients_rejects_two_layers():
    model = char_lm(5, cell="gru", hidden=4, layers=2, embed=3)
    with pytest.raises(ValueError, match="one unidirectional layer"):
        analysis.char_lm_gradients(model, None, np.zeros((4, 2), int))


def test_steps_to_fall():
    norms = np.array([1.0, 0.5, 0.01, 1e-4, 1e-6])
    assert analysis.steps_to_fall(norms, 1e3) == 3
    assert analysis.steps_to_fall(norms, 1e9) is None


def test_recall_batch_targets_the_token_gap_steps_back():
    rng = np.random.default_rng(0)
    for gap in (1, 7, 30):
        tokens, targets = _race.recall_batch(rng, 64, gap, num_symbols=3, num_noise=5)
        assert tokens.shape == (gap + 1, 64) and targets.shape == (64,)
        np.testing.assert_array_equal(tokens[-1 - gap], targets)  # seen gap steps before the end
        assert targets.min() >= 0 and targets.max() < 3
        assert tokens[1:].min() >= 3 and tokens[1:].max() < 8  # only noise in between
    assert len(set(targets.tolist())) == 3  # every symbol occurs


def test_recall_task_is_learned_at_a_short_gap():
    result = _race.train_recall(
        "gru", 3, hidden=16, embed=8, steps=150, batch=32, lr=1e-2, eval_size=256
    )
    assert result.accuracy > 0.95 and result.loss < 0.3


TINY = [
    "--hidden",
    "8",
    "--embed",
    "4",
    "--window",
    "12",
    "--burn-in",
    "3",
    "--examples",
    "3",
    "--jacobian-examples",
    "1",
    "--train-chars",
    "512",
    "--train-batch",
    "4",
    "--train-seq",
    "16",
    "--task-gaps",
    "2",
    "--task-steps",
    "3",
    "--task-hidden",
    "8",
    "--task-eval-size",
    "16",
    "--no-progress",
]


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to be or not to be", "that is the question", "whether tis nobler"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 3)) for _ in range(60)))
    return path


def test_main_writes_plots_and_tables(corpus, tmp_path, capsys):
    out = tmp_path / "van"
    argv = ["--data", str(corpus), "--out", str(out), "--cells", "lstm", *TINY]
    assert cli.main(argv) == 0
    for name in ("gradients.png", "long_range.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grads_md = (out / "gradients.md").read_text()
    assert "| lstm | init |" in grads_md and "| lstm | trained |" in grads_md
    assert "Jacobian" in grads_md and "python -m experiments.vanishing" in grads_md
    assert "| lstm | " in (out / "long_range.md").read_text()
    record = json.loads((out / "results.json").read_text())
    for cell in ("lstm",):
        for phase in ("init", "trained"):
            g = record["gradients"][cell][phase]
            assert len(g["state"]) == len(g["jacobian"]) == 12
            assert math.isclose(g["jacobian"][0], math.sqrt(8))  # the identity
    assert [(r["cell"], r["gap"]) for r in record["recall"]] == [("lstm", 2)]
    assert "## Loss gradient" in capsys.readouterr().out


@pytest.mark.slow
def test_main_measures_the_min_cells_from_a_comma_list(corpus, tmp_path):
    out = tmp_path / "van"
    argv = [
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--cells",
        "mingru,minlstm",
        *TINY,
        "--jacobian-examples",
        "0",
        "--task-steps",
        "1",
    ]
    assert cli.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert list(record["gradients"]) == ["mingru", "minlstm"]
    assert [r["cell"] for r in record["recall"]] == ["mingru", "minlstm"]
    assert "| minlstm | trained |" in (out / "gradients.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-chars", "0"], "--train-chars must be positive"),
        (["--cells", "rnn", "transformer"], "unknown cell 'transformer'"),
        (["--task-gaps", "0"], "--task-gaps must be positive"),
        (["--data", "/no/such/file.txt"], "corpus file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, message, corpus, tmp_path, capsys):
    argv = ["--data", str(corpus), "--out", str(tmp_path / "o"), *TINY, *extra]
    assert _cli.run_main(cli.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_existing_out_needs_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert _cli.run_main(cli.main, ["--data", str(corpus), "--out", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "keep me"
