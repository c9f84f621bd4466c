"""Micro-benchmarks: ``python -m bench`` runs each ``bench/<name>.py`` with ``run()``.

Each module's ``run() -> dict`` returns flat, JSON-ready figures; the runner
merges them into ``bench/results.json`` (keys of modules that did not run this
time are kept) and writes a readable ``bench/results.md``.
"""
