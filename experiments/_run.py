"""What every training command shares: stop signals, the run directory, the metrics log.

The library (``jaxseq``) supplies models, steps and checkpoint files; a run of them, with
its process-wide concerns, is put together here:

* ``StopSignals``: SIGINT/SIGTERM set a flag the loop checks between steps, so the run
  can save a checkpoint and end with exit code 128 + the signal; a second Ctrl-C raises
  ``KeyboardInterrupt`` at once.
* ``RunDir``: resume a run directory or refuse to overwrite it (unless asked), check it is
  writable, and save checkpoints atomically (``jaxseq.checkpoint``).
* ``MetricsLog``: ``metrics.jsonl``, one JSON record a line, trimmed on resume to the
  records of the steps the checkpoint holds.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from collections.abc import Callable
from typing import Any

from jaxseq import checkpoint as ckpt
from jaxseq.errors import UsageError

METRICS_NAME = "metrics.jsonl"


def log_to_stderr(message: str) -> None:
    """Prints one line to stderr at once (the default ``log`` of the commands)."""
    print(message, file=sys.stderr, flush=True)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between steps (so a checkpoint can be saved).

    A context manager; outside the main thread (where Python cannot install handlers) or
    with ``enabled=False`` it leaves the handlers alone and ``received`` stays None.
    """

    def __init__(self, enabled: bool = True):
        self.received: int | None = None
        self._enabled = enabled
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self._enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user insists
        self.received = signum

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def name(self) -> str | None:
        """``"SIGINT"`` or ``"SIGTERM"`` once one arrived, else None."""
        return None if self.received is None else signal.Signals(self.received).name


def exit_code_for(signum: int | None) -> int:
    """The shell's convention: 128 + the signal number (130 SIGINT, 143 SIGTERM), 0 for none."""
    return 0 if signum is None else 128 + signum


class RunDir:
    """A run directory: where checkpoints and ``metrics.jsonl`` go.

    ``check`` (no side effects) decides between resuming and starting afresh: with
    ``resume`` it finds the checkpoint to continue from; without it a directory that holds
    files is refused unless ``overwrite``. ``create`` then makes the directory, checks it is
    writable, and with ``overwrite`` removes the old run's checkpoints and metrics (and
    nothing else). Only the ``writer`` process (process 0) touches files.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        writer: bool = True,
        log: Callable[[str], None] = log_to_stderr,
    ):
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        self.path = pathlib.Path(path)
        self.resume, self.overwrite, self.writer, self.log = resume, overwrite, writer, log

    def check(self) -> pathlib.Path | None:
        """The checkpoint to resume from (None: start from the beginning).

        Raises:
          UsageError: the path is a file; a run is there and neither resume nor overwrite
            was asked for; or checkpoint files are there and none can be read.
        """
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"run directory {out} exists and is not a directory")
        if self.resume:
            found = find_resume_checkpoint(out)
            if found is None:
                self.log(f"no checkpoint in {out} yet: starting from the beginning")
            elif found.name != ckpt.CHECKPOINT_NAME:
                self.log(
                    f"warning: {out / ckpt.CHECKPOINT_NAME} is unreadable; resuming "
                    f"from the previous checkpoint {found.name}"
                )
            return found
        if self.writer and out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise UsageError(
                f"run directory {out} already exists and is not empty; pass "
                f"--resume to continue its run or --overwrite to start again"
            )
        return None

    def create(self) -> None:
        """Makes the directory and probes that it is writable; with ``overwrite`` removes
        the old run's checkpoints and metrics.

        Raises:
          UsageError: the directory cannot be created or written.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.writer:  # other processes may share the directory
                probe = self.path / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
        except OSError as e:
            raise UsageError(f"cannot write to run directory {self.path}: {e.strerror}") from None
        if self.overwrite and self.writer:
            for name in (METRICS_NAME, ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME):
                (self.path / name).unlink(missing_ok=True)

    def save(self, tree: Any, meta: dict) -> pathlib.Path | None:
        """Writes ``tree`` (host arrays) and ``meta`` atomically; None on other processes."""
        if not self.writer:
            return None
        return ckpt.save(self.path, tree, meta)

    def describe_last(self) -> str:
        """Which checkpoint a stopped run leaves behind, in words."""
        found = ckpt.find(self.path) if self.path.is_dir() else None
        if found is None:
            return "no checkpoint was saved yet"
        return f"last good checkpoint (step {ckpt.read_meta(found)['step']}) kept in {self.path}"


def find_resume_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint a resume of ``directory`` starts from, or None when it holds none.

    Falls back to the previous checkpoint when the newest is unreadable; when checkpoint
    files exist but none can be read, raises the newest one's UsageError instead of
    silently starting over.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return None
    found = ckpt.find(directory)
    if found is None:
        for name in (ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME):
            if (directory / name).is_file():
                ckpt.read_meta(directory / name)  # raises the reason
    return found


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, each with a ``step``."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.path = pathlib.Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        """Appends ``record`` (nothing on processes other than the writer)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def trim(self, step: int) -> None:
        """Drops the records after ``step`` (written after the checkpoint a run resumes
        from) and any line torn by a kill."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def read(self) -> list[dict]:
        """Every record, in order (an absent file reads as none)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]
