"""Per-task quality from additive sums: calibration, normalized entropy, binned AUC, RMSE.

Production labels arrive as events long after the prediction, on whichever replica took them
here is a ratio of *sums* that add across events, batches, replicas and restarts (the way
TorchRec keeps its metric states): Prometheus sums the counters of ``POST /feedback``, the
recording rules in ``deploy/prometheus/rules/recording.yml`` take the same ratios, and
``ranker evaluate`` computes them offline from a bundle's own scores. One module for the
elementwise terms (log loss clip, bins) keeps the three in agreement.

- calibration = sum(score) / sum(label): expected over observed positives for a binary task,
  predicted over observed total for a regression task; 1 is calibrated.
- NE (normalized entropy, He et al., ADKDD 2014) = mean log loss / H(rate), with H the
  entropy of the observed positive rate: log loss relative to always predicting the base rate
  (1 means no better than the base rate; lower is better).
- binned AUC: each score is replaced by its reference bin (the bundle's quantile bins of the
  validation scores, ``ranker.reference``); AUC by rank sum where events sharing a bin count
  as ties (one half). It is the exact AUC of the bin index, computable from per-bin counts
  alone; on large samples usually a little below the exact AUC of the scores, though coarse
  bins can also land above it (cvr on a small validation split: 0.754 against 0.744).
- RMSE = sqrt(sum(squared error) / count), label units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ranker.reference import assign_bins

LOGLOSS_CLIP = 1e-7  # probabilities are clipped to [clip, 1 - clip] before the log, as in training


def log_loss_terms(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-event log loss in nats, -(y ln p + (1 - y) ln(1 - p)), with p clipped."""
    pc = np.clip(np.asarray(p, dtype=np.float64), LOGLOSS_CLIP, 1 - LOGLOSS_CLIP)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(pc) + (1 - y) * np.log1p(-pc))


def entropy(rate: float) -> float:
    """Entropy in nats of a Bernoulli(rate); NaN outside the open interval (0, 1)."""
    if not 0 < rate < 1:
        return float("nan")
    return float(-(rate * np.log(rate) + (1 - rate) * np.log1p(-rate)))


def normalized_entropy(mean_log_loss: float, rate: float) -> float:
    """Mean log loss over the entropy of the observed positive rate; NaN when only one class
    was observed (the entropy is 0).

    Example:
        >>> round(normalized_entropy(entropy(0.2), 0.2), 6)  # predicting the base rate
        1.0
    """
    h = entropy(rate)
    return float(mean_log_loss / h) if np.isfinite(h) else float("nan")


def binned_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUC from per-bin counts (bins in ascending score order), ties inside a bin count half.

    AUC = sum_i P_i (N_{<i} + N_i / 2) / (P N), with N_{<i} the negatives in bins below i.
    NaN when either class is absent.

    Example:
        >>> binned_auc(np.array([0, 1, 3]), np.array([2, 1, 0]))  # (1 * (2 + .5) + 3 * 3) / 12
        0.9583333333333334
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # (K,) negatives strictly below each bin
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


@dataclass
class QualitySums:
    """The additive state of one task's quality figures (one model version, any events).

    Args:
        task_type: ``"binary"`` or ``"regression"``.
        edges: the task's reference bin edges (inner, ascending); binary tasks only.

    Example:
        >>> s = QualitySums("binary", [0.5])
        >>> s.add(np.array([0, 1, 1, 0]), np.array([0.2, 0.6, 0.9, 0.7]))
        >>> f = s.figures()  # bins (0, 1, 1, 1): positives (0, 2), negatives (1, 1)
        >>> round(f["calibration"], 6), f["auc_binned"]  # 2.4 / 2; (2 * (1 + 1 / 2)) / (2 * 2)
        (1.2, 0.75)
    """

    task_type: str
    edges: np.ndarray | list[float] = field(default_factory=list)
    count: float = 0.0
    label_sum: float = 0.0
    score_sum: float = 0.0
    log_loss_sum: float = 0.0  # binary, nats
    squared_error_sum: float = 0.0  # regression, label units squared
    positives: np.ndarray = field(init=False)  # (K,) binary: positives per reference bin
    negatives: np.ndarray = field(init=False)  # (K,)

    def __post_init__(self) -> None:
        self.edges = np.asarray(self.edges, dtype=np.float64)
        k = self.edges.size + 1
        self.positives, self.negatives = np.zeros(k), np.zeros(k)

    def add(self, y: np.ndarray, p: np.ndarray) -> None:
        """Add labelled events: labels ``y`` and the scores ``p`` served for them, (N,) each."""
        y = np.asarray(y, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        self.count += y.size
        self.label_sum += float(y.sum())
        self.score_sum += float(p.sum())
        if self.task_type == "binary":
            self.log_loss_sum += float(log_loss_terms(y, p).sum())
            bins = assign_bins(p, self.edges)  # (N,)
            k = self.positives.size
            self.positives += np.bincount(bins, weights=y, minlength=k)
            self.negatives += np.bincount(bins, weights=1 - y, minlength=k)
        else:
            self.squared_error_sum += float(((p - y) ** 2).sum())

    def figures(self) -> dict[str, float]:
        """The figures the recording rules compute, from these sums (NaN where undefined)."""
        nan = float("nan")
        n = self.count
        out = {
            "count": int(n),
            "label_sum": self.label_sum,
            "score_sum": self.score_sum,
            "calibration": self.score_sum / self.label_sum if self.label_sum > 0 else nan,
        }
        if self.task_type == "binary":
            rate = self.label_sum / n if n else nan
            out["ne"] = normalized_entropy(self.log_loss_sum / n, rate) if n else nan
            out["auc_binned"] = binned_auc(self.positives, self.negatives)
        else:
            out["rmse"] = float(np.sqrt(self.squared_error_sum / n)) if n else nan
        return out
