"""word2vec's text and binary vector formats (what gensim's ``load_word2vec_format`` reads).

Both start with the header line ``vocab_size dim``. Text: one line per word, the word then
its components in decimal. Binary: per word, the UTF-8 word, a space, ``dim`` little-endian
float32s and a newline (word2vec.c's layout). Files are written atomically: a temporary
file in the same directory, fsync, then ``os.replace``, so a crash or a kill never leaves a
half-written vectors file under the final name.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np

from jaxseq.errors import UsageError


def _atomic_write(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _check(words: Sequence[str], vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"vectors {vectors.shape} do not match {len(words)} words")
    for w in words:
        if not w or any(ch.isspace() for ch in w):
            raise ValueError(f"word {w!r} is empty or holds whitespace")
    return vectors


def save_text(path: str | os.PathLike, words: Sequence[str], vectors: np.ndarray) -> None:
    """Writes word2vec's text format; '%.9g' round-trips every float32 exactly.

    Args:
      path: destination file.
      words: V words.
      vectors: (V, D) array.
    """
    vectors = _check(words, vectors)

    def write(f):
        f.write(f"{vectors.shape[0]} {vectors.shape[1]}\n".encode())
        for word, row in zip(words, vectors):
            f.write((word + " " + " ".join(f"{x:.9g}" for x in row.tolist()) + "\n").encode())

    _atomic_write(pathlib.Path(path), write)


def save_binary(path: str | os.PathLike, words: Sequence[str], vectors: np.ndarray) -> None:
    """Writes word2vec's binary format (little-endian float32)."""
    vectors = _check(words, vectors).astype("<f4")

    def write(f):
        f.write(f"{vectors.shape[0]} {vectors.shape[1]}\n".encode())
        for word, row in zip(words, vectors):
            f.write(word.encode() + b" " + row.tobytes() + b"\n")

    _atomic_write(pathlib.Path(path), write)


def load(path: str | os.PathLike, *, binary: bool | None = None) -> tuple[list[str], np.ndarray]:
    """Reads either format (``binary=None``: decided by the ``.bin`` suffix).

    Returns:
      The words and a (V, D) float32 array.

    Raises:
      UsageError: the file is missing or not in the format.
    """
    path = pathlib.Path(path)
    if binary is None:
        binary = path.suffix == ".bin"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read vectors {path}: {e.strerror}") from None
    try:
        header, _, body = data.partition(b"\n")
        count, dim = (int(x) for x in header.split())
        words, rows = [], []
        if binary:
            pos, width = 0, 4 * dim
            for _ in range(count):
                while body[pos : pos + 1] in (b"\n", b" "):
                    pos += 1
                space = body.index(b" ", pos)
                words.append(body[pos:space].decode())
                rows.append(np.frombuffer(body, "<f4", dim, space + 1))
                pos = space + 1 + width
        else:
            lines = body.decode().splitlines()
            for line in lines[:count]:
                parts = line.rstrip().split(" ")
                words.append(parts[0])
                rows.append(np.array(parts[1:], np.float32))
        vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
        if len(words) != count or vectors.shape != (count, dim):
            raise ValueError("truncated")
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{path} is not a word2vec {'binary' if binary else 'text'} vectors file ({e})"
        ) from None
    return words, vectors
