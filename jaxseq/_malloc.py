"""Keep freed memory in the process instead of returning it to the OS (glibc only).

XLA:CPU allocates the temporaries of a compiled program as one block per execution (115 MB
for the 2-layer H=256 GRU train step) and frees it at the end. glibc serves a block that
large with a fresh ``mmap`` and gives it back with ``munmap``, so every execution page-faults
the whole block in again: about 34,000 minor faults per train step, 7-10% of its time
(``benchmarks/charlm.md``). Telling glibc to serve every allocation from one heap that it
never trims makes the next execution reuse the same pages.

The price: the process keeps its peak heap (freed memory is reused by later allocations,
not returned to the OS), and all threads share one malloc arena, which makes XLA's
multi-threaded compiles slower (train-step compile 1.3-2.8 s instead of 1.1-1.8 s for the
2-layer H=512 models, ``benchmarks/charlm.md``). One arena is required: glibc serves a
block over 64 MiB requested by any other thread's arena with ``mmap`` whatever the options.
A training run compiles once and then runs thousands of steps, which is why the
command-line experiments switch it on; a library import never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_done = False


def retain_freed_memory() -> bool:
    """Tell glibc malloc to reuse freed memory rather than unmap it; True if it took.

    Call it before JAX runs its first computation (its thread pools are created then, and
    a thread keeps the malloc arena it started with). Does nothing (returns False) on
    other C libraries or platforms, or when ``JAXSEQ_MALLOC=default`` is set.
    """
    global _done
    if _done:
        return True
    if (os.environ.get("JAXSEQ_MALLOC", "").lower() == "default"
            or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl and others lack it (AttributeError above).
    ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
          and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
    _done = ok
    return ok
