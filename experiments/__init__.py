"""Command-line experiments built on the jaxseq library (run with ``python -m experiments.X``).

Importing the package (which every ``python -m experiments.X`` does first) tells glibc
malloc to keep freed memory for reuse and runs single-device JAX computations inline
(``jaxseq._malloc``): XLA:CPU otherwise maps and unmaps its temporaries on every train
step. ``JAXSEQ_MALLOC=default`` turns that off.
"""

from jaxseq._malloc import retain_freed_memory as _retain_freed_memory

_retain_freed_memory()
