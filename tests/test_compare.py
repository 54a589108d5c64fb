"""The RNN/LSTM/GRU comparison: budgets, equal parameter counts, the CLI's files and errors."""

import dataclasses
import json
import math

import numpy as np
import pytest

from experiments import _cli, _race
from experiments import compare as cli
from jaxseq.charrnn import CharRNNConfig

TINY = [
    "--hidden",
    "16",
    "--embed",
    "4",
    "--batch",
    "4",
    "--seq",
    "16",
    "--eval-points",
    "2",
    "--sample-length",
    "24",
    "--warmup",
    "0",
    "--lr",
    "1e-2",
    "--no-progress",
]
GATES = {"rnn": 1, "lstm": 4, "gru": 3, "mingru": 2, "minlstm": 3}


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = [
        "to be or not to be",
        "that is the question",
        "whether tis nobler",
        "in the mind to suffer",
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 3)) for _ in range(80)))
    return path


def expected_params(cell, hidden, vocab, embed, input_mode):
    """Written from the architecture: (embedding) -> one layer with G gate blocks -> dense."""
    width = embed if input_mode == "embedding" else vocab
    recurrent = 0 if cell.startswith("min") else hidden * hidden  # min cells: no W_hh
    count = GATES[cell] * (width * hidden + recurrent + hidden) + hidden * vocab + vocab
    if input_mode == "embedding":
        count += vocab * embed
    if cell == "gru":
        count += hidden  # b_hn, the recurrent bias inside r * (.)
    return count


def table_rows(md):
    return [
        line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| cell")
    ]


def test_main_equal_characters_writes_table_plot_and_samples(corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    budget = 1000
    assert (
        cli.main(["--data", str(corpus), "--out", str(out), "--budget-chars", str(budget), *TINY])
        == 0
    )
    rows = table_rows((out / "results.md").read_text())
    assert [r.split("|")[1].strip() for r in rows] == ["rnn", "lstm", "gru"]
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.md").read_text()
    assert [l for l in samples.splitlines() if l.startswith("## ")] == [
        "## rnn",
        "## lstm",
        "## gru",
    ]
    record = json.loads((out / "results.json").read_text())
    vocab = len(set(corpus.read_text()))
    per_step = 4 * 16
    for run in record["runs"]:
        # Equal characters: every run stops at the first step that reaches the budget.
        assert run["chars"] == math.ceil(budget / per_step) * per_step
        assert run["parameters"] == expected_params(run["cell"], 16, vocab, 4, "embedding")
        hist = run["history"]
        assert hist[0]["chars"] == 0 and hist[-1]["chars"] == run["chars"]
        assert all(a["chars"] < b["chars"] for a, b in zip(hist, hist[1:]))
        assert run["best_val_loss"] == min(h["val_loss"] for h in hist)
        assert run["best_val_loss"] < hist[0]["val_loss"] - 0.3  # it learned something
        assert math.isclose(run["best_val_bpc"], run["best_val_loss"] / math.log(2))
    assert "python -m experiments.compare" in (out / "results.md").read_text()
    assert "| rnn |" in capsys.readouterr().out


def test_input_both_and_seconds_budget(corpus, tmp_path):
    out = tmp_path / "cmp"
    assert (
        cli.main(
            [
                "--data",
                str(corpus),
                "--out",
                str(out),
                *TINY,
                "--budget-seconds",
                "0.3",
                "--cells",
                "gru",
                "--input",
                "both",
                "--sample-length",
                "0",
            ]
        )
        == 0
    )
    record = json.loads((out / "results.json").read_text())
    assert [(r["cell"], r["input"]) for r in record["runs"]] == [
        ("gru", "embedding"),
        ("gru", "onehot"),
    ]
    vocab = len(set(corpus.read_text()))
    for run in record["runs"]:
        assert run["seconds"] >= 0.3  # the stopping rule, not a speed
        assert run["parameters"] == expected_params("gru", 16, vocab, 4, run["input"])
    assert len(table_rows((out / "results.md").read_text())) == 2
    assert not (out / "samples.md").exists()


def test_min_cells_from_a_comma_list_under_a_seconds_budget(corpus, tmp_path):
    out = tmp_path / "cmp"
    assert (
        cli.main(
            [
                "--data",
                str(corpus),
                "--out",
                str(out),
                *TINY,
                "--budget-seconds",
                "0.2",
                "--cells",
                "mingru,minlstm",
                "--sample-length",
                "0",
            ]
        )
        == 0
    )
    record = json.loads((out / "results.json").read_text())
    assert [r["cell"] for r in record["runs"]] == ["mingru", "minlstm"]
    vocab = len(set(corpus.read_text()))
    for run in record["runs"]:
        assert run["seconds"] >= 0.2
        assert run["parameters"] == expected_params(run["cell"], 16, vocab, 4, "embedding")
    assert (out / "results.md").read_text().startswith("# minGRU vs minLSTM under")


@pytest.mark.parametrize("cell", ["rnn", "gru", "mingru", "minlstm"])
def test_hidden_for_param_count_is_the_closest(cell):
    vocab = 40
    base = CharRNNConfig(cell=cell, layers=1, embed=8)
    target = expected_params("lstm", 64, vocab, 8, "embedding")
    hidden = _race.hidden_for_param_count(base, vocab, target)
    gaps = {
        h: abs(expected_params(cell, h, vocab, 8, "embedding") - target) for h in range(1, 1000)
    }
    assert gaps[hidden] == min(gaps.values())
    cfg = dataclasses.replace(base, hidden=hidden)
    assert _race.count_model_params(cfg, vocab) == expected_params(
        cell, hidden, vocab, 8, "embedding"
    )


def test_match_params_run_configs():
    cfg = cli.CompareConfig(match="params", hidden=64, embed=8)
    runs = cli.run_configs(cfg, 40)
    counts = {c.cell: _race.count_model_params(c, 40) for _, c in runs}
    hidden = {c.cell: c.hidden for _, c in runs}
    assert hidden["lstm"] == 64 and hidden["rnn"] > hidden["gru"] > 64
    for cell in ("rnn", "gru"):
        assert abs(counts[cell] - counts["lstm"]) / counts["lstm"] < 0.02


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget-chars", "0"], "--budget-chars must be positive"),
        (["--budget-seconds", "-1"], "--budget-seconds must be positive"),
        (["--cells", "rnn", "elman"], "unknown cell 'elman'"),
        (["--cells", "gru,gru"], "lists a cell twice"),
        (["--data", "/no/such/file.txt"], "corpus file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, message, corpus, tmp_path, capsys):
    argv = ["--data", str(corpus), "--out", str(tmp_path / "o"), *TINY, *extra]
    assert _cli.run_main(cli.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.md").write_text("an earlier run")
    assert _cli.run_main(cli.main, ["--data", str(corpus), "--out", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.md").read_text() == "an earlier run"
