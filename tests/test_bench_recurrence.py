"""``python -m benchmarks recurrence`` at tiny sizes: JSON lines, sizes, errors (no timing
asserted)."""

import json
import math

import pytest

import benchmarks.__main__ as bench
from benchmarks import recurrence

QUICK = ["--quick", "--seq", "32", "--json", "--no-progress"]


def records(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output"
    return [json.loads(line) for line in lines]  # every line must be JSON


def test_quick_in_process(capsys):
    assert (
        bench.main(
            [
                "recurrence",
                *QUICK,
                "--in-process",
                "--layers",
                "1",
                "--impl",
                "gru",
                "mingru-assoc",
                "--match",
                "hidden",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    recs = records(captured.out)
    assert [(r["impl"], r["unroll"]) for r in recs] == [
        ("gru", "auto"),
        ("mingru-assoc", "associative"),
    ]
    gru = recs[0]
    for r in recs:
        # --quick filled in what the flags left at their defaults; --seq 32 stayed.
        assert (r["seq"], r["batch"], r["hidden"], len(r["step_s"])) == (32, 8, 16, 2)
        assert r["chars_per_s"] > 0 and r["compile_s"] > 0 and r["peak_rss_mb"] > 0
        assert math.isclose(r["vs_gru"], r["chars_per_s"] / gru["chars_per_s"])
        assert r["params"] == recurrence.param_count(r["cell"], r["hidden"], 1)
    assert "mingru-assoc =hidden" in captured.err  # the table goes to stderr with --json


def test_matched_hidden_brings_the_min_cells_to_the_grus_parameter_count():
    target = recurrence.param_count("gru", 256, 2)
    for cell in ("mingru", "minlstm"):
        h = recurrence.matched_hidden(cell, target, 2)
        assert h > 256  # no recurrent matrix: a wider layer for the same count
        gaps = {k: abs(recurrence.param_count(cell, k, 2) - target) for k in (h - 1, h, h + 1)}
        assert gaps[h] == min(gaps.values()) and gaps[h] / target < 0.01


def test_variants_size_only_the_min_cells_by_parameters():
    config = recurrence.RecurrenceBenchConfig(hidden=64, impl=("gru", "minlstm-assoc"))
    runs = recurrence.variants(config)
    assert [(r["label"], r["unroll"]) for r in runs] == [
        ("gru", "auto"),
        ("minlstm-assoc =hidden", "associative"),
        ("minlstm-assoc =params", "associative"),
    ]
    assert runs[1]["hidden"] == 64 and runs[2]["hidden"] > 64


@pytest.mark.slow
def test_workers_report_their_own_rss(capsys):
    assert (
        bench.main(["recurrence", *QUICK, "--impl", "lstm", "minlstm-scan", "--match", "hidden"])
        == 0
    )
    recs = records(capsys.readouterr().out)
    assert [r["impl"] for r in recs] == ["lstm", "minlstm-scan"]
    assert all(r["rss_mode"] == "worker" and r["peak_rss_mb"] > 50 for r in recs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq", "100"], "positive divisor of --tokens"),
        (["--impl", "elman"], "unknown --impl elman"),
        (["--match", "flops"], "unknown --match flops"),
        (["--steps", "0"], "--steps must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert bench.main(["recurrence", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["recurrence", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--seq",
        "--tokens",
        "--hidden",
        "--impl",
        "--match",
        "--quick",
        "--json",
        "--in-process",
    ):
        assert flag in text
