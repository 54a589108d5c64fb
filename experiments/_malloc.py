"""Keep freed memory in the process instead of returning it to the OS (glibc only).

XLA:CPU allocates the temporaries of a compiled program as one block per execution (115 MB
for the 2-layer H=256 GRU train step) and frees it at the end. glibc serves a block that
large with a fresh ``mmap`` and gives it back with ``munmap``, so every execution page-faults
the whole block in again: about 34,000 minor faults per train step, 10-20% of its time
(``benchmarks/charlm.md``).

Two settings make the next execution reuse the same pages:

* glibc: no ``mmap`` for large blocks and no trimming of the heap top (``mallopt``);
* JAX: single-device computations run inline on the thread that calls them
  (``jax_cpu_enable_async_dispatch=False``) rather than on a JAX worker thread. The block is
  then allocated by the main thread from glibc's main heap, which honours the two options;
  a worker thread's own malloc arena serves any block over 64 MiB with ``mmap`` whatever
  the options.

The price: the process keeps its peak heap (freed memory is reused by later allocations,
not returned to the OS), and Python waits for each step to finish before it goes on (a
training loop that reads the loss every step waits anyway). An earlier version forced a
single malloc arena instead of inline dispatch; that made XLA's threaded compiles about
30% slower, this does not. A training run compiles once and then runs thousands of steps,
which is why the command-line experiments switch it on in their ``main``; importing
``jaxseq`` or ``experiments`` never does.
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
_mallopt = None  # glibc's mallopt, once retain_freed_memory has found it


def retain_freed_memory() -> bool:
    """Tell glibc malloc to reuse freed memory rather than unmap it; True if it took.

    Also turns JAX's asynchronous CPU dispatch off, so that XLA's temporaries come from the
    main heap (see the module docstring). Call it before JAX runs its first computation:
    the dispatch mode is fixed when JAX creates its CPU client. Does nothing (returns False)
    on other C libraries or platforms, or when ``JAXSEQ_MALLOC=default`` is set.
    """
    global _done, _mallopt
    if _done:
        return True
    if os.environ.get("JAXSEQ_MALLOC", "").lower() == "default" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl and others lack it (AttributeError above).
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
        _mallopt = mallopt
    _done = ok
    return ok


def one_arena_for_devices(devices: int) -> bool:
    """With several CPU devices (``parallel.use_cpu_devices``), serve every thread from the
    main heap too; True if it took (nothing to do for one device).

    Each device runs its program on a JAX worker thread, and the temporaries it allocates
    there come from that thread's malloc arena, whose heaps are at most 64 MiB and are
    unmapped when they fall empty: then every step may fault its temporaries in afresh
    (H=256 GRU, batch 32 per device, 100 steps: ~23,000 faults per step, steps up to 1.7x
    slower). With one arena they come from the main heap, which ``retain_freed_memory``
    keeps. The cost: XLA's compiler threads share that arena (compiles 0-1.6 s slower in
    the runs here). Call it after ``retain_freed_memory`` and before JAX starts any thread.
    """
    if devices <= 1 or _mallopt is None:
        return False
    return _mallopt(_M_ARENA_MAX, 1) == 1
