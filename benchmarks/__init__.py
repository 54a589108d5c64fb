"""Benchmarks of jaxseq against flax.linen, PyTorch and gensim (``python -m benchmarks``).

Run from the source tree; they are not part of the installed library. Each benchmark's
``main`` builds on the command-line plumbing of ``experiments`` (benchmarks -> experiments
-> jaxseq); importing the package changes nothing in the process.
"""
