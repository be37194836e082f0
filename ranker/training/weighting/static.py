"""Static weighting: each task's configured ``weight`` (default 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ranker.config import TaskSpec
from ranker.training.weighting.base import LossWeighting, StepContext


class Static(LossWeighting):
    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.w = {t.name: t.weight for t in tasks}

    def combine(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        total = sum(self.w[t] * loss for t, loss in losses.items())
        return total, {t: self.w[t] for t in losses}  # type: ignore[return-value]
