"""Data-parallel Word2Vec: 4 forced CPU devices and 2 processes agree with one device."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import _cli
from experiments import word2vec as cli
from jaxseq import word2vec as w2v

REPO = pathlib.Path(__file__).resolve().parents[1]
FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
# 16 segments of 8 centres per step, 4 negative groups: 4 segments and 1 group per device.
ARGS = [
    "--dim",
    "16",
    "--window",
    "3",
    "--min-count",
    "1",
    "--epochs",
    "2",
    "--batch",
    "128",
    "--segment",
    "8",
    "--negative",
    "3",
    "--shared-negatives",
    "8",
    "--negative-groups",
    "4",
    "--steps-per-call",
    "4",
    "--no-progress",
]
# Negative sampling with gathered updates is bitwise equal on this corpus (max difference
# 0.0 measured); the bound leaves room for summation order in other XLA versions.
ATOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(200)])
    p = 1.0 / np.arange(1, 201)
    lines = [" ".join(rng.choice(words, size=10, p=p / p.sum())) for _ in range(600)]
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(["--data", str(corpus), "--out", str(out), "--devices", "1", *ARGS]) == 0
    return w2v.load_vectors(out / "vectors.bin")


def run(args, env_extra=None, module=("-m", "experiments.word2vec")):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, *module, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_four_devices_match_one(corpus, single, tmp_path):
    out = tmp_path / "four"
    proc = run(["--data", corpus, "--out", out, *ARGS], FOUR)  # default: all 4 devices
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "4 cpu device(s)" in err and "4 of 16 segments per step" in err
    words, vectors = w2v.load_vectors(out / "vectors.bin")
    assert words == single[0]
    assert np.abs(single[1]).max() > 0.1  # trained, not still at the tiny initial values
    np.testing.assert_allclose(vectors, single[1], atol=ATOL, rtol=0)
    assert json.loads((out / "run.json").read_text())["devices"] == 4


_MODES = """
import json, sys
import numpy as np
from experiments import word2vec as w2v_run
from jaxseq import word2vec as w2v
sentences = w2v.tokenize(open(sys.argv[1]).read())
diffs = {}
for mode, objective, epochs in (("cbow", "negative", 2), ("skipgram", "softmax", 1)):
    cfg = w2v.TrainConfig(mode=mode, objective=objective, dim=16, window=3, min_count=1,
                          epochs=epochs, batch=128, segment=8, negative=3, shared_negatives=8,
                          negative_groups=4, steps_per_call=4)
    one = w2v_run.train(sentences, cfg, progress=False, devices=1).vectors
    four = w2v_run.train(sentences, cfg, progress=False, devices=4, log=lambda m: None)
    assert four.params.w_in.shape == one.shape
    diffs[f"{mode}-{objective}"] = [float(np.abs(one - four.vectors).max()),
                                    float(np.abs(one).max())]
print(json.dumps(diffs))
"""


@pytest.mark.slow
def test_cbow_and_softmax_on_four_devices(corpus):
    proc = run([corpus], FOUR, module=("-c", _MODES))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    diffs = json.loads(out.strip().splitlines()[-1])
    for name, (diff, scale) in diffs.items():
        assert scale > 0.05, name
        # The softmax's dense output gradient is summed across devices (another order).
        assert diff < (ATOL if name == "cbow-negative" else 1e-4), (name, diff)


def test_too_many_devices_is_one_line(corpus, tmp_path, capsys):
    for devices, message in (("2", "device(s) available"), ("0", "must be positive")):
        code = _cli.run_main(
            cli.main,
            ["--data", str(corpus), "--out", str(tmp_path / "r"), "--devices", devices, *ARGS],
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_batch_must_divide_over_devices(corpus, tmp_path):
    proc = run(["--data", corpus, "--out", tmp_path / "r", *ARGS, "--batch", "48"], FOUR)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "divide evenly over 4 devices" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the corpus line, then the error


@pytest.mark.slow
def test_two_processes_match_one(corpus, single, tmp_path, free_port):
    out = tmp_path / "two"
    port = free_port
    procs = [
        run(
            [
                "--data",
                corpus,
                "--out",
                out,
                *ARGS,
                "--query",
                "w1",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                2,
                "--process-id",
                i,
            ]
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert "over 2 process(es)" in results[0][1]
    # only process 0 reports and answers queries
    assert "trained skipgram" in results[0][1] and "trained" not in results[1][1]
    assert "w1: " in results[0][0] and "w1: " not in results[1][0]
    words, vectors = w2v.load_vectors(out / "vectors.bin")
    assert words == single[0]
    np.testing.assert_allclose(vectors, single[1], atol=ATOL, rtol=0)
