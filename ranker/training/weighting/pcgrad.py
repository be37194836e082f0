"""PCGrad (Yu et al., NeurIPS 2020): project away the conflicting component of task gradients.

For each task i, in a fresh random order over the other tasks j: if g_i . g_j < 0, replace g_i
by g_i - (g_i . g_j / |g_j|^2) g_j (always projecting onto the original g_j, as the paper's
code does). The shared gradient is the sum of the projected g_i. Each projected g_i stays a
linear combination of the original gradients, so the whole method runs on the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ranker.config import GradientParams, TaskSpec
from ranker.training.weighting.base import GradientWeighting, seeded_rng


class PCGrad(GradientWeighting):
    def __init__(self, tasks: Sequence[TaskSpec], params: GradientParams | None = None) -> None:
        super().__init__(tasks, params or GradientParams())
        self.rng = seeded_rng()

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = len(gram)
        c = np.eye(t)  # row i: projected g_i as a combination of the original gradients
        for i in range(t):
            for j in self.rng.permutation(t):
                dot = c[i] @ gram[:, j]  # projected g_i . g_j
                if j != i and dot < 0 and gram[j, j] > 0:
                    c[i, j] -= dot / gram[j, j]
        return c.sum(0)

    def get_extra_state(self) -> dict:
        """The private generator's state, so a resumed run draws the same numbers."""
        return {"rng": self.rng.bit_generator.state}

    def set_extra_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
