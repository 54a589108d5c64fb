"""Word2Vec input pipeline on the host: tokens, vocabulary, subsampling, windows, negatives.

Everything here is NumPy. Training batches are *segments*: ``segment`` consecutive kept
centre words plus ``window`` words of context on either side, with each centre's shrunk
window and every position's sentence id, so the device can rebuild the exact set of
word2vec (context, centre) pairs from a mask (see ``pair_mask``).
"""

from __future__ import annotations

import collections
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from jaxseq.errors import UsageError

# Letters and digits (any script), with inner apostrophes kept: "o'er", "don't".
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")

#: Sentence id of padding positions; never equal to a real sentence id (those are >= 0).
PAD_SENTENCE = -1


def tokenize(text: str, *, max_sentence_len: int = 10000) -> list[list[str]]:
    """Splits text into sentences of lower-cased word tokens.

    A sentence is one line (word2vec.c treats a newline as a sentence end); lines longer
    than ``max_sentence_len`` tokens are cut into pieces of that length, as gensim does.
    Context windows never cross a sentence boundary.

    Args:
      text: any UTF-8 text.
      max_sentence_len: longest sentence kept whole.

    Returns:
      A list of non-empty sentences, each a list of tokens.
    """
    sentences = []
    for line in text.splitlines():
        words = _WORD.findall(line.lower())
        for start in range(0, len(words), max_sentence_len):
            sentences.append(words[start : start + max_sentence_len])
    return sentences


class Vocab(NamedTuple):
    """Words kept by ``min_count``, most frequent first.

    words: the vocabulary; index i is the row of word i in both embedding tables.
    counts: (V,) int64 corpus frequency of each word.
    """

    words: tuple[str, ...]
    counts: np.ndarray

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)


def build_vocab(sentences: Iterable[Sequence[str]], min_count: int) -> Vocab:
    """Counts words and keeps those seen at least ``min_count`` times.

    Ties in frequency are broken alphabetically so the vocabulary is deterministic.

    Raises:
      UsageError: the corpus has no words, or no word reaches ``min_count``.
    """
    if min_count < 1:
        raise UsageError(f"min_count must be >= 1, got {min_count}")
    counter = collections.Counter()
    for sentence in sentences:
        counter.update(sentence)
    if not counter:
        raise UsageError("the corpus holds no words")
    kept = sorted((w for w, c in counter.items() if c >= min_count), key=lambda w: (-counter[w], w))
    if not kept:
        top = max(counter.values())
        raise UsageError(
            f"no word occurs min_count={min_count} times (the most frequent "
            f"occurs {top} times); lower min_count or use a larger corpus"
        )
    return Vocab(tuple(kept), np.array([counter[w] for w in kept], dtype=np.int64))


class EncodedCorpus(NamedTuple):
    """The corpus as vocabulary ids, out-of-vocabulary words dropped.

    ids: (T,) int32 word ids in corpus order.
    sentence: (T,) int32 sentence number of each token (non-decreasing).
    raw_words: number of tokens before dropping rare words (the "corpus words" of words/s).
    """

    ids: np.ndarray
    sentence: np.ndarray
    raw_words: int


def encode(sentences: Sequence[Sequence[str]], vocab: Vocab) -> EncodedCorpus:
    index = vocab.index
    ids, sentence, raw = [], [], 0
    for k, words in enumerate(sentences):
        raw += len(words)
        row = [index[w] for w in words if w in index]
        ids.extend(row)
        sentence.extend([k] * len(row))
    return EncodedCorpus(np.asarray(ids, np.int32), np.asarray(sentence, np.int32), raw)


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """word2vec.c's subsampling: P(keep w) = (sqrt(f/(s*T)) + 1) * (s*T)/f, capped at 1.

    Args:
      counts: (V,) word frequencies f.
      sample: the threshold s; <= 0 keeps every word.

    Returns:
      (V,) float64 keep probabilities, where T is the total count of in-vocabulary words.
    """
    counts = np.asarray(counts, np.float64)
    if sample <= 0:
        return np.ones_like(counts)
    threshold = sample * counts.sum()
    return np.minimum(1.0, (np.sqrt(counts / threshold) + 1.0) * threshold / counts)


