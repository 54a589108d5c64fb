"""minGRU and minLSTM against the GRU and the LSTM: ``python -m benchmarks recurrence``.

Training throughput of 2-layer char LMs (embedding of width H, two recurrent layers of H
units, a dense decoder to 65 characters; Adam, clipping by global norm 5, float32, random
tokens), the setting of ``python -m benchmarks charlm``, at several sequence lengths T with
the batch chosen so that every step sees the same ``--tokens`` characters (B = tokens / T).

Implementations (``IMPLS``): ``gru`` and ``lstm`` with ``impl="auto"`` (their fused
kernels), and ``mingru`` and ``minlstm`` each as ``scan`` (``lax.scan`` of the step) and
``assoc`` (``unroll(impl="associative")``: ``jaxseq.linear_recurrence``'s associative
scan). The min cells run at the GRU's hidden size (``--match hidden``) and at the hidden
size whose char LM has about the GRU's parameter count (``--match params``; their layers
have no recurrent matrix, so that size is larger).

Every implementation runs in its own worker process (charlm's protocol and allocator
setting), so each peak RSS is its own. For each T the workers are started one at a time
and then asked for one timed step each in turn, A B C, B C A, ..., so that drift on a
shared machine hits them alike. Reported: the median step as characters per second, its
ratio to the GRU's, the compile time, the worker's peak RSS and the 1-minute load average.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import charlm
from jaxseq.config import field

# implementation -> (cell, unroll impl)
IMPLS = {
    "gru": ("gru", "auto"),
    "lstm": ("lstm", "auto"),
    "mingru-scan": ("mingru", "scan"),
    "mingru-assoc": ("mingru", "associative"),
    "minlstm-scan": ("minlstm", "scan"),
    "minlstm-assoc": ("minlstm", "associative"),
}
MIN_CELLS = ("mingru", "minlstm")
QUICK = dict(seq=(16, 64), tokens=256, hidden=16, steps=2, warmup=1, gap=0.0)


def _quick(config):
    """``config`` (a ``RecurrenceBenchConfig``) with ``QUICK``'s value for every setting
    still at its default."""
    defaults = RecurrenceBenchConfig()
    return dataclasses.replace(
        config, **{k: v for k, v in QUICK.items() if getattr(config, k) == getattr(defaults, k)}
    )


@dataclasses.dataclass(frozen=True)
class RecurrenceBenchConfig:
    """Settings of ``python -m benchmarks recurrence``."""

    seq: tuple[int, ...] = field((128, 512, 2048, 8192), "sequence lengths T")
    tokens: int = field(8192, "characters per batch, B*T (B = tokens / T for every T)")
    hidden: int = field(256, "hidden size H of the GRU and the LSTM (embedding width = H)")
    impl: tuple[str, ...] = field(tuple(IMPLS), f"implementations, from {', '.join(IMPLS)}")
    match: tuple[str, ...] = field(
        ("hidden", "params"),
        "sizes of the min cells: hidden "
        "(the GRU's H), params (the H whose char LM has about the "
        "GRU's parameter count), or both",
    )
    layers: int = field(2, "recurrent layers")
    steps: int = field(7, "timed steps per implementation (the median is reported)")
    warmup: int = field(2, "untimed steps after compiling")
    gap: float = field(0.3, "seconds of idle time before each timed step (charlm's --gap)")
    seed: int = field(0, "seed of the weights and the random tokens")
    quick: bool = field(
        False,
        "tiny settings for a smoke test: "
        + ", ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in QUICK.items()
        )
        + " (explicit flags win)",
    )
    in_process: bool = field(
        False,
        "run every implementation in this process instead of one "
        "worker each (faster to start; peak RSS is then this process's)",
    )
    json: bool = field(
        False, "print one JSON line per measurement on stdout (the table then goes to stderr)"
    )
    progress: bool = field(True, "progress bar on stderr")

    def validate(self) -> None:
        from jaxseq.errors import UsageError

        for name in ("tokens", "hidden", "layers", "steps"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.gap < 0:
            raise UsageError(f"--warmup and --gap must be >= 0, got {self.warmup}, {self.gap}")
        if not self.seq or any(t <= 0 or self.tokens % t for t in self.seq):
            raise UsageError(
                f"every --seq must be a positive divisor of --tokens "
                f"{self.tokens}, got {list(self.seq)}"
            )
        bad = [i for i in self.impl if i not in IMPLS]
        if bad or not self.impl:
            raise UsageError(
                f"unknown --impl {', '.join(bad) or '(none)'}; choose from {', '.join(IMPLS)}"
            )
        bad = [m for m in self.match if m not in ("hidden", "params")]
        if bad or not self.match:
            raise UsageError(
                f"unknown --match {', '.join(bad) or '(none)'}; choose from hidden, params"
            )


# ================================================================= the train step


def build_train_step(spec: dict):
    """``(run_step, compile_s)``: one Adam step of the char LM of ``spec`` on a fixed batch.

    ``spec``: ``cell``, ``unroll`` (the ``impl`` of ``jaxseq.unroll``), ``hidden`` (also the
    embedding width), ``layers``, ``batch``, ``seq``, ``seed``.
    """
    import jax

    from jaxseq import charrnn

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
        dtype="float32",
        seed=spec["seed"],
    )
    model = charrnn.build_model(config, charlm.VOCAB)
    optimizer = charrnn.make_optimizer(config)
    state = charrnn.init_state(config, model, optimizer)
    inputs, targets = (jax.device_put(a) for a in charlm._tokens(spec))
    step = charrnn.make_train_step(model, optimizer, config, impl=spec["unroll"])
    start = time.perf_counter()
    compiled = step.lower(state, inputs, targets, False).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def run_step():
        box[0], metrics = compiled(box[0], inputs, targets, False)
        jax.block_until_ready(metrics["loss"])

    return run_step, compile_s


def _ready(spec: dict) -> tuple[Any, dict]:
    """Builds the step, runs its first and warm-up steps; ``(run_step, ready record)``."""
    run_step, compile_s = build_train_step(spec)
    start = time.perf_counter()
    run_step()
    first_step_s = time.perf_counter() - start
    for _ in range(max(0, spec["warmup"] - 1)):
        run_step()
    return run_step, {
        "ready": True,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "device": charlm._jax_device(),
    }


def _timed(run_step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return times


def worker_main(spec_json: str) -> int:
    """A worker speaking ``benchmarks.charlm``'s protocol (``steps N``, ``quit``)."""
    from experiments import _malloc

    _malloc.retain_freed_memory()  # as charlm's JAX workers (JAXSEQ_MALLOC from the parent)
    run_step, ready = _ready(json.loads(spec_json))
    charlm._say(ready)
    for line in sys.stdin:
        command = line.split()
        if command and command[0] == "steps":
            charlm._say({"times": _timed(run_step, int(command[1]))})
        elif command and command[0] == "quit":
            charlm._say({"peak_rss_mb": charlm._peak_rss_mb()})
            return 0
    return 0


