"""Micro-benchmarks: ``python -m bench`` runs each ``bench/<name>.py`` with ``run()``.

Each module's ``run() -> dict`` returns flat, JSON-ready figures; the runner
merges them into ``bench/results.json`` (keys of modules that did not run this
time are kept; a module that ran replaces its own ``<name>_...`` keys) and
writes a readable ``bench/results.md``.
"""

import os

# Large CPU allocations on transparent huge pages: the EMA's lazy tables read
# random rows of 640 MB tables, and with 4 KiB pages each row also costs a
# page-table walk. Torch reads the variable once, at its first allocation, so
# it is set here, before any benchmark imports torch.
THP = "THP_MEM_ALLOC_ENABLE"
THP_SET_HERE = THP not in os.environ
os.environ.setdefault(THP, "1")
