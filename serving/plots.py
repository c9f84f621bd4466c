"""PNG charts of a serving run: CTR over time by cohort, latency by endpoint.

The reporter draws both at each successful flush and logs them to its MLflow
run. Figures are built with :class:`matplotlib.figure.Figure` on an explicit
Agg canvas, never through ``pyplot``: pyplot keeps global state that is not
thread-safe, and the reporter draws from its background thread. Figures are
small and low-resolution so a flush stays cheap.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DPI = 80
PERCENTILE_LINES = (50, 95, 99)
BINS = 40


@dataclass(frozen=True)
class CtrPoint:
    """Cumulative CTR by cohort as of one flush.

    Attributes:
        step: the flush's MLflow step.
        timestamp_s: wall-clock time of the flush, seconds since the epoch.
        ctr: cumulative clicks per impression by cohort.
        impressions: cumulative impressions by cohort.
    """

    step: int
    timestamp_s: float
    ctr: Mapping[str, float]
    impressions: Mapping[str, int]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _empty_note(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def ctr_by_cohort_png(history: Sequence[CtrPoint], title: str = "") -> bytes:
    """Draw cumulative CTR per cohort against minutes since the first flush.

    Args:
        history: flushes in order; cohorts may differ between points.
        title: figure title, e.g. the model version.

    Returns:
        The chart as PNG bytes; a note instead of lines when ``history`` is
        empty.
    """
    figure = Figure(figsize=(7, 3.5), dpi=DPI)
    axes = figure.add_subplot()
    axes.set_title(title or "cumulative CTR by cohort")
    if not history:
        _empty_note(axes, "no flushes yet")
        return _png(figure)
    start = history[0].timestamp_s
    minutes = np.array([(p.timestamp_s - start) / 60.0 for p in history])
    cohorts = sorted({c for point in history for c in point.ctr})
    for cohort in cohorts:
        ctr = np.array([p.ctr.get(cohort, np.nan) for p in history])
        last = history[-1].impressions.get(cohort, 0)
        axes.plot(minutes, ctr, marker=".", label=f"{cohort} ({last} impressions)")
    axes.set_xlabel(f"minutes since first flush (steps 0-{history[-1].step})")
    axes.set_ylabel("CTR")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return _png(figure)


def latency_histogram_png(
    samples_ms: Mapping[str, Sequence[float]],
    requests: Mapping[str, int] | None = None,
    title: str = "",
) -> bytes:
    """Draw one latency histogram per endpoint, with p50/p95/p99 marked.

    Args:
        samples_ms: latency samples in milliseconds by endpoint (the
            reporter's reservoirs); an endpoint with none gets a note.
        requests: requests counted by endpoint, shown in each panel's title;
            the samples may be a subset of them.
        title: figure title.

    Returns:
        The chart as PNG bytes.
    """
    endpoints = list(samples_ms) or ["(no endpoints)"]
    columns = min(2, len(endpoints))
    rows = -(-len(endpoints) // columns)
    figure = Figure(figsize=(4 * columns, 2.6 * rows), dpi=DPI)
    figure.suptitle(title or "handler latency by endpoint")
    for index, endpoint in enumerate(endpoints):
        axes = figure.add_subplot(rows, columns, index + 1)
        values = np.asarray(samples_ms.get(endpoint, ()), dtype=np.float64)
        count = (requests or {}).get(endpoint, len(values))
        axes.set_title(f"{endpoint} ({count} requests)", fontsize="small")
        if values.size == 0:
            _empty_note(axes, "no requests")
            continue
        _histogram(axes, values)
    figure.tight_layout()
    return _png(figure)


def _histogram(axes, values: np.ndarray) -> None:
    # Cut the axis at p99.9 so a few stragglers do not squash the bulk.
    upper = float(np.percentile(values, 99.9))
    low = float(values.min())
    upper = upper if upper > low else low + 1.0
    axes.hist(np.clip(values, low, upper), bins=BINS, range=(low, upper))
    points = np.percentile(values, PERCENTILE_LINES)
    for pct, point in zip(PERCENTILE_LINES, points, strict=True):
        axes.axvline(point, linestyle="--", linewidth=1, color="black")
        axes.annotate(
            f"p{pct} {point:.1f}",
            (point, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize="x-small",
        )
    axes.set_xlabel("ms")
