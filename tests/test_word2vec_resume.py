"""Word2Vec checkpoints: an interrupted run resumed with --resume ends bit for bit where an
uninterrupted run does; other configs, other corpora and broken checkpoints are refused."""

import json
import signal

import numpy as np
import pytest

from experiments import _cli
from experiments import word2vec as cli
from jaxseq import checkpoint as ckpt
from jaxseq import word2vec as w2v
from jaxseq._w2v_data import epoch_chunks

# No subsampling, so an epoch is ~19 device calls: stops land mid-epoch.
FAST = [
    "--dim",
    "12",
    "--window",
    "2",
    "--min-count",
    "1",
    "--epochs",
    "3",
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
    "--sample",
    "0",
    "--no-progress",
]
REAL_TRAIN = cli.train


def _corpus(path, seed=0, lines=400):
    rng = np.random.default_rng(seed)
    groups = [["king", "queen", "prince", "crown"], ["dog", "cat", "horse", "tail"]]
    path.write_text(
        "\n".join(" ".join(rng.choice(groups[i % 2], size=6)) for i in range(lines)) + "\n"
    )
    return path


@pytest.fixture
def corpus(tmp_path):
    return _corpus(tmp_path / "corpus.txt")


@pytest.fixture
def straight(corpus, tmp_path):
    out = tmp_path / "straight"
    assert cli.main(["--data", str(corpus), "--out", str(out), *FAST]) == 0
    return out


def _raise_sigint_after(monkeypatch, calls):
    """Makes the CLI's train() get a real SIGINT after ``calls`` device calls (the handler
    sees it at the next poll, so training stops after calls + 1 calls)."""

    def train(*args, **kwargs):
        polls = iter(range(10**9))

        def should_stop():
            if next(polls) == calls:
                signal.raise_signal(signal.SIGINT)
            return False

        return REAL_TRAIN(*args, **kwargs, should_stop=should_stop)

    monkeypatch.setattr(cli, "train", train)


