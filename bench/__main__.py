"""Runs the benchmark modules and merges their figures into ``bench/results.json``.

Usage: ``python -m bench [name ...]`` - every module of this package that has
a ``run()`` when no name is given. A module that fails is reported (its
traceback on stderr, ``<name>_error`` in the results) and the others still run;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import sys
import time
import traceback
from pathlib import Path

logger = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
SUMMARY = HERE / "results.md"


def discover() -> list[str]:
    """Names of the modules in this package, ``__main__`` and private ones left out.

    Returns:
        Module names, sorted.
    """
    names = [m.name for m in pkgutil.iter_modules([str(HERE)])]
    return sorted(n for n in names if not n.startswith("_"))


def run_one(name: str) -> dict:
    """Imports ``bench.<name>`` and runs it.

    Args:
        name: the module name.

    Returns:
        Its figures, plus ``<name>_seconds``; ``<name>_error`` on failure.
    """
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.{name}")
        if not hasattr(module, "run"):
            logger.info("bench.%s has no run(); skipped", name)
            return {}
        figures = dict(module.run())
    except Exception as error:  # noqa: BLE001 - one bench must not stop the rest
        traceback.print_exc()
        logger.warning("bench.%s failed: %s", name, error)
        return {f"{name}_error": f"{type(error).__name__}: {error}"}
    figures[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
    return figures


def merge(figures: dict, names: list[str], path: Path = RESULTS) -> dict:
    """Updates the results file with this run's figures.

    Args:
        figures: this run's figures.
        names: the modules that ran; their stale ``<name>_error`` keys go,
            and so do the ``<name>_...`` keys of a module that succeeded but
            no longer reports them (a figure renamed or dropped).
        path: the results file, one flat JSON object.

    Returns:
        The merged results.
    """
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        results.pop(f"{name}_error", None)
        if f"{name}_error" not in figures:
            stale = [
                k for k in results if k.startswith(f"{name}_") and k not in figures
            ]
            for key in stale:
                results.pop(key)
    results.update(figures)
    path.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    return results


def summarize(results: dict) -> str:
    """A two-column table of the results, for the terminal and ``results.md``."""
    width = max(map(len, results), default=10)
    lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    for key, value in sorted(results.items()):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key:<{width}} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="modules to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    names = args.names or discover()
    figures: dict = {}
    for name in names:
        logger.info("running bench.%s", name)
        figures.update(run_one(name))
    results = merge(figures, names)
    table = summarize(results)
    SUMMARY.write_text("# Benchmark results\n\n" + table + "\n")
    print(table)
    return 1 if any(f"{n}_error" in figures for n in names) else 0


if __name__ == "__main__":
    sys.exit(main())
