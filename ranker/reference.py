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
    edges = _full_edges(np.unique(qs), scores, bins - 1)
    counts = np.bincount(assign_bins(scores, edges), minlength=len(edges) + 1)
    return {"edges": edges.tolist(), "shares": (counts / counts.sum()).tolist()}


def _full_edges(edges: np.ndarray, scores: np.ndarray, want: int) -> np.ndarray:
    """``want`` strictly ascending edges from the unique quantiles ``edges``: tied quantiles
    (scores with few distinct values, or a spike at one value) leave fewer, and the live
    binned AUC adds bins of different model versions by index, so every bundle keeps the same
    count (a 10-bin and a 3-bin version, 0.749 and 0.722 alone, had read 0.434 together).
    Missing edges split the fullest bin between two distinct scores, then sit above the
    largest score (bins that stay empty)."""
    distinct = np.unique(scores)
    mids = (distinct[:-1] + distinct[1:]) / 2  # splits that leave every tie in one bin
    while edges.size < want:
        free = mids[~np.isin(mids, edges)]
        if not free.size:
            break
        bins_of, free_bins = assign_bins(scores, edges), assign_bins(free, edges)
        counts = np.bincount(bins_of, minlength=edges.size + 1)
        room = np.bincount(free_bins, minlength=edges.size + 1) > 0  # a bin of one tied value has none
        fullest = int(np.argmax(np.where(room, counts, -1)))
        inside, held = free[free_bins == fullest], np.sort(scores[bins_of == fullest])
        pick = inside[np.argmin(np.abs(np.searchsorted(held, inside) - held.size / 2))]  # the most even split
        edges = np.sort(np.append(edges, pick))
    if edges.size < want:
        top = max(float(distinct[-1]), float(edges[-1])) if edges.size else float(distinct[-1])
        step = max(abs(top), 1.0) * 1e-9
        edges = np.append(edges, top + step * np.arange(1, want - edges.size + 1))
    return edges


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
