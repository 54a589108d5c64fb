"""Training that survives: SIGKILL at random moments, SIGINT, corrupt checkpoints, NaNs,
and bad input that must end in one line and exit code 2."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import charrnn as cli
from jaxseq import checkpoint as ckpt

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--layers",
    "1",
    "--hidden",
    "24",
    "--embed",
    "8",
    "--batch",
    "4",
    "--seq",
    "16",
    "--eval-every",
    "1000",
    "--log-every",
    "5",
    "--sample-length",
    "0",
    "--no-progress",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(200))
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(text)
    return path


def command(*args):
    return [sys.executable, "-m", "experiments.charrnn", *map(str, args)]


def spawn(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        command(*args),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def leaves(run_dir):
    with np.load(run_dir / "checkpoint.npz") as z:
        return {k: z[k] for k in z.files if k.startswith("leaf_")}


def _last_logged_step(run_dir):
    """The step of the last complete line of metrics.jsonl (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return steps[-1]


def wait_for_step(proc, run_dir, step, timeout=300):
    """Polls until metrics.jsonl logs ``step`` (an event, not a time); False if the process
    ended first."""
    deadline = time.monotonic() + timeout
    while _last_logged_step(run_dir) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(corpus, tmp_path):
    steps = 60
    common = ["--data", corpus, "--steps", steps, "--save-every", 3, *TINY, "--log-every", 1]
    straight = tmp_path / "straight"
    assert cli.main([*map(str, common), "--out", str(straight)]) == 0

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills, target = 0, 0
    for attempt in range(2):
        proc = spawn(*common, "--out", run, "--resume")
        # Kill just after a random step has been logged: sometimes mid-checkpoint (every 3
        # steps), whatever the machine's speed.
        target = max(target, _last_logged_step(run)) + rng.randint(2, 15)
        assert wait_for_step(proc, run, target), proc.communicate()[1]
        proc.send_signal(signal.SIGKILL)
        kills += 1
        proc.communicate(timeout=60)
        found = ckpt.find(run)
        if found is not None:  # whatever survived must be complete and loadable
            ckpt.read_meta(found)
    assert kills >= 1
    proc = spawn(*common, "--out", run, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    a, b = leaves(straight), leaves(run)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_says_how_to_resume(corpus, tmp_path):
    run = tmp_path / "run"
    proc = spawn("--data", corpus, "--out", run, "--steps", 100000, "--save-every", 100000, *TINY)
    assert wait_for_step(proc, run, 5)  # training is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert "--resume" in err
    meta = ckpt.read_meta(run / "checkpoint.npz")
    assert meta["step"] >= 5


@pytest.mark.slow
def test_sigterm_saves_too(corpus, tmp_path):
    run = tmp_path / "run"
    proc = spawn("--data", corpus, "--out", run, "--steps", 100000, "--save-every", 100000, *TINY)
    assert wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err
    assert ckpt.read_meta(run / "checkpoint.npz")["step"] >= 5


@pytest.fixture
def trained_run(corpus, tmp_path):
    run = tmp_path / "run"
    assert (
        cli.main(
            [*map(str, ["--data", corpus, "--out", run, "--steps", 10, "--save-every", 5, *TINY])]
        )
        == 0
    )
    return run


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused_with_one_line(trained_run, damage, capsys):
    path = trained_run / "checkpoint.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # flip bytes inside an array, keeping the zip structure intact
        with np.load(path) as z:
            biggest = max((k for k in z.files if k.startswith("leaf_")), key=lambda k: z[k].size)
            needle = z[biggest].tobytes()[:64]
        at = bytes(data).find(needle)
        assert at > 0
        data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    path.write_bytes(bytes(data))
    (trained_run / "checkpoint.prev.npz").unlink()
    with pytest.raises(Exception, match="corrupt|truncated|no readable"):
        cli.main(["sample", "--checkpoint", str(trained_run)])
    proc = subprocess.run(
        command("sample", "--checkpoint", trained_run),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_falls_back_to_previous_checkpoint(trained_run, corpus):
    (trained_run / "checkpoint.npz").write_bytes(b"not a checkpoint")
    found = ckpt.find(trained_run)
    assert found is not None and found.name == "checkpoint.prev.npz"
    assert ckpt.read_meta(found)["step"] == 5


def test_resume_without_checkpoint_starts_over(corpus, tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    assert (
        cli.main([*map(str, ["--data", corpus, "--out", run, "--steps", 5, *TINY]), "--resume"])
        == 0
    )
    assert "starting from the beginning" in capsys.readouterr().err


@pytest.mark.slow
def test_non_finite_loss_stops_and_names_the_step(corpus, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        command(
            "--data",
            corpus,
            "--out",
            run,
            "--steps",
            50,
            "--lr",
            "1e38",
            "--clip",
            0,
            "--warmup",
            0,
            "--save-every",
            1,
            *TINY,
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    line = [l for l in proc.stderr.splitlines() if "non-finite" in l]
    assert len(line) == 1 and "at step" in line[0]
    step = int(line[0].split("at step ")[1].split()[0])
    # the checkpoint left behind is the last good one, from before the bad step
    meta = ckpt.read_meta(ckpt.find(run))
    assert meta["step"] == step - 1
    with np.load(run / "checkpoint.npz") as z:
        assert all(
            np.isfinite(z[k]).all()
            for k in z.files
            if k.startswith("leaf_") and z[k].dtype.kind == "f"
        )


def test_skip_policy_keeps_going(corpus, tmp_path):
    """lr 1e38: the first step is finite and blows the weights up, every later one is not.
    Each skipped step is logged, leaves the parameters as they were, and the run ends."""
    from jaxseq.charrnn import CharRNNConfig

    config = CharRNNConfig(
        layers=1,
        hidden=24,
        embed=8,
        batch=4,
        seq=16,
        steps=6,
        lr=1e38,
        clip=0,
        warmup=0,
        nan_policy="skip",
        log_every=5,
        eval_every=1000,
        sample_length=0,
    )
    seen, messages = [], []

    def record(step, metrics, state):
        seen.append(
            (step, bool(metrics["finite"]), [np.asarray(p) for p in jax.tree.leaves(state.params)])
        )

    result = cli.train(
        config,
        corpus.read_text(),
        tmp_path / "run",
        progress=False,
        log=messages.append,
        step_callback=record,
    )
    assert result.exit_code == 0 and [s for s, _, _ in seen] == [1, 2, 3, 4, 5, 6]
    skipped = [s for s, finite, _ in seen if not finite]
    assert skipped and skipped[0] > 1
    assert [m for m in messages if m.startswith("warning: skipped step")] == [
        f"warning: skipped step {s}: non-finite loss or gradient" for s in skipped
    ]
    for (_, _, before), (_, finite, after) in zip(seen, seen[1:]):
        if not finite:
            for a, b in zip(before, after):
                np.testing.assert_array_equal(a, b)
    assert ckpt.read_meta(tmp_path / "run" / "checkpoint.npz")["step"] == 6


def test_existing_run_directory_is_not_overwritten(trained_run, corpus):
    before = (trained_run / "checkpoint.npz").read_bytes()
    with pytest.raises(Exception, match="already exists"):
        cli.main([*map(str, ["--data", corpus, "--out", trained_run, "--steps", 3, *TINY])])
    assert (trained_run / "checkpoint.npz").read_bytes() == before


def test_resume_with_other_model_is_refused(trained_run, corpus):
    with pytest.raises(Exception, match="hidden=24 \\(now 32\\)"):
        cli.main(
            [
                *map(
                    str,
                    [
                        "--data",
                        corpus,
                        "--out",
                        trained_run,
                        "--steps",
                        20,
                        "--resume",
                        *TINY,
                        "--hidden",
                        32,
                    ],
                )
            ]
        )


# --------------------------------------------------------------------------- bad input


def _bad_inputs(tmp: pathlib.Path, corpus: pathlib.Path, run: pathlib.Path):
    empty = tmp / "empty.txt"
    empty.write_text("")
    binary = tmp / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    short = tmp / "short.txt"
    short.write_text("abc")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    base = ["--data", corpus, "--steps", 2, *TINY]
    return {
        "missing corpus": ["--data", tmp / "nope.txt", "--out", tmp / "a"],
        "empty corpus": ["--data", empty, "--out", tmp / "b"],
        "non-utf8 corpus": ["--data", binary, "--out", tmp / "c"],
        "too-short corpus": ["--data", short, "--out", tmp / "d"],
        "unknown cell": [*base, "--cell", "transformer", "--out", tmp / "e"],
        "zero hidden": [*base, "--hidden", 0, "--out", tmp / "f"],
        "negative batch": [*base, "--batch", -3, "--out", tmp / "g"],
        "not a number": [*base, "--seq", "ten", "--out", tmp / "h"],
        "unknown flag": [*base, "--hiden", 3, "--out", tmp / "i"],
        "unwritable run dir": [*base, "--out", locked / "run"],
        "existing run dir": [*base, "--out", run],
        "zero temperature": ["sample", "--checkpoint", run, "--temperature", 0],
        "prime outside vocab": ["sample", "--checkpoint", run, "--prime", "ZZZ@#"],
        "missing checkpoint": ["sample", "--checkpoint", tmp / "nothing"],
        "not a checkpoint": ["sample", "--checkpoint", corpus],
        "negative length": ["sample", "--checkpoint", run, "--length", -5],
    }


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_exit_2(corpus, trained_run, tmp_path):
    cases = _bad_inputs(tmp_path, corpus, trained_run)
    # Run them all in one Python process (importing JAX once), each through run_main,
    # capturing stderr per case.
    script = (
        "import sys, io, contextlib, json\n"
        "from experiments import _cli, charrnn\n"
        "cases = json.loads(sys.argv[1])\n"
        "out = {}\n"
        "for name, argv in cases.items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            code = _cli.run_main(charrnn.main, argv)\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    out[name] = [code, err.getvalue()]\n"
        "print(json.dumps(out))\n"
    )
    import json

    argvs = {k: [str(a) for a in v] for k, v in cases.items()}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (code, err) in results.items():
        if name == "unwritable run dir" and os.geteuid() == 0:
            continue  # root can write anywhere; covered by the read-only-file case below
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert "Traceback" not in err, name
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert len(lines) == 1, f"{name}: {err!r}"
        assert "error" in lines[0], name


@pytest.mark.slow
def test_bad_input_through_the_real_command_line(tmp_path):
    proc = subprocess.run(
        command("--data", tmp_path / "missing.txt", "--out", tmp_path / "r"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: corpus file not found: {tmp_path / 'missing.txt'}"


def test_run_dir_that_is_a_file_is_refused(corpus, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(Exception, match="cannot write|already exists|Not a directory"):
        cli.main([*map(str, ["--data", corpus, "--steps", 2, *TINY, "--out", blocker / "run"])])
