"""Shared command-line plumbing: flags from a frozen dataclass, one-line errors.

Each experiment keeps every setting in one frozen dataclass whose fields carry their help
text in ``metadata``; ``add_dataclass_flags`` turns the fields into ``--kebab-case`` flags so
``--help`` lists every setting with its default. ``run_main`` turns ``UsageError`` (and
other expected failures such as a full disk) into ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from jaxseq.config import field  # noqa: F401  (re-exported for the benchmarks' configs)
from jaxseq.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where it says something: not for switches, not for None,
    not where the help text already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, [], argparse.SUPPRESS)
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        ):
            return text
        return super()._get_help_string(action)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, formatter_class=_HelpFormatter)


def _positive_or_any(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    convert.__name__ = kind.__name__
    return convert


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Adds one ``--flag`` per field of the dataclass ``cls`` (bools become on/off pairs)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_text,
            )
            continue
        origin = typing.get_origin(kind)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            p.add_argument(
                flag,
                dest=f.name,
                nargs="+",
                type=_positive_or_any(inner),
                default=f.default,
                help=help_text,
            )
            continue
        p.add_argument(
            flag,
            dest=f.name,
            type=_positive_or_any(kind),
            default=f.default,
            choices=f.metadata.get("choices"),
            help=help_text,
            metavar=f.metadata.get("metavar"),
        )


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    values.update(overrides)
    return cls(**values)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Calls ``main(argv)``; expected failures become one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, unwritable directory, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """``--devices`` and the multi-host flags shared by the training commands."""
    g = p.add_argument_group("data parallelism")
    g.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="shard each batch over N devices (default: all; with several "
        "processes, all devices of all processes)",
    )
    g.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        metavar="N",
        help="present the CPU to JAX as N devices and split each batch over "
        "them, N programs side by side (pays for small models on few cores: "
        "2 on a 2-core machine, H=256 char-RNN GRU ~1.2x; "
        "benchmarks/charlm.md)",
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-host: address of process 0, for jax.distributed.initialize",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="multi-host: total number of processes",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=None,
        metavar="I",
        help="multi-host: this process's index (0 writes checkpoints and logs)",
    )


def split_cpu(devices: int) -> None:
    """``--cpu-devices``: the CPU as ``devices`` JAX devices, all threads on one malloc arena
    (``experiments._malloc.one_arena_for_devices``). Before JAX starts its backend."""
    from experiments._malloc import one_arena_for_devices
    from jaxseq import parallel

    parallel.use_cpu_devices(devices)
    one_arena_for_devices(devices)


def start_parallel(args: argparse.Namespace) -> None:
    """Checks the parallelism flags (errors name them), then sets up devices and processes."""
    from jaxseq import parallel

    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices must be positive, got {args.devices}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise UsageError(f"--cpu-devices must be positive, got {args.cpu_devices}")
    if (args.coordinator is None) != (args.num_processes is None or args.process_id is None):
        raise UsageError("--coordinator HOST:PORT, --num-processes and --process-id go together")
    if args.cpu_devices is not None:
        split_cpu(args.cpu_devices)
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
