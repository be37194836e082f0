"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Each task learns s_t = log sigma_t^2. Regression: 0.5 * exp(-s) * L + 0.5 * s (Gaussian
likelihood); classification: exp(-s) * L + 0.5 * s (the paper's approximation for a softmax
likelihood). Noisy tasks raise their s and so lower their own weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ranker.config import TaskSpec
from ranker.training.weighting.base import LossWeighting, StepContext


class Uncertainty(LossWeighting):
    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))
        self.index = {t.name: i for i, t in enumerate(tasks)}
        self.scale = {t.name: (0.5 if t.type == "regression" else 1.0) for t in tasks}

    def combine(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(())
        weights = {}
        for t, loss in losses.items():
            s = self.log_var[self.index[t]]
            w = self.scale[t] * torch.exp(-s)
            # the regulariser is a global term: each rank adds its 1/world share
            total = total + w * loss + 0.5 * s / ctx.ranks.world
            weights[t] = float(w.detach())
        return total, weights
