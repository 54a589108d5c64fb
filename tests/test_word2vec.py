"""Word2Vec: sampling formulas, exact pair coverage, gradients, learning, IO, evaluation."""

import collections
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import word2vec as w2v_run
from jaxseq import word2vec as w2v
from jaxseq._w2v_data import epoch_chunks

# ------------------------------------------------------------------ sampling formulas


def test_window_sizes_are_uniform_on_1_to_window():
    rng = np.random.default_rng(0)
    b = w2v.sample_windows(200_000, 5, rng)
    assert b.min() == 1 and b.max() == 5
    freq = np.bincount(b, minlength=6)[1:] / b.size
    np.testing.assert_allclose(freq, 0.2, atol=0.005)


def test_keep_probability_formula_and_empirical_rate():
    counts = np.array([10_000, 1_000, 100, 10, 1])
    sample = 1e-3
    keep = w2v.keep_probabilities(counts, sample)
    total = counts.sum()
    for f, p in zip(counts, keep):
        expected = min(1.0, (np.sqrt(f / (sample * total)) + 1) * (sample * total) / f)
        assert p == pytest.approx(expected, rel=1e-12)
    assert keep[0] < keep[1] < 1.0 and keep[-1] == 1.0
    np.testing.assert_array_equal(w2v.keep_probabilities(counts, 0.0), 1.0)
    # Empirical keep rates over many draws, within 4 standard deviations.
    ids = np.repeat(np.arange(len(counts)), 50_000).astype(np.int32)
    kept = w2v.subsample(ids, keep, np.random.default_rng(1))
    rate = kept.reshape(len(counts), -1).mean(axis=1)
    sd = np.sqrt(keep * (1 - keep) / 50_000)
    assert np.all(np.abs(rate - keep) <= 4 * sd + 1e-12)


def test_negatives_follow_unigram_to_the_three_quarters():
    counts = np.array([5000, 1200, 300, 80, 20, 5])
    cdf = w2v.negative_cdf(counts)
    draws = w2v.sample_negatives(cdf, (400_000,), np.random.default_rng(2))
    freq = np.bincount(draws, minlength=len(counts)) / draws.size
    expected = counts**0.75 / np.sum(counts**0.75)
    np.testing.assert_allclose(freq, expected, atol=0.004)
    # Not the plain unigram distribution: the 0.75 power lifts rare words.
    assert freq[-1] > 2 * counts[-1] / counts.sum()


def _reference_pairs(corpus, keep, window, seed):
    """word2vec.c's pairs written as plain loops, drawing randomness in the same order."""
    rng = np.random.default_rng(seed)
    kept = rng.random(corpus.ids.shape[0]) < keep[corpus.ids]
    ids, sent = corpus.ids[kept], corpus.sentence[kept]
    b = rng.integers(1, window + 1, size=ids.shape[0], dtype=np.int32)
    pairs = collections.Counter()
    per_centre = []
    for i in range(len(ids)):
        n = 0
        for o in range(-b[i], b[i] + 1):
            j = i + o
            if o != 0 and 0 <= j < len(ids) and sent[j] == sent[i]:
                pairs[(int(ids[j]), int(ids[i]))] += 1
                n += 1
        per_centre.append(n)
    return pairs, per_centre


@pytest.mark.parametrize(
    "segment,per_step,steps,block", [(4, 3, 2, 0), (16, 2, 5, 0), (4, 2, 3, 5)]
)
def test_segment_batches_hold_exactly_word2vec_pairs(segment, per_step, steps, block):
    rng = np.random.default_rng(3)
    sentences = [
        [f"w{x}" for x in rng.integers(0, 30, size=rng.integers(1, 25))] for _ in range(60)
    ]
    vocab = w2v.build_vocab(sentences, 2)
    corpus = w2v.encode(sentences, vocab)
    keep = w2v.keep_probabilities(vocab.counts, 0.005)
    assert keep.min() < 0.9  # subsampling is active
    window = 3
    got = collections.Counter()
    raw = 0.0
    for chunk in epoch_chunks(
        corpus,
        keep,
        w2v.negative_cdf(vocab.counts),
        window=window,
        segment=segment,
        segments_per_step=per_step,
        steps_per_call=steps,
        shared_negatives=4,
        negative_groups=1,
        shuffle_block=block,
        rng=np.random.default_rng(7),
    ):
        assert chunk.batch.in_ids.shape == (steps, per_step, segment + 2 * window)
        assert chunk.batch.neg_ids.shape == (steps, 1, 4)
        raw += chunk.raw_words
        flat = w2v.SegmentBatch(
            *(x.reshape(-1, *x.shape[2:]) if x.ndim == 3 else x for x in chunk.batch)
        )
        got.update(map(tuple, w2v.pairs_from_batch(flat, window).tolist()))
    expected, _ = _reference_pairs(corpus, keep, window, seed=7)
    assert got == expected
    assert raw == pytest.approx(corpus.raw_words)


