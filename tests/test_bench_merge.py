"""How ``python -m bench`` merges a run's figures into the results file."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest


@pytest.fixture
def merge(monkeypatch):
    """``bench.__main__.merge``, imported without leaving the package's
    environment variable (huge pages for torch) behind for other tests."""
    saved = dict(os.environ)
    module = importlib.import_module("bench.__main__")
    os.environ.clear()
    os.environ.update(saved)
    yield module.merge
    sys.modules.pop("bench.__main__", None)


def test_a_module_that_ran_replaces_its_own_keys_only(merge, tmp_path):
    path = tmp_path / "results.json"
    old = {"ema_old_figure": 1, "ema_kept": 1, "serving_p99": 9, "stream_gbps": 40}
    path.write_text(json.dumps({**old, "ema_error": "boom"}))

    merged = merge({"ema_kept": 2, "stream_gbps": 47}, ["ema"], path)

    # ema's dropped figure and its old error go; serving did not run, stays.
    assert merged == {"ema_kept": 2, "serving_p99": 9, "stream_gbps": 47}
    assert json.loads(path.read_text()) == merged


def test_a_failed_module_keeps_its_last_figures(merge, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"int8_batch_speedup": 1.7}))

    merged = merge({"int8_error": "RuntimeError: x"}, ["int8"], path)

    assert merged == {"int8_batch_speedup": 1.7, "int8_error": "RuntimeError: x"}
