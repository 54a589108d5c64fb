"""RNN vs LSTM vs GRU (and one-hot vs embedding input) on one training budget.

    python -m experiments.compare --budget-chars 1500000 --out runs/compare
    python -m experiments.compare --budget-seconds 60 --input both --match params
    python -m experiments.compare --cells rnn,lstm,gru,mingru,minlstm

``--cells`` takes any cells of ``jaxseq.make_cell`` (comma- or space-separated).

Every run trains a char LM on the same text, one step of each run in turn, until it has
seen ``--budget-chars`` characters or spent ``--budget-seconds`` of training wall-clock.
The output directory receives ``results.md`` (the table), ``results.json`` (every number,
curves included), ``val_loss.png`` (validation loss against characters seen and against
wall-clock) and ``samples.md`` (a sample from each model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import shlex
import sys
from collections.abc import Sequence

from experiments import _cli, _malloc, _race
from jaxseq._cells import CELLS
from jaxseq.charrnn import CharRNNConfig
from jaxseq.config import field
from jaxseq.data import CharVocab, load_corpus
from jaxseq.errors import UsageError

DEFAULT_OUT = "runs/compare"
DEFAULT_BUDGET_CHARS = 1_500_000
CELL_NAMES = ("rnn", "lstm", "gru")  # the default set; any of jaxseq's CELLS may be asked for
COLORS = {
    "rnn": "tab:blue",
    "lstm": "tab:orange",
    "gru": "tab:green",
    "mingru": "tab:red",
    "minlstm": "tab:purple",
}
DISPLAY_NAMES = {
    "rnn": "RNN",
    "lstm": "LSTM",
    "gru": "GRU",
    "mingru": "minGRU",
    "minlstm": "minLSTM",
}
LINESTYLES = {"embedding": "-", "onehot": "--"}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Every setting of a comparison (each one is a command-line flag)."""

    cells: tuple[str, ...] = field(
        CELL_NAMES, f"cells to compare, comma- or space-separated, from {', '.join(CELLS)}"
    )
    input: str = field(
        "embedding",
        "input encoding: learned embeddings, one-hot vectors, or both (every cell twice)",
        choices=("embedding", "onehot", "both"),
    )
    match: str = field(
        "hidden",
        "hidden: every cell gets --hidden units; params: each "
        "cell's hidden size is chosen so that its parameter count is closest "
        "to an LSTM's with --hidden units",
        choices=("hidden", "params"),
    )
    hidden: int = field(128, "units of the recurrent layer(s)")
    layers: int = field(1, "stacked recurrent layers")
    embed: int = field(32, "embedding width (embedding input)")
    batch: int = field(32, "sequences per batch")
    seq: int = field(64, "characters per truncated-BPTT window")
    lr: float = field(3e-3, "learning rate (Adam, constant after warm-up)")
    warmup: int = field(20, "linear warm-up steps")
    clip: float = field(5.0, "clip gradients to this global norm (0: off)")
    seed: int = field(0, "random seed (initialisation and samples)")
    budget_chars: int | None = field(
        None,
        f"stop each run after this many training characters (default "
        f"{DEFAULT_BUDGET_CHARS:,} when --budget-seconds is not given)",
    )
    budget_seconds: float | None = field(
        None,
        "stop each run after this many seconds of training wall-clock (evaluation and "
        "compilation excluded); with --budget-chars too, whichever comes first",
    )
    eval_points: int = field(10, "validations per run (besides the one at the start)")
    val_chars: int = field(
        0, "validate on the first N characters of the validation split (0: the whole split)"
    )
    sample_length: int = field(300, "characters sampled from each model (0: none)")
    temperature: float = field(0.8, "sampling temperature")

    def budget(self) -> _race.Budget:
        chars = self.budget_chars
        if chars is None and self.budget_seconds is None:
            chars = DEFAULT_BUDGET_CHARS
        return _race.Budget(chars=chars, seconds=self.budget_seconds)

    def validate(self) -> None:
        check_cells(self.cells)
        for name in ("hidden", "layers", "embed", "batch", "seq", "eval_points"):
            if getattr(self, name) <= 0:
                raise UsageError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.val_chars < 0 or self.sample_length < 0 or self.warmup < 0 or self.clip < 0:
            raise UsageError("--val-chars, --sample-length, --warmup and --clip must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature must be positive, got {self.temperature}")
        self.budget().validate()

    def input_modes(self) -> tuple[str, ...]:
        return ("embedding", "onehot") if self.input == "both" else (self.input,)


