"""Per-task score tracking against the training reference histogram.

Each task's scores are counted into the reference bins of its bundle (``ranker.reference``):
all-time counts feed ``ranker_task_score`` and ``ranker_task_score_bin_total``, and a ring
buffer of the last ``window`` scores' bins gives the in-process ``ranker_task_drift_psi``
(NaN while the window holds fewer than ``MIN_PSI_SCORES``: the PSI of a few scores is noise).
A reload hands the all-time counts on to the next model's tracker of the task (``carry``), so
these counters never go back. Updates are vectorised (one bincount per request) and guarded by
a lock because requests are scored in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ranker.reference import assign_bins, psi

# fewest scores in the window for which ranker_task_drift_psi is a number (NaN below; the whole
# window when RANKER_DRIFT_WINDOW is smaller). The drift alerts ask the same of the fleet's hour:
# drawn from the reference itself, 10 scores in 10 bins give a median PSI of 2.4, 50 of 0.18,
# 1,000 of about 0.01.
MIN_PSI_SCORES = 1000


def window_psi(window: np.ndarray, shares: np.ndarray, min_scores: int) -> float:
    """PSI of the window's bin counts against the reference shares; NaN under ``min_scores``."""
    return psi(window, shares) if window.sum() >= min_scores else float("nan")


@dataclass(frozen=True)
class TrackerSnapshot:
    counts: np.ndarray  # (K,) int64 all-time items per bin
    total: float  # sum of all scores (the histogram's _sum)
    window: np.ndarray  # (K,) int64 items per bin among the last ``window`` scores
    psi: float  # PSI of ``window`` against the reference shares (NaN for too few scores)


class AllTimeCounts:
    """A task's all-time items per bin and score sum, and the lock that guards them and the
    window of every tracker that counts into them (``ScoreTracker.carry``)."""

    def __init__(self, bins: int) -> None:
        self.lock = threading.Lock()
        self.counts = np.zeros(bins, dtype=np.int64)
        self.total = 0.0


class ScoreTracker:
    """Counts scores into reference bins, all-time and over a sliding window.

    Args:
        edges: inner bin edges, ascending (bin i holds scores in (edges[i-1], edges[i]]).
        shares: reference share of each of the ``len(edges) + 1`` bins.
        window: how many of the most recent scores the PSI looks at.

    Example:
        >>> t = ScoreTracker([0.5], [0.5, 0.5], window=4)
        >>> t.add(np.array([0.1, 0.9, 0.2]))
        >>> t.snapshot().psi  # fewer than min(MIN_PSI_SCORES, window) scores
        nan
        >>> t.add(np.array([0.8]))
        >>> t.snapshot().window.tolist(), round(t.snapshot().psi, 6)
        ([2, 2], 0.0)
    """

    def __init__(self, edges: Sequence[float], shares: Sequence[float], window: int) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.shares = np.asarray(shares, dtype=np.float64)
        self.bins = len(self.edges) + 1
        if self.shares.shape != (self.bins,):
            raise ValueError(f"{self.bins} bins but {self.shares.size} reference shares")
        self.all_time = AllTimeCounts(self.bins)
        self.min_psi_scores = min(MIN_PSI_SCORES, window)
        self._ring = np.full(window, -1, dtype=np.int64)  # bin of each recent score; -1 = empty slot
        self._pos = 0
        self._window = np.zeros(self.bins, dtype=np.int64)

    def carry(self, all_time: AllTimeCounts) -> None:
        """Count on from ``all_time`` (the counts of an earlier model's tracker of this task,
        with as many bins), before this tracker counts anything. The earlier tracker keeps
        counting into them too: requests pinned to it may still finish after a reload."""
        if all_time.counts.shape != (self.bins,):
            raise ValueError(f"{self.bins} bins but all-time counts of {all_time.counts.size}")
        self.all_time = all_time

    def add(self, scores: np.ndarray) -> None:
        """Count a request's scores (non-finite ones are skipped: they fit no bin)."""
        s = np.asarray(scores, dtype=np.float64)
        s = s[np.isfinite(s)]
        if s.size == 0:
            return
        bins = assign_bins(s, self.edges)  # (N,)
        per_bin = np.bincount(bins, minlength=self.bins)
        n = self._ring.size
        tail = bins[-n:]  # only the last ``window`` scores can stay in the ring
        a = self.all_time
        with a.lock:
            a.counts += per_bin
            a.total += float(s.sum())
            slots = (self._pos + np.arange(tail.size)) % n
            old = self._ring[slots]
            self._window -= np.bincount(old[old >= 0], minlength=self.bins)
            self._ring[slots] = tail
            self._window += np.bincount(tail, minlength=self.bins)
            self._pos = int((self._pos + tail.size) % n)

    def state(self) -> tuple[np.ndarray, float, np.ndarray]:
        """(all-time counts per bin, score sum, window counts per bin), copied under the lock."""
        a = self.all_time
        with a.lock:
            return a.counts.copy(), a.total, self._window.copy()

    def snapshot(self) -> TrackerSnapshot:
        counts, total, window = self.state()
        return TrackerSnapshot(counts, total, window, window_psi(window, self.shares, self.min_psi_scores))