def subsample(ids: np.ndarray, keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of tokens that survive subsampling: token t is kept with keep[ids[t]]."""
    return rng.random(ids.shape[0]) < keep[ids]


def sample_windows(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """Each centre's effective window, uniform on 1..window (word2vec.c's ``b`` shrink)."""
    return rng.integers(1, window + 1, size=n, dtype=np.int32)


def negative_cdf(counts: np.ndarray, power: float = 0.75) -> np.ndarray:
    """Cumulative unigram^power distribution used to draw negative samples."""
    weights = np.asarray(counts, np.float64) ** power
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def sample_negatives(cdf: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
    """Word ids drawn i.i.d. with P(w) proportional to count(w)^0.75."""
    ids = np.searchsorted(cdf, rng.random(shape), side="right")
    return np.minimum(ids, cdf.shape[0] - 1).astype(np.int32)


class SegmentBatch(NamedTuple):
    """A training batch of ``B`` segments of ``L`` centre words (host or device arrays).

    Leading axes may be stacked (steps, B, ...) to feed a ``lax.scan`` over steps.

    in_ids: (B, L + 2W) int32 ids of the centres and W words either side.
    in_sentence: (B, L + 2W) int32 sentence of each input position, PAD_SENTENCE for padding.
    out_ids: (B, L) int32 centre word ids (input positions W .. W+L-1).
    out_sentence: (B, L) int32 sentence of each centre, PAD_SENTENCE for padding.
    out_window: (B, L) int32 each centre's shrunk window in 1..W.
    neg_ids: (G, M) int32 negatives of each group of B/G consecutive segments, shared by
      every pair of the group.
    """

    in_ids: np.ndarray
    in_sentence: np.ndarray
    out_ids: np.ndarray
    out_sentence: np.ndarray
    out_window: np.ndarray
    neg_ids: np.ndarray


def offsets(segment: int, window: int) -> np.ndarray:
    """(L, L + 2W) int32: input position minus centre position within a segment."""
    return (np.arange(segment + 2 * window)[None, :] - window - np.arange(segment)[:, None]).astype(
        np.int32
    )


def pair_mask(in_sentence, out_sentence, out_window, window: int):
    """Which (centre, input position) cells of a segment are word2vec training pairs.

    Works on NumPy and JAX arrays alike (it is what the device step uses).

    Args:
      in_sentence: (..., L + 2W) sentence id of each input position.
      out_sentence: (..., L) sentence id of each centre.
      out_window: (..., L) each centre's shrunk window b.
      window: the maximal window W.

    Returns:
      (..., L, L + 2W) bool: 0 < |offset| <= b, same sentence, centre not padding.
    """
    segment = out_sentence.shape[-1]
    dist = abs(offsets(segment, window))
    return (
        (dist > 0)
        & (dist <= out_window[..., :, None])
        & (in_sentence[..., None, :] == out_sentence[..., :, None])
        & (out_sentence[..., :, None] != PAD_SENTENCE)
    )


def pairs_from_batch(batch: SegmentBatch, window: int) -> np.ndarray:
    """(P, 2) int (context id, centre id) pairs encoded by a host batch, for tests/inspection."""
    mask = pair_mask(batch.in_sentence, batch.out_sentence, batch.out_window, window)
    b, c, j = np.nonzero(mask)
    return np.stack([batch.in_ids[b, j], batch.out_ids[b, c]], axis=1)


class Chunk(NamedTuple):
    """``steps`` stacked batches for one device call, and the corpus words they cover."""

    batch: SegmentBatch
    raw_words: float
    epoch: int
    call: int = 0  # index of this device call within its epoch
    calls: int = 1  # device calls in this epoch


def epoch_chunks(
    corpus: EncodedCorpus,
    keep: np.ndarray,
    cdf: np.ndarray,
    *,
    window: int,
    segment: int,
    segments_per_step: int,
    steps_per_call: int,
    shared_negatives: int,
    rng: np.random.Generator,
    negative_groups: int = 1,
    shuffle_block: int = 0,
    epoch: int = 0,
    skip: int = 0,
) -> Iterator[Chunk]:
    """One epoch of shuffled segment batches, ``steps_per_call`` steps at a time.

    The kept tokens (after subsampling) are cut into segments of ``segment`` centres whose
    order is shuffled within consecutive blocks of ``shuffle_block`` segments (0: the whole
    epoch), so each step mixes ``segments_per_step`` places of that stretch of the corpus;
    the last call of the epoch is filled up with empty (all-padding) segments.

    ``skip`` leaves out the first ``skip`` calls (a resumed epoch) while drawing the same
    random numbers for them, so the remaining chunks equal those of an uninterrupted epoch.
    """
    kept = subsample(corpus.ids, keep, rng)
    ids, sent = corpus.ids[kept], corpus.sentence[kept]
    n = ids.shape[0]
    n_seg = max(1, -(-n // segment))
    per_call = segments_per_step * steps_per_call
    n_calls = -(-n_seg // per_call)
    # Layout: W pads, tokens, pads up to a whole number of segments, W pads, and one more
    # empty segment (L + 2W pads) that the filler segments point at.
    length = window + n_seg * segment + window
    tok = np.zeros(length + segment + 2 * window, np.int32)
    sen = np.full(tok.shape, PAD_SENTENCE, np.int32)
    win = np.ones(tok.shape, np.int32)
    tok[window : window + n], sen[window : window + n] = ids, sent
    win[window : window + n] = sample_windows(n, window, rng)
    block = shuffle_block if shuffle_block > 0 else n_seg
    order = np.concatenate(
        [start + rng.permutation(min(block, n_seg - start)) for start in range(0, n_seg, block)]
    )
    starts = order * segment
    filler = np.full(n_calls * per_call - n_seg, length, np.int64)
    starts = np.concatenate([starts, filler]).reshape(n_calls, steps_per_call, segments_per_step)
    in_pos = np.arange(segment + 2 * window)
    out_pos = np.arange(window, window + segment)
    words_per_segment = corpus.raw_words / n_seg
    for call in range(n_calls):
        s = starts[call][..., None]
        ii, oo = s + in_pos, s + out_pos
        negs = sample_negatives(cdf, (steps_per_call, negative_groups, shared_negatives), rng)
        if call < skip:
            continue
        real = int(np.count_nonzero(starts[call] < length))
        yield Chunk(
            SegmentBatch(tok[ii], sen[ii], tok[oo], sen[oo], win[oo], negs),
            real * words_per_segment,
            epoch,
            call,
            n_calls,
        )


class BatchProducer:
    """Builds the next chunks on a background thread while the device trains.

    Iterating yields ``Chunk``s for epochs ``first_epoch .. epochs-1`` in order; the RNG
    is used by this one thread only, so a seed gives the same batches every run.
    """

    def __init__(self, make_epoch, epochs: int, *, first_epoch: int = 0, depth: int = 4):
        self._make_epoch = make_epoch
        self._epochs = range(first_epoch, epochs)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="w2v-batches", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for epoch in self._epochs:
                for chunk in self._make_epoch(epoch):
                    if not self._put(chunk):
                        return
            self._put(None)
        except BaseException as e:  # surfaced in the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
