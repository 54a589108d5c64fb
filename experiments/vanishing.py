"""Vanishing gradients, measured: how far back does each cell's gradient reach?

    python -m experiments.vanishing --out runs/vanishing
    python -m experiments.vanishing --cells rnn,lstm,gru,mingru,minlstm

Two experiments, each on RNN, LSTM and GRU (``--cells`` adds minGRU and minLSTM, whose
state Jacobian ``∂h_t/∂h_{t-1} = diag(a_t)`` is the product of their gates alone):

1. Gradient through time on Tiny Shakespeare. For windows of real text, the norm of the
   gradient of the last step's loss with respect to the recurrent state ``k`` steps
   earlier, ``‖∂L_T/∂s_{T-k}‖``, and the Frobenius norm of the Jacobian ``∂h_T/∂s_{T-k}``,
   for ``k`` up to ``--window``; at initialisation and again after each cell has trained
   on ``--train-chars`` characters. Written to ``gradients.png`` (log scale) and
   ``gradients.md``.
2. A long-range recall task: a symbol, then ``k`` noise tokens, then the question "which
   symbol?". Each cell trains ``--task-steps`` steps per gap ``k``; accuracy on held-out
   sequences against ``k`` goes to ``long_range.png`` and ``long_range.md``.

Every number is also in ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shlex
import sys
from collections.abc import Sequence

import numpy as np

from experiments import _cli, _malloc, _race
from experiments.compare import (
    CELL_NAMES,
    COLORS,
    check_cells,
    describe_machine,
    machine_summary,
    prepare_out_dir,
    split_cells,
)
from jaxseq import analysis
from jaxseq.charrnn import CharRNNConfig, build_model
from jaxseq.config import field
from jaxseq.data import CharVocab, load_corpus, train_val_split
from jaxseq.errors import UsageError

DEFAULT_OUT = "runs/vanishing"
TABLE_STEPS = (1, 10, 50, 100, 200)
MARKERS = {"rnn": "o", "lstm": "s", "gru": "^", "mingru": "D", "minlstm": "v"}
PHASE_NAMES = {"init": "at initialisation", "trained": "trained"}


@dataclasses.dataclass(frozen=True)
class VanishingConfig:
    """Every setting of the vanishing-gradient experiments (each one is a flag)."""

    cells: tuple[str, ...] = field(
        CELL_NAMES,
        "cells to measure, comma- or space-separated, from rnn, lstm, gru, mingru, minlstm",
    )
    hidden: int = field(128, "units of the one recurrent layer (Shakespeare model)")
    embed: int = field(32, "embedding width (Shakespeare model)")
    window: int = field(256, "steps back measured, K (the lecture's claim needs >= 200)")
    burn_in: int = field(32, "unmeasured steps that warm the state up before the window")
    examples: int = field(32, "text windows the loss gradient is averaged over")
    jacobian_examples: int = field(
        4,
        "windows (of those) that also get the full "
        "Jacobian norm, H backward passes each (0: skip it)",
    )
    train_chars: int = field(
        1_000_000,
        "characters of training text each cell sees before the 'after training' measurement",
    )
    train_batch: int = field(32, "sequences per training batch")
    train_seq: int = field(64, "truncated-BPTT window of that training")
    lr: float = field(3e-3, "learning rate (Adam) of both trainings")
    task_gaps: tuple[int, ...] = field(
        (5, 10, 20, 40, 80), "recall-task gaps k: the symbol is seen k steps before it is asked for"
    )
    task_steps: int = field(1000, "training steps per cell and gap")
    task_batch: int = field(32, "recall sequences per training step")
    task_hidden: int = field(64, "units of the recall-task models")
    task_symbols: int = field(4, "symbols to remember (chance accuracy is 1/this)")
    task_noise: int = field(4, "distinct noise tokens between symbol and question")
    task_eval_size: int = field(1024, "held-out sequences per accuracy")
    seed: int = field(0, "random seed")

    def validate(self) -> None:
        check_cells(self.cells)
        positive = (
            "hidden",
            "embed",
            "window",
            "examples",
            "train_chars",
            "train_batch",
            "train_seq",
            "task_steps",
            "task_batch",
            "task_hidden",
            "task_symbols",
            "task_noise",
            "task_eval_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.burn_in < 0 or self.jacobian_examples < 0:
            raise UsageError("--burn-in and --jacobian-examples must be >= 0")
        if not self.task_gaps or any(k <= 0 for k in self.task_gaps):
            raise UsageError(f"--task-gaps must be positive, got {list(self.task_gaps)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be positive, got {self.lr}")

    def shakespeare_config(self, cell: str) -> CharRNNConfig:
        # Every training setting is spelled out so that changes to CharRNNConfig's defaults
        # do not silently change this experiment.
        return CharRNNConfig(
            cell=cell,
            layers=1,
            hidden=self.hidden,
            embed=self.embed,
            input="embedding",
            dropout=0.0,
            dtype="float32",
            batch=self.train_batch,
            seq=self.train_seq,
            windows="sequential",
            lr=self.lr,
            schedule="constant",
            warmup=20,
            clip=5.0,
            seed=self.seed,
            sample_length=0,
            train_fraction=0.9,
        )


def _windows(n: int) -> str:
    return f"{n} window" + ("s" if n != 1 else "")


def _sci(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) and x > 0 else ("0" if x == 0 else str(x))


def gradient_tables(profiles: dict, cfg: VanishingConfig, val_loss: dict) -> str:
    """Markdown tables of the measured profiles (mean over windows)."""
    ks = [k for k in TABLE_STEPS if k < cfg.window]
    lines = [
        f"## Loss gradient: mean ‖∂L_T/∂s_(T−k)‖ over {_windows(cfg.examples)}\n",
        "s is the whole recurrent state (h; h and c together for the LSTM). Columns "
        "after k = 0 are ratios to k = 0. 'Falls 1000x at' is the first k where the "
        "mean is below a thousandth of its k = 0 value.\n",
        "| cell | phase | val loss (nats/char) | k = 0 | "
        + " | ".join(f"k = {k} / k = 0" for k in ks)
        + " | falls 1000x at k |",
        "|" + "---|" * (5 + len(ks)),
    ]
    for cell in cfg.cells:
        for phase in ("init", "trained"):
            mean = profiles[cell][phase]["state"].mean(axis=1)
            fall = analysis.steps_to_fall(mean, 1e3)
            lines.append(
                f"| {cell} | {phase} | {val_loss[cell][phase]:.3f} | {_sci(mean[0])} | "
                + " | ".join(_sci(mean[k] / mean[0]) for k in ks)
                + f" | {fall if fall is not None else f'> {cfg.window - 1}'} |"
            )
    if cfg.jacobian_examples:
        lines += [
            "",
            f"## Jacobian: mean ‖∂h_T/∂s_(T−k)‖_F over "
            f"{_windows(min(cfg.jacobian_examples, cfg.examples))}\n",
            f"At k = 0 it is √H = {math.sqrt(cfg.hidden):.2f} (the identity).\n",
            "| cell | phase | " + " | ".join(f"k = {k}" for k in ks) + " |",
            "|" + "---|" * (2 + len(ks)),
        ]
        for cell in cfg.cells:
            for phase in ("init", "trained"):
                mean = profiles[cell][phase]["jacobian"].mean(axis=1)
                lines.append(
                    f"| {cell} | {phase} | " + " | ".join(_sci(mean[k]) for k in ks) + " |"
                )
    return "\n".join(lines) + "\n"


def plot_gradients(profiles: dict, cfg: VanishingConfig, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (
            "state",
            r"loss gradient $\|\partial L_T / \partial s_{T-k}\|$, mean over "
            f"{_windows(cfg.examples)}",
        )
    ]
    if cfg.jacobian_examples:
        panels.append(
            (
                "jacobian",
                r"Jacobian $\|\partial h_T / \partial s_{T-k}\|_F$, mean "
                f"over {_windows(min(cfg.jacobian_examples, cfg.examples))}",
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    k = np.arange(cfg.window)
    # Markers tell apart curves that coincide (the RNN's and GRU's at initialisation do).
    markevery = max(1, cfg.window // 8)
    for ax, (key, title) in zip(axes[0], panels):
        for cell in cfg.cells:
            for phase, style in (("init", ":"), ("trained", "-")):
                mean = profiles[cell][phase][key].mean(axis=1)
                mean = np.where(mean > 0, mean, np.nan)  # log axis
                ax.semilogy(
                    k,
                    mean,
                    linestyle=style,
                    color=COLORS[cell],
                    marker=MARKERS[cell],
                    markevery=markevery,
                    markersize=5,
                    markerfacecolor="none" if phase == "init" else COLORS[cell],
                    label=f"{cell}, {PHASE_NAMES[phase]}",
                )
        ax.set_xlabel("k, steps back from the last step")
        ax.set_ylabel("norm (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"Gradient through time on Tiny Shakespeare text (H = {cfg.hidden}; trained on "
        f"{cfg.train_chars:,} characters)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(results: list, cfg: VanishingConfig, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    gaps = sorted(set(cfg.task_gaps))
    for i, cell in enumerate(cfg.cells):
        acc = [next(r.accuracy for r in results if r.cell == cell and r.gap == g) for g in gaps]
        # A small horizontal offset per cell keeps coinciding points (all at 1.0, say) visible.
        shift = 1.0 + 0.025 * (i - (len(cfg.cells) - 1) / 2)
        ax.plot(
            [g * shift for g in gaps],
            acc,
            marker=MARKERS[cell],
            color=COLORS[cell],
            label=cell,
            alpha=0.85,
        )
    ax.axhline(
        1.0 / cfg.task_symbols, color="gray", linestyle="--", label=f"chance (1/{cfg.task_symbols})"
    )
    ax.set_xscale("log")
    ax.set_xticks(gaps)
    ax.set_xticklabels([str(g) for g in gaps])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("gap k: steps between the symbol and the question")
    ax.set_ylabel(f"held-out accuracy ({cfg.task_eval_size} sequences)")
    ax.set_title(
        f"Recall a symbol seen k steps earlier\n({cfg.task_steps} training steps of "
        f"{cfg.task_batch} sequences per cell and gap, H = {cfg.task_hidden})",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recall_table(results: list, cfg: VanishingConfig) -> str:
    gaps = sorted(set(cfg.task_gaps))
    lines = [
        f"## Recall task: held-out accuracy (chance {1 / cfg.task_symbols:.2f})\n",
        "| cell | " + " | ".join(f"k = {g}" for g in gaps) + " | training time (s) |",
        "|" + "---|" * (len(gaps) + 2),
    ]
    for cell in cfg.cells:
        mine = {r.gap: r for r in results if r.cell == cell}
        lines.append(
            f"| {cell} | "
            + " | ".join(f"{mine[g].accuracy:.3f}" for g in gaps)
            + f" | {sum(r.seconds for r in mine.values()):.0f} |"
        )
    return "\n".join(lines) + "\n"


def _parser():
    p = _cli.parser(
        "python -m experiments.vanishing",
        "Measure how the gradient through time shrinks for RNN, LSTM and GRU (or "
        "--cells) "
        "(at initialisation and after training) and train them on a long-range "
        "recall task; write plots and tables.",
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
    _cli.add_dataclass_flags(p, VanishingConfig)
    return p


def run_recall_tasks(cfg, progress: bool) -> list:
    """The recall task for every (gap, cell), with a progress bar."""
    from tqdm.auto import tqdm

    jobs = [(g, c) for g in sorted(set(cfg.task_gaps)) for c in cfg.cells]
    recall = []
    for gap, cell in tqdm(
        jobs, desc="recall task", disable=not progress, file=sys.stderr, dynamic_ncols=True
    ):
        recall.append(
            _race.train_recall(
                cell,
                gap,
                hidden=cfg.task_hidden,
                steps=cfg.task_steps,
                batch=cfg.task_batch,
                lr=cfg.lr,
                num_symbols=cfg.task_symbols,
                num_noise=cfg.task_noise,
                eval_size=cfg.task_eval_size,
                seed=cfg.seed,
            )
        )
    return recall


def main(argv: Sequence[str] | None = None) -> int:
    _malloc.retain_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    cfg = _cli.config_from_args(VanishingConfig, args, cells=split_cells(args.cells))
    cfg.validate()
    out = pathlib.Path(args.out)
    text = load_corpus(args.data)
    vocab = CharVocab.from_text(text)
    _, val_ids = train_val_split(vocab.encode(text))
    windows = analysis.text_windows(val_ids, cfg.burn_in + cfg.window + 1, cfg.examples, cfg.seed)
    prepare_out_dir(out, args.overwrite)
    machine_before = machine_summary()
    log = lambda s: print(s, file=sys.stderr, flush=True)

    import jax

    models = {c: build_model(cfg.shakespeare_config(c), vocab.size) for c in cfg.cells}
    profiles = {c: {} for c in cfg.cells}
    log(f"measuring gradients at initialisation over {cfg.window} steps")
    for cell in cfg.cells:
        params = models[cell].init(jax.random.key(cfg.seed))
        profiles[cell]["init"] = analysis.char_lm_gradients(
            models[cell],
            params,
            windows,
            burn_in=cfg.burn_in,
            jacobian_examples=cfg.jacobian_examples,
        )

    log(f"training each cell on {cfg.train_chars:,} characters")
    trained = _race.race(
        [cfg.shakespeare_config(c) for c in cfg.cells],
        text,
        _race.Budget(chars=cfg.train_chars),
        eval_points=1,
        progress=args.progress,
        log=log,
    )
    val_loss = {}
    for r in trained:
        val_loss[r.config.cell] = {"init": r.history[0]["val_loss"], "trained": r.best_val}
        profiles[r.config.cell]["trained"] = analysis.char_lm_gradients(
            r.model, r.params, windows, burn_in=cfg.burn_in, jacobian_examples=cfg.jacobian_examples
        )

    recall = run_recall_tasks(cfg, args.progress)

    machine = machine_summary()
    machine["load_average_at_start"] = machine_before["load_average"]
    command = "python -m experiments.vanishing " + shlex.join(argv)
    header = (
        f"Command: `{command}`\n\nMachine: {describe_machine(machine)} (at start: "
        f"{', '.join(map(str, machine_before['load_average'] or []))}).\n\n"
    )
    grad_md = gradient_tables(profiles, cfg, val_loss)
    (out / "gradients.md").write_text("# Gradient through time\n\n" + header + grad_md)
    plot_gradients(profiles, cfg, out / "gradients.png")
    recall_md = recall_table(recall, cfg)
    (out / "long_range.md").write_text("# Long-range recall\n\n" + header + recall_md)
    plot_recall(recall, cfg, out / "long_range.png")
    record = {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "machine": machine,
        "validation_loss": val_loss,
        "gradients": {
            c: {
                ph: {key: arr.mean(axis=1).tolist() for key, arr in d.items()}
                for ph, d in profiles[c].items()
            }
            for c in cfg.cells
        },
        "recall": [r._asdict() for r in recall],
    }
    (out / "results.json").write_text(json.dumps(record) + "\n")
    print(grad_md + "\n" + recall_md, end="")
    log(f"wrote gradients.png, gradients.md, long_range.png, long_range.md, results.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
