"""The word2vec command line: outputs, queries, refusals, bad input, interruption."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import _cli
from experiments import word2vec as cli
from jaxseq import word2vec as w2v

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = [
    "--dim",
    "12",
    "--window",
    "2",
    "--min-count",
    "1",
    "--epochs",
    "2",
    "--batch",
    "64",
    "--segment",
    "8",
    "--negative",
    "2",
    "--shared-negatives",
    "4",
    "--steps-per-call",
    "2",
    "--no-progress",
]


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    groups = [["king", "queen", "prince", "crown"], ["dog", "cat", "horse", "tail"]]
    lines = [" ".join(rng.choice(groups[i % 2], size=6)) for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trains_and_writes_both_formats(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--query",
            "king",
            "--analogy",
            "dog",
            "cat",
            "king",
            *FAST,
        ]
    )
    assert code == 0
    words_t, vec_t = w2v.load_vectors(out / "vectors.txt")
    words_b, vec_b = w2v.load_vectors(out / "vectors.bin")
    assert words_t == words_b and set(words_t) == {
        "king",
        "queen",
        "prince",
        "crown",
        "dog",
        "cat",
        "horse",
        "tail",
    }
    assert vec_t.shape == (8, 12)
    np.testing.assert_array_equal(vec_t, vec_b)
    stdout = capsys.readouterr().out
    assert stdout.startswith("king: ")
    assert "dog : cat :: king : " in stdout
    neighbours = stdout.splitlines()[0].split(": ")[1].split(", ")
    assert neighbours[0].split()[0] in {"queen", "prince", "crown"}


def test_gensim_reads_the_cli_output(corpus, tmp_path):
    KeyedVectors = pytest.importorskip("gensim.models").KeyedVectors
    out = tmp_path / "run"
    assert cli.main(["--data", str(corpus), "--out", str(out), "--mode", "cbow", *FAST]) == 0
    words, vectors = w2v.load_vectors(out / "vectors.txt")
    for name, binary in (("vectors.txt", False), ("vectors.bin", True)):
        kv = KeyedVectors.load_word2vec_format(str(out / name), binary=binary)
        assert list(kv.index_to_key) == words
        np.testing.assert_array_equal(kv.vectors, vectors)


def test_refuses_non_empty_out_dir_without_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = _cli.run_main(cli.main, ["--data", str(corpus), "--out", str(out), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert cli.main(["--data", str(corpus), "--out", str(out), "--overwrite", *FAST]) == 0
    assert (out / "vectors.bin").is_file() and (out / "keep.txt").read_text() == "mine"


def test_eval_prints_scores_or_says_why_not(corpus, tmp_path, capsys):
    assert cli.main(["--data", str(corpus), "--out", str(tmp_path / "r"), "--eval", *FAST]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    if w2v.gensim_test_data() is None:
        assert line == w2v.NO_GENSIM
    else:
        assert line.startswith("wordsim353 spearman") and "analogies" in line


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dim", "0"], "dim must be positive"),
        (["--window", "-2"], "window must be positive"),
        (["--epochs", "0"], "epochs must be positive"),
        (["--min-count", "1000"], "min_count"),
        (["--query", "zebra"], "not in the vocabulary"),
        (["--analogy", "king", "queen", "unicorn"], "not in the vocabulary"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, capsys, args, message):
    fast = [a for a in FAST]
    code = _cli.run_main(
        cli.main, ["--data", str(corpus), "--out", str(tmp_path / "r"), *fast, *args]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_empty_corpus_in_a_subprocess_has_no_traceback(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n !!! \n")  # no word characters at all
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.word2vec",
            "--corpus",
            str(empty),
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: the corpus holds no words"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_vectors_and_exits_cleanly(corpus, tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [a for a in FAST if a != "--no-progress"]
    args[args.index("--epochs") + 1] = "100000"  # far longer than the test waits
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.word2vec",
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            *args,
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    deadline = time.monotonic() + 120
    while "word/s" not in seen and "kword/s" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.read(1) if proc.stderr else ""
        if proc.poll() is not None:
            break
    assert "word/s" in seen, seen
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    err = seen + rest
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert f"interrupted by {signal.Signals(sig).name}" in err
    words, vectors = w2v.load_vectors(out / "vectors.bin")
    assert len(words) == 8 and np.all(np.isfinite(vectors))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
