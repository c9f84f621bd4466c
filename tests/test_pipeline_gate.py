"""The registry gate on hand-made figures: a new version is kept out only
when it is worse than the champion by more than the tolerance."""

from __future__ import annotations

from pipeline.register import gate_metrics, passes_gate

CHAMPION = {"cold": 0.36, "warm": 0.12}


def candidate(cold: float, warm: float) -> dict:
    metrics = {
        "student_int8/cold/recall_at_10": cold,
        "student_int8/cold/recall_at_10_se": 0.02,
        "ema_teacher/warm/recall_at_10": warm,
        "ema_teacher/warm/recall_at_10_se": 0.005,
    }
    return gate_metrics(metrics, 10)


def test_the_first_version_always_passes():
    assert passes_gate(candidate(0.0, 0.0), None, 2.0)


def test_a_drop_within_the_standard_errors_passes():
    # 0.03 below on cold is 1.5 standard errors; 0.009 below on warm is 1.8.
    assert passes_gate(candidate(0.33, 0.111), CHAMPION, 2.0)
    # Without a tolerance the same figures are worse, and kept out.
    assert not passes_gate(candidate(0.33, 0.111), CHAMPION, 0.0)
    assert passes_gate(candidate(0.36, 0.12), CHAMPION, 0.0)


def test_a_drop_beyond_the_standard_errors_on_either_cohort_fails():
    assert not passes_gate(candidate(0.31, 0.13), CHAMPION, 2.0)  # cold: 2.5 SE
    assert not passes_gate(candidate(0.40, 0.108), CHAMPION, 2.0)  # warm: 2.4 SE


def test_without_a_standard_error_the_gate_is_strict():
    figures = candidate(0.359, 0.12) | {"cold_se": float("nan")}
    assert not passes_gate(figures, CHAMPION, 2.0)
    assert passes_gate(figures | {"cold": 0.36}, CHAMPION, 2.0)
