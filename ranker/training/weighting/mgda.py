"""MGDA-UB (Sener & Koltun, NeurIPS 2018): the min-norm point of the task gradients' convex hull.

The direction d = sum_t a_t g_t with a on the simplex minimising |d| is a common descent
direction: d . g_t >= |d|^2 >= 0 for every task (zero only at a Pareto-stationary point).
With ``gradients: representation`` (the default, the paper's "upper bound" variant) the a_t
come from the gradients on the shared representation (the encoder output here) and the model
is trained on sum_t a_t L_t: no per-task weight gradients of the whole trunk are materialised.
``normalization`` scales each gradient first, as in the paper's code.

A task whose gradient is zero (e.g. a tower whose ReLUs all died) would be the min-norm point
on its own and freeze every other task; it is left out of the solve (a_t = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from ranker.config import MGDAParams, TaskSpec
from ranker.training.weighting.base import GradientWeighting

_EPS = 1e-12


def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """Simplex weights a minimising a^T G a, exactly: the optimum is the affine-hull minimiser
    of its own support, so every support is tried (2^T - 1 small KKT solves, batched per support
    size; fine for the handful of tasks a ranker has).

    Example:
        >>> min_norm_weights(np.array([[1.0, 0.0], [0.0, 4.0]]))  # g1 = (1, 0), g2 = (0, 2)
        array([0.8, 0.2])
    """
    t = len(gram)
    ridge = 1e-12 * max(float(np.trace(gram)), _EPS)  # singular supports still solve
    best, best_v = np.full(t, 1.0 / t), np.inf
    for k in range(1, t + 1):
        supports = np.array(list(combinations(range(t), k)))  # (n, k)
        kkt = np.zeros((len(supports), k + 1, k + 1))
        kkt[:, :k, :k] = gram[supports[:, :, None], supports[:, None, :]] + ridge * np.eye(k)
        kkt[:, :k, k] = kkt[:, k, :k] = 1.0
        rhs = np.zeros((len(supports), k + 1))
        rhs[:, k] = 1.0
        w = np.linalg.solve(kkt, rhs[..., None])[:, :k, 0]  # (n, k) affine-hull minimisers
        ok = (w >= -1e-12).all(axis=1)
        if not ok.any():
            continue
        a = np.zeros((int(ok.sum()), t))
        np.put_along_axis(a, supports[ok], np.clip(w[ok], 0, None), axis=1)
        a /= a.sum(axis=1, keepdims=True)
        v = np.einsum("ni,ij,nj->n", a, gram, a)
        i = int(np.argmin(v))
        if v[i] < best_v:
            best, best_v = a[i], v[i]
    return best


class MGDA(GradientWeighting):
    def __init__(self, tasks: Sequence[TaskSpec], params: MGDAParams | None = None) -> None:
        params = params or MGDAParams()
        super().__init__(tasks, params)
        self.normalization = params.normalization

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        norms = np.sqrt(np.clip(np.diag(gram), 0, None))
        scale = {
            "none": np.ones_like(norms),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.normalization]
        live = norms > 1e-8 * max(float(norms.max()), _EPS)
        a = np.zeros(len(gram))
        if not live.any():
            return np.full(len(gram), 1.0 / len(gram))
        scale = np.maximum(scale[live], _EPS)
        a[live] = min_norm_weights(gram[np.ix_(live, live)] / np.outer(scale, scale))
        # the paper's code trains on sum_t a_t L_t with the raw losses
        return a