class _InProcess:
    """The same interface in this process (peak RSS: this process's so far)."""

    def __init__(self, spec: dict, env: dict):
        self.spec = spec
        self._run, self.ready = _ready(spec)

    def steps(self, n: int) -> list[float]:
        return _timed(self._run, n)

    def quit(self) -> float:
        return charlm._peak_rss_mb()

    def kill(self) -> None:
        pass


# ================================================================= sizes


def param_count(cell: str, hidden: int, layers: int) -> int:
    """Parameters of the benchmark's char LM (embedding width = ``hidden``)."""
    from experiments import _race
    from jaxseq.charrnn import CharRNNConfig

    return _race.count_model_params(
        CharRNNConfig(cell=cell, layers=layers, hidden=hidden, embed=hidden), charlm.VOCAB
    )


def matched_hidden(cell: str, target: int, layers: int) -> int:
    """The H (= embedding width) whose char LM of ``cell`` has about ``target`` parameters."""
    from experiments import _race
    from jaxseq.charrnn import CharRNNConfig

    return _race.hidden_for_param_count(
        CharRNNConfig(cell=cell, layers=layers, hidden=1, embed=1),
        charlm.VOCAB,
        target,
        resize=lambda c, h: dataclasses.replace(c, hidden=h, embed=h),
    )


def variants(config: RecurrenceBenchConfig) -> list[dict]:
    """One entry per timed implementation: label, cell, unroll impl, match, hidden, params."""
    gru_params = param_count("gru", config.hidden, config.layers)
    sizes = {}
    for cell in MIN_CELLS:
        sizes[cell, "hidden"] = config.hidden
        if "params" in config.match:
            sizes[cell, "params"] = matched_hidden(cell, gru_params, config.layers)
    out = []
    for impl in dict.fromkeys(config.impl):
        cell, unroll = IMPLS[impl]
        matches = config.match if cell in MIN_CELLS else ("hidden",)
        for match in matches:
            hidden = sizes.get((cell, match), config.hidden)
            label = impl if cell not in MIN_CELLS else f"{impl} ={match}"
            out.append(
                dict(
                    label=label,
                    impl=impl,
                    cell=cell,
                    unroll=unroll,
                    match=match,
                    hidden=hidden,
                    params=param_count(cell, hidden, config.layers),
                )
            )
    return out


