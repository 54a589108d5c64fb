"""Every entry point turns bad input into one line on stderr and exit code 2, with --help
working on each; one table, one Python process (so JAX is imported once)."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import contextlib, importlib, io, json, sys
from experiments import _cli
cases = json.loads(sys.argv[1])
results = {}
for name, (module, argv) in cases.items():
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = _cli.run_main(main, argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # a traceback would have reached the user
            code, err = "raised", io.StringIO(repr(e))
    results[name] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def run_cases(cases):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bad_input_everywhere(tmp_path):
    missing = str(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    ckpt_dir = str(tmp_path / "no-run")
    cases = {
        "charrnn missing data": ("experiments.charrnn", ["--data", missing]),
        "charrnn bad cell": ("experiments.charrnn", ["--cell", "tcn"]),
        "charrnn negative steps": ("experiments.charrnn", ["--steps", "-1"]),
        "sample missing checkpoint": ("experiments.charrnn", ["sample", "--checkpoint", ckpt_dir]),
        "sample zero temperature": (
            "experiments.charrnn",
            ["sample", "--checkpoint", ckpt_dir, "--temperature", "0"],
        ),
        "word2vec missing corpus": (
            "experiments.word2vec",
            ["--corpus", missing, "--out", str(tmp_path / "w")],
        ),
        "word2vec empty corpus": (
            "experiments.word2vec",
            ["--corpus", str(empty), "--out", str(tmp_path / "w2")],
        ),
        "word2vec zero dim": ("experiments.word2vec", ["--dim", "0"]),
        "word2vec bad mode": ("experiments.word2vec", ["--mode", "glove"]),
        "compare missing data": (
            "experiments.compare",
            ["--data", missing, "--out", str(tmp_path / "c")],
        ),
        "compare zero budget": ("experiments.compare", ["--budget-chars", "0"]),
        "vanishing bad flag": ("experiments.vanishing", ["--no-such-flag"]),
        "vanishing missing data": (
            "experiments.vanishing",
            ["--data", missing, "--out", str(tmp_path / "v")],
        ),
        "bench unknown command": ("benchmarks.__main__", ["gpt"]),
        "bench bad cell": ("benchmarks.__main__", ["charlm", "--cell", "tcn"]),
        "bench word2vec missing corpus": ("benchmarks.__main__", ["word2vec", "--corpus", missing]),
    }
    for name, (code, out, err) in run_cases(cases).items():
        assert code == 2, f"{name}: exit {code!r}, stderr {err!r}"
        assert "Traceback" not in err, name
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and "error" in lines[0], f"{name}: {err!r}"


@pytest.mark.slow
def test_help_on_every_entry_point():
    cases = {
        "charrnn": ("experiments.charrnn", ["--help"]),
        "charrnn sample": ("experiments.charrnn", ["sample", "--help"]),
        "word2vec": ("experiments.word2vec", ["--help"]),
        "compare": ("experiments.compare", ["--help"]),
        "vanishing": ("experiments.vanishing", ["--help"]),
        "bench": ("benchmarks.__main__", ["--help"]),
        "bench charlm": ("benchmarks.__main__", ["charlm", "--help"]),
    }
    for name, (code, out, err) in run_cases(cases).items():
        assert code in (0, None), f"{name}: {code} {err}"
        assert "--" in out and len(out.splitlines()) > 3, name
