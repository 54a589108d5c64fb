"""Data parallelism: 4 forced CPU devices and 2 processes agree with one device."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import charrnn as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = [
    "--layers",
    "2",
    "--hidden",
    "24",
    "--embed",
    "8",
    "--batch",
    "8",
    "--seq",
    "16",
    "--steps",
    "12",
    "--eval-every",
    "6",
    "--save-every",
    "6",
    "--log-every",
    "3",
    "--sample-length",
    "0",
    "--dropout",
    "0.1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    text = "\n".join(" ".join(rng.choice(words, 6)) for _ in range(150))
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(["--data", str(corpus), "--out", str(out), *ARGS]) == 0
    return out


def records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, tol):
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("train_loss", "val_loss"):
            if key in x:
                assert abs(x[key] - y[key]) < tol, (key, x, y)
    with np.load(a / "checkpoint.npz") as za, np.load(b / "checkpoint.npz") as zb:
        for k in (k for k in za.files if k.startswith("leaf_")):
            np.testing.assert_allclose(za[k], zb[k], atol=1e-4, rtol=1e-4)


def run_cli(args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.charrnn", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_four_devices_match_one(corpus, single, tmp_path):
    out = tmp_path / "four"
    proc = run_cli(
        ["--data", corpus, "--out", out, *ARGS],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "4 cpu device(s)" in err
    assert_same_run(single, out, 1e-5)


@pytest.mark.slow
def test_batch_must_divide_over_devices(corpus, tmp_path):
    proc = run_cli(
        ["--data", corpus, "--out", tmp_path / "r", *ARGS, "--batch", 6],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "divide evenly" in err and "Traceback" not in err


@pytest.mark.slow
def test_two_processes_match_one(corpus, single, tmp_path, free_port):
    out = tmp_path / "two"
    port = free_port
    procs = [
        run_cli(
            [
                "--data",
                corpus,
                "--out",
                out,
                *ARGS,
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
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert "over 2 process(es)" in results[0][1]
    # only process 0 logs the evaluation
    assert "validation" in results[0][1] and "validation" not in results[1][1]
    assert_same_run(single, out, 1e-5)


# A data-parallel step compiled for 4 devices; prints its per-device HLO. T=6, global batch
# 12 (3 rows per device), hidden 16, embedding 8, vocabulary 11: no other array has a
# (6, 12, ...) or (6, 3, ...) shape.
SPLIT_STEP = """
import sys
import jax, numpy as np
from jaxseq import charrnn, parallel
cell, dropout = sys.argv[1], float(sys.argv[2])
config = charrnn.CharRNNConfig(cell=cell, layers=2, hidden=16, embed=8, batch=12, seq=6,
                               dropout=dropout)
model = charrnn.build_model(config, 11)
optimizer = charrnn.make_optimizer(config)
mesh = parallel.data_mesh()
state, put = charrnn.shard_state(mesh, charrnn.init_state(config, model, optimizer))
step = charrnn.make_train_step(model, optimizer, config, mesh=mesh)
tokens = put(np.zeros((6, 12), np.int32))
print(step.lower(state, tokens, tokens, False).compile().as_text())
"""


@pytest.mark.parametrize("cell, dropout", [("gru", 0.0), ("lstm", 0.1)])
@pytest.mark.slow
def test_each_device_runs_the_recurrent_layers_on_its_own_rows(cell, dropout):
    """The fused layers (table-lookup path without dropout, plain path with it) run on 3 rows
    per device: no whole-batch (6, 12, ...) activation and no all-gather in the program."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SPLIT_STEP, cell, str(dropout)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    hlo = proc.stdout
    assert "while" in hlo and "[6,3," in hlo  # the time loops, over this device's rows
    assert "[6,12," not in hlo
    assert "all-gather" not in hlo and "all-reduce" in hlo  # only gradients are combined


@pytest.mark.slow
def test_cpu_devices_flag_splits_the_cpu_and_matches_one_device(corpus, single, tmp_path):
    out = tmp_path / "cores"
    proc = run_cli(["--data", corpus, "--out", out, *ARGS, "--cpu-devices", 2])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "2 cpu device(s)" in err
    assert_same_run(single, out, 1e-5)


@pytest.mark.slow
def test_cpu_devices_must_be_positive(corpus, tmp_path):
    proc = run_cli(["--data", corpus, "--out", tmp_path / "r", *ARGS, "--cpu-devices", 0])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "--cpu-devices must be positive" in err
    assert "Traceback" not in err
