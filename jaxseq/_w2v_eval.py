"""Word-vector evaluation in NumPy: WordSim-353, SimLex-999 and Google analogies.

The data files are the ones gensim ships in ``gensim/test/test_data/``; they are found
through ``importlib`` without importing gensim. The scoring follows gensim's conventions
(case-insensitive; pairs or questions with an out-of-vocabulary word are skipped and
counted in the OOV rate; analogies answered by 3CosAdd over unit vectors, excluding the
three question words, among the first 300,000 words), but is computed here.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

WORDSIM353 = "wordsim353.tsv"
SIMLEX999 = "simlex999.txt"
ANALOGIES = "questions-words.txt"

NO_GENSIM = (
    "evaluation skipped: the WordSim-353, SimLex-999 and analogy files come with "
    "gensim, which is not installed (pip install 'jaxseq[eval]')"
)


def gensim_test_data() -> pathlib.Path | None:
    """The directory of gensim's test data, or None when gensim is not installed."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    return path if (path / WORDSIM353).is_file() else None


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's 'average' method)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values; each run gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the (average-tie) ranks."""
    rx, ry = rankdata(np.asarray(x)), rankdata(np.asarray(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


class PairScore(NamedTuple):
    spearman: float  # NaN when fewer than 2 pairs are in the vocabulary
    oov_rate: float  # fraction of pairs skipped for an unknown word
    pairs: int  # pairs scored


class AnalogyScore(NamedTuple):
    accuracy: float  # fraction of answerable questions answered right (NaN if none)
    oov_rate: float  # fraction of questions skipped for an unknown word
    questions: int  # questions answered


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _lower_index(words: Sequence[str], limit: int | None = None) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, w in enumerate(words[:limit] if limit else words):
        index.setdefault(w.lower(), i)  # the most frequent spelling wins, as in gensim
    return index


def read_pairs(path: str | pathlib.Path) -> list[tuple[str, str, float]]:
    """Reads 'word1<TAB>word2<TAB>score' lines, skipping '#' comments."""
    rows = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        rows.append((a, b, float(score)))
    return rows


def evaluate_pairs(words: Sequence[str], vectors: np.ndarray, path) -> PairScore:
    """Spearman correlation between cosine similarity and human similarity scores."""
    index = _lower_index(words)
    unit = _unit(vectors)
    model, gold, oov = [], [], 0
    rows = read_pairs(path)
    for a, b, score in rows:
        ia, ib = index.get(a.lower()), index.get(b.lower())
        if ia is None or ib is None:
            oov += 1
            continue
        model.append(float(unit[ia] @ unit[ib]))
        gold.append(score)
    rho = spearman(model, gold) if len(model) >= 2 else float("nan")
    return PairScore(rho, oov / max(len(rows), 1), len(model))


def read_analogies(path) -> list[tuple[str, str, str, str]]:
    rows = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(":") or not line.strip():
            continue
        a, b, c, d = line.lower().split()
        rows.append((a, b, c, d))
    return rows


def evaluate_analogies(
    words: Sequence[str],
    vectors: np.ndarray,
    path,
    *,
    restrict_vocab: int = 300_000,
    batch: int = 1024,
) -> AnalogyScore:
    """Accuracy of a:b :: c:? answered by argmax cos(x, b - a + c), x not in {a, b, c}."""
    index = _lower_index(words, restrict_vocab)
    unit = _unit(vectors[:restrict_vocab])
    rows = read_analogies(path)
    known = [
        (index[a], index[b], index[c], index[d])
        for a, b, c, d in rows
        if a in index and b in index and c in index and d in index
    ]
    if not known:
        return AnalogyScore(float("nan"), 1.0 if rows else 0.0, 0)
    q = np.asarray(known, np.int64)
    correct = 0
    for start in range(0, len(q), batch):
        a, b, c, d = q[start : start + batch].T
        sims = (unit[b] - unit[a] + unit[c]) @ unit.T
        rows_ = np.arange(len(a))
        for excluded in (a, b, c):
            sims[rows_, excluded] = -np.inf
        correct += int(np.count_nonzero(sims.argmax(axis=1) == d))
    return AnalogyScore(correct / len(q), 1.0 - len(q) / len(rows), len(q))


class Scores(NamedTuple):
    ws353: PairScore
    simlex: PairScore
    analogy: AnalogyScore


def evaluate(
    words: Sequence[str], vectors: np.ndarray, data_dir: str | pathlib.Path | None = None
) -> Scores | None:
    """All three benchmarks, or None when the data files (gensim) are not available."""
    data_dir = pathlib.Path(data_dir) if data_dir is not None else gensim_test_data()
    if data_dir is None:
        return None
    vectors = np.asarray(vectors, np.float32)
    return Scores(
        evaluate_pairs(words, vectors, data_dir / WORDSIM353),
        evaluate_pairs(words, vectors, data_dir / SIMLEX999),
        evaluate_analogies(words, vectors, data_dir / ANALOGIES),
    )


def format_scores(scores: Scores) -> str:
    w, s, a = scores
    return (
        f"wordsim353 spearman {w.spearman:.4f} (oov {w.oov_rate:.1%}), "
        f"simlex999 spearman {s.spearman:.4f} (oov {s.oov_rate:.1%}), "
        f"analogies {a.accuracy:.2%} of {a.questions} (oov {a.oov_rate:.1%})"
    )
