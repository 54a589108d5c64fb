"""Corpora: finding Tiny Shakespeare (download, cache, offline copy) and reading text.

Resolution order for the default corpus:
  1. an explicit path (the ``path`` argument);
  2. the environment variable ``JAXSEQ_DATA`` (a file, or a directory holding
     ``tinyshakespeare.txt``);
  3. the cache ``data/tinyshakespeare.txt`` in the checkout (or ``~/.cache/jaxseq``);
  4. a download from the corpus's public home, verified by sha256, into that cache.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

from jaxseq.errors import UsageError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_NAME = "tinyshakespeare.txt"
ENV_VAR = "JAXSEQ_DATA"


def cache_dir() -> pathlib.Path:
    """Where downloads are cached: ``data/`` in a source checkout, else ``~/.cache/jaxseq``."""
    checkout_data = pathlib.Path(__file__).resolve().parents[1] / "data"
    if checkout_data.is_dir() and os.access(checkout_data, os.W_OK):
        return checkout_data
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "jaxseq"


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: pathlib.Path, sha256: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            while block := resp.read(1 << 16):
                out.write(block)
        got = sha256_of(pathlib.Path(tmp))
        if got != sha256:
            raise UsageError(f"download of {url} has sha256 {got}, expected {sha256}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UsageError(
            f"cannot download Tiny Shakespeare ({e}); offline, point {ENV_VAR} at a local "
            f"copy of {TINY_SHAKESPEARE_NAME} or give the path of a text file"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_corpus(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the path of the corpus to read.

    Args:
      path: an explicit text file (any UTF-8 text), or None for Tiny Shakespeare found
        through ``JAXSEQ_DATA``, the cache, or a download.

    Raises:
      UsageError: the file is missing, or Tiny Shakespeare cannot be found or fetched.
    """
    if path is not None:
        p = pathlib.Path(path).expanduser()
        if p.is_dir():
            p = p / TINY_SHAKESPEARE_NAME
        if not p.is_file():
            raise UsageError(f"corpus file not found: {p}")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = pathlib.Path(env).expanduser()
        if p.is_dir():
            p = p / TINY_SHAKESPEARE_NAME
        if not p.is_file():
            raise UsageError(f"{ENV_VAR}={env} names no file (expected {TINY_SHAKESPEARE_NAME})")
        return p
    cached = cache_dir() / TINY_SHAKESPEARE_NAME
    if cached.is_file() and sha256_of(cached) == TINY_SHAKESPEARE_SHA256:
        return cached
    _download(TINY_SHAKESPEARE_URL, cached, TINY_SHAKESPEARE_SHA256)
    return cached


def read_text(path: str | os.PathLike) -> str:
    """Reads a whole UTF-8 text file; a clear UsageError for missing, binary or empty files."""
    p = pathlib.Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"corpus file not found: {p}") from None
    except IsADirectoryError:
        raise UsageError(f"corpus path is a directory, not a file: {p}") from None
    except OSError as e:
        raise UsageError(f"cannot read corpus {p}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"corpus {p} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text:
        raise UsageError(f"corpus {p} is empty")
    return text


def load_corpus(path: str | os.PathLike | None = None) -> str:
    """``read_text(resolve_corpus(path))``: the default corpus, or any UTF-8 file."""
    return read_text(resolve_corpus(path))


# --------------------------------------------------------------------------- characters


class CharVocab:
    """A character vocabulary: one entry per distinct Unicode code point of the corpus.

    Multi-byte UTF-8 characters (Korean, Chinese, emoji, ...) are single entries.
    """

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be distinct")
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(sorted(set(text)))

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str):
        """``str -> (len,) int32``; a UsageError names characters outside the vocabulary."""
        import numpy as np

        missing = sorted({c for c in text if c not in self.index})
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10])
            raise UsageError(f"characters not in the model's vocabulary: {shown}")
        return np.fromiter((self.index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars


def train_val_split(ids, train_fraction: float = 0.9):
    """First ``train_fraction`` for training, the rest for validation (nanoGPT's split)."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]
