"""The NNX training step against the functional one: ``python -m benchmarks nnx``.

One char LM (embedding of width E, ``--layers`` recurrent layers of H units, a dense
decoder to 65 characters; Adam after clipping by global norm 5, float32, random tokens),
trained by the same loss in four ways that compute the same update:

* ``functional``: ``jax.jit`` of ``jax.value_and_grad`` and optax over
  ``jaxseq.models.char_lm``'s params (``python -m experiments.charrnn``'s form);
* ``nnx.jit``: ``jaxseq.nnx.CharLM`` with ``nnx.Optimizer`` under ``nnx.jit``, the form
  Flax's documentation teaches (the module graph is walked on every call: flax#4459);
* ``nnx.jit tree``: the same with ``nnx.jit(graph=False)``, NNX's tree mode, where the
  Flax version has it;
* ``split + jax.jit``: ``nnx.split`` once, ``jax.jit`` of a function that ``nnx.merge`` s
  the state, steps and returns ``nnx.state``, Flax's advice where the per-call cost
  matters.

All run in this process and are interleaved, A B C D, B C D A, ..., one timed step each in
turn, so that drift on a shared machine hits them alike. Reported per size: the median
step, characters per second, the ratio to ``functional`` and the 1-minute load average.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence

from benchmarks import charlm
from jaxseq.config import field

IMPLS = ("functional", "nnx.jit", "nnx.jit tree", "split + jax.jit")
VOCAB = 65


@dataclasses.dataclass(frozen=True)
class NNXBenchConfig:
    """Settings of ``python -m benchmarks nnx``."""

    cell: str = field("gru", "recurrent cell", choices=("rnn", "lstm", "gru"))
    hidden: tuple[int, ...] = field((64, 256), "hidden sizes H (embedding width = H)")
    batch: tuple[int, ...] = field((16, 64), "batch size for each H (same count as --hidden)")
    seq: int = field(128, "characters per sequence T")
    layers: int = field(2, "recurrent layers")
    steps: int = field(15, "timed steps per implementation (the median is reported)")
    warmup: int = field(2, "untimed steps after compiling")
    seed: int = field(0, "seed of the weights and the random tokens")
    json: bool = field(
        False, "print one JSON line per measurement on stdout (the table then goes to stderr)"
    )

    def validate(self) -> None:
        from jaxseq.errors import UsageError

        if len(self.hidden) != len(self.batch):
            raise UsageError("--hidden and --batch need the same number of values")
        if min(self.hidden + self.batch) <= 0 or self.seq <= 0 or self.layers <= 0:
            raise UsageError("--hidden, --batch, --seq and --layers must be positive")
        if self.steps <= 0 or self.warmup < 0:
            raise UsageError("--steps must be positive and --warmup >= 0")


def build_steps(config: NNXBenchConfig, hidden: int, batch: int) -> dict:
    """``{impl: run_step}``: each ``run_step()`` takes one training step and returns its
    loss, ready; all start from the same params and see the same batch."""
    import inspect

    import jax
    import optax
    from flax import nnx

    import jaxseq.nnx as jnnx
    from jaxseq.models import char_lm, cross_entropy

    kwargs = dict(cell=config.cell, hidden=hidden, layers=config.layers, embed=hidden)
    model = char_lm(VOCAB, **kwargs)
    params = model.init(jax.random.key(config.seed))
    tx = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(1e-3))
    tokens = jax.random.randint(jax.random.key(config.seed + 1), (config.seq + 1, batch), 0, VOCAB)
    inputs, targets = tokens[:-1], tokens[1:]

    def loss_of(logits):
        return cross_entropy(logits, targets).mean()

    @jax.jit
    def functional_step(params, opt_state, inputs):
        def loss_fn(p):
            return loss_of(model.apply(p, model.initial_carry((batch,)), inputs)[1])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def nnx_step(lm, optimizer, inputs):
        def loss_fn(lm):
            return loss_of(lm(inputs)[1])

        loss, grads = nnx.value_and_grad(loss_fn)(lm)
        optimizer.update(lm, grads)
        return loss

    def fresh():
        lm = jnnx.CharLM(VOCAB, params=params, **kwargs)
        return lm, nnx.Optimizer(lm, tx, wrt=nnx.Param)

    steps = {}
    state = {"params": params, "opt": tx.init(params)}

    def run_functional():
        state["params"], state["opt"], loss = functional_step(state["params"], state["opt"], inputs)
        return loss.block_until_ready()

    steps["functional"] = run_functional
    graph_jit = nnx.jit(nnx_step)
    lm, opt = fresh()
    steps["nnx.jit"] = lambda: graph_jit(lm, opt, inputs).block_until_ready()
    if "graph" in inspect.signature(nnx.jit).parameters:  # tree mode: Flax >= 0.12
        tree_jit = nnx.jit(nnx_step, graph=False)
        lm_t, opt_t = fresh()
        steps["nnx.jit tree"] = lambda: tree_jit(lm_t, opt_t, inputs).block_until_ready()

    graphdef, split_state = nnx.split(fresh())

    @jax.jit
    def split_step(split_state, inputs):
        lm, optimizer = nnx.merge(graphdef, split_state)
        loss = nnx_step(lm, optimizer, inputs)
        return nnx.state((lm, optimizer)), loss

    holder = {"state": split_state}

    def run_split():
        holder["state"], loss = split_step(holder["state"], inputs)
        return loss.block_until_ready()

    steps["split + jax.jit"] = run_split
    return steps


def measure(config: NNXBenchConfig, hidden: int, batch: int) -> list[dict]:
    import os

    steps = build_steps(config, hidden, batch)
    names = list(steps)
    compile_s, first_loss = {}, {}
    for name in list(names):
        t = time.perf_counter()
        try:
            first_loss[name] = float(steps[name]())
        except (TypeError, ValueError) as e:  # a mode this Flax cannot run on this module
            print(f"{name} skipped: {type(e).__name__}: {e}", file=sys.stderr)
            names.remove(name)
            continue
        compile_s[name] = time.perf_counter() - t
        for _ in range(config.warmup):
            steps[name]()
    times = {name: [] for name in names}
    for i in range(config.steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["functional"])
    chars = batch * config.seq
    return [
        {
            "cell": config.cell,
            "hidden": hidden,
            "batch": batch,
            "seq": config.seq,
            "impl": name,
            "step_ms": 1e3 * statistics.median(times[name]),
            "chars_per_s": chars / statistics.median(times[name]),
            "vs_functional": base / statistics.median(times[name]),
            "first_step_s": compile_s[name],
            "first_loss": first_loss[name],
            "load_1min": round(os.getloadavg()[0], 2),
        }
        for name in names
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from experiments import _cli

    return _cli.run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    config = charlm._parse(
        NNXBenchConfig,
        "python -m benchmarks nnx",
        "Training-step time of jaxseq's NNX char LM (nnx.jit, tree mode, "
        "split + jax.jit) against the functional step, interleaved.",
        argv,
    )
    out = sys.stderr if config.json else sys.stdout
    machine = charlm._machine()
    results = []
    for hidden, batch in zip(config.hidden, config.batch):
        records = measure(config, hidden, batch)
        results.extend(records)
        if config.json:
            for rec in records:
                print(json.dumps(rec), flush=True)
    rows = [
        [
            r["hidden"],
            r["batch"],
            r["impl"],
            f"{r['step_ms']:.2f}",
            f"{r['chars_per_s']:,.0f}",
            f"{r['vs_functional']:.3f}",
            f"{r['first_step_s']:.1f}",
            f"{r['first_loss']:.5f}",
            r["load_1min"],
        ]
        for r in results
    ]
    charlm._emit_table(
        f"{config.cell} char LM, {config.layers} layers, E = H, T = {config.seq}, float32, "
        f"median of {config.steps} interleaved steps ({machine['cpu']}, {machine['cpus']} "
        f"CPUs, load {machine.get('load_1min', '?')} at the start)",
        [
            "H",
            "B",
            "impl",
            "step ms",
            "chars/s",
            "vs functional",
            "first step s",
            "first loss",
            "load",
        ],
        rows,
        out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