def test_pairs_per_centre_match_the_shrunk_window_distribution():
    # One long sentence, no subsampling: away from the ends a centre with window b has 2b
    # pairs, so pairs/2 must be uniform on 1..W.
    sentences = [["a", "b", "c", "d"] * 5000]
    vocab = w2v.build_vocab(sentences, 1)
    corpus = w2v.encode(sentences, vocab)
    _, per_centre = _reference_pairs(corpus, np.ones(len(vocab)), 4, seed=0)
    chunks = epoch_chunks(
        corpus,
        np.ones(len(vocab)),
        w2v.negative_cdf(vocab.counts),
        window=4,
        segment=8,
        segments_per_step=8,
        steps_per_call=4,
        shared_negatives=2,
        rng=np.random.default_rng(0),
    )
    sizes = []
    for chunk in chunks:
        b = chunk.batch
        mask = w2v.pair_mask(b.in_sentence, b.out_sentence, b.out_window, 4)
        real = b.out_sentence != w2v.PAD_SENTENCE
        sizes.append(mask.sum(-1)[real])
    sizes = np.concatenate(sizes)
    assert sorted(sizes.tolist()) == sorted(per_centre)
    inner = np.asarray(per_centre[10:-10]) // 2
    freq = np.bincount(inner, minlength=5)[1:] / inner.size
    np.testing.assert_allclose(freq, 0.25, atol=0.02)


# ------------------------------------------------------------------ objectives


def _random_rows(seed, b=4, segment=4, window=2, m=3, d=5, groups=2):
    rng = np.random.default_rng(seed)
    width = segment + 2 * window
    in_rows = rng.normal(size=(b, width, d)).astype(np.float32) * 0.5
    out_rows = rng.normal(size=(b, segment, d)).astype(np.float32) * 0.5
    neg_rows = rng.normal(size=(groups, m, d)).astype(np.float32) * 0.5
    in_sent = rng.integers(0, 2, size=(b, width)).astype(np.int32)
    in_sent[:, :1] = w2v.PAD_SENTENCE
    out_sent = in_sent[:, window : window + segment]
    out_win = rng.integers(1, window + 1, size=(b, segment)).astype(np.int32)
    mask = w2v.pair_mask(in_sent, out_sent, out_win, window)
    assert mask.any() and not mask.all()
    return in_rows, out_rows, neg_rows, mask


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_skipgram_gradient_matches_a_per_pair_reference():
    in_rows, out_rows, neg_rows, mask = _random_rows(0)
    k, m = 5, neg_rows.shape[1]
    per_group = in_rows.shape[0] // neg_rows.shape[0]
    # word2vec.c per pair (x, c): d/du_x = -(1 - s(u.v_c)) v_c + sum_m (K/M) s(u.v_m) v_m.
    g_in, g_out, g_neg = np.zeros_like(in_rows), np.zeros_like(out_rows), np.zeros_like(neg_rows)
    loss = 0.0
    for b, c, j in zip(*np.nonzero(mask)):
        u, v = in_rows[b, j], out_rows[b, c]
        s = u @ v
        loss -= np.log(_sigmoid(s))
        g_in[b, j] -= (1 - _sigmoid(s)) * v
        g_out[b, c] -= (1 - _sigmoid(s)) * u
        group = b // per_group  # segments b of a group share its negatives
        for n in range(m):
            z = u @ neg_rows[group, n]
            loss -= (k / m) * np.log(_sigmoid(-z))
            g_in[b, j] += (k / m) * _sigmoid(z) * neg_rows[group, n]
            g_neg[group, n] += (k / m) * _sigmoid(z) * u
    got_loss = w2v.skipgram_negative_loss(in_rows, out_rows, neg_rows, mask, k)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    from jaxseq._w2v_model import skipgram_negative_grads

    auto = jax.grad(w2v.skipgram_negative_loss, argnums=(0, 1, 2))(
        in_rows, out_rows, neg_rows, mask, k
    )
    closed = skipgram_negative_grads(in_rows, out_rows, neg_rows, mask, k)
    for a, c_, ref in zip(auto, closed, (g_in, g_out, g_neg)):
        np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(c_, ref, rtol=1e-4, atol=1e-6)


