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


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto the probability simplex (sort-based, exact)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def cagrad_weights(
    gram: np.ndarray, c: float, start: np.ndarray | None = None, iters: int = 5000, tol: float = 1e-12
) -> np.ndarray:
    """Simplex w minimising w^T G 1/T + c |g0| sqrt(w^T G w), from ``start`` (default uniform).

    The objective is convex (a linear term plus a norm), so projected gradient on the simplex
    converges to the optimum from any start: spectral (Barzilai-Borwein) steps, a nonmonotone
    Armijo backtracking line search and an exact Euclidean projection, until the projected
    gradient step is below ``tol`` (on the simplex, i.e. in w) or no descent is found, at most
    ``iters`` iterations. Works on G divided by its largest diagonal entry (same minimiser), so
    the tolerances do not depend on the gradients' scale. The norm is not differentiable where
    w^T G w = 0; there the subgradient with a zero norm part is used, and a line search that
    finds no descent ends the solve."""
    t = len(gram)
    w = np.full(t, 1.0 / t) if start is None else _project_simplex(np.asarray(start, dtype=np.float64))
    if not np.isfinite(gram).all():  # e.g. an fp16 overflow: nothing to solve, keep the start
        return w
    b = gram.mean(axis=1)  # (T,) g_i . g0
    radius = c * np.sqrt(max(gram.mean(), 0.0))  # no absolute epsilon: the solve is scale-free
    scale = max(float(np.abs(np.diag(gram)).max()), np.finfo(float).tiny)
    g = (gram + gram.T) / (2 * scale)
    bs, rs = b / scale, radius / np.sqrt(scale)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        gw = g @ w
        norm = np.sqrt(max(float(w @ gw), 0.0))  # |g_w| / sqrt(scale)
        grad = bs + rs * gw / norm if norm > 1e-150 else bs.copy()
        return float(w @ bs) + rs * norm, grad

    f, grad = objective(w)
    best, best_f = w, f
    recent = [f]  # the nonmonotone line search compares with the worst of the last 10 values
    step = 1.0
    for _ in range(iters):
        d = _project_simplex(w - step * grad) - w
        if np.abs(d).max() <= tol and np.abs(_project_simplex(w - grad) - w).max() <= tol:
            break  # w is a fixed point of the projected gradient step: optimal
        slope, ref = float(grad @ d), max(recent[-10:])
        lam = 1.0
        while True:
            nxt = w + lam * d
            f_nxt, grad_nxt = objective(nxt)
            if f_nxt <= ref + 1e-4 * lam * slope:
                break
            lam *= 0.5
            if lam < 1e-20:
                return best  # no descent along the projected gradient: converged (or at the kink)
        s, y = nxt - w, grad_nxt - grad
        sy = float(s @ y)
        step = min(max(float(s @ s) / sy, 1e-10), 1e10) if sy > 0 else 1e10
        w, f, grad = nxt, f_nxt, grad_nxt
        recent.append(f)
        if f < best_f:
            best, best_f = w, f
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
        # warm start (G changes little from step to step), pulled towards the uniform point
        start = 0.9 * self._last + 0.1 * mean if self._last is not None and len(self._last) == t else None
        w = self._last = cagrad_weights(gram, self.c, start)
        radius = self.c * np.sqrt(max(gram.mean(), 0.0))
        # relative to the gradients' size: an absolute 1e-8 moved the coefficients once
        # gradients were small (representation gradients shrink with the batch)
        gw_norm = np.sqrt(max(float(w @ gram @ w), 0.0))
        if gw_norm <= _EPS * np.sqrt(max(float(np.abs(np.diag(gram)).max()), 0.0)) or not np.isfinite(gw_norm):
            return mean / (1 + self.c**2)  # g_w ~ 0: the correction has no direction
        return (mean + radius / gw_norm * w) / (1 + self.c**2)

    def get_extra_state(self) -> dict:
        """The warm start of the dual solve, so a resumed run solves from the same point."""
        return {"last": None if self._last is None else self._last.tolist()}

    def set_extra_state(self, state: dict) -> None:
        self._last = None if state.get("last") is None else np.asarray(state["last"], dtype=np.float64)
