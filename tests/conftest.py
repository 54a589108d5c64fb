"""Shared test setup.

``JAXSEQ_DATA`` defaults to ``<repo>/../shared/data`` (where CI and the dev machines keep
Tiny Shakespeare) when that folder exists and the variable is not already set, so tests
that read the corpus never download it.

``JAXSEQ_MALLOC`` defaults to ``default``: the test processes (and the command lines they
start) keep glibc malloc and JAX's dispatch as a library user who imports ``jaxseq`` gets
them. The command lines' memory-keeping mode (``experiments/_malloc.py``) is checked on its own
in ``tests/test_bench.py``.

XLA compiles the same train steps in many tests and in the command-line processes they
start, so the session shares one JAX compilation cache (a fresh temporary directory, passed
to subprocesses and xdist workers through the environment): each program compiles once per
run. Measured on tests/test_resilience.py alone: 66 s without it, 52 s with a cold cache.
"""

import os
import pathlib
import socket
import tempfile

import pytest

_SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

if _SHARED_DATA.is_dir():
    os.environ.setdefault("JAXSEQ_DATA", str(_SHARED_DATA))

os.environ.setdefault("JAXSEQ_MALLOC", "default")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxseq-tests-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a jax.distributed
    coordinator in the multi-process tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
