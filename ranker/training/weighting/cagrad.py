"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent.

Finds the direction d in a ball of radius c |g0| around the mean gradient g0 that maximises the
worst task's improvement min_i g_i . d. Its dual over simplex weights w is
    min_w  g_w . g0 + c |g0| |g_w|,   g_w = sum_i w_i g_i,
and d = g0 + (c |g0| / |g_w|) g_w, rescaled by 1 / (1 + c^2) as in the paper's code. c = 0 is
the plain mean gradient. Everything is a function of the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ranker.config import CAGradParams, TaskSpec
from ranker.training.weighting.base import GradientWeighting

_EPS = 1e-8


def cagrad_weights(gram: np.ndarray, c: float, start: np.ndarray | None = None, iters: int = 200) -> np.ndarray:
    """Simplex w minimising w^T G 1/T + c |g0| sqrt(w^T G w) by exponentiated gradient (the
    objective is convex: a linear term plus a norm), from ``start`` (default uniform)."""
    t = len(gram)
    b = gram.mean(axis=1)  # (T,) g_i . g0
    radius = c * np.sqrt(max(gram.mean(), 0.0) + _EPS)
    w = np.full(t, 1.0 / t) if start is None else start.copy()
    best, best_f = w, np.inf
    for k in range(iters):
        gw2 = max(float(w @ gram @ w), 0.0) + _EPS
        f = float(w @ b) + radius * np.sqrt(gw2)
        if f < best_f:
            best, best_f = w, f
        grad = b + radius * (gram @ w) / np.sqrt(gw2)
        step = 1.0 / (np.abs(grad).max() + _EPS) / np.sqrt(k + 1)
        nxt = w * np.exp(-step * (grad - grad.min()))
        nxt /= nxt.sum()
        if np.abs(nxt - w).max() < 1e-7:
            break
        w = nxt
    return best


class CAGrad(GradientWeighting):
    def __init__(self, tasks: Sequence[TaskSpec], params: CAGradParams | None = None) -> None:
        params = params or CAGradParams()
        super().__init__(tasks, params)
        self.c = params.c
        self._last: np.ndarray | None = None  # warm start: G changes little from step to step

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = len(gram)
        mean = np.full(t, 1.0 / t)
        if self.c == 0:
            return mean
        # warm start, kept off the simplex's faces: multiplicative updates cannot leave a 0
        start = 0.9 * self._last + 0.1 * mean if self._last is not None and len(self._last) == t else None
        w = self._last = cagrad_weights(gram, self.c, start)
        radius = self.c * np.sqrt(max(gram.mean(), 0.0) + _EPS)
        gw_norm = np.sqrt(max(float(w @ gram @ w), 0.0)) + _EPS
        return (mean + radius / gw_norm * w) / (1 + self.c**2)