def test_cbow_gradient_matches_autodiff_and_hidden_is_the_context_mean():
    in_rows, out_rows, neg_rows, mask = _random_rows(1)
    hidden, count = w2v.cbow_hidden(in_rows, mask)
    b, c = np.nonzero(mask.any(-1))[0][0], np.nonzero(mask.any(-1))[1][0]
    np.testing.assert_allclose(hidden[b, c], in_rows[b][mask[b, c]].mean(0), rtol=1e-5)
    valid = count > 0
    from jaxseq._w2v_model import cbow_negative_grads

    auto = jax.grad(w2v.cbow_negative_loss, argnums=(0, 1, 2))(hidden, out_rows, neg_rows, valid, 5)
    closed = cbow_negative_grads(hidden, out_rows, neg_rows, valid, 5)
    chex.assert_trees_all_close(auto, closed, rtol=1e-4, atol=1e-6)


def test_softmax_loss_is_the_full_cross_entropy():
    in_rows, _, _, mask = _random_rows(2)
    rng = np.random.default_rng(2)
    w_out = rng.normal(size=(7, in_rows.shape[-1])).astype(np.float32)
    out_ids = rng.integers(0, 7, size=mask.shape[:2]).astype(np.int32)
    expected = 0.0
    for b, c, j in zip(*np.nonzero(mask)):
        logits = w_out @ in_rows[b, j]
        expected -= logits[out_ids[b, c]] - np.log(np.exp(logits).sum())
    got = w2v.skipgram_softmax_loss(in_rows, out_ids, w_out, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ------------------------------------------------------------------ learning


def _planted_corpus(seed=0, topics=4, per_topic=6, sentences=1500, length=8):
    """Sentences drawn from one topic each: words of a topic co-occur, others never."""
    rng = np.random.default_rng(seed)
    words = [[f"t{t}w{i}" for i in range(per_topic)] for t in range(topics)]
    corpus = []
    for _ in range(sentences):
        t = rng.integers(topics)
        corpus.append([words[t][i] for i in rng.integers(0, per_topic, size=length)])
    return corpus, words


def _topic_margin(result, words):
    index = result.vocab.index
    unit = result.vectors / np.linalg.norm(result.vectors, axis=1, keepdims=True)
    same, other = [], []
    for t, group in enumerate(words):
        for a in group:
            for u, group2 in enumerate(words):
                for b in group2:
                    if a != b:
                        (same if t == u else other).append(unit[index[a]] @ unit[index[b]])
    return np.mean(same), np.mean(other)


SMALL = dict(
    dim=16,
    window=3,
    min_count=1,
    sample=0.0,
    epochs=3,
    batch=64,
    segment=8,
    negative=3,
    shared_negatives=8,
    steps_per_call=4,
)


@pytest.mark.parametrize("mode", ["skipgram", "cbow"])
@pytest.mark.parametrize("objective", ["negative", "softmax"])
def test_planted_cooccurrence_is_learned(mode, objective):
    corpus, words = _planted_corpus()
    config = w2v.TrainConfig(mode=mode, objective=objective, seed=1, **SMALL)
    result = w2v_run.train(corpus, config, progress=False)
    same, other = _topic_margin(result, words)
    assert same > other + 0.3, (same, other)
    assert result.epochs_done == pytest.approx(1.0) and result.interrupted is None
    # Nearest neighbours of a word are its topic mates.
    neighbours = [
        w for w, _ in w2v.most_similar(result.vocab.words, result.vectors, "t0w0", topn=5)
    ]
    assert set(neighbours) <= set(words[0])


def test_fixed_seed_gives_identical_vectors():
    corpus, _ = _planted_corpus(sentences=150)
    config = w2v.TrainConfig(seed=5, **{**SMALL, "epochs": 2})
    a = w2v_run.train(corpus, config, progress=False).vectors
    b = w2v_run.train(corpus, config, progress=False).vectors
    c = w2v_run.train(corpus, dataclasses.replace(config, seed=6), progress=False).vectors
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_large_batches_with_summed_duplicates_do_not_diverge():
    # 24 words and 1024 centres per step: each row sums hundreds of stale pair updates.
    corpus, words = _planted_corpus(sentences=1500)
    big = {**SMALL, "batch": 1024, "segment": 32, "epochs": 4}
    unlimited = w2v_run.train(
        corpus, w2v.TrainConfig(**big, dup_limit=1e9), progress=False, log=lambda msg: None
    )
    blown = unlimited.vectors[np.isfinite(unlimited.vectors)]
    assert blown.size < unlimited.vectors.size or np.abs(blown).max() > 1e3  # plain sums blow up
    limited = w2v_run.train(corpus, w2v.TrainConfig(**big), progress=False)
    assert np.all(np.isfinite(limited.vectors))
    assert np.abs(limited.vectors).max() < 10
    assert np.all(np.isfinite(limited.params.w_out))
    # It still moves towards the planted structure, if far less than with small steps.
    same, other = _topic_margin(limited, words)
    assert same > other


def test_train_step_is_traced_once_per_chunk_function():
    corpus, _ = _planted_corpus(sentences=100)
    config = w2v.TrainConfig(**SMALL)
    prepared = w2v.prepare(corpus, config)
    params = w2v.init_params(jax.random.key(0), len(prepared.vocab), config.dim)
    opt = w2v.make_optimizer(config, 10)
    state = w2v.TrainState(params, opt.init(params))
    chunks = list(
        epoch_chunks(
            prepared.corpus,
            prepared.keep,
            prepared.cdf,
            window=3,
            segment=8,
            segments_per_step=8,
            steps_per_call=2,
            shared_negatives=8,
            negative_groups=2,
            rng=np.random.default_rng(0),
        )
    )
    step = chex.assert_max_traces(n=1)(lambda s, b: w2v.train_step(config, opt, s, b))
    step = jax.jit(step)
    for chunk in chunks[:3]:
        state = step(state, jax.tree.map(lambda x: x[0], chunk.batch))
    counts = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert [int(c) for c in counts] == [3]  # the schedule's step count


def test_learning_rate_decays_linearly():
    config = w2v.TrainConfig(mode="cbow")
    opt = w2v.make_optimizer(config, 100)
    params = (jnp.ones(1),)
    state = opt.init(params)
    lrs = []
    for _ in range(101):
        (update,), state = opt.update((jnp.ones(1),), state)
        lrs.append(-float(update[0]))
    np.testing.assert_allclose(lrs[0], 0.05, rtol=1e-6)
    np.testing.assert_allclose(lrs[50], 0.05 * (1 - 0.5 * (1 - 1e-4)), rtol=1e-5)
    np.testing.assert_allclose(lrs[100], 0.05 * 1e-4, rtol=1e-3)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "text,kwargs,match",
    [
        ("", {}, "no words"),
        ("a b c\nd e f\n", {"min_count": 5}, "min_count"),
        ("a b c", {"dim": 0}, "^dim must be positive"),
        ("a b c", {"window": -1}, "^window must be positive"),
        ("a b c", {"lr": -0.1}, "^lr must be positive"),
    ],
)
def test_bad_input_is_a_usage_error(text, kwargs, match):
    with pytest.raises(w2v.UsageError, match=match):
        w2v.prepare(w2v.tokenize(text), w2v.TrainConfig(**kwargs))


