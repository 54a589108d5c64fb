"""Word-vector evaluation without gensim: local files whose right answers are known.

``tests/test_word2vec.py`` compares the same functions with scipy and with gensim's own
evaluators on gensim's shipped files when gensim is installed; these run everywhere.
"""

import numpy as np

from jaxseq import _w2v_eval as ev

WORDS = ["king", "queen", "man", "woman", "paris", "france", "rome", "italy", "apple"]


def _vectors():
    """Analogies hold exactly: queen = king - man + woman, italy = rome - paris + france."""
    rng = np.random.default_rng(0)
    v = {
        w: rng.normal(size=16) for w in ("king", "man", "woman", "paris", "france", "rome", "apple")
    }
    v["queen"] = v["king"] - v["man"] + v["woman"]
    v["italy"] = v["rome"] - v["paris"] + v["france"]
    return np.stack([v[w] for w in WORDS]).astype(np.float32)


def _write_pairs(path, vectors, order):
    """Pairs whose gold scores follow ``order`` applied to the true cosine similarities."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = [(a, b) for a in range(len(WORDS)) for b in range(a + 1, len(WORDS))][:12]
    cos = np.array([unit[a] @ unit[b] for a, b in pairs])
    gold = order(cos)
    lines = ["# word1\tword2\tscore"] + [
        f"{WORDS[a].upper()}\t{WORDS[b]}\t{g:.6f}" for (a, b), g in zip(pairs, gold)
    ]
    lines.append("unicorn\tking\t5.0")  # out of vocabulary: skipped, counted
    path.write_text("\n".join(lines) + "\n")


def test_pairs_score_rank_agreement_and_count_oov(tmp_path):
    vectors = _vectors()
    _write_pairs(tmp_path / "same.tsv", vectors, lambda c: 10 * np.exp(c))  # monotone
    _write_pairs(tmp_path / "reversed.tsv", vectors, lambda c: -c)
    same = ev.evaluate_pairs(WORDS, vectors, tmp_path / "same.tsv")
    assert same.pairs == 12 and np.isclose(same.oov_rate, 1 / 13)
    np.testing.assert_allclose(same.spearman, 1.0, atol=1e-12)
    np.testing.assert_allclose(
        ev.evaluate_pairs(WORDS, vectors, tmp_path / "reversed.tsv").spearman, -1.0, atol=1e-12
    )


def test_analogies_find_the_planted_answers(tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text(
        ": royal\nking queen man woman\nman woman king queen\n"
        ": capitals\nparis france rome italy\nrome italy paris france\n"
        "paris france unicorn horn\n"
    )
    score = ev.evaluate_analogies(WORDS, _vectors(), path)
    # man:woman :: king:? -> king - man + woman = queen (exact); the others likewise
    assert score.questions == 4 and np.isclose(score.oov_rate, 1 / 5)
    assert score.accuracy == 1.0
    shuffled = _vectors()[np.random.default_rng(1).permutation(len(WORDS))]
    assert ev.evaluate_analogies(WORDS, shuffled, path).accuracy < 1.0


def test_evaluate_reads_a_local_directory_without_gensim(tmp_path):
    vectors = _vectors()
    _write_pairs(tmp_path / ev.WORDSIM353, vectors, lambda c: c)
    _write_pairs(tmp_path / ev.SIMLEX999, vectors, lambda c: -c)
    (tmp_path / ev.ANALOGIES).write_text(": x\nking queen man woman\n")
    scores = ev.evaluate(WORDS, vectors, data_dir=tmp_path)
    assert np.isclose(scores.ws353.spearman, 1.0) and np.isclose(scores.simlex.spearman, -1.0)
    assert scores.analogy.accuracy == 1.0
    assert "wordsim353 spearman 1.0000" in ev.format_scores(scores)
