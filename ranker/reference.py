"""Reference score distributions and the population stability index (PSI).

Training stores, per task, quantile bins of the validation scores in the bundle; serving
counts live scores into the same bins and compares shares. Shared by both wings, so the
binning rule exists once.
"""

from __future__ import annotations

import numpy as np

PSI_FLOOR = 1e-4  # share floor so an empty bin gives a large but finite PSI term


def reference_histogram(scores: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Quantile bins of ``scores``: inner ``edges`` (ascending, unique) and each bin's share.

    Bin i holds scores in (edges[i-1], edges[i]]; the first and last bins are open-ended, which
    matches Prometheus' cumulative ``le`` buckets with edges as upper bounds.
    """
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return {"edges": [], "shares": [1.0]}
    qs = np.quantile(scores, np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(qs)
    counts = np.bincount(assign_bins(scores, edges), minlength=len(edges) + 1)
    return {"edges": edges.tolist(), "shares": (counts / counts.sum()).tolist()}


def assign_bins(scores: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Bin index per score: the first edge >= score (so edges are inclusive upper bounds)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), scores, side="left")


def psi(observed: np.ndarray, reference: np.ndarray) -> float:
    """PSI = sum_i (p_i - q_i) ln(p_i / q_i) of observed counts (or shares) vs reference shares."""
    obs = np.asarray(observed, dtype=np.float64)
    total = obs.sum()
    if total <= 0:
        return 0.0
    p = np.maximum(obs / total, PSI_FLOOR)
    q = np.maximum(np.asarray(reference, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))
