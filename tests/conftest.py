"""Shared test setup.

``JAXSEQ_DATA`` defaults to ``<repo>/../shared/data`` (where CI and the dev machines keep
Tiny Shakespeare) when that folder exists and the variable is not already set, so tests
that read the corpus never download it.

``JAXSEQ_MALLOC`` defaults to ``default``: the test processes (and the command lines they
start) keep glibc malloc and JAX's dispatch as a library user who imports ``jaxseq`` gets
them. The command lines' memory-keeping mode (``experiments/_malloc.py``) is checked on its own
in ``tests/test_bench.py``.
"""

import os
import pathlib
import socket

import pytest

_SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

if _SHARED_DATA.is_dir():
    os.environ.setdefault("JAXSEQ_DATA", str(_SHARED_DATA))

os.environ.setdefault("JAXSEQ_MALLOC", "default")


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a jax.distributed
    coordinator in the multi-process tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
