"""The README's Python examples run as written, and its quickstart matches .ci/run."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
CI = pathlib.Path(__file__).resolve().parents[1] / ".ci" / "run"


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run():
    code = blocks("python")
    assert len(code) >= 2
    for block in code:
        exec(compile(block, str(README), "exec"), {})


def test_ci_runs_the_readme_test_command():
    quickstart = blocks("bash")[0].strip().splitlines()
    assert len(quickstart) == 2
    assert "experiments.charrnn" in quickstart[0]
    assert quickstart[1] in CI.read_text()
