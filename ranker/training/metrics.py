"""Per-task evaluation metrics, computed exactly from all predictions of a pass.

Binary: AUC (tie-aware, Mann-Whitney), logloss, calibration (mean prediction / mean label),
NE (logloss over the entropy of the observed positive rate, ``ranker.quality``).
Regression: RMSE, MAE (label units) and R^2. ``PRIMARY`` names each type's metric used by the
early-stopping monitor; ``HIGHER_IS_BETTER`` gives every metric's orientation.
"""

from __future__ import annotations

import numpy as np

from ranker.quality import log_loss_terms, normalized_entropy

PRIMARY = {"binary": "auc", "regression": "r2"}
HIGHER_IS_BETTER = {"auc": True, "logloss": False, "calibration": None, "ne": False, "rmse": False, "mae": False, "r2": True}


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve; tied scores count one half. NaN when a class is absent."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    # average 1-based rank per run of equal scores
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ends = np.r_[starts[1:], ps.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(ps.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, dtype=np.float64)
    pc = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    mean_y = float(y.mean()) if y.size else float("nan")
    return {
        "auc": auc(y, p),
        "logloss": float(-(y * np.log(pc) + (1 - y) * np.log1p(-pc)).mean()) if y.size else float("nan"),
        "calibration": float(pc.mean() / mean_y) if y.size and mean_y > 0 else float("nan"),
        "count": int(y.size),
    } | binary_ne(y, p)


def binary_ne(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """``{"ne": ...}``: normalized entropy (log loss / entropy of the observed positive rate);
    the production feedback rules compute the same figure from the served scores."""
    y = np.asarray(y, dtype=np.float64)
    if not y.size:
        return {"ne": float("nan")}
    return {"ne": normalized_entropy(float(log_loss_terms(y, p).mean()), float(y.mean()))}


def regression_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0:
        return {"rmse": float("nan"), "mae": float("nan"), "r2": float("nan"), "count": 0}
    err = p - y
    var = float(y.var())
    return {
        "rmse": float(np.sqrt((err**2).mean())),
        "mae": float(np.abs(err).mean()),
        "r2": float(1 - (err**2).mean() / var) if var > 0 else float("nan"),
        "count": int(y.size),
    }


METRICS = {"binary": binary_metrics, "regression": regression_metrics}


def task_metrics(task_type: str, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return METRICS[task_type](y, p)


def monitor_value(monitor: str, metrics: dict[str, dict[str, float]], task_types: dict[str, str]) -> float:
    """The early-stopping score, oriented so higher is better.

    ``mean``: mean over tasks of the primary metric (AUC; R^2 for regression);
    ``TASK.METRIC``: that one metric, negated when lower is better.
    """
    if monitor == "mean":
        vals = [metrics[t][PRIMARY[ty]] for t, ty in task_types.items()]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("-inf")
    task, _, metric = monitor.partition(".")
    v = metrics[task][metric]
    return v if HIGHER_IS_BETTER[metric] else -v


def check_monitor(monitor: str, task_types: dict[str, str]) -> str | None:
    """An error message if ``monitor`` cannot be computed for these tasks, else None."""
    if monitor == "mean":
        return None
    task, _, metric = monitor.partition(".")
    if task not in task_types:
        return f"unknown task {task!r} in monitor {monitor!r}; tasks: {', '.join(task_types)}"
    valid = [m for m in HIGHER_IS_BETTER if HIGHER_IS_BETTER[m] is not None and m in METRICS[task_types[task]](np.zeros(2), np.zeros(2))]
    if metric not in valid:
        return f"monitor {monitor!r}: metric must be one of {', '.join(valid)} for a {task_types[task]} task"
    return None
