"""Char-RNN end to end: training through main(), overfitting, sampling, exact resume."""

import collections
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import charrnn as cli
from jaxseq import charrnn
from jaxseq.data import CharVocab
from jaxseq.models import char_lm, cross_entropy
from jaxseq.sample import filter_logits, sample

TINY = [
    "--layers",
    "1",
    "--hidden",
    "32",
    "--embed",
    "8",
    "--batch",
    "4",
    "--seq",
    "16",
    "--eval-every",
    "10",
    "--save-every",
    "10",
    "--log-every",
    "5",
    "--sample-length",
    "20",
    "--no-progress",
]


@pytest.fixture
def corpus(tmp_path):
    words = [
        "to be or not to be",
        "that is the question",
        "whether tis nobler",
        "in the mind to suffer",
        "the slings and arrows",
    ]
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(words, 3)) for _ in range(120))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def run(args):
    return cli.main([str(a) for a in args])


def test_main_trains_and_writes_run_directory(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--data", corpus, "--out", out, "--steps", 20, *TINY]) == 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert math.isclose(r["val_bpc"], r["val_loss"] / math.log(2))
    assert (out / "checkpoint.npz").is_file()
    err = capsys.readouterr().err
    assert "validation" in err and "bits/char" in err


def test_overfits_a_tiny_corpus(tmp_path):
    text = "abcdefgh" * 200
    path = tmp_path / "abc.txt"
    path.write_text(text)
    out = tmp_path / "run"
    assert run(["--data", path, "--out", out, "--steps", 150, "--lr", "1e-2", *TINY]) == 0
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # A deterministic cycle of 8 letters: chance is log(8) = 2.08 nats.
    assert last["val_loss"] < 0.1


def test_multibyte_characters_are_single_tokens(tmp_path):
    text = "가나다라마바사 아자차카타파하 " * 60
    path = tmp_path / "ko.txt"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    assert run(["--data", path, "--out", out, "--steps", 10, *TINY]) == 0
    _, _, vocab, _ = charrnn.load_for_sampling(out)
    assert vocab.size == len(set(text)) == 15  # 14 syllables and the space


def _greedy_reference(model, params, prime, length):
    """A Python loop that feeds one token at a time and takes the argmax."""
    apply = jax.jit(model.apply)
    carry = model.initial_carry((1,))
    for t in prime:
        carry, logits = apply(params, carry, jnp.array([[t]]))
    out = []
    for _ in range(length):
        token = int(jnp.argmax(logits[0, 0]))
        out.append(token)
        carry, logits = apply(params, carry, jnp.array([[token]]))
    return out


@pytest.fixture(scope="module")
def small_model():
    model = char_lm(12, cell="lstm", hidden=16, layers=2, embed=4)
    params = model.init(jax.random.key(3))
    # Larger output weights so the distribution is far from uniform.
    params = params._replace(w_out=params.w_out * 8, b_out=jnp.linspace(-1, 1, 12))
    return model, params


def test_sampling_is_deterministic_per_key(small_model):
    model, params = small_model
    prime = jnp.array([1, 2, 3])
    a = sample(model, params, jax.random.key(0), prime, length=40, num=3)
    b = sample(model, params, jax.random.key(0), prime, length=40, num=3)
    c = sample(model, params, jax.random.key(1), prime, length=40, num=3)
    assert a.shape == (3, 40)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_one_is_greedy(small_model):
    model, params = small_model
    prime = [4, 7, 1, 1]
    got = sample(model, params, jax.random.key(5), jnp.array(prime), length=25, top_k=1)
    assert list(np.asarray(got[0])) == _greedy_reference(model, params, prime, 25)


def test_top_k_samples_only_among_the_k_most_likely(small_model):
    model, params = small_model
    prime = jnp.array([2, 3])
    k = 3
    tokens = np.asarray(
        sample(model, params, jax.random.key(9), prime, length=30, num=8, top_k=k, temperature=2.0)
    )
    # Replay all samples as one batch and check every token was among the k largest logits.
    apply = jax.jit(model.apply)
    carry, logits = apply(
        params, model.initial_carry((8,)), jnp.broadcast_to(prime[:, None], (2, 8))
    )
    last = logits[-1]
    for t in range(tokens.shape[1]):
        top = np.argsort(-np.asarray(last), axis=-1)[:, :k]
        assert all(tokens[b, t] in top[b] for b in range(8))
        carry, logits = apply(params, carry, jnp.asarray(tokens[None, :, t]))
        last = logits[0]


def test_filter_logits_temperature_and_k():
    logits = jnp.array([1.0, 3.0, 2.0, 0.0])
    np.testing.assert_allclose(filter_logits(logits, 2.0, 0), logits / 2)
    kept = filter_logits(logits, 1.0, 2)
    assert np.isinf(kept[0]) and np.isinf(kept[3]) and kept[1] == 3.0 and kept[2] == 2.0


def test_sampling_distribution_matches_softmax():
    """With one step and no prime effect, sample frequencies follow softmax(logits/T)."""
    model = char_lm(5, cell="rnn", hidden=4, layers=1, embed=2)
    params = model.init(jax.random.key(0))
    params = params._replace(
        w_out=jnp.zeros_like(params.w_out), b_out=jnp.array([0.0, 1.0, 2.0, 0.5, -1.0])
    )
    draws = np.asarray(
        sample(
            model, params, jax.random.key(1), jnp.array([0]), length=1, num=20000, temperature=0.7
        )
    )[:, 0]
    freq = np.bincount(draws, minlength=5) / draws.size
    want = np.asarray(jax.nn.softmax(params.b_out / 0.7))
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_sample_cli(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--data", corpus, "--out", out, "--steps", 10, *TINY]) == 0
    capsys.readouterr()
    args = [
        "sample",
        "--checkpoint",
        out,
        "--prime",
        "to be",
        "--length",
        30,
        "--num",
        2,
        "--seed",
        4,
        "--top-k",
        5,
    ]
    assert run(args) == 0
    first = capsys.readouterr().out
    assert run(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    samples = first[:-1].split("\n" + "=" * 40 + "\n")
    assert len(samples) == 2
    for s in samples:  # the prime, then exactly --length characters of the corpus's alphabet
        assert s.startswith("to be") and len(s) == len("to be") + 30
        assert set(s) <= set(corpus.read_text())
    assert samples[0] != samples[1]  # two draws of one batch differ
    args[args.index("--seed") + 1] = 5
    assert run(args) == 0
    assert capsys.readouterr().out != first


def test_train_step_compiles_once_over_a_run(corpus, tmp_path, monkeypatch):
    """Evaluations, checkpoints, metrics lines and state resets never retrace the step."""
    real = cli.charrnn.make_train_step

    def counted(model, optimizer, config, **kw):
        model = model._replace(apply=chex.assert_max_traces(model.apply, n=1))
        return real(model, optimizer, config, **kw)

    monkeypatch.setattr(cli.charrnn, "make_train_step", counted)
    # 40 steps cross the end of a pass over the windows (a state reset) with --seq 64.
    out = tmp_path / "run"
    args = ["--data", corpus, "--out", out, "--steps", 40, *TINY, "--seq", 64, "--batch", 16]
    config = cli._cli.config_from_args(
        charrnn.CharRNNConfig, cli.parse_train_args([str(a) for a in args])
    )
    n_train = len(cli.charrnn.prepare_corpus(corpus.read_text(), config).train)
    assert charrnn.windows_per_epoch(config, n_train) < 40
    assert run(args) == 0


def test_preset_values_are_defaults_that_explicit_flags_override():
    tiny = cli.PRESETS["tiny"]
    assert cli.parse_train_args(["--preset", "tiny"]).hidden == tiny["hidden"] != 128
    for argv in (
        ["--preset", "tiny", "--hidden", "128"],
        ["--preset=tiny", "--hidden=128"],
        ["--hidden=128", "--preset", "tiny"],
        ["--preset", "tiny", "--hid", "128"],
    ):
        args = cli.parse_train_args(argv)
        assert args.hidden == 128, argv
        assert args.steps == tiny["steps"], argv
    assert cli.parse_train_args([]).hidden == charrnn.CharRNNConfig().hidden


def test_impl_flag_reaches_the_config():
    args = cli.parse_train_args(["--impl", "scan"])
    assert cli._cli.config_from_args(charrnn.CharRNNConfig, args).impl == "scan"
    with pytest.raises(SystemExit):
        cli.parse_train_args(["--impl", "cuda"])


def test_resume_is_bitwise_equal_to_straight_run(corpus, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--data", corpus, "--dropout", "0.1", *TINY]
    assert run([*common, "--out", straight, "--steps", 20]) == 0
    assert run([*common, "--out", split, "--steps", 10]) == 0
    assert run([*common, "--out", split, "--steps", 20, "--resume"]) == 0
    a = np.load(straight / "checkpoint.npz")
    b = np.load(split / "checkpoint.npz")
    leaves = [k for k in a.files if k.startswith("leaf_")]
    assert leaves and leaves == [k for k in b.files if k.startswith("leaf_")]
    for k in leaves:
        np.testing.assert_array_equal(a[k], b[k])
    la = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (split / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "chars_per_s"} for r in rs]
    assert strip(la) == strip(lb)


def test_random_windows_resume_too(corpus, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--data", corpus, "--windows", "random", *TINY]
    assert run([*common, "--out", straight, "--steps", 20]) == 0
    assert run([*common, "--out", split, "--steps", 10]) == 0
    assert run([*common, "--out", split, "--steps", 20, "--resume"]) == 0
    a, b = np.load(straight / "checkpoint.npz"), np.load(split / "checkpoint.npz")
    for k in (k for k in a.files if k.startswith("leaf_")):
        np.testing.assert_array_equal(a[k], b[k])


def test_sequential_windows_continue_each_row():
    config = charrnn.CharRNNConfig(batch=3, seq=5)
    train = np.arange(100, dtype=np.int32)
    x0, y0, r0 = charrnn.batch_at(config, train, 0)
    x1, y1, r1 = charrnn.batch_at(config, train, 1)
    assert r0 and not r1
    assert x0.shape == (5, 3)
    np.testing.assert_array_equal(y0[:-1], x0[1:])
    np.testing.assert_array_equal(x1[0], y0[-1])  # row b of step 1 continues row b of step 0
    # 100 // 3 = 33 characters per row, (33 - 1) // 5 = 6 windows per pass
    _, _, r6 = charrnn.batch_at(config, train, 6)
    assert r6


def test_evaluator_equals_a_direct_computation():
    """The chunked, masked validation pass equals one unroll over each stream."""
    model = char_lm(7, cell="gru", hidden=8, layers=1, embed=3)
    params = model.init(jax.random.key(1))
    val = np.random.default_rng(0).integers(0, 7, size=203).astype(np.int32)
    got = float(charrnn.make_evaluator(model, val, seq=10, streams=1)(params))
    _, logits = model.apply(params, model.initial_carry((1,)), jnp.asarray(val[:-1, None]))
    want = float(cross_entropy(logits[:, 0], jnp.asarray(val[1:])).mean())
    assert got == pytest.approx(want, rel=1e-5)


def test_vocab_round_trip_and_unknown_characters():
    vocab = CharVocab.from_text("hello, 世界")
    assert vocab.decode(vocab.encode("hello 世界")) == "hello 世界"
    with pytest.raises(Exception, match="not in the model's vocabulary"):
        vocab.encode("xyz")


def test_bfloat16_mixed_precision_trains(corpus, tmp_path):
    """bf16 compute with f32 parameters learns: validation loss well below the unigram
    model's cross-entropy (what a model that ignores context can reach; ln V is chance)."""
    out = tmp_path / "run"
    args = [a if a not in ("10",) else "50" for a in TINY]  # evaluate/save every 50 steps
    assert (
        run(
            [
                "--data",
                corpus,
                "--out",
                out,
                "--steps",
                150,
                "--lr",
                "1e-2",
                "--dtype",
                "bfloat16",
                *args,
            ]
        )
        == 0
    )
    model, params, vocab, _ = charrnn.load_for_sampling(out)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    tokens = jnp.zeros((4, 2), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, model.initial_carry((2,)), tokens))(params))
    assert "bf16" in jaxpr  # the recurrent layers really compute in bfloat16
    text = corpus.read_text()
    split = int(0.9 * len(text))
    counts = collections.Counter(text[:split])
    unigram = -np.mean([math.log(counts[ch] / split) for ch in text[split + 1 :]])
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val_loss"] < 0.5 * unigram  # measured: 0.58 nats against 2.69


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_table_lookup_first_layer_equals_the_plain_network(cell):
    """char_lm reads the first layer through the embedding x projection table when the
    batch is large; values and gradients must equal embedding -> stack -> decoder."""
    model = char_lm(65, cell=cell, hidden=16, layers=2, embed=8)
    params = model.init(jax.random.key(0))
    params = params._replace(rnn=jax.tree.map(lambda a: a + 0.05, params.rnn))
    tokens = jax.random.randint(jax.random.key(1), (12, 16), 0, 65)  # 192 > 2 * 65

    def direct(params):
        _, hs = model.network.apply(params.rnn, model.initial_carry((16,)), params.embed[tokens])
        return cross_entropy(hs @ params.w_out + params.b_out, tokens).mean()

    def via_model(params):
        _, logits = model.apply(params, model.initial_carry((16,)), tokens)
        return cross_entropy(logits, tokens).mean()

    np.testing.assert_allclose(via_model(params), direct(params), rtol=1e-5)
    g_model, g_direct = jax.grad(via_model)(params), jax.grad(direct)(params)
    for a, b in zip(jax.tree.leaves(g_model), jax.tree.leaves(g_direct)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
