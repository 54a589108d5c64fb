"""jaxseq.checkpoint: arrays keyed by tree path; version-1 files still load."""

import json
from typing import NamedTuple

import numpy as np
import pytest

from jaxseq import checkpoint as ckpt
from jaxseq.errors import UsageError


class Layer(NamedTuple):
    w: np.ndarray
    b: np.ndarray


class Reordered(NamedTuple):  # the same fields, declared in the other order
    b: np.ndarray
    w: np.ndarray


def _layer(seed=0):
    rng = np.random.default_rng(seed)
    return Layer(
        w=rng.normal(size=(3, 3)).astype(np.float32), b=rng.normal(size=(3, 3)).astype(np.float32)
    )


def test_arrays_are_matched_by_path_not_position(tmp_path):
    """Loaded by position, w and b (same shape) would silently swap places."""
    saved = _layer()
    ckpt.save(tmp_path, {"layer": saved, "step": np.int32(7)}, {"kind": "test"})
    template = {
        "layer": Reordered(b=np.zeros((3, 3), np.float32), w=np.zeros((3, 3), np.float32)),
        "step": np.int32(0),
    }
    tree, meta = ckpt.load(tmp_path / ckpt.CHECKPOINT_NAME, template)
    np.testing.assert_array_equal(tree["layer"].w, saved.w)
    np.testing.assert_array_equal(tree["layer"].b, saved.b)
    assert int(tree["step"]) == 7 and meta["kind"] == "test"
    assert meta["paths"] == ["['layer'].w", "['layer'].b", "['step']"]


def test_mismatch_names_the_array(tmp_path):
    ckpt.save(tmp_path, {"layer": _layer()}, {})
    path = tmp_path / ckpt.CHECKPOINT_NAME
    wrong_shape = {"layer": Layer(w=np.zeros((3, 4), np.float32), b=np.zeros((3, 3), np.float32))}
    with pytest.raises(UsageError, match=r"\['layer'\]\.w: \(3, 3\) float32, expected \(3, 4\)"):
        ckpt.load(path, wrong_shape)
    with pytest.raises(UsageError, match=r"lacks \['other'\].*has no \['layer'\]"):
        ckpt.load(path, {"other": np.zeros(3)})


def _downgrade_to_version_1(path):
    """Rewrites a checkpoint as format 1 wrote it: the same arrays, no paths."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    del meta["paths"]
    meta["format_version"] = 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_version_1_checkpoints_still_load_by_position(tmp_path):
    saved = _layer(1)
    ckpt.save(tmp_path, saved, {"step": 3})
    path = tmp_path / ckpt.CHECKPOINT_NAME
    _downgrade_to_version_1(path)
    assert ckpt.read_meta(path)["format_version"] == 1
    tree, meta = ckpt.load(path, Layer(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.float32)))
    np.testing.assert_array_equal(tree.w, saved.w)
    assert meta["step"] == 3
    with pytest.raises(UsageError, match="holds 2 arrays.*needs 1"):
        ckpt.load(path, {"w": np.zeros((3, 3), np.float32)})


def test_unknown_version_is_refused(tmp_path):
    ckpt.save(tmp_path, _layer(), {})
    path = tmp_path / ckpt.CHECKPOINT_NAME
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["format_version"] = 99
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(UsageError, match="format version 99"):
        ckpt.read_meta(path)