# ================================================================= the run


def _run_length(config: RecurrenceBenchConfig, seq: int, runs: list[dict], bar) -> list[dict]:
    batch = config.tokens // seq
    workers: dict[str, Any] = {}
    ready: dict[str, dict] = {}
    labels = [r["label"] for r in runs]
    try:
        for r in runs:
            spec = dict(
                cell=r["cell"],
                unroll=r["unroll"],
                hidden=r["hidden"],
                layers=config.layers,
                batch=batch,
                seq=seq,
                seed=config.seed,
                warmup=config.warmup,
            )
            bar.set_description(f"T={seq}: starting {r['label']}")
            env = charlm._impl_env("")
            env["JAXSEQ_MALLOC"] = "retain"
            workers[r["label"]] = (
                _InProcess(spec, env)
                if config.in_process
                else charlm._Worker(spec, env, module="benchmarks.recurrence")
            )
            ready[r["label"]] = workers[r["label"]].ready
            bar.update(1)
        times: dict[str, list[float]] = {label: [] for label in labels}
        bar.set_description(f"T={seq}: timing")
        for round_ in range(config.steps):
            for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
                time.sleep(config.gap)
                times[label].extend(workers[label].steps(1))
                bar.update(1)
        load = charlm._machine().get("load_1min")
        rss = {label: workers.pop(label).quit() for label in list(workers)}
    finally:
        for w in workers.values():
            w.kill()

    speed = {label: config.tokens / statistics.median(t) for label, t in times.items()}
    reference = speed.get("gru")
    return [
        {
            "bench": "recurrence",
            "impl": r["impl"],
            "label": r["label"],
            "cell": r["cell"],
            "unroll": r["unroll"],
            "match": r["match"],
            "hidden": r["hidden"],
            "params": r["params"],
            "layers": config.layers,
            "batch": batch,
            "seq": seq,
            "dtype": "float32",
            "chars_per_s": speed[r["label"]],
            "vs_gru": speed[r["label"]] / reference if reference else None,
            "step_s_median": statistics.median(times[r["label"]]),
            "step_s": times[r["label"]],
            "compile_s": ready[r["label"]]["compile_s"],
            "first_step_s": ready[r["label"]]["first_step_s"],
            "peak_rss_mb": rss[r["label"]],
            "rss_mode": "process" if config.in_process else "worker",
            "device": ready[r["label"]]["device"],
            "load_1min": load,
        }
        for r in runs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from experiments import _cli

    return _cli.run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    config = charlm._parse(
        RecurrenceBenchConfig,
        "python -m benchmarks recurrence",
        "Training throughput of minGRU and minLSTM (scan and associative "
        "forms) against the GRU and the LSTM, at several sequence lengths "
        "with a fixed number of characters per batch.",
        argv,
    )
    if config.quick:
        config = _quick(config)
        config.validate()
    from tqdm.auto import tqdm

    from experiments import _malloc

    _malloc.retain_freed_memory()  # for --in-process; the workers set it themselves

    runs = variants(config)
    out = sys.stderr if config.json else sys.stdout
    machine = charlm._machine()
    bar = tqdm(
        total=len(config.seq) * len(runs) * (1 + config.steps),
        unit="step",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    results = []
    try:
        for seq in config.seq:
            records = _run_length(config, seq, runs, bar)
            results.extend(records)
            if config.json:
                for rec in records:
                    print(json.dumps(rec), flush=True)
    finally:
        bar.close()
    rows = [
        [
            r["seq"],
            r["batch"],
            r["label"],
            r["hidden"],
            f"{r['params']:,}",
            f"{r['chars_per_s']:,.0f}",
            charlm._fmt(r["vs_gru"]),
            charlm._fmt(r["compile_s"]),
            f"{r['peak_rss_mb']:,.0f}",
            r["load_1min"],
        ]
        for r in results
    ]
    charlm._emit_table(
        f"char-LM training, {config.layers} layers, {config.tokens} characters per batch "
        f"(B = {config.tokens}/T), float32, median of {config.steps} interleaved steps "
        f"({machine['cpu']}, {machine['cpus']} CPUs, {results[0]['device']}, load "
        f"{machine.get('load_1min', '?')} at the start)",
        ["T", "B", "impl", "H", "params", "chars/s", "vs gru", "compile s", "peak RSS MB", "load"],
        rows,
        out,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit(main())
