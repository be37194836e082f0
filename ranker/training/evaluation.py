"""Per-task metrics of a pass over data in bounded memory, mergeable across ranks.

Metrics that are sums (log loss, NE, calibration, RMSE, MAE; R^2 through a mean/M2 merge) are
exact at any size. AUC is exact (every labelled score kept, the tie-aware rank sum of
``metrics.auc``) while a task has at most ``EXACT_AUC_ROWS`` labelled rows over all ranks;
past that it comes from a histogram of 2^16 bins on the logit scale, and the result carries
``auc_max_error``: half the share of positive/negative pairs that fall in one bin, the most
that not knowing their order can move the AUC (typically < 1e-4). The bundle's reference
score bins are quantiles of a uniform sample of at most ``REFERENCE_SAMPLE`` scores per task
(all of them below that).

Memory: at most EXACT_AUC_ROWS + REFERENCE_SAMPLE scores and 2 x 2^16 counters per task,
whatever the data size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ranker.quality import normalized_entropy
from ranker.training.distributed import Collective
from ranker.training.metrics import auc, task_metrics

EXACT_AUC_ROWS = 500_000
REFERENCE_SAMPLE = 200_000
AUC_BINS = 1 << 16
LOGIT_RANGE = 17.0  # float32 probabilities stay within logit +-16.7
_EPS = 1e-7  # probability clip of the log loss, as in metrics.binary_metrics


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC from per-bin positive/negative counts (ascending score bins), ties within a bin
    counted one half; returns (auc, max error from the unknown order inside bins)."""
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan"), 0.0
    below = np.cumsum(neg) - neg  # negatives in lower bins
    wins = (pos * (below + 0.5 * neg)).sum()
    return float(wins / (n_pos * n_neg)), float(0.5 * (pos * neg).sum() / (n_pos * n_neg))


