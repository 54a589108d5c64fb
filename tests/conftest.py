"""Shared test setup.

``JAXSEQ_DATA`` defaults to ``<repo>/../shared/data`` (where CI and the dev machines keep
Tiny Shakespeare) when that folder exists and the variable is not already set, so tests
that read the corpus never download it.
"""

import os
import pathlib

_SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

if _SHARED_DATA.is_dir():
    os.environ.setdefault("JAXSEQ_DATA", str(_SHARED_DATA))