def split_cells(values: Sequence[str]) -> tuple[str, ...]:
    """``("rnn,lstm", "gru")`` -> ``("rnn", "lstm", "gru")``: ``--cells`` in either spelling."""
    return tuple(name.strip() for v in values for name in v.split(",") if name.strip())


def check_cells(cells: Sequence[str]) -> None:
    """``UsageError`` unless ``cells`` names registered cells (``jaxseq.make_cell``), once each."""
    if not cells:
        raise UsageError("--cells names no cell")
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise UsageError(f"unknown cell {unknown[0]!r}; choose from {', '.join(CELLS)}")
    if len(set(cells)) != len(cells):
        raise UsageError("--cells lists a cell twice")


def run_configs(config: CompareConfig, vocab_size: int) -> list[tuple[str, CharRNNConfig]]:
    """``(label, CharRNNConfig)`` for every run: each cell, for each input mode."""
    runs = []
    for mode in config.input_modes():
        # Every training setting is spelled out so that changes to CharRNNConfig's defaults
        # do not silently change the comparison.
        base = CharRNNConfig(
            cell="lstm",
            layers=config.layers,
            hidden=config.hidden,
            embed=config.embed,
            input=mode,
            dropout=0.0,
            dtype="float32",
            batch=config.batch,
            seq=config.seq,
            windows="sequential",
            lr=config.lr,
            schedule="constant",
            warmup=config.warmup,
            clip=config.clip,
            seed=config.seed,
            sample_length=0,
            train_fraction=0.9,
        )
        target = None
        if config.match == "params":
            target = _race.count_model_params(base, vocab_size)
        for cell in config.cells:
            c = dataclasses.replace(base, cell=cell)
            if target is not None:
                c = dataclasses.replace(
                    c, hidden=_race.hidden_for_param_count(c, vocab_size, target)
                )
            label = cell if config.input != "both" else f"{cell} ({mode})"
            runs.append((label, c))
    return runs


def prepare_out_dir(out: pathlib.Path, overwrite: bool) -> None:
    """Creates ``out``; refuses a non-empty existing directory unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(
            f"output directory {out} already exists; pass --overwrite to replace its files"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to output directory {out}: {e.strerror}") from None


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity


def _fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def results_table(results: Sequence[_race.RaceResult]) -> str:
    """The markdown table: one row per run."""
    head = (
        "| cell | input | hidden | parameters | chars/s | best val loss (nats/char) | "
        "best val (bits/char) | wall time (s) | chars seen | steps |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in results:
        cps = r.chars / r.seconds if r.seconds > 0 else math.nan
        note = " (diverged)" if r.diverged else ""
        rows.append(
            f"| {r.config.cell}{note} | {r.config.input} | {r.config.hidden} | "
            f"{_fmt_int(r.n_params)} | {_fmt_int(cps)} | {r.best_val:.4f} | "
            f"{r.best_val / math.log(2):.4f} | {r.seconds:.1f} | {_fmt_int(r.chars)} | "
            f"{r.steps} |"
        )
    return "\n".join(rows) + "\n"


def plot_curves(results: Sequence[_race.RaceResult], path: pathlib.Path, title: str) -> None:
    """Validation loss against characters seen (left) and training wall-clock (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for r in results:
        chars = [h["chars"] / 1e6 for h in r.history]
        secs = [h["seconds"] for h in r.history]
        loss = [h["val_loss"] for h in r.history]
        style = dict(
            color=COLORS.get(r.config.cell),
            linestyle=LINESTYLES[r.config.input],
            marker="o",
            markersize=3,
            label=f"{r.label} ({r.n_params:,} params)",
        )
        axes[0].plot(chars, loss, **style)
        axes[1].plot(secs, loss, **style)
    axes[0].set_xlabel("characters seen (millions)")
    axes[1].set_xlabel("training wall-clock (s)")
    axes[0].set_ylabel("validation loss (nats/char)")
    right = axes[1].secondary_yaxis(
        "right", functions=(lambda x: x / math.log(2), lambda x: x * math.log(2))
    )
    right.set_ylabel("bits/char")
    finals = [h["val_loss"] for r in results for h in r.history[1:] if math.isfinite(h["val_loss"])]
    if finals:  # the first point (about log V nats) would squash the interesting range
        lo, hi = min(finals), max(finals)
        axes[0].set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.3 * (hi - lo + 0.1))
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("validation loss vs characters seen")
    axes[1].set_title("validation loss vs training time")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_summary() -> dict:
    """What ran the experiment: CPU, core count, JAX backend, load average."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": f"{device.platform} ({device.device_kind})",
        "load_average": load,
    }


def describe_machine(m: dict) -> str:
    load = ", ".join(map(str, m["load_average"])) if m["load_average"] else "unknown"
    return (
        f"{m['cpu']}, {m['cpu_count']} CPUs, JAX {m['jax']} on {m['backend']}; "
        f"load average (1, 5, 15 min) {load}"
    )


def _parser():
    p = _cli.parser(
        "python -m experiments.compare",
        "Train char LMs of several cells (RNN, LSTM, GRU by default) under one "
        "budget (equal characters or equal wall-clock) and write a table, a plot of "
        "validation loss and samples.",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="UTF-8 text file (default: Tiny Shakespeare via $JAXSEQ_DATA, the data/ "
        "cache, or a download)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output directory")
    p.add_argument(
        "--overwrite", action="store_true", help="write into --out even if it already holds files"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _cli.add_dataclass_flags(p, CompareConfig)
    return p


def run_record(r) -> dict:
    """One run's entry in ``results.json``."""
    return {
        "label": r.label,
        "cell": r.config.cell,
        "input": r.config.input,
        "hidden": r.config.hidden,
        "parameters": r.n_params,
        "steps": r.steps,
        "chars": r.chars,
        "seconds": r.seconds,
        "chars_per_s": r.chars / r.seconds if r.seconds > 0 else None,
        "best_val_loss": _finite_or_none(r.best_val),
        "best_val_bpc": _finite_or_none(r.best_val / math.log(2)),
        "diverged": r.diverged,
        "history": r.history,
    }


