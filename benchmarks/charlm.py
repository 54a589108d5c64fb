"""Char-LM training and sampling throughput: jaxseq vs flax.linen vs PyTorch.

Training (``python -m benchmarks charlm``): the same model in every implementation
(embedding of width H, ``--layers`` recurrent layers of H units, a dense decoder to the
vocabulary; Adam, clipping by global norm 5, float32) trained on random tokens. Every
implementation runs in its own worker process, so each one's peak RSS is its own; the
workers of one (cell, H) group are all started first (one at a time, so compile times are
not disturbed) and then asked for one timed step each in turn, A B C, B C A, ..., so that
drift on a shared machine hits all of them alike. Reported: the median of the timed steps
as characters per second, the compile time of the train step, the worker's peak RSS, and
the ratios to PyTorch and to flax.linen within the group.

Sampling (``python -m benchmarks sample``): ``--length`` characters at each
``--batch`` from jaxseq's compiled scan (``jaxseq.sample.sample``), from a Python loop
over a jitted single step, and from a PyTorch ``no_grad`` loop, interleaved in one process.

Compile (``python -m benchmarks compile``): the compile time of jaxseq's (and
flax.linen's) train step at several sequence lengths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxseq.config import field

VOCAB = 65  # Tiny Shakespeare's character set
CELLS = ("rnn", "lstm", "gru")
TRAIN_IMPLS = (
    "jaxseq",
    "jaxseq-cores",
    "jaxseq-notable",
    "jaxseq-bf16",
    "jaxseq-scan",
    "flax",
    "torch",
)
SAMPLE_IMPLS = ("jaxseq", "jax-loop", "torch", "torch-native")
# In one process (the compile benchmark): every JAX implementation that runs on one device.
_JAX_IMPLS = tuple(i for i in TRAIN_IMPLS if i not in ("torch", "jaxseq-cores"))
_MARK = "@@bench "  # prefix of the worker's protocol lines on stdout


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# ================================================================= the three train steps
#
# Each builder returns ``(run_step, compile_s)``: ``run_step()`` does one optimizer step on
# the fixed batch and returns when its results are ready.


def _tokens(spec: dict):
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    shape = (spec["seq"], spec["batch"])
    return (
        rng.integers(0, VOCAB, shape).astype(np.int32),
        rng.integers(0, VOCAB, shape).astype(np.int32),
    )


def _plain_model(model):
    """``model`` with its first layer fed the looked-up embeddings (``network.apply`` on
    ``embed[tokens]``) instead of ``models.char_lm``'s product-table lookup: the same
    function and parameters, the path a char LM took before the table existed."""
    import jax
    import jax.numpy as jnp

    net, dtype = model.network, model.compute_dtype

    def apply(params, carry, tokens, *, dropout_key=None, impl="auto", mesh=None):
        rnn = jax.tree.map(lambda p: p.astype(dtype), params.rnn)
        carry, hs = net.apply(rnn, carry, params.embed.astype(dtype)[tokens], impl=impl, mesh=mesh)
        logits = hs @ params.w_out.astype(dtype) + params.b_out.astype(dtype)
        return carry, logits.astype(jnp.float32)

    return model._replace(apply=apply)


def _build_jaxseq(spec: dict, fused: bool = True, table: bool = True):
    import jax
    import numpy as np

    from jaxseq import charrnn, parallel

    config = charrnn.CharRNNConfig(
        cell=spec["cell"],
        layers=spec["layers"],
        hidden=spec["hidden"],
        embed=spec["hidden"],
        batch=spec["batch"],
        seq=spec["seq"],
        lr=2e-3,
        schedule="constant",
        warmup=0,
        clip=5.0,
        dtype=spec["dtype"],
        seed=spec["seed"],
    )
    model = charrnn.build_model(config, VOCAB)
    if not table:
        model = _plain_model(model)
    optimizer = charrnn.make_optimizer(config)
    state = charrnn.init_state(config, model, optimizer)
    inputs, targets = _tokens(spec)
    mesh = None
    if len(jax.devices()) > 1:  # jaxseq-cores (or several GPUs): data-parallel, as charrnn
        mesh = parallel.data_mesh()
        state, put = charrnn.shard_state(mesh, state)
        inputs, targets = put(np.asarray(inputs)), put(np.asarray(targets))
    else:
        inputs, targets = jax.device_put(inputs), jax.device_put(targets)
    step = charrnn.make_train_step(
        model, optimizer, config, impl="auto" if fused else "scan", mesh=mesh
    )
    start = time.perf_counter()
    compiled = step.lower(state, inputs, targets, False).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def run_step():
        box[0], metrics = compiled(box[0], inputs, targets, False)
        jax.block_until_ready(metrics["loss"])

    return run_step, compile_s


def _build_flax(spec: dict):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    H, dtype = spec["hidden"], jnp.dtype(spec["dtype"])
    cell_cls = {"rnn": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[spec["cell"]]

    class LinenCharLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):  # (T, B) int
            x = nn.Embed(VOCAB, H, dtype=dtype)(tokens)
            for _ in range(spec["layers"]):
                x = nn.RNN(cell_cls(features=H, dtype=dtype), time_major=True)(x)
            return nn.Dense(VOCAB, dtype=dtype)(x).astype(jnp.float32)

    model = LinenCharLM()
    inputs, targets = _tokens(spec)
    inputs, targets = jax.device_put(inputs), jax.device_put(targets)
    params = model.init(jax.random.key(spec["seed"]), inputs)
    optimizer = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(2e-3))
    opt_state = optimizer.init(params)

    def loss_fn(params, inputs, targets):
        logits = model.apply(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train_step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    compiled = train_step.lower(params, opt_state, inputs, targets).compile()
    compile_s = time.perf_counter() - start
    box = [params, opt_state]

    def run_step():
        box[0], box[1], loss = compiled(box[0], box[1], inputs, targets)
        jax.block_until_ready(loss)

    return run_step, compile_s


def _jax_device() -> str:
    import jax

    devices = jax.devices()
    d = devices[0]
    name = d.platform if d.platform == "cpu" else f"{d.platform}:{d.device_kind}"
    return name if len(devices) == 1 else f"{len(devices)}x {name}"


def _torch_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _torch_model(spec: dict):
    import torch

    # The two cores of the reference machine (or the cores this process is pinned to by
    # --cores); moot on a GPU.
    torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))
    torch.manual_seed(spec["seed"])
    rnn_cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[spec["cell"]]
    H = spec["hidden"]

    class TorchCharLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, H)
            self.rnn = rnn_cls(H, H, spec["layers"])  # time-major (T, B, H)
            self.decode = torch.nn.Linear(H, VOCAB)

        def forward(self, tokens, state=None):
            ys, state = self.rnn(self.embed(tokens), state)
            return self.decode(ys), state

    return TorchCharLM().to(_torch_device(spec.get("torch_device", "auto")))


def _build_torch(spec: dict):
    import torch

    model = _torch_model(spec)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    inputs, targets = (torch.from_numpy(a).long().to(device) for a in _tokens(spec))

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        logits, _ = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run_step, None  # eager: nothing to compile


def train_device(spec: dict) -> str:
    """Where ``spec['impl']`` runs: ``cpu``, or ``gpu:<kind>`` / ``cuda``."""
    return (
        _torch_device(spec.get("torch_device", "auto"))
        if spec["impl"] == "torch"
        else _jax_device()
    )


def build_train_step(spec: dict) -> tuple[Callable[[], None], float | None]:
    """``(run_step, compile_s)`` for ``spec['impl']`` (see ``TRAIN_IMPLS``)."""
    impl = spec["impl"]
    if impl in ("jaxseq", "jaxseq-cores"):  # jaxseq-cores: worker_main made the devices
        return _build_jaxseq(spec, fused=True)
    if impl == "jaxseq-notable":
        return _build_jaxseq(spec, table=False)
    if impl == "jaxseq-bf16":
        return _build_jaxseq(dict(spec, dtype="bfloat16"))
    if impl == "jaxseq-scan":
        return _build_jaxseq(spec, fused=False)
    if impl == "flax":
        return _build_flax(spec)
    if impl == "torch":
        return _build_torch(spec)
    raise ValueError(f"unknown implementation {impl!r}")


# ================================================================= worker process


def _say(record: dict) -> None:
    sys.stdout.write(_MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


def worker_main(spec_json: str) -> int:
    """A worker: builds one train step, then times steps on request (one JSON line each).

    Protocol on stdin: ``steps N`` times N steps and answers ``{"times": [...]}``;
    ``quit`` answers ``{"peak_rss_mb": ...}`` and exits.
    """
    from experiments import _malloc

    # The parent passes JAXSEQ_MALLOC (--malloc): keep freed memory and dispatch inline, as
    # the command lines do, unless it says ``default``. Before JAX creates its CPU client.
    _malloc.retain_freed_memory()
    spec = json.loads(spec_json)
    if spec.get("cores"):
        os.sched_setaffinity(0, spec["cores"])  # before JAX or PyTorch size their thread pools
    if spec["impl"] == "jaxseq-cores":
        # One JAX CPU device per core this process may use, before JAX starts its backend,
        # as `python -m experiments.charrnn --cpu-devices N` does.
        from experiments._cli import split_cpu

        split_cpu(math.gcd(len(os.sched_getaffinity(0)), spec["batch"]))
    import_rss = _peak_rss_mb()
    run_step, compile_s = build_train_step(spec)
    start = time.perf_counter()
    run_step()
    first_step_s = time.perf_counter() - start
    for _ in range(max(0, spec["warmup"] - 1)):
        run_step()
    _say(
        {
            "ready": True,
            "compile_s": compile_s,
            "first_step_s": first_step_s,
            "rss_before_build_mb": import_rss,
            "device": train_device(spec),
        }
    )
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "steps":
            times = []
            for _ in range(int(command[1])):
                start = time.perf_counter()
                run_step()
                times.append(time.perf_counter() - start)
            _say({"times": times})
        elif command[0] == "quit":
            _say({"peak_rss_mb": _peak_rss_mb()})
            return 0
    return 0


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(
        self, spec: dict, env: dict, module: str = "benchmarks.charlm", cwd: str | None = None
    ):
        self.spec = spec
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self._stderr.seek(0)
                tail = self._stderr.read().strip().splitlines()[-5:]
                raise RuntimeError(
                    f"{self.spec['impl']} worker exited with code "
                    f"{self.proc.returncode}: " + " | ".join(tail)
                )
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK) :])

    def steps(self, n: int) -> list[float]:
        self.proc.stdin.write(f"steps {n}\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def quit(self) -> float:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        rss = self._read()["peak_rss_mb"]
        self.proc.wait(timeout=60)
        self._stderr.close()
        return rss

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


class _InProcess:
    """Same interface as ``_Worker`` but in this process (RSS: this process's peak so far)."""

    def __init__(self, spec: dict, env: dict):
        self.spec = spec
        run_step, compile_s = build_train_step(spec)
        start = time.perf_counter()
        run_step()
        first = time.perf_counter() - start
        for _ in range(max(0, spec["warmup"] - 1)):
            run_step()
        self._run = run_step
        self.ready = {"compile_s": compile_s, "first_step_s": first, "device": train_device(spec)}

    def steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self._run()
            times.append(time.perf_counter() - start)
        return times

    def quit(self) -> float:
        return _peak_rss_mb()

    def kill(self) -> None:
        pass


# ================================================================= configs and CLI


def _check_choices(impls: Sequence[str], allowed: Sequence[str], cores: Sequence[int] = ()) -> None:
    """``UsageError`` for an empty or unknown ``--impl`` or a ``--cores`` core this process
    may not use."""
    from jaxseq.errors import UsageError

    bad = [i for i in impls if i not in allowed]
    if bad or not impls:
        raise UsageError(
            f"unknown --impl {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}"
        )
    usable = os.sched_getaffinity(0)
    if any(c not in usable for c in cores):
        raise UsageError(f"--cores {list(cores)}: this process may use cores {sorted(usable)}")


@dataclasses.dataclass(frozen=True)
class TrainBenchConfig:
    """Settings of ``python -m benchmarks charlm``."""

    cell: str = field(
        "all", "recurrent cell (all: rnn, lstm and gru)", choices=("rnn", "lstm", "gru", "all")
    )
    hidden: tuple[int, ...] = field((256, 512), "hidden sizes H (embedding width = H)")
    impl: tuple[str, ...] = field(
        ("jaxseq", "jaxseq-cores", "flax", "torch"),
        f"implementations, from {', '.join(TRAIN_IMPLS)} (jaxseq-cores: jaxseq with the CPU "
        f"presented as one JAX device per core and each batch split over them, as "
        f"'experiments.charrnn --cpu-devices N' runs; jaxseq-notable: jaxseq without the "
        f"product-table lookup for the embedding and the first layer's input projection; "
        f"jaxseq-scan: jaxseq with the fused layers off, plain lax.scan autodiff); torch is "
        f"skipped with a note when PyTorch is not installed",
    )
    layers: int = field(2, "recurrent layers")
    batch: int = field(64, "sequences per batch")
    seq: int = field(128, "characters per sequence")
    steps: int = field(7, "timed steps per implementation (the median is reported)")
    warmup: int = field(2, "untimed steps after compiling")
    gap: float = field(
        0.3,
        "seconds of idle time before each timed step, so that the thread "
        "pools of the implementation that ran before (OpenMP, Eigen) stop "
        "spinning before the next one is timed",
    )
    dtype: str = field(
        "float32",
        "compute dtype of the JAX implementations (bfloat16: mixed "
        "precision with float32 parameters; PyTorch stays float32)",
        choices=("float32", "bfloat16"),
    )
    xla_flags: str = field(
        "", "extra XLA_FLAGS for the JAX workers (appended to the environment's)"
    )
    jaxseq_xla_flags: str = field(
        "",
        "if set, also run 'jaxseq+flags': jaxseq with these "
        "extra XLA_FLAGS, interleaved with the rest",
    )
    baseline: str = field(
        "",
        "a checkout of an earlier jaxseq (e.g. a git worktree): also "
        "run 'jaxseq-baseline', that checkout's jaxseq, interleaved with "
        "the rest (before/after figures of a change)",
        metavar="DIR",
    )
    torch_device: str = field(
        "auto",
        "device of the PyTorch implementation (auto: cuda when available)",
        choices=("auto", "cpu", "cuda"),
    )
    cores: tuple[int, ...] = field(
        (),
        "pin every worker to these CPU cores (e.g. --cores 1: "
        "single-threaded, which on a loaded machine compares the "
        "implementations' work rather than their thread "
        "synchronisation); default: no pinning",
        metavar="CORE",
    )
    in_process: bool = field(
        False,
        "run every implementation in this process instead of one "
        "worker each (faster to start; peak RSS is then this process's)",
    )
    malloc: str = field(
        "retain-jax",
        "allocator in the workers: retain-jax (the JAX "
        "workers, jaxseq and flax alike, keep freed memory for reuse and "
        "dispatch inline as jaxseq's command lines do, see experiments/_malloc.py; "
        "PyTorch keeps the default), retain-all, or default everywhere",
        choices=("retain-jax", "retain-all", "default"),
    )
    seed: int = field(0, "seed of the weights and the random tokens")
    json: bool = field(
        False, "print one JSON line per measurement on stdout (the table then goes to stderr)"
    )
    progress: bool = field(True, "progress bar on stderr")

    def validate(self) -> None:
        from jaxseq.errors import UsageError

        for name in ("layers", "batch", "seq", "steps"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.gap < 0:
            raise UsageError(f"--warmup and --gap must be >= 0, got {self.warmup}, {self.gap}")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise UsageError(f"--hidden must be positive integers, got {list(self.hidden)}")
        _check_choices(self.impl, TRAIN_IMPLS, self.cores)


@dataclasses.dataclass(frozen=True)
class SampleBenchConfig:
    """Settings of ``python -m benchmarks sample``."""

    cell: str = field(
        "lstm", "recurrent cell (all: rnn, lstm and gru)", choices=("rnn", "lstm", "gru", "all")
    )
    hidden: tuple[int, ...] = field((512,), "hidden sizes H (embedding width = H)")
    batch: tuple[int, ...] = field((1, 64), "numbers of samples drawn at once")
    impl: tuple[str, ...] = field(
        SAMPLE_IMPLS,
        f"implementations, from {', '.join(SAMPLE_IMPLS)} (jax-loop: a Python loop "
        f"over a jitted single step; torch-native: the PyTorch loop with its oneDNN (mkldnn) "
        f"kernels switched off, which for one step at a time is the faster PyTorch path)",
    )
    layers: int = field(2, "recurrent layers")
    length: int = field(2000, "characters generated per sample")
    repeats: int = field(5, "timed repetitions per implementation (median reported)")
    seed: int = field(0, "seed")
    torch_device: str = field(
        "auto",
        "device of the PyTorch loop (auto: cuda when available)",
        choices=("auto", "cpu", "cuda"),
    )
    cores: tuple[int, ...] = field(
        (),
        "pin this process to these CPU cores before anything "
        "runs (e.g. --cores 1: single-threaded JAX and PyTorch)",
        metavar="CORE",
    )
    json: bool = field(
        False, "print one JSON line per measurement on stdout (the table then goes to stderr)"
    )

    def validate(self) -> None:
        from jaxseq.errors import UsageError

        for name in ("layers", "length", "repeats"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("hidden", "batch"):
            values = getattr(self, name)
            if not values or any(v <= 0 for v in values):
                raise UsageError(f"--{name} must be positive integers, got {list(values)}")
        _check_choices(self.impl, SAMPLE_IMPLS, self.cores)


@dataclasses.dataclass(frozen=True)
class CompileBenchConfig:
    """Settings of ``python -m benchmarks compile``."""

    cell: str = field(
        "all", "recurrent cell (all: rnn, lstm and gru)", choices=("rnn", "lstm", "gru", "all")
    )
    hidden: int = field(512, "hidden size H")
    seq: tuple[int, ...] = field((32, 128, 512), "sequence lengths to compile for")
    impl: tuple[str, ...] = field(
        ("jaxseq", "jaxseq-notable", "flax"), f"JAX implementations, from {', '.join(_JAX_IMPLS)}"
    )
    layers: int = field(2, "recurrent layers")
    batch: int = field(64, "sequences per batch")
    json: bool = field(False, "print one JSON line per measurement on stdout")

    def validate(self) -> None:
        from jaxseq.errors import UsageError

        if self.hidden <= 0 or self.layers <= 0 or self.batch <= 0:
            raise UsageError("--hidden, --layers and --batch must be positive")
        if not self.seq or any(s <= 0 for s in self.seq):
            raise UsageError(f"--seq must be positive integers, got {list(self.seq)}")
        _check_choices(self.impl, _JAX_IMPLS)


def _parse(cls, prog: str, description: str, argv):
    from experiments import _cli

    p = _cli.parser(prog, description)
    _cli.add_dataclass_flags(p, cls)
    config = _cli.config_from_args(cls, p.parse_args(argv))
    config.validate()
    return config


def _cells(choice: str) -> tuple[str, ...]:
    return CELLS if choice == "all" else (choice,)


def _machine() -> dict:
    info = {"cpu": "unknown", "cpus": os.cpu_count()}
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["load_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def _emit_table(title: str, header: Sequence[str], rows: list[Sequence[str]], stream) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))
    print(title, file=stream)
    print(line(header), file=stream)
    print("  ".join("-" * w for w in widths), file=stream)
    for r in rows:
        print(line(r), file=stream)
    print(file=stream)


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


# ================================================================= training benchmark


def _impl_env(extra_flags: str) -> dict:
    env = dict(os.environ)
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra_flags).strip()
    return env


def train_main(argv: Sequence[str] | None = None) -> int:
    config = _parse(
        TrainBenchConfig,
        "python -m benchmarks charlm",
        "Training throughput of a char LM: jaxseq vs flax.linen vs PyTorch.",
        argv,
    )
    from tqdm.auto import tqdm

    from jaxseq.errors import UsageError

    impls = list(dict.fromkeys(config.impl))
    if "torch" in impls and not _torch_available():
        print("note: PyTorch is not installed; skipping the torch implementation", file=sys.stderr)
        impls.remove("torch")
    if config.jaxseq_xla_flags:
        impls.append("jaxseq+flags")
    if config.baseline:
        _baseline_module(config.baseline)  # a usage error unless it is a jaxseq checkout
        impls.append("jaxseq-baseline")
    if config.in_process and (
        config.xla_flags
        or config.jaxseq_xla_flags
        or config.cores
        or config.malloc != "retain-jax"
        or "jaxseq-cores" in impls
        or config.baseline
    ):
        raise UsageError(
            "--xla-flags, --jaxseq-xla-flags, --cores, --malloc, --baseline and "
            "jaxseq-cores need worker processes (drop --in-process)"
        )
    groups = [(c, h) for h in config.hidden for c in _cells(config.cell)]
    out = sys.stderr if config.json else sys.stdout
    machine = _machine()
    bar = tqdm(
        total=len(groups) * (len(impls) * (1 + config.steps)),
        unit="step",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    results = []
    try:
        for cell, hidden in groups:
            results.extend(_run_group(config, cell, hidden, impls, bar))
    finally:
        bar.close()

    rows = []
    for r in results:
        rows.append(
            [
                r["cell"],
                r["hidden"],
                r["impl"],
                f"{r['chars_per_s']:,.0f}",
                _fmt(r["vs_torch"]),
                _fmt(r["vs_flax"]),
                _fmt(r["compile_s"]),
                f"{r['peak_rss_mb']:,.0f}",
            ]
        )
        if config.json:
            print(json.dumps(r), flush=True)
    _emit_table(
        f"char-LM training, {config.layers} layers, batch {config.batch}, seq {config.seq}, "
        f"{config.dtype}, median of {config.steps} interleaved steps "
        f"({machine['cpu']}, {machine['cpus']} CPUs"
        + (f", workers pinned to cores {list(config.cores)}" if config.cores else "")
        + f", load {machine.get('load_1min', '?')} before the last group)",
        ["cell", "H", "impl", "chars/s", "vs torch", "vs flax", "compile s", "peak RSS MB"],
        rows,
        out,
    )
    return 0


def _baseline_module(root: str) -> str:
    """The benchmark worker module of the checkout at ``root`` (its layout changed once)."""
    from jaxseq.errors import UsageError

    for module, path in (
        ("benchmarks.charlm", "benchmarks/charlm.py"),
        ("experiments.bench_charlm", "experiments/bench_charlm.py"),
    ):
        if (pathlib.Path(root) / path).is_file():
            return module
    raise UsageError(
        f"--baseline {root}: no jaxseq benchmark (benchmarks/charlm.py or "
        f"experiments/bench_charlm.py) there"
    )


def _start_worker(config: TrainBenchConfig, impl: str, spec: dict, env: dict):
    """``impl``'s worker: in this process, a subprocess, or one in the baseline checkout."""
    if config.in_process:
        return _InProcess(spec, env)
    if impl != "jaxseq-baseline":
        return _Worker(spec, env)
    root = str(pathlib.Path(config.baseline).resolve())
    env = dict(env, PYTHONPATH=root)  # the checkout's jaxseq, not this one
    return _Worker(spec, env, module=_baseline_module(root), cwd=root)


def _malloc_mode(config: TrainBenchConfig, impl: str) -> str:
    """``retain`` or ``default``: the ``JAXSEQ_MALLOC`` of ``impl``'s worker."""
    jax_impl = impl != "torch"
    return (
        "retain"
        if config.malloc == "retain-all" or (config.malloc == "retain-jax" and jax_impl)
        else "default"
    )


def _train_record(
    config: TrainBenchConfig,
    impl: str,
    cell: str,
    hidden: int,
    speed: dict,
    times: list,
    ready: dict,
    rss: float,
    load,
) -> dict:
    """One JSON record of the training benchmark (``speed``: chars/s of every impl)."""
    return {
        "bench": "charlm",
        "impl": impl,
        "cell": cell,
        "hidden": hidden,
        "layers": config.layers,
        "batch": config.batch,
        "seq": config.seq,
        "dtype": (
            "float32" if impl == "torch" else "bfloat16" if impl == "jaxseq-bf16" else config.dtype
        ),
        "chars_per_s": speed[impl],
        "step_s_median": statistics.median(times),
        "step_s": times,
        "vs_torch": speed[impl] / speed["torch"] if "torch" in speed else None,
        "vs_flax": speed[impl] / speed["flax"] if "flax" in speed else None,
        "compile_s": ready.get("compile_s"),
        "first_step_s": ready.get("first_step_s"),
        "peak_rss_mb": rss,
        "rss_mode": "process" if config.in_process else "worker",
        "cores": list(config.cores) or None,
        "device": ready.get("device"),
        "xla_flags": (
            config.xla_flags + (" " + config.jaxseq_xla_flags if impl == "jaxseq+flags" else "")
        ).strip()
        if impl != "torch"
        else None,
        "malloc": "process" if config.in_process else _malloc_mode(config, impl),
        "load_1min": load,
    }


def _run_group(config: TrainBenchConfig, cell: str, hidden: int, impls: list[str], bar):
    base = dict(
        cell=cell,
        hidden=hidden,
        layers=config.layers,
        batch=config.batch,
        seq=config.seq,
        dtype=config.dtype,
        seed=config.seed,
        warmup=config.warmup,
        torch_device=config.torch_device,
        cores=list(config.cores),
    )
    workers: dict[str, Any] = {}
    ready: dict[str, dict] = {}
    try:
        for impl in impls:
            spec = dict(
                base, impl="jaxseq" if impl in ("jaxseq+flags", "jaxseq-baseline") else impl
            )
            if impl == "torch":
                spec["dtype"] = "float32"
            flags = config.xla_flags + (
                " " + config.jaxseq_xla_flags if impl == "jaxseq+flags" else ""
            )
            bar.set_description(f"{cell} H={hidden}: starting {impl}")
            env = _impl_env(flags.strip())
            env["JAXSEQ_MALLOC"] = _malloc_mode(config, impl)
            workers[impl] = _start_worker(config, impl, spec, env)
            ready[impl] = workers[impl].ready
            bar.update(1)
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for round_ in range(config.steps):
            order = impls[round_ % len(impls) :] + impls[: round_ % len(impls)]
            bar.set_description(f"{cell} H={hidden}: timing")
            for impl in order:
                time.sleep(config.gap)
                times[impl].extend(workers[impl].steps(1))
                bar.update(1)
        load = _machine().get("load_1min")
        rss = {impl: workers.pop(impl).quit() for impl in list(workers)}
    finally:
        for w in workers.values():
            w.kill()

    chars = config.batch * config.seq
    speed = {impl: chars / statistics.median(t) for impl, t in times.items()}
    return [
        _train_record(config, impl, cell, hidden, speed, times[impl], ready[impl], rss[impl], load)
        for impl in impls
    ]


# ================================================================= sampling benchmark


def _sample_fns(config: SampleBenchConfig, cell: str, hidden: int, batch: int, impls):
    """``{impl: run()}``, each generating ``length`` tokens for ``batch`` rows and blocking."""
    fns = {}
    L = config.length
    if {"jaxseq", "jax-loop"} & set(impls):
        import jax
        import jax.numpy as jnp

        from jaxseq.models import char_lm
        from jaxseq.sample import sample

        model = char_lm(VOCAB, cell=cell, hidden=hidden, layers=config.layers, embed=hidden)
        params = model.init(jax.random.key(config.seed))
        prime = jnp.zeros((1,), jnp.int32)
        keys = iter(jax.random.split(jax.random.key(config.seed + 1), 10_000))

        def run_scan():
            jax.block_until_ready(sample(model, params, next(keys), prime, length=L, num=batch))

        @jax.jit
        def one_step(params, carry, token, key):
            carry, logits = model.apply(params, carry, token[None])
            return carry, jax.random.categorical(key, logits[0]).astype(jnp.int32)

        def run_loop():
            step_keys = list(jax.random.split(next(keys), L))
            carry = model.initial_carry((batch,))
            token = jnp.zeros((batch,), jnp.int32)
            out = []
            for k in step_keys:
                carry, token = one_step(params, carry, token, k)
                out.append(token)
            jax.block_until_ready(jnp.stack(out))

        fns["jaxseq"], fns["jax-loop"] = run_scan, run_loop
    if {"torch", "torch-native"} & set(impls):
        import torch

        net = _torch_model(
            dict(
                cell=cell,
                hidden=hidden,
                layers=config.layers,
                seed=config.seed,
                torch_device=config.torch_device,
            )
        ).eval()
        device = next(net.parameters()).device
        gen = torch.Generator(device=device).manual_seed(config.seed)

        def run_torch():
            with torch.no_grad():
                token = torch.zeros((1, batch), dtype=torch.long, device=device)
                state, out = None, []
                for _ in range(L):
                    logits, state = net(token, state)
                    probs = torch.softmax(logits[0], dim=-1)
                    token = torch.multinomial(probs, 1, generator=gen).T
                    out.append(token)
                torch.cat(out).cpu()

        def run_torch_native():
            previous = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
            try:
                run_torch()
            finally:
                torch.backends.mkldnn.enabled = previous

        fns["torch"], fns["torch-native"] = run_torch, run_torch_native
    return {k: fns[k] for k in impls}


def _time_samples(config: SampleBenchConfig, cell: str, hidden: int, batch: int, impls, bar):
    """``(first, times)``: each implementation's first (compiling) run, then
    ``config.repeats`` interleaved timed runs of each."""
    fns = _sample_fns(config, cell, hidden, batch, impls)
    first = {}
    for impl, fn in fns.items():
        bar.set_description(f"{cell} H={hidden} batch {batch}: first {impl}")
        start = time.perf_counter()
        fn()
        first[impl] = time.perf_counter() - start
        bar.update(1)
    times = {impl: [] for impl in fns}
    bar.set_description(f"{cell} H={hidden} batch {batch}: timing")
    for r in range(config.repeats):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            start = time.perf_counter()
            fns[impl]()
            times[impl].append(time.perf_counter() - start)
            bar.update(1)
    return first, times


def sample_main(argv: Sequence[str] | None = None) -> int:
    config = _parse(
        SampleBenchConfig,
        "python -m benchmarks sample",
        "Sampling throughput of a char LM: jaxseq's compiled scan vs a loop of "
        "jitted steps vs a PyTorch no_grad loop.",
        argv,
    )
    if config.cores:  # before JAX's CPU client and PyTorch size their thread pools
        os.sched_setaffinity(0, config.cores)
    from tqdm.auto import tqdm

    impls = list(dict.fromkeys(config.impl))
    if not _torch_available() and {"torch", "torch-native"} & set(impls):
        print("note: PyTorch is not installed; skipping the torch implementations", file=sys.stderr)
        impls = [i for i in impls if not i.startswith("torch")]
    out = sys.stderr if config.json else sys.stdout
    machine = _machine()
    groups = [(c, h, b) for h in config.hidden for c in _cells(config.cell) for b in config.batch]
    rows, records = [], []
    bar = tqdm(
        total=len(groups) * len(impls) * (1 + config.repeats),
        unit="run",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for cell, hidden, batch in groups:
            first, times = _time_samples(config, cell, hidden, batch, impls, bar)
            speed = {
                impl: batch * config.length / statistics.median(t) for impl, t in times.items()
            }
            for impl in impls:
                med = statistics.median(times[impl])
                rec = {
                    "bench": "sample",
                    "impl": impl,
                    "cell": cell,
                    "hidden": hidden,
                    "layers": config.layers,
                    "batch": batch,
                    "length": config.length,
                    "chars_per_s": speed[impl],
                    "run_s_median": med,
                    "run_s": times[impl],
                    "first_run_s": first[impl],
                    "vs_torch": speed[impl] / speed["torch"] if "torch" in speed else None,
                    "device": (
                        _torch_device(config.torch_device)
                        if impl.startswith("torch")
                        else _jax_device()
                    ),
                    "load_1min": _machine().get("load_1min"),
                }
                records.append(rec)
                rows.append(
                    [
                        cell,
                        hidden,
                        batch,
                        impl,
                        f"{speed[impl]:,.0f}",
                        f"{med * 1e3:,.1f}",
                        _fmt(rec["vs_torch"]),
                        f"{first[impl]:.2f}",
                    ]
                )
    finally:
        bar.close()
    if config.json:
        for rec in records:
            print(json.dumps(rec), flush=True)
    _emit_table(
        f"char-LM sampling, {config.layers} layers, {config.length} characters, median of "
        f"{config.repeats} interleaved runs ({machine['cpu']}, {machine['cpus']} CPUs"
        + (f", pinned to cores {list(config.cores)}" if config.cores else "")
        + f", load {machine.get('load_1min', '?')} at the start)",
        ["cell", "H", "batch", "impl", "chars/s", "ms/run", "vs torch", "first run s"],
        rows,
        out,
    )
    return 0


# ================================================================= compile-time benchmark


def compile_main(argv: Sequence[str] | None = None) -> int:
    config = _parse(
        CompileBenchConfig,
        "python -m benchmarks compile",
        "Compile time of the JAX train steps at several sequence lengths.",
        argv,
    )
    out = sys.stderr if config.json else sys.stdout
    rows = []
    for cell in _cells(config.cell):
        for seq in config.seq:
            for impl in dict.fromkeys(config.impl):
                spec = dict(
                    impl=impl,
                    cell=cell,
                    hidden=config.hidden,
                    layers=config.layers,
                    batch=config.batch,
                    seq=seq,
                    dtype="float32",
                    seed=0,
                    warmup=0,
                )
                _, compile_s = build_train_step(spec)
                rec = {
                    "bench": "compile",
                    "impl": impl,
                    "cell": cell,
                    "hidden": config.hidden,
                    "seq": seq,
                    "batch": config.batch,
                    "layers": config.layers,
                    "compile_s": compile_s,
                }
                if config.json:
                    print(json.dumps(rec), flush=True)
                rows.append([cell, config.hidden, seq, impl, f"{compile_s:.2f}"])
    _emit_table(
        "train-step compile time (lower + compile)",
        ["cell", "H", "seq", "impl", "compile s"],
        rows,
        out,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.charlm [charlm|sample|compile] ...`` (default: charlm)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from experiments import _cli, _malloc

    # In this process: the sample and compile benchmarks, and charlm --in-process.
    _malloc.retain_freed_memory()
    commands = {"charlm": train_main, "sample": sample_main, "compile": compile_main}
    if argv and argv[0] in commands:
        return _cli.run_main(commands[argv[0]], argv[1:])
    return _cli.run_main(train_main, argv)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit(main())
