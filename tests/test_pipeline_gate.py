"""The registry gate on hand-made figures: a new version is kept out only
when it is worse than the champion by more than the tolerance, and says why."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, PipelineConfig
from pipeline.register import gate_metrics, gate_refusals

CHAMPION = {"version": "3", "cold": 0.36, "warm": 0.12}


def candidate(cold: float, warm: float) -> dict:
    metrics = {
        "student_int8/cold/recall_at_10": cold,
        "student_int8/cold/recall_at_10_se": 0.02,
        "ema_teacher/warm/recall_at_10": warm,
        "ema_teacher/warm/recall_at_10_se": 0.005,
    }
    return gate_metrics(metrics, 10)


def test_the_first_version_always_passes():
    assert gate_refusals(candidate(0.0, 0.0), None, 2.0, 10) == []


def test_a_drop_within_the_standard_errors_passes():
    # 0.03 below on cold is 1.5 standard errors; 0.009 below on warm is 1.8.
    assert gate_refusals(candidate(0.33, 0.111), CHAMPION, 2.0, 10) == []
    # Without a tolerance the same figures are worse, and kept out.
    assert len(gate_refusals(candidate(0.33, 0.111), CHAMPION, 0.0, 10)) == 2
    assert gate_refusals(candidate(0.36, 0.12), CHAMPION, 0.0, 10) == []


def test_a_drop_beyond_the_standard_errors_says_which_figure():
    cold = gate_refusals(candidate(0.31, 0.13), CHAMPION, 2.0, 10)  # 2.5 SE
    assert cold == [
        "cold Recall@10 (INT8 student) 0.3100 is below the champion's (version 3) "
        "0.3600 by more than 0.0400 (2 standard errors of 0.0200)"
    ]
    warm = gate_refusals(candidate(0.40, 0.108), CHAMPION, 2.0, 10)  # 2.4 SE
    assert len(warm) == 1 and warm[0].startswith("warm Recall@10 (EMA teacher) 0.1080")


@pytest.mark.parametrize("missing", [float("nan"), None])
def test_without_a_standard_error_the_gate_is_strict(missing):
    figures = candidate(0.359, 0.12) | {"cold_se": missing}
    assert len(gate_refusals(figures, CHAMPION, 2.0, 10)) == 1
    assert gate_refusals(figures | {"cold": 0.36}, CHAMPION, 2.0, 10) == []


def test_figures_at_another_k_are_not_compared():
    champion = CHAMPION | {"k": 20}
    (refusal,) = gate_refusals(candidate(0.9, 0.9), champion, 2.0, 10)
    assert "Recall@20 and this version on Recall@10: not comparable" in refusal


@pytest.mark.parametrize("value", [-1, "two", float("inf"), float("nan")])
def test_an_impossible_tolerance_is_refused_by_name(value):
    with pytest.raises(ConfigError, match="gate_tolerance_se"):
        PipelineConfig.validated({"gate_tolerance_se": value}, "test.yaml")


@pytest.mark.parametrize("champion", [None, CHAMPION])
def test_a_figure_that_could_not_be_measured_is_never_champion(champion):
    # metrics.json holds null where a cohort has no click to rank.
    refused = gate_refusals(candidate(None, 0.12), champion, 2.0, 10)
    assert refused == [
        "cold Recall@10 (INT8 student) could not be measured (no test user of "
        "that cohort has a click to rank): a version without it is never champion"
    ]
    assert len(gate_refusals(candidate(0.3, float("nan")), champion, 2.0, 10)) == 1
