"""Numeric encodings fitted in the featurizer's one streaming pass: a bounded-memory quantile
sketch, quantile bin edges, and a value's position among them.

The piecewise-linear encoding of Gorishniy et al. (NeurIPS 2022, "On Embeddings for Numerical
Features in Tabular Deep Learning") maps x, with bin edges b_0 < ... < b_T, to T components
e_t = clamp((x - b_t) / (b_{t+1} - b_t), 0, 1). All T components are determined by one number,
the fractional bin position q = i + (x - b_i) / (b_{i+1} - b_i) of x in bin i: e_t = clamp(q - t,
0, 1). So the featurizer hands the model one float per feature (a batch stays as small as with
standardisation) and the model expands it (``ranker.model.numeric``). Values beyond the outer
edges clip to q = 0 or q = T. NaN (null, NaN, inf) stays NaN: the model gives it its own learned
vector instead of pretending it is some value.

Edges come from a quantile sketch, not from the data held in memory: a stack of compactors in
the spirit of KLL (Karnin, Lang and Liberty, FOCS 2016). Level h holds items that each stand
for 2**h values; a level that outgrows ``k`` items is sorted and every other item (random
offset) moves up a level. Memory is O(k log(n / k)) items; each rank estimate is off by about
n / k at worst, far less on average, which tests check against exact quantiles.
"""

from __future__ import annotations

import numpy as np

SKETCH_K = 8192  # items per level: rank error ~1e-4 of n on typical data, ~1 MB per feature


class QuantileSketch:
    """Mergeable streaming quantiles in bounded memory.

    Args:
        k: items a level holds before it is compacted.
        seed: seeds the compaction offsets, so a fit is reproducible.

    Example:
        >>> s = QuantileSketch(k=256)
        >>> for chunk in np.array_split(np.arange(100_000, dtype=float), 10):
        ...     s.update(chunk)
        >>> abs(s.quantiles(np.array([0.5]))[0] - 50_000) < 1_500
        True
    """

    def __init__(self, k: int = SKETCH_K, seed: int = 0) -> None:
        self.k = k
        self.levels: list[np.ndarray] = [np.empty(0)]
        self.count = 0  # finite values seen
        self.min, self.max = np.inf, -np.inf
        self._rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        """Add values; NaN is skipped (it has its own treatment downstream)."""
        x = np.asarray(x, dtype=np.float64)
        x = x[~np.isnan(x)]
        if x.size == 0:
            return
        self.count += int(x.size)
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        self.levels[0] = np.concatenate([self.levels[0], x])
        self._compact()

    def merge(self, other: QuantileSketch) -> None:
        """Add another sketch's values (another rank's share of the data): level by level, then
        compacted as usual, so the merged sketch keeps the same bound. While both hold fewer
        than ``k`` values in all, the merge is exact: the sketch of the union."""
        self.count += other.count
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        for h, items in enumerate(other.levels):
            if h == len(self.levels):
                self.levels.append(np.empty(0))
            self.levels[h] = np.concatenate([self.levels[h], items])
        self._compact()

    def _compact(self) -> None:
        h = 0
        while h < len(self.levels):
            items = self.levels[h]
            if items.size > self.k:
                items = np.sort(items)
                keep = items.size % 2  # an odd item out stays, so weight is conserved exactly
                promoted = items[keep:][int(self._rng.integers(2)) :: 2]  # every other item, weight x2
                self.levels[h] = items[:keep]
                if h + 1 == len(self.levels):
                    self.levels.append(np.empty(0))
                self.levels[h + 1] = np.concatenate([self.levels[h + 1], promoted])
            h += 1

    def weighted(self) -> tuple[np.ndarray, np.ndarray]:
        """The sketch's items sorted, and the number of values each stands for."""
        values = np.concatenate(self.levels)
        weights = np.concatenate([np.full(lv.size, 2.0**h) for h, lv in enumerate(self.levels)])
        order = np.argsort(values, kind="stable")
        return values[order], weights[order]

    def quantiles(self, qs: np.ndarray) -> np.ndarray:
        """Estimated quantiles at the probabilities ``qs`` (NaN if no value was seen)."""
        if self.count == 0:
            return np.full(len(qs), np.nan)
        v, w = self.weighted()
        cum = np.cumsum(w) - 0.5 * w  # mid-rank of each item
        out = np.interp(np.asarray(qs) * w.sum(), cum, v)
        return np.clip(out, self.min, self.max)


def bin_edges(sketch: QuantileSketch, bins: int) -> np.ndarray:
    """Up to ``bins + 1`` strictly ascending edges holding about equal mass per bin.

    Repeated values are common in logs (a money column is mostly 0; a count has a handful of
    values). Plain quantile edges collapse there and leave few bins for the rest, so the edges
    are placed greedily: a value holding a large share of the mass becomes an edge of its own
    and the bins left are shared out over the remaining mass. A column with at most
    ``bins + 1`` distinct values gets an edge at every value, so each value is told apart.
    """
    if sketch.count == 0:
        return np.zeros(1)
    v, w = sketch.weighted()
    distinct, start = np.unique(v, return_index=True)
    mass = np.add.reduceat(w, start)
    edges = [sketch.min, *distinct, sketch.max]
    if len(distinct) <= bins + 1:
        return np.unique(np.asarray(edges, dtype=np.float64))
    # greedy equal-mass split over the distinct values (a fit-time loop, not a hot path)
    out = [float(distinct[0])]
    remaining, left, acc = float(mass[1:].sum()), bins, 0.0
    for value, m in zip(distinct[1:-1], mass[1:-1], strict=True):
        acc += m
        if acc >= remaining / left and left > 1:
            out.append(float(value))
            remaining, left, acc = remaining - acc, left - 1, 0.0
    out.append(float(distinct[-1]))
    out[0], out[-1] = min(out[0], sketch.min), max(out[-1], sketch.max)
    return np.unique(np.asarray(out, dtype=np.float64))


def bin_position(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fractional bin position q in [0, T] of each value (T = len(edges) - 1); NaN stays NaN.

    Example:
        >>> bin_position(np.array([-1.0, 0.0, 0.5, 2.0, 9.0, np.nan]), np.array([0.0, 1.0, 3.0]))
        array([0.  , 0.  , 0.5 , 1.5 , 2.  ,  nan])
    """
    x = np.asarray(x, dtype=np.float64)
    t = len(edges) - 1
    if t < 1:  # a constant column: every value sits at the one edge
        return np.where(np.isnan(x), np.nan, 0.0)
    i = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, t - 1)  # bin of each value
    lo, hi = edges[i], edges[i + 1]
    with np.errstate(invalid="ignore"):
        q = i + np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return q  # NaN in -> NaN out (searchsorted puts NaN last; the clip keeps it NaN)