def write_samples(out: pathlib.Path, results, vocab: CharVocab, config) -> list[str]:
    """``samples.md``: a sample from each run that did not diverge (none if length is 0)."""
    samples = []
    for r in results:
        if config.sample_length and not r.diverged:
            body = _race.sample_text(
                r.model,
                r.params,
                vocab,
                length=config.sample_length,
                seed=config.seed,
                temperature=config.temperature,
            )
            samples.append(
                f"## {r.label}\n\nbest validation {r.best_val:.4f} nats/char, "
                f"temperature {config.temperature}, primed with a newline\n\n"
                f"```text\n{body}\n```\n"
            )
    if samples:
        (out / "samples.md").write_text("# Samples\n\n" + "\n".join(samples))
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    _malloc.retain_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    config = _cli.config_from_args(CompareConfig, args, cells=split_cells(args.cells))
    config.validate()
    out = pathlib.Path(args.out)
    text = load_corpus(args.data)
    prepare_out_dir(out, args.overwrite)
    machine_before = machine_summary()
    vocab = CharVocab.from_text(text)
    runs = run_configs(config, vocab.size)
    budget = config.budget()
    log = lambda s: print(s, file=sys.stderr, flush=True)
    log(f"{len(runs)} runs, budget {budget.describe()} each, one step of each in turn")
    results = _race.race(
        [c for _, c in runs],
        text,
        budget,
        labels=[l for l, _ in runs],
        eval_points=config.eval_points,
        val_chars=config.val_chars,
        progress=args.progress,
        log=log,
    )
    machine = machine_summary()
    machine["load_average_at_start"] = machine_before["load_average"]
    command = "python -m experiments.compare " + shlex.join(argv)

    table = results_table(results)
    (out / "results.md").write_text(
        f"# {' vs '.join(DISPLAY_NAMES.get(c, c) for c in config.cells)} under one budget\n\n"
        f"Command: `{command}`\n\n"
        f"Budget per run: {budget.describe()}; batch {config.batch} x {config.seq} characters "
        f"per step, {config.layers} layer(s), Adam lr {config.lr:g}, match={config.match}. "
        f"Validation on {config.val_chars or 'all'} characters of the held-out split. "
        f"chars/s and wall time count training steps only (the runs' steps interleave).\n\n"
        f"Machine: {describe_machine(machine)} (at start: "
        f"{', '.join(map(str, machine_before['load_average'] or []))}).\n\n" + table
    )
    plot_curves(
        results,
        out / "val_loss.png",
        f"Char LM validation loss, budget {budget.describe()} per run",
    )
    samples = write_samples(out, results, vocab, config)
    record = {
        "command": command,
        "config": dataclasses.asdict(config),
        "machine": machine,
        "budget": budget._asdict(),
        "runs": [run_record(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table, end="")
    log(f"wrote results.md, results.json, val_loss.png{', samples.md' if samples else ''} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