def _same_files(a, b):
    for name in ("vectors.txt", "vectors.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_resumed_run_equals_uninterrupted_run(corpus, tmp_path, straight, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(out), *FAST]
    # Stop mid-epoch 1, resume and stop again in epoch 2 (checkpoints every 3 calls too),
    # then resume to the end.
    _raise_sigint_after(monkeypatch, 7)
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT" in err and "--resume" in err
    meta = ckpt.read_meta(out / ckpt.CHECKPOINT_NAME)
    assert (meta["epoch"], meta["call"]) == (0, 8)
    assert not np.array_equal(
        w2v.load_vectors(out / "vectors.bin")[1], w2v.load_vectors(straight / "vectors.bin")[1]
    )

    _raise_sigint_after(monkeypatch, 25)
    assert cli.main([*args, "--resume", "--save-every", "3"]) == 130
    err = capsys.readouterr().err
    assert "resumed from" in err and "epoch 1, device call 8" in err
    meta = ckpt.read_meta(out / ckpt.CHECKPOINT_NAME)
    assert meta["epoch"] == 1 and meta["call"] > 0  # mid-epoch again

    monkeypatch.undo()
    assert cli.main([*args, "--resume"]) == 0
    _same_files(out, straight)
    record = json.loads((out / "run.json").read_text())
    assert record["interrupted"] is None and record["epochs_done"] == pytest.approx(3)
    assert record["resumed_from"]["epoch"] == 1

    # Resuming a finished run trains nothing and writes the same vectors again.
    assert cli.main([*args, "--resume"]) == 0
    _same_files(out, straight)


def test_resume_without_checkpoint_starts_over(corpus, tmp_path, straight, capsys):
    out = tmp_path / "fresh"
    assert cli.main(["--data", str(corpus), "--out", str(out), "--resume", *FAST]) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    _same_files(out, straight)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dim", "16"], "dim=12 (now 16)"),
        (["--window", "3"], "window=2 (now 3)"),
        (["--mode", "cbow"], "mode=skipgram (now cbow)"),
        (["--negative", "3"], "negative=2 (now 3)"),
    ],
)
def test_resume_with_other_config_is_one_line_exit_2(corpus, straight, capsys, flags, message):
    args = ["--data", str(corpus), "--out", str(straight), *FAST, "--resume", *flags]
    capsys.readouterr()
    assert _cli.run_main(cli.main, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot resume") and message in err


def test_resume_with_other_corpus_is_refused(tmp_path, straight, capsys):
    other = _corpus(tmp_path / "other.txt", seed=1, lines=300)
    capsys.readouterr()
    code = _cli.run_main(
        cli.main, ["--corpus", str(other), "--out", str(straight), *FAST, "--resume"]
    )
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "another vocabulary" in errors[0] and "Traceback" not in err


def test_truncated_checkpoint_falls_back_or_is_refused(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(out), *FAST]
    _raise_sigint_after(monkeypatch, 22)  # epoch 0 ends (a checkpoint), then stops mid epoch 1
    assert cli.main(args) == 130
    monkeypatch.undo()
    newest = out / ckpt.CHECKPOINT_NAME
    prev_meta = ckpt.read_meta(out / ckpt.PREVIOUS_NAME)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 0  # from the previous checkpoint
    err = capsys.readouterr().err
    assert "resuming from the previous checkpoint" in err
    assert f"epoch {prev_meta['epoch'] + 1}, device call {prev_meta['call']}" in err

    for name in (ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME):
        path = out / name
        path.write_bytes(path.read_bytes()[:100])
    assert _cli.run_main(cli.main, [*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt or truncated" in err


def test_non_empty_out_still_needs_resume_or_overwrite(corpus, straight, capsys):
    code = _cli.run_main(cli.main, ["--data", str(corpus), "--out", str(straight), *FAST])
    assert code == 2
    assert "not empty" in capsys.readouterr().err


def test_skipped_chunks_equal_the_tail_of_a_full_epoch():
    sentences = [["a", "b", "c", "d", "e"][i % 3 :] * 3 for i in range(60)]
    vocab = w2v.build_vocab(sentences, 1)
    corpus = w2v.encode(sentences, vocab)
    kw = dict(
        window=2,
        segment=4,
        segments_per_step=2,
        steps_per_call=2,
        shared_negatives=3,
        shuffle_block=5,
    )

    def chunks(skip):
        return list(
            epoch_chunks(
                corpus,
                w2v.keep_probabilities(vocab.counts, 0.05),
                w2v.negative_cdf(vocab.counts),
                skip=skip,
                epoch=4,
                rng=np.random.default_rng([9, 4]),
                **kw,
            )
        )

    full, tail = chunks(0), chunks(3)
    assert len(full) > 4 and len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail):
        assert (a.call, a.calls, a.epoch) == (b.call, b.calls, b.epoch)
        for x, y in zip(a.batch, b.batch):
            np.testing.assert_array_equal(x, y)


def test_training_never_deletes_checkpoints_unless_asked(corpus, tmp_path, straight):
    """A run directory that holds a checkpoint is refused without resume or overwrite, and
    its checkpoint stays; overwrite removes the old run's checkpoints and trains afresh."""
    prepared = w2v.prepare(
        w2v.tokenize(corpus.read_text()),
        _cli.config_from_args(w2v.TrainConfig, cli._parser().parse_args(FAST)),
    )
    config = _cli.config_from_args(w2v.TrainConfig, cli._parser().parse_args(FAST))
    before = {p.name: p.read_bytes() for p in straight.iterdir()}
    with pytest.raises(w2v.UsageError, match="not empty"):
        cli.train(prepared, config, progress=False, run_dir=straight)
    assert {p.name: p.read_bytes() for p in straight.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / ckpt.PREVIOUS_NAME).write_bytes(before[ckpt.CHECKPOINT_NAME])
    (other / "notes.txt").write_text("mine")
    result = cli.train(prepared, config, progress=False, run_dir=other, overwrite=True)
    assert result.resumed_from is None and result.checkpoint == other / ckpt.CHECKPOINT_NAME
    assert (other / "notes.txt").read_text() == "mine"
    assert ckpt.read_meta(other / ckpt.PREVIOUS_NAME)["epoch"] < 3  # the new run's own


def test_metrics_log_is_written_and_trimmed_on_resume(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(out), *FAST]
    _raise_sigint_after(monkeypatch, 22)
    assert cli.main(args) == 130
    monkeypatch.undo()
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    meta = ckpt.read_meta(out / ckpt.CHECKPOINT_NAME)
    assert steps == sorted(steps) and steps[-1] > steps[0]
    assert cli.main([*args, "--resume"]) == 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in records]
    assert resumed == sorted(set(resumed))  # no step logged twice
    assert records[-1]["epochs_done"] == pytest.approx(3)
    assert resumed[: len(steps)] == steps and meta["epoch"] == 1


def test_corpus_is_an_alias_of_data(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["--data", str(corpus), "--out", str(a), *FAST, "--epochs", "1"]) == 0
    assert cli.main(["--corpus", str(corpus), "--out", str(b), *FAST, "--epochs", "1"]) == 0
    _same_files(a, b)
