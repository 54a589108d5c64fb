"""Char-RNN on Tiny Shakespeare (or any UTF-8 text).

Train:   python -m experiments.charrnn --cell gru [--data FILE] [--out DIR] [--resume]
Sample:  python -m experiments.charrnn sample --checkpoint DIR --prime "ROMEO:" --length 500
Export:  python -m experiments.charrnn export --checkpoint DIR --to torch OUT.pt

The run loop lives here; every piece it calls (batches, the train step, the evaluator,
checkpoint metadata) is in ``jaxseq.charrnn``. Exit codes: 0 done, 2 bad input, 3 stopped
at a non-finite loss or gradient, 130/143 stopped by SIGINT/SIGTERM (after a checkpoint).
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _cli, _malloc, _run
from jaxseq import charrnn, parallel
from jaxseq import checkpoint as ckpt
from jaxseq.charrnn import CharRNNConfig, TrainState
from jaxseq.data import CharVocab, load_corpus
from jaxseq.errors import UsageError
from jaxseq.models import count_params
from jaxseq.sample import sample

DEFAULT_OUT = "runs/charrnn"

PRESETS: dict[str, dict[str, Any]] = {
    # The default: about 10 minutes on a 2-core CPU.
    "default": {},
    # Larger and longer, for a GPU or a patient CPU.
    "large": dict(
        cell="lstm",
        layers=3,
        hidden=512,
        embed=128,
        dropout=0.2,
        batch=64,
        seq=256,
        steps=20000,
        lr=2e-3,
        warmup=200,
        eval_every=1000,
        save_every=1000,
    ),
    # Seconds, for smoke tests and learners trying the flags.
    "tiny": dict(
        layers=1, hidden=64, embed=16, batch=16, seq=32, steps=200, eval_every=100, save_every=100
    ),
}


# --------------------------------------------------------------------------- the run


class RunResult(NamedTuple):
    """What ``train`` leaves: the final state, the vocabulary, the validation records
    (``history``), the best validation loss in nats per character, and the exit code."""

    state: TrainState
    vocab: CharVocab
    best_val: float
    history: list
    exit_code: int


class _Pieces(NamedTuple):
    model: Any
    state: TrainState
    train_step: Callable
    put_batch: Callable
    evaluate: Callable
    mesh: Any


def _build(
    config: CharRNNConfig, corpus: charrnn.Corpus, found: pathlib.Path | None, devices: int | None
) -> _Pieces:
    """The model, the (restored and placed) state and the compiled-on-first-use functions."""
    model = charrnn.build_model(config, corpus.vocab.size)
    optimizer = charrnn.make_optimizer(config)
    state = charrnn.init_state(config, model, optimizer)
    if found is not None:
        state, _ = ckpt.load(found, state)
    mesh = charrnn.data_parallel_mesh(config, devices)
    put_batch = jnp.asarray
    if mesh is not None:
        state, put_batch = charrnn.shard_state(mesh, state)
    train_step = charrnn.make_train_step(model, optimizer, config, impl=config.impl, mesh=mesh)
    evaluate = charrnn.make_evaluator(model, corpus.val, seq=config.seq)
    return _Pieces(model, state, train_step, put_batch, evaluate, mesh)


class _Meter:
    """Mean training loss and characters per second between two metrics lines."""

    def __init__(self, config: CharRNNConfig, step: int):
        self.config, self.chars_per_step = config, config.batch * config.seq
        self.reset(step)

    def reset(self, step: int) -> None:
        self.loss_sum, self.loss_n, self.t0, self.step0 = 0.0, 0, time.perf_counter(), step

    def add(self, loss: float) -> None:
        if math.isfinite(loss):
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1

    def record(self, step: int) -> dict:
        now = time.perf_counter()
        cps = self.chars_per_step * (step - self.step0) / max(now - self.t0, 1e-9)
        record = {
            "step": step,
            "train_loss": self.loss_sum / max(self.loss_n, 1),
            "chars_per_s": cps,
            "lr": float(charrnn.learning_rate(self.config)(step - 1)),
        }
        self.reset(step)
        return record


def _sample_line(config: CharRNNConfig, model, params, vocab: CharVocab, step: int) -> str:
    prime_char = "\n" if "\n" in vocab.index else vocab.chars[0]
    key = jax.random.fold_in(jax.random.key(config.seed + 1), step)
    ids = sample(
        model,
        params,
        key,
        jnp.asarray(vocab.encode(prime_char)),
        length=config.sample_length,
        temperature=0.8,
    )
    return f"--- sample at step {step} ---\n{vocab.decode(np.asarray(ids[0]))}\n---"


def _validate(config, pieces: _Pieces, vocab, step: int, writer: bool, bar, printer) -> dict:
    """One validation pass (and a sample); the record for ``metrics.jsonl``."""
    params = parallel.to_local(pieces.state.params)
    val = float(pieces.evaluate(params))
    if writer:
        bar.write(
            f"step {step}: validation {val:.4f} nats, {val / math.log(2):.4f} bits/char",
            file=sys.stderr,
        )
        if config.sample_length:
            printer(_sample_line(config, pieces.model, params, vocab, step))
    return {
        "step": step,
        "val_loss": val,
        "val_bpc": val / math.log(2),
        "chars_seen": step * config.batch * config.seq,
    }


def _log_and_validate(
    config,
    vocab,
    pieces: _Pieces,
    step: int,
    meter: _Meter,
    metrics: _run.MetricsLog,
    history: list,
    bar,
    writer: bool,
    printer,
) -> None:
    """The metrics line every ``log_every`` steps and validation every ``eval_every``."""
    if step % config.log_every == 0 or step == config.steps:
        record = meter.record(step)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", chars_s=f"{record['chars_per_s']:,.0f}")
        metrics.write(record)
    if step % config.eval_every == 0 or step == config.steps:
        history.append(_validate(config, pieces, vocab, step, writer, bar, printer))
        metrics.write(history[-1])
        meter.reset(step)  # keep validation time out of chars/s


def train(
    config: CharRNNConfig,
    text: str,
    out_dir: str | pathlib.Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = _run.log_to_stderr,
    sample_printer: Callable[[str], None] | None = None,
    step_callback: Callable[[int, dict, TrainState], None] | None = None,
    devices: int | None = None,
) -> RunResult:
    """Trains (or resumes) a char-RNN run in ``out_dir``.

    Writes ``checkpoint.npz`` every ``save_every`` steps, at the end and on SIGINT/SIGTERM,
    and ``metrics.jsonl`` (one record per log line or validation). ``devices`` (default:
    every device) shards each batch over a data-parallel mesh; the global batch, and so the
    result, does not depend on it. Only process 0 writes files.

    Args:
      config: every setting of the run.
      text: the corpus.
      out_dir: the run directory.
      resume: continue from the run directory's checkpoint.
      overwrite: start afresh in a directory that holds a run.
      progress: show a tqdm bar on stderr.
      log: where one-line messages go.
      sample_printer: where the samples at each validation go (default: above the bar).
      step_callback: called as ``(step, metrics, state)`` after every step.
      devices: devices to shard each batch over.

    Returns:
      A ``RunResult``; ``exit_code`` is 0 when done, 130/143 after SIGINT/SIGTERM, 3 after
      a non-finite step with ``nan_policy="stop"``.
    """
    config.validate()
    writer = parallel.is_main_process()
    if not writer:
        progress, log = False, (lambda s: None)
    run_dir = _run.RunDir(out_dir, resume=resume, overwrite=overwrite, writer=writer, log=log)
    found = run_dir.check()
    vocab = charrnn.resume_vocab(ckpt.read_meta(found), config, text) if found else None
    corpus = charrnn.prepare_corpus(text, config, vocab)
    run_dir.create()
    pieces = _build(config, corpus, found, devices)
    metrics = _run.MetricsLog(run_dir.path / _run.METRICS_NAME, enabled=writer)
    if found is not None:
        metrics.trim(int(pieces.state.step))
        log(f"resumed from {found} at step {int(pieces.state.step)}")
    log(
        f"{config.cell} {config.layers}x{config.hidden}, {count_params(pieces.state.params):,} "
        f"parameters, vocabulary {corpus.vocab.size}, {len(corpus.train):,} train / "
        f"{len(corpus.val):,} validation characters"
        + (f"; {parallel.describe(pieces.mesh)}" if pieces.mesh is not None else "")
    )
    return _loop(
        config,
        corpus,
        pieces,
        run_dir,
        metrics,
        progress=progress,
        log=log,
        sample_printer=sample_printer,
        step_callback=step_callback,
    )


def _loop(
    config,
    corpus,
    pieces: _Pieces,
    run_dir: _run.RunDir,
    metrics: _run.MetricsLog,
    *,
    progress,
    log,
    sample_printer,
    step_callback,
) -> RunResult:
    """Steps from the state's step to ``config.steps``: log, validate, save, stop."""
    from tqdm.auto import tqdm

    def save(st: TrainState) -> None:
        host = parallel.to_host(st)  # every process takes part in gathering shards
        run_dir.save(host, charrnn.checkpoint_meta(config, corpus.vocab, int(host.step)))
        parallel.sync("checkpoint saved")

    step = int(pieces.state.step)
    history, exit_code, meter = [], 0, _Meter(config, step)
    resume_hint = f"resume with --out {run_dir.path} --resume"
    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    with _run.StopSignals() as signals:
        try:
            while step < config.steps:
                inputs, targets, reset = charrnn.batch_at(config, corpus.train, step)
                state, m = pieces.train_step(
                    pieces.state, pieces.put_batch(inputs), pieces.put_batch(targets), reset
                )
                m = parallel.to_local(m)
                if not bool(m["finite"]):
                    if config.nan_policy == "stop":
                        log(
                            f"error: non-finite loss or gradient at step {step + 1} (loss "
                            f"{float(m['loss'])}); stopped, {run_dir.describe_last()}; try a "
                            f"lower --lr or --nan-policy skip"
                        )
                        exit_code = 3
                        break
                    log(f"warning: skipped step {step + 1}: non-finite loss or gradient")
                pieces, step = pieces._replace(state=state), step + 1
                meter.add(float(m["loss"]))
                bar.update(1)
                _log_and_validate(
                    config,
                    corpus.vocab,
                    pieces,
                    step,
                    meter,
                    metrics,
                    history,
                    bar,
                    run_dir.writer,
                    sample_printer or tqdm.write,
                )
                if step % config.save_every == 0 or step == config.steps:
                    save(pieces.state)
                if step_callback is not None:
                    step_callback(step, m, pieces.state)
                if signals.received is not None:
                    save(pieces.state)
                    log(
                        f"{signals.name}: saved checkpoint at step {step} in {run_dir.path}; "
                        f"{resume_hint}"
                    )
                    exit_code = _run.exit_code_for(signals.received)
                    break
        except KeyboardInterrupt:
            save(pieces.state)
            log(f"interrupted: saved checkpoint at step {step} in {run_dir.path}; {resume_hint}")
            exit_code = 130
        finally:
            bar.close()
    best_val = min((r["val_loss"] for r in history), default=math.inf)
    return RunResult(pieces.state, corpus.vocab, best_val, history, exit_code)


