"""The benchmarks run at tiny sizes and print well-formed JSON lines (no timing asserted)."""

import importlib.util
import json
import math
import os
import pathlib
import platform
import subprocess
import sys

import pytest

import benchmarks.__main__ as bench

TINY = [
    "--hidden",
    "16",
    "--batch",
    "4",
    "--seq",
    "8",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--json",
    "--no-progress",
]
HAS_TORCH = importlib.util.find_spec("torch") is not None
TRAIN_KEYS = {
    "impl",
    "cell",
    "hidden",
    "chars_per_s",
    "compile_s",
    "peak_rss_mb",
    "vs_torch",
    "vs_flax",
}


def json_lines(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output"
    return [json.loads(line) for line in lines]  # every line must be JSON


def test_charlm_in_process_every_implementation(capsys):
    impls = ["jaxseq", "flax"] + (["torch"] if HAS_TORCH else [])
    assert (
        bench.main(
            [
                "charlm",
                *TINY,
                "--cell",
                "rnn",
                "--hidden",
                "8",
                "16",
                "--layers",
                "1",
                "--in-process",
                "--impl",
                *impls,
            ]
        )
        == 0
    )
    records = json_lines(capsys.readouterr().out)
    assert [(r["hidden"], r["impl"]) for r in records] == [(h, i) for h in (8, 16) for i in impls]
    for r in records:
        assert TRAIN_KEYS <= r.keys()
        assert r["cell"] == "rnn" and r["chars_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert len(r["step_s"]) == 2
        assert (r["compile_s"] is None) == (r["impl"] == "torch")
        flax = next(x for x in records if x["hidden"] == r["hidden"] and x["impl"] == "flax")
        assert math.isclose(r["vs_flax"], r["chars_per_s"] / flax["chars_per_s"])
        if HAS_TORCH:
            torch = next(x for x in records if x["hidden"] == r["hidden"] and x["impl"] == "torch")
            assert math.isclose(r["vs_torch"], r["chars_per_s"] / torch["chars_per_s"])


@pytest.mark.slow
def test_charlm_worker_processes_report_their_own_rss(capsys):
    """Each worker's own RSS; --baseline (here this very checkout) adds its jaxseq."""
    impls = ["jaxseq", "jaxseq-cores"] + (["torch"] if HAS_TORCH else [])
    root = pathlib.Path(__file__).resolve().parents[1]
    assert (
        bench.main(["charlm", *TINY, "--cell", "lstm", "--impl", *impls, "--baseline", str(root)])
        == 0
    )
    captured = capsys.readouterr()
    records = json_lines(captured.out)
    assert [r["impl"] for r in records] == impls + ["jaxseq-baseline"]
    assert all(r["rss_mode"] == "worker" and r["peak_rss_mb"] > 50 for r in records)
    assert [r["malloc"] for r in records] == (
        ["retain"] * 2 + (["default"] if HAS_TORCH else []) + ["retain"]
    )
    # jaxseq-cores: one JAX device per usable core (that divides the batch of 4)
    cores = math.gcd(len(os.sched_getaffinity(0)), 4)
    assert records[0]["device"] == "cpu"
    assert records[1]["device"] == ("cpu" if cores == 1 else f"{cores}x cpu")
    assert "chars/s" in captured.err  # the table goes to stderr with --json


def test_charlm_bfloat16_table(capsys):
    args = [
        "charlm",
        "--hidden",
        "16",
        "--batch",
        "4",
        "--seq",
        "8",
        "--steps",
        "2",
        "--cell",
        "gru",
        "--impl",
        "jaxseq-scan",
        "jaxseq",
        "--in-process",
        "--dtype",
        "bfloat16",
        "--layers",
        "1",
        "--no-progress",
    ]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "jaxseq" in out and "chars/s" in out


def test_sample_and_compile(capsys):
    impls = ["jaxseq", "jax-loop"] + (["torch", "torch-native"] if HAS_TORCH else [])
    assert (
        bench.main(
            [
                "sample",
                "--hidden",
                "16",
                "--length",
                "20",
                "--batch",
                "3",
                "--layers",
                "1",
                "--repeats",
                "2",
                "--cell",
                "gru",
                "--json",
                "--impl",
                *impls,
            ]
        )
        == 0
    )
    records = json_lines(capsys.readouterr().out)
    assert [r["impl"] for r in records] == impls
    assert all(r["chars_per_s"] > 0 and r["length"] == 20 and r["batch"] == 3 for r in records)
    assert (
        bench.main(
            [
                "compile",
                "--hidden",
                "8",
                "--batch",
                "2",
                "--seq",
                "4",
                "8",
                "--layers",
                "1",
                "--cell",
                "rnn",
                "--impl",
                "jaxseq",
                "--json",
            ]
        )
        == 0
    )
    records = json_lines(capsys.readouterr().out)
    assert [(r["impl"], r["seq"]) for r in records] == [("jaxseq", 4), ("jaxseq", 8)]
    assert all(r["compile_s"] > 0 for r in records)


@pytest.mark.parametrize(
    "argv",
    [
        ["charlm", "--hidden", "0"],
        ["charlm", "--impl", "keras"],
        ["charlm", "--steps", "0"],
        ["sample", "--batch", "0"],
        ["charlm", "--cell", "transformer"],
        ["charlm", "--baseline", "/nonexistent/jaxseq"],
        ["nonsense"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    try:
        code = bench.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("module", ["benchmarks", "experiments.bench"])
def test_command_line_entry_point(module):
    """``python -m benchmarks`` and its old name ``python -m experiments.bench``."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "charlm", "--impl", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown --impl x")


def test_missing_benchmark_module_is_one_line_and_exit_2(capsys, monkeypatch):
    """A registered command whose module is not there (yet) says so; it does not crash."""
    monkeypatch.setattr(bench, "COMMANDS", (*bench.COMMANDS, "nosuchbench"))
    assert bench.main(["nosuchbench", "--help"]) == 2
    assert capsys.readouterr().err == "error: benchmark 'nosuchbench' is not available\n"
    assert "recurrence" in bench.COMMANDS


@pytest.mark.slow
def test_worker_keeps_freed_memory_unless_told_not_to():
    """The charlm workers (``python -m benchmarks.charlm --worker``) switch the memory
    tuning on themselves, since importing ``experiments`` no longer does; JAXSEQ_MALLOC
    (set by --malloc) turns it off."""
    spec = {
        "impl": "jaxseq",
        "cell": "rnn",
        "hidden": 4,
        "layers": 1,
        "batch": 2,
        "seq": 3,
        "dtype": "float32",
        "seed": 0,
        "warmup": 1,
        "torch_device": "cpu",
        "cores": [],
    }
    root = pathlib.Path(__file__).resolve().parents[1]
    for setting, expect in (("retain", "False"), ("default", "True")):
        code = (
            "import sys, jax, benchmarks.charlm as c\n"
            "c.build_train_step = lambda spec: (lambda: None, 0.0)\n"
            "c.worker_main(sys.argv[1])\n"
            "print(jax.config.read('jax_cpu_enable_async_dispatch'))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)],
            input="quit\n",
            capture_output=True,
            text=True,
            cwd=root,
            timeout=120,
            env=dict(os.environ, JAXSEQ_MALLOC=setting),
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == expect


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["charlm", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--cell",
        "--hidden",
        "--impl",
        "--batch",
        "--seq",
        "--steps",
        "--warmup",
        "--dtype",
        "--xla-flags",
        "--jaxseq-xla-flags",
        "--in-process",
        "--json",
    ):
        assert flag in text
    assert bench.main([]) == 2 and "charlm" in capsys.readouterr().out


def test_word2vec_is_delegated(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["word2vec", "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC_LINUX, reason="the malloc options and fault counts are glibc's")
@pytest.mark.parametrize("setting,expect", [("", "True"), ("default", "False")])
def test_retain_freed_memory_makes_xla_reuse_its_temporaries(setting, expect):
    """experiments._malloc makes a jitted program's 64 MiB temporaries come back from
    the heap on the next call (no new page faults); JAXSEQ_MALLOC=default leaves glibc and
    JAX as they are, and every call faults the block in afresh. Both halves are needed:
    the glibc options and inline dispatch (the main thread allocates from the main heap)."""
    code = (
        "import resource, experiments._malloc as m\n"
        "m.retain_freed_memory()\n"
        "import jax, jax.numpy as jnp\n"
        "f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 2.0)[::1000]\n"
        "            + jnp.cumsum(jnp.cos(x))[::1000])\n"
        "x = jnp.ones((1 << 24,), jnp.float32)\n"
        "f(x).block_until_ready(); f(x).block_until_ready()\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "f(x).block_until_ready()\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0\n"
        "print(m._done, jax.config.read('jax_cpu_enable_async_dispatch'), faults)\n"
    )
    env = dict(os.environ, JAXSEQ_MALLOC=setting)
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=root
    ).stdout.split()
    assert out[0] == expect
    assert out[1] == ("False" if expect == "True" else "True")
    pages = (64 << 20) // 4096  # one 64 MiB temporary (sin(x) * 2 or cos(x))
    if expect == "True":
        assert int(out[2]) < pages // 10  # the temporaries reuse the last call's pages
    else:
        assert int(out[2]) > pages // 2  # glibc unmapped them; the pages fault again


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC_LINUX, reason="the malloc options and fault counts are glibc's")
def test_malloc_faults_script_runs_each_setting_in_its_own_process():
    """benchmarks/malloc_faults.py (the source of the allocator table in
    benchmarks/charlm.md) runs at a tiny size and prints one well-formed line per setting;
    an unknown setting is a one-line usage error."""
    root = pathlib.Path(__file__).resolve().parents[1]
    script = str(root / "benchmarks" / "malloc_faults.py")
    out = subprocess.run(
        [sys.executable, script, "--hidden", "8", "--steps", "1", "default", "both"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout.splitlines()
    assert [line.split()[0] for line in out] == ["default", "both"]
    for line in out:
        words = line.split()
        assert words[1] == "faults/step" and float(words[2]) >= 0
        assert words[5] == "ms" and float(words[4]) > 0 and float(words[7]) > 0
    bad = subprocess.run(
        [sys.executable, script, "nosuch"], capture_output=True, text=True, cwd=root
    )
    assert bad.returncode == 2 and "unknown MODE nosuch" in bad.stderr
    assert "Traceback" not in bad.stderr