def _logit_bins(p: np.ndarray) -> np.ndarray:
    pc = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    z = np.log(pc) - np.log1p(-pc)
    idx = np.floor((z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * AUC_BINS)
    return np.clip(idx, 0, AUC_BINS - 1).astype(np.int64)


class TaskAccumulator:
    """Streaming state of one task's metrics over a pass.

    Args:
        task_type: ``binary`` or ``regression``.
        seed: for the reference sample's random keys (the same on every rank is fine: the
            keys of different rows are still independent).

    Example:
        >>> acc = TaskAccumulator("binary")
        >>> acc.update(np.array([0.0, 1.0, np.nan]), np.array([0.2, 0.7, 0.5]))
        >>> m = acc.result(Collective.single(torch.device("cpu")))[0]
        >>> m["auc"], m["count"]
        (1.0, 2)
    """

    def __init__(self, task_type: str, seed: int = 0) -> None:
        self.type = task_type
        self.rng = np.random.default_rng([seed, 0x5EED])  # its own stream for the sample keys
        self.sums = np.zeros(4)  # binary: n, sum y, sum p (clipped), sum log loss; regression: n, sse, sae, 0
        self.moments = (0, 0.0, 0.0)  # regression labels: n, mean, M2 (Chan's parallel merge)
        self.kept_y: list[np.ndarray] = []
        self.kept_p: list[np.ndarray] = []
        self.kept = 0  # labelled rows kept for the exact AUC; -1 once past EXACT_AUC_ROWS
        self.hist = np.zeros((2, AUC_BINS), dtype=np.int64) if task_type == "binary" else None
        self.ref_keys = np.empty(0)
        self.ref_scores = np.empty(0, dtype=np.float32)

    def update(self, y: np.ndarray, p: np.ndarray) -> None:
        """One batch: labels (NaN = unlabelled) and scores of every row."""
        self._sample(p)
        valid = ~np.isnan(y)
        y, p = y[valid].astype(np.float64), p[valid].astype(np.float64)
        if not y.size:
            return
        if self.type == "binary":
            pc = np.clip(p, _EPS, 1 - _EPS)
            ll = -(y * np.log(pc) + (1 - y) * np.log1p(-pc))
            self.sums += (y.size, y.sum(), pc.sum(), ll.sum())
            assert self.hist is not None
            b = _logit_bins(p)
            self.hist[1] += np.bincount(b[y == 1], minlength=AUC_BINS)
            self.hist[0] += np.bincount(b[y == 0], minlength=AUC_BINS)
            if self.kept >= 0:
                if self.kept + y.size > EXACT_AUC_ROWS:  # too many to keep: the histogram takes over
                    self.kept, self.kept_y, self.kept_p = -1, [], []
                else:
                    self.kept += y.size
                    self.kept_y.append(y.astype(np.bool_))
                    self.kept_p.append(p.astype(np.float32))
        else:
            err = p - y
            self.sums += (y.size, (err**2).sum(), np.abs(err).sum(), 0.0)
            self.moments = _merge_moments(self.moments, (y.size, float(y.mean()), float(((y - y.mean()) ** 2).sum())))

    def _sample(self, p: np.ndarray) -> None:
        """Keep the REFERENCE_SAMPLE scores with the smallest random keys: a uniform sample."""
        keys = self.rng.random(p.size)
        ks, ps = np.concatenate([self.ref_keys, keys]), np.concatenate([self.ref_scores, p.astype(np.float32)])
        if ks.size > REFERENCE_SAMPLE:
            keep = np.argpartition(ks, REFERENCE_SAMPLE - 1)[:REFERENCE_SAMPLE]
            ks, ps = ks[keep], ps[keep]
        self.ref_keys, self.ref_scores = ks, ps

    def result(self, world: Collective) -> tuple[dict[str, float], np.ndarray]:
        """(metrics over every rank's rows, reference score sample); every rank must call it."""
        sums = world.sum(torch.from_numpy(self.sums.copy())).numpy()
        samples = world.gather_objects((self.ref_keys, self.ref_scores)) if world.world > 1 else [(self.ref_keys, self.ref_scores)]
        keys = np.concatenate([k for k, _ in samples])
        scores = np.concatenate([s for _, s in samples])
        if keys.size > REFERENCE_SAMPLE:
            scores = scores[np.argpartition(keys, REFERENCE_SAMPLE - 1)[:REFERENCE_SAMPLE]]
        n = int(sums[0])
        if self.type == "regression":
            moments = self.moments
            if world.world > 1:
                moments = (0, 0.0, 0.0)
                for m in world.gather_objects(self.moments):
                    moments = _merge_moments(moments, m)
            return _regression(n, sums, moments), scores
        return self._binary(n, sums, world), scores

    def _binary(self, n: int, sums: np.ndarray, world: Collective) -> dict[str, float]:
        if n == 0:
            return task_metrics("binary", np.zeros(0), np.zeros(0))
        dropped = int(world.max(torch.tensor([1 if self.kept < 0 else 0])).item())
        # every rank kept all its rows (none went past the cap) and the union is small enough
        if not dropped and n <= EXACT_AUC_ROWS:
            parts = world.gather_objects((self.kept_y, self.kept_p)) if world.world > 1 else [(self.kept_y, self.kept_p)]
            y = np.concatenate([a for ys, _ in parts for a in ys])
            p = np.concatenate([a for _, ps in parts for a in ps])
            value, err = auc(y, p), None
        else:
            assert self.hist is not None
            hist = world.sum(torch.from_numpy(self.hist.copy())).numpy()
            value, err = histogram_auc(hist[1], hist[0])
        mean_y = sums[1] / n
        out = {
            "auc": value,
            "logloss": float(sums[3] / n),
            "calibration": float((sums[2] / n) / mean_y) if mean_y > 0 else float("nan"),
            "count": n,
            "ne": normalized_entropy(float(sums[3] / n), float(mean_y)),
        }
        if err is not None:
            out["auc_max_error"] = err
        return out


def _merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    (na, ma, qa), (nb, mb, qb) = a, b
    n = na + nb
    if n == 0:
        return (0, 0.0, 0.0)
    d = mb - ma
    return (n, ma + d * nb / n, qa + qb + d * d * na * nb / n)


def _regression(n: int, sums: np.ndarray, moments: tuple[int, float, float]) -> dict[str, float]:
    if n == 0:
        return task_metrics("regression", np.zeros(0), np.zeros(0))
    var = moments[2] / n
    mse = sums[1] / n
    return {"rmse": float(np.sqrt(mse)), "mae": float(sums[2] / n), "r2": float(1 - mse / var) if var > 0 else float("nan"), "count": n}


def accumulators(types: Sequence[tuple[str, str]], seed: int = 0) -> dict[str, TaskAccumulator]:
    """One accumulator per (task name, task type)."""
    return {name: TaskAccumulator(ty, seed) for name, ty in types}
