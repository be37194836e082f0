"""Metrics: exact AUC against a brute-force pair count, and the monitor's orientation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ranker.training.metrics import (
    auc,
    binary_metrics,
    check_monitor,
    monitor_value,
    regression_metrics,
)


def brute_force_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos = [s for s, t in zip(p, y) if t]
    neg = [s for s, t in zip(p, y) if not t]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    p = np.round(rng.random(300) + 0.3 * y, 1)  # rounding forces many ties
    assert auc(y, p) == pytest.approx(brute_force_auc(y, p), abs=1e-12)


def test_auc_golden_values() -> None:
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_binary_and_regression_metrics() -> None:
    m = binary_metrics(np.array([0, 1, 1, 0]), np.array([0.2, 0.6, 0.9, 0.1]))
    assert m["logloss"] == pytest.approx(-np.mean(np.log([0.8, 0.6, 0.9, 0.9])))
    assert m["calibration"] == pytest.approx(np.mean([0.2, 0.6, 0.9, 0.1]) / 0.5)
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert r["rmse"] == pytest.approx(np.sqrt(4 / 3)) and r["mae"] == pytest.approx(2 / 3)
    assert r["r2"] == pytest.approx(1 - (4 / 3) / np.var([1.0, 2.0, 3.0]))


def test_monitor_orientation() -> None:
    metrics = {"ctr": {"auc": 0.7, "logloss": 0.3}, "watch": {"rmse": 2.0, "r2": 0.4}}
    types = {"ctr": "binary", "watch": "regression"}
    assert monitor_value("mean", metrics, types) == pytest.approx(0.55)
    assert monitor_value("watch.rmse", metrics, types) == -2.0
    assert monitor_value("ctr.auc", metrics, types) == 0.7
    assert check_monitor("ctr.rmse", types) is not None
    assert check_monitor("nope.auc", types) is not None
    assert check_monitor("watch.mae", types) is None
