"""Crash-safe checkpoints of any pytree, with a format version and a content checksum.

A checkpoint is one ``.npz`` file: the pytree's leaves as arrays and a JSON metadata record
(format version, checksum of the leaves, and whatever the caller adds: config, vocabulary,
step). Writes go to a temporary file in the same directory, are fsynced, and replace the
file with ``os.replace``; the previous checkpoint is kept as ``<name>.prev.npz``, so a
process killed at any moment leaves at least one complete, loadable checkpoint.

Each leaf is stored under its tree path (``jax.tree_util.keystr``: ``.params.rnn[0].w_hh``),
so loading matches arrays by name, not by position: a field added to or reordered in a
``NamedTuple`` cannot shift one array into another's place. Loading needs a *template*
pytree (for example freshly initialised state built from the stored config); the leaves
are checked against its shapes and dtypes, and the checksum against the bytes, so
truncated, corrupt or mismatched files are refused with a ``UsageError`` naming the array,
rather than loaded half-way. Version-1 files (before paths were stored) load by position.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
from typing import Any

import jax
import numpy as np

from jaxseq.errors import UsageError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: leaves by position, without paths
CHECKPOINT_NAME = "checkpoint.npz"
PREVIOUS_NAME = "checkpoint.prev.npz"


def _digest(leaves) -> str:
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.ascontiguousarray(leaf)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _portable(a: np.ndarray) -> np.ndarray:
    """bfloat16 and other ml_dtypes are stored as unsigned ints of the same width, since
    ``np.load(allow_pickle=False)`` cannot read them back; ``dtypes`` in the metadata
    restores them."""
    if a.dtype.isbuiltin:
        return a
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _paths(tree: Any) -> list[str]:
    """The tree path of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(directory: str | os.PathLike, tree: Any, meta: dict) -> pathlib.Path:
    """Writes ``tree`` and ``meta`` atomically to ``directory/checkpoint.npz``.

    Args:
      directory: the run directory (created if missing).
      tree: a pytree of arrays (typed PRNG keys must be stored as ``key_data``).
      meta: JSON-serialisable metadata.

    Returns:
      The checkpoint's path.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    record = dict(
        meta,
        format_version=FORMAT_VERSION,
        num_leaves=len(leaves),
        checksum=_digest(leaves),
        dtypes=[str(leaf.dtype) for leaf in leaves],
        paths=_paths(tree),
    )
    arrays = {f"leaf_{i:05d}": _portable(leaf) for i, leaf in enumerate(leaves)}
    arrays["meta"] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        final = directory / CHECKPOINT_NAME
        if final.exists():
            os.replace(final, directory / PREVIOUS_NAME)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def _read(path: pathlib.Path) -> tuple[dict, list[np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            leaves = [z[f"leaf_{i:05d}"] for i in range(meta["num_leaves"])]
            dtypes = meta.get("dtypes") or [str(a.dtype) for a in leaves]
            leaves = [
                a if str(a.dtype) == d else a.view(jax.numpy.dtype(d))
                for a, d in zip(leaves, dtypes)
            ]
    except (
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        TypeError,
        EOFError,
        OSError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        zipfile.LargeZipFile,
    ) as e:
        raise UsageError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__})"
        ) from None
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise UsageError(
            f"checkpoint {path} has format version {meta.get('format_version')}, "
            f"this jaxseq reads versions {READABLE_VERSIONS}"
        )
    if _digest(leaves) != meta.get("checksum"):
        raise UsageError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return meta, leaves


def find(directory: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint file to resume from, or None if the directory holds none.

    Falls back to the previous checkpoint when the newest one is missing (a kill between the
    two renames of ``save``) or unreadable.
    """
    directory = pathlib.Path(directory)
    if directory.is_file():
        return directory
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        p = directory / name
        if p.is_file():
            try:
                _read(p)
            except UsageError:
                continue
            return p
    return None


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint file (verifying the whole file)."""
    return _read(pathlib.Path(path))[0]


def _by_path(path: pathlib.Path, meta: dict, leaves: list, want: list[str]) -> list:
    """The stored leaves in the order of the template's paths ``want``."""
    stored = meta.get("paths")
    if stored is None:  # format 1: by position
        if len(want) != len(leaves):
            raise UsageError(
                f"checkpoint {path} holds {len(leaves)} arrays, this "
                f"configuration needs {len(want)}: it was saved with another model"
            )
        return leaves
    index = dict(zip(stored, leaves))
    missing = [p for p in want if p not in index]
    extra = sorted(set(stored) - set(want))
    if missing or extra:
        raise UsageError(
            f"checkpoint {path} was saved with another model: "
            + "; ".join(
                f"{label} {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                for label, names in (("it lacks", missing), ("this configuration has no", extra))
                if names
            )
        )
    return [index[p] for p in want]


def load(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Loads a checkpoint file into the structure of ``template``, matching arrays by path.

    Raises:
      UsageError: the file is corrupt, of an unknown format version, or its arrays do not
        match the template (another model configuration); the message names the array.
    """
    path = pathlib.Path(path)
    meta, leaves = _read(path)
    t_leaves, treedef = jax.tree.flatten(template)
    names = _paths(template)
    leaves = _by_path(path, meta, leaves, names)
    for name, want, got in zip(names, t_leaves, leaves):
        want = np.asarray(want) if not hasattr(want, "shape") else want
        if tuple(want.shape) != got.shape or np.dtype(want.dtype) != got.dtype:
            raise UsageError(
                f"checkpoint {path} does not match this configuration (array "
                f"{name or 'root'}: {got.shape} {got.dtype}, expected "
                f"{tuple(want.shape)} {want.dtype})"
            )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves]), meta