def test_unknown_query_word_is_a_usage_error():
    with pytest.raises(w2v.UsageError, match="not in the vocabulary"):
        w2v.most_similar(["a", "b"], np.eye(2), "zebra")


# ------------------------------------------------------------------ IO


def _some_vectors():
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "naïve", "o'er"]
    return words, (rng.normal(size=(5, 7)) * 10.0 ** rng.integers(-6, 3, (5, 7))).astype(np.float32)


def test_text_and_binary_round_trip(tmp_path):
    words, vectors = _some_vectors()
    w2v.save_text(tmp_path / "v.txt", words, vectors)
    w2v.save_binary(tmp_path / "v.bin", words, vectors)
    assert (tmp_path / "v.txt").read_text().splitlines()[0] == "5 7"
    assert (tmp_path / "v.bin").read_bytes().startswith(b"5 7\n")
    for name in ("v.txt", "v.bin"):
        got_words, got = w2v.load_vectors(tmp_path / name)
        assert got_words == words
        np.testing.assert_array_equal(got, vectors)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_gensim_loads_both_formats(tmp_path):
    KeyedVectors = pytest.importorskip("gensim.models").KeyedVectors
    words, vectors = _some_vectors()
    w2v.save_text(tmp_path / "v.txt", words, vectors)
    w2v.save_binary(tmp_path / "v.bin", words, vectors)
    for name, binary in (("v.txt", False), ("v.bin", True)):
        kv = KeyedVectors.load_word2vec_format(str(tmp_path / name), binary=binary)
        assert list(kv.index_to_key) == words
        np.testing.assert_array_equal(kv.vectors, vectors)


