"""Page faults per train step and compile time under each allocator setting.

    python benchmarks/malloc_faults.py [--cell gru] [--hidden 256] [--steps 10] [MODE ...]

MODE is one of ``default`` (glibc and JAX as they are), ``nommap`` (glibc: no mmap, no
trim), ``inline`` (JAX: inline dispatch only), ``both`` (what ``experiments/_malloc.py`` does)
and ``arena1`` (glibc: one arena, no mmap, no trim; the earlier setting). Each mode runs in
a fresh process, since both settings must be made before JAX starts.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("default", "nommap", "inline", "both", "arena1")


def _child(mode: str, cell: str, hidden: int, steps: int) -> None:
    os.environ["JAXSEQ_MALLOC"] = "default"  # only the settings below, whatever runs
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    if mode == "arena1":
        mallopt(-8, 1)  # M_ARENA_MAX
    if mode in ("nommap", "both", "arena1"):
        mallopt(-4, 0)  # M_MMAP_MAX
        mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    import jax

    if mode in ("inline", "both"):
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    from benchmarks import charlm

    spec = dict(cell=cell, hidden=hidden, layers=2, batch=64, seq=128, dtype="float32", seed=0)
    run, compile_s = charlm._build_jaxseq(spec)
    run()
    run()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    print(
        f"{mode:8s} faults/step {faults:8.0f}  step {statistics.median(times) * 1e3:6.1f} ms"
        f"  compile {compile_s:.2f} s",
        flush=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "modes",
        nargs="*",
        metavar="MODE",
        help=f"settings to run, from {', '.join(MODES)} (default: all)",
    )
    parser.add_argument(
        "--cell",
        default="gru",
        choices=("rnn", "lstm", "gru"),
        help="recurrent cell (default: gru)",
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown MODE {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.child:
        _child(args.child, args.cell, args.hidden, args.steps)
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for mode in args.modes or MODES:
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                mode,
                "--cell",
                args.cell,
                "--hidden",
                str(args.hidden),
                "--steps",
                str(args.steps),
            ],
            cwd=root,
            check=True,
            env=dict(os.environ, PYTHONPATH=root),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
