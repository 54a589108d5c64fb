"""Command-line experiments built on the jaxseq library (run with ``python -m experiments.X``)."""