def test_truncated_file_is_a_usage_error(tmp_path):
    words, vectors = _some_vectors()
    w2v.save_binary(tmp_path / "v.bin", words, vectors)
    data = (tmp_path / "v.bin").read_bytes()
    (tmp_path / "v.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(w2v.UsageError):
        w2v.load_vectors(tmp_path / "v.bin")


# ------------------------------------------------------------------ evaluation


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, size=200).astype(float)
    y = x + rng.integers(0, 5, size=200)
    np.testing.assert_allclose(w2v.spearman(x, y), stats.spearmanr(x, y).statistic, rtol=1e-10)
    from jaxseq._w2v_eval import rankdata

    np.testing.assert_array_equal(rankdata(x), stats.rankdata(x))


def test_evaluation_matches_gensim(tmp_path):
    gensim_models = pytest.importorskip("gensim.models")
    data = w2v.gensim_test_data()
    assert data is not None
    from jaxseq._w2v_eval import read_analogies, read_pairs

    rng = np.random.default_rng(0)
    pool = sorted({w.lower() for a, b, _ in read_pairs(data / "wordsim353.tsv") for w in (a, b)})
    analogy_words = sorted(
        {w for q in read_analogies(data / "questions-words.txt")[:3000] for w in q}
    )
    words = list(
        dict.fromkeys(
            rng.permutation(pool)[:250].tolist() + rng.permutation(analogy_words)[:300].tolist()
        )
    )
    vectors = rng.normal(size=(len(words), 12)).astype(np.float32)
    # Plant some structure so a fair number of analogies are answered right.
    idx = {w: i for i, w in enumerate(words)}
    for a, b, c, d in read_analogies(data / "questions-words.txt")[:3000:7]:
        if all(x in idx for x in (a, b, c, d)):
            vectors[idx[d]] = vectors[idx[b]] - vectors[idx[a]] + vectors[idx[c]]
    kv = gensim_models.KeyedVectors(12)
    kv.add_vectors(words, vectors)
    for name in ("wordsim353.tsv", "simlex999.txt"):
        ours = w2v.evaluate_pairs(words, vectors, data / name)
        _, (rho, _), oov = kv.evaluate_word_pairs(str(data / name))
        np.testing.assert_allclose(ours.spearman, rho, rtol=1e-4)
        np.testing.assert_allclose(ours.oov_rate * 100, oov, rtol=1e-9)
    ours = w2v.evaluate_analogies(words, vectors, data / "questions-words.txt")
    score, sections = kv.evaluate_word_analogies(str(data / "questions-words.txt"))
    total = sections[-1]
    assert ours.questions == len(total["correct"]) + len(total["incorrect"])
    np.testing.assert_allclose(ours.accuracy, score, rtol=1e-9)
    assert ours.accuracy > 0.01


def test_shuffle_is_local_to_blocks():
    sentences = [[f"w{i % 7}", f"w{(i + 1) % 7}", f"w{(i + 3) % 7}"] for i in range(400)]
    vocab = w2v.build_vocab(sentences, 1)
    corpus = w2v.encode(sentences, vocab)
    kw = dict(window=2, segment=4, segments_per_step=2, steps_per_call=3, shared_negatives=2)

    def segment_sentences(block):
        out = []
        for chunk in epoch_chunks(
            corpus,
            np.ones(len(vocab)),
            w2v.negative_cdf(vocab.counts),
            rng=np.random.default_rng(0),
            shuffle_block=block,
            **kw,
        ):
            for seg in chunk.batch.out_sentence.reshape(-1, 4):
                if (seg >= 0).any():
                    out.append(seg[seg >= 0].min())
        return np.asarray(out)

    local = segment_sentences(10)
    blocks = [local[i : i + 10] for i in range(0, len(local), 10)]
    assert all(a.max() < b.min() for a, b in zip(blocks, blocks[1:]))  # blocks stay in order
    assert any((np.diff(b) < 0).any() for b in blocks)  # shuffled inside
    full = segment_sentences(0)
    assert sorted(full.tolist()) == sorted(local.tolist())
    assert (np.diff(full[: len(full) // 2]) < 0).sum() > len(full) // 8  # shuffled throughout
