"""Command-line experiments built on the jaxseq library (run with ``python -m experiments.X``).

Importing the package changes nothing in the process. Each command's ``main`` calls
``experiments._malloc.retain_freed_memory()`` before JAX starts, so that glibc malloc keeps
freed memory for reuse and single-device JAX computations run inline: XLA:CPU otherwise maps
and unmaps its temporaries on every train step. ``JAXSEQ_MALLOC=default`` turns that off.
"""