# --------------------------------------------------------------------------- command line


def _train_parser():
    p = _cli.parser(
        "python -m experiments.charrnn",
        "Train a character-level RNN/LSTM/GRU language model. "
        "Use 'python -m experiments.charrnn sample --help' for sampling.",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="UTF-8 text file to train on (default: Tiny Shakespeare via "
        "$JAXSEQ_DATA, the data/ cache, or a download)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"run directory for checkpoints and metrics.jsonl (default: {DEFAULT_OUT}-<cell>)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start again even if --out already holds a run"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="a named set of defaults (explicit flags still win): "
        + "; ".join(f"{k}: {v or 'the defaults below'}" for k, v in PRESETS.items()),
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _cli.add_parallel_flags(p)
    _cli.add_dataclass_flags(p, CharRNNConfig)
    return p


def _sample_parser():
    p = _cli.parser(
        "python -m experiments.charrnn sample", "Generate text from a trained char-RNN checkpoint."
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="run directory (or checkpoint.npz file) to sample from",
    )
    p.add_argument("--prime", default="\n", help="text to condition on before generating")
    p.add_argument("--length", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more conservative")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely characters (0: all)"
    )
    p.add_argument("--num", type=int, default=1, help="number of samples, drawn as one batch")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed; same seed, same text")
    return p


def _export_parser():
    p = _cli.parser(
        "python -m experiments.charrnn export",
        "Write a char-RNN checkpoint in another framework's format: --to torch "
        "writes (with torch.save) the state_dict of nn.ModuleDict(embed="
        "nn.Embedding, rnn=nn.RNN/LSTM/GRU, out=nn.Linear), the vocabulary and "
        "the sizes; the README's 'Open a checkpoint in PyTorch' loads it.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="run directory (or checkpoint.npz file) to export",
    )
    p.add_argument("--to", required=True, choices=("torch",), help="target framework")
    p.add_argument("out", metavar="OUT", help="file to write, e.g. model.pt")
    return p


def torch_export(model, params, vocab: CharVocab, config: CharRNNConfig) -> dict:
    """What ``export --to torch`` saves: NumPy arrays keyed as PyTorch's
    ``nn.ModuleDict({"embed": nn.Embedding(V, E), "rnn": nn.GRU(E, H, layers),
    "out": nn.Linear(H, V)})`` names them, plus the vocabulary and the sizes.

    One-hot input is the embedding whose table is the identity (``E = V``), so every
    checkpoint loads into the same three modules. The recurrent weights are
    ``jaxseq.to_torch_state_dict``'s (summed biases in ``bias_ih``, zeros in ``bias_hh``:
    the same function).
    """
    from jaxseq import to_torch_state_dict

    V = vocab.size
    table = (
        np.asarray(params.embed, np.float32)
        if params.embed is not None
        else np.eye(V, dtype=np.float32)
    )
    arrays = {
        "embed.weight": table,
        **to_torch_state_dict(params.rnn, model.network, prefix="rnn.", as_numpy=True),
        "out.weight": np.ascontiguousarray(np.asarray(params.w_out, np.float32).T),
        "out.bias": np.asarray(params.b_out, np.float32),
    }
    sizes = {
        "cell": config.cell,
        "layers": config.layers,
        "hidden": config.hidden,
        "embed": int(table.shape[1]),
        "vocab_size": V,
    }
    return {
        "format": "jaxseq.charrnn.torch/1",
        "state_dict": arrays,
        "vocab": list(vocab.chars),
        "config": sizes,
    }


def export_main(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(argv)
    try:
        import torch
    except ImportError:
        raise UsageError("--to torch needs PyTorch (pip install torch)") from None
    model, params, vocab, config = charrnn.load_for_sampling(args.checkpoint)
    out = torch_export(model, params, vocab, config)
    out["state_dict"] = {k: torch.from_numpy(np.array(v)) for k, v in out["state_dict"].items()}
    torch.save(out, args.out)
    print(
        f"wrote {args.out}: {config.cell} {config.layers}x{config.hidden}, vocabulary "
        f"{vocab.size}; load it as the README's 'Open a checkpoint in PyTorch' shows",
        file=sys.stderr,
    )
    return 0


def parse_train_args(argv: Sequence[str]):
    """The training flags, with ``--preset``'s values as the defaults that explicit flags
    (in any spelling argparse accepts) override."""
    p = _train_parser()
    known, _ = p.parse_known_args(argv)  # only --preset matters here; errors come below
    p.set_defaults(**PRESETS[known.preset])
    return p.parse_args(argv)


def train_main(argv: Sequence[str]) -> int:
    args = parse_train_args(argv)
    config = _cli.config_from_args(CharRNNConfig, args)
    config.validate()
    _cli.start_parallel(args)
    out = pathlib.Path(args.out or f"{DEFAULT_OUT}-{config.cell}")
    text = load_corpus(args.data)
    result = train(
        config,
        text,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress,
        devices=args.devices,
    )
    if result.exit_code == 0 and result.history and parallel.is_main_process():
        last = result.history[-1]
        print(
            f"done: step {last['step']}, validation {last['val_loss']:.4f} nats "
            f"({last['val_bpc']:.4f} bits/char), best {result.best_val:.4f}; run in {out}",
            file=sys.stderr,
        )
    return result.exit_code


def sample_main(argv: Sequence[str]) -> int:
    args = _sample_parser().parse_args(argv)
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.length <= 0 or args.num <= 0 or args.top_k < 0:
        raise UsageError("--length and --num must be positive and --top-k >= 0")
    if not args.prime:
        raise UsageError("--prime must hold at least one character")
    model, params, vocab, _ = charrnn.load_for_sampling(args.checkpoint)
    prime = vocab.encode(args.prime)
    ids = sample(
        model,
        params,
        jax.random.key(args.seed),
        jnp.asarray(prime),
        length=args.length,
        num=args.num,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    texts = [args.prime + vocab.decode(row) for row in np.asarray(ids)]
    print(("\n" + "=" * 40 + "\n").join(texts))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    _malloc.retain_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sample":
        return sample_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
